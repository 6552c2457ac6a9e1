"""Monte-Carlo evaluation (R chip instances) vs R clean passes over the same images, and vs the
reference loop (per instance: re-create the model, reload the checkpoint from disk, host-side noise,
evaluate), on the small model.

DESIGN §8 targets: MC (R = 100) ≤ 1.2× 100 clean passes on CPU (≤ 1.1× on GPU); MC ≥ 3× faster than the
reference loop on CPU (small model, embedded test slice; ≥ 10× on GPU).

Data: the embedded test split (``nft_cuda.data.load_dataset("embedded", split="test")``), first
``--images`` images; random images when it is not available (noted in the output).

    python -m benchmarks.bench_eval [--device cpu|cuda] [--runs 100] [--images 256] [--batch 128]
                                    [--threads N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from benchmarks import common  # sets NFT_CUDA_STRICT=1 before nft_cuda is imported

import torch  # noqa: E402

import nft_cuda  # noqa: E402
from nft_cuda.eval import TensorBatches, monte_carlo  # noqa: E402
from nft_cuda.eval.reference_loop import reference_monte_carlo  # noqa: E402
from nft_cuda.io import save_model  # noqa: E402
from nft_cuda.models import build_model  # noqa: E402


def _data(images: int):
    try:
        from nft_cuda.data import load_dataset

        x, y = load_dataset("embedded", split="test")
        return x[:images], y[:images], "embedded test split"
    except Exception as exc:  # the embedded slice may not be installed yet
        g = torch.Generator().manual_seed(0)
        x = torch.randn(images, 1, 32, 32, generator=g)
        y = torch.randint(0, 10, (images,), generator=g)
        return x, y, f"random images (embedded test split unavailable: {type(exc).__name__})"


def _timed(name: str, fn, repeats: int) -> common.Timing:
    """Median of ``repeats`` timed calls after one warm-up call (each call takes seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return common.Timing(name, times[len(times) // 2], times[0], times[-1], len(times))


def _fmt_s(t: common.Timing) -> str:
    return f"{t.median_s:.2f} s ({t.min_s:.2f}–{t.max_s:.2f})"


def run(device: str, runs: int, images: int, batch: int, repeats: int, passes: tuple[int, ...]) -> list[dict]:
    dev = torch.device(device)
    torch.manual_seed(0)
    variation = nft_cuda.Variation(0.1, "RRAM1")
    model = nft_cuda.convert(build_model("small", in_channels=1, num_classes=10), variation).to(dev).eval()
    x, y, source = _data(images)
    loader = TensorBatches(x.to(dev), y.to(dev), batch)
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 1.0}

    def clean_passes():
        with torch.no_grad(), nft_cuda.noise_mode(model, "off"):
            for _ in range(runs):
                for xb, yb in loader:
                    (model(xb).argmax(-1) == yb).sum()

    results, rows = [], []
    clean = _timed(f"{runs} clean passes", clean_passes, repeats)
    mcs = {s: _timed(f"monte_carlo R={runs}, {s} instances/pass",
                     lambda s=s: monte_carlo(model, loader, variation, runs, seed=0, instances_per_pass=s,
                                             progress=False), repeats)
           for s in passes}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "small.pt")
        save_model(path, model, spec=spec, variation=variation, meta={"dataset": "embedded"})
        ref = _timed(f"reference loop R={runs}",
                     lambda: reference_monte_carlo(path, loader, variation, runs, seed=0, device=dev), repeats)

    is_cpu = dev.type == "cpu"
    t_clean, t_ref = ("≤ 1.2×", "≥ 3×") if is_cpu else ("≤ 1.1×", "≥ 10×")
    for s, t in mcs.items():
        vs_clean = t.median_s / clean.median_s
        speedup = ref.median_s / t.median_s
        rows.append([t.name, _fmt_s(t), f"{vs_clean:.2f}× (target {t_clean})", f"{speedup:.2f}× (target {t_ref})"])
        results.append({"case": t.name, "device": device, **common.as_dict(t), "vs_clean": vs_clean,
                        "speedup_vs_reference": speedup})
    for t in (clean, ref):
        rows.append([t.name, _fmt_s(t), "", ""])
        results.append({"case": t.name, "device": device, **common.as_dict(t)})
    print(f"\nMonte-Carlo evaluation, small model, {images} images ({source}), batch {batch}, R = {runs}, "
          f"{device}, {torch.get_num_threads()} thread(s)")
    print(common.markdown_table(["variant", "median (min–max)", "time / clean passes", "speed-up vs reference"],
                                rows))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--passes", default="1,8", help="instances_per_pass values, comma-separated")
    p.add_argument("--quick", action="store_true", help="one timed repeat instead of three")
    p.add_argument("--json", help="write results as JSON")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    env = common.environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    results = run(a.device, a.runs, a.images, a.batch, 1 if a.quick else 3,
                  tuple(int(s) for s in a.passes.split(",")))
    if a.json:
        common.write_json(a.json, env, results)


if __name__ == "__main__":
    main()
