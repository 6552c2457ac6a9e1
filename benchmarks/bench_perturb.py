"""perturb on a 4M-element weight vs the reference way, torch.compile of it, and a plain copy.

DESIGN §8 targets (CPU, 2 cores): perturb ≤ 4× a copy of the same bytes, ≥ 5× faster than the
reference way, ≥ 1.0× torch.compile of the composite. GPU (H200): ≤ 1.25× copy, ≥ 50× / ≥ 1.5×.

The "reference way" is the paper code's method written in plain PyTorch: max|W| read back to the
host, the state-band mask, torch.normal on the host then copied to the weight's device, add — per
call. "compiled" is torch.compile of that composite without the host read (noise from randn_like).

    python -m benchmarks.bench_perturb [--device cpu|cuda] [--numel N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse

from benchmarks import common  # sets NFT_CUDA_STRICT=1 before nft_cuda is imported

import torch  # noqa: E402

import nft_cuda  # noqa: E402
from nft_cuda import reference  # noqa: E402


def reference_way(w: torch.Tensor, v: nft_cuda.Variation) -> torch.Tensor:
    m = w.abs().max().item()  # host read: one synchronisation per layer per forward
    base = v.sigma * m * v.scale
    aw = w.abs()
    mask = (aw > 0.25 * m) & (aw < 0.75 * m)
    std = torch.where(mask, base * v.state_factor, base).cpu()
    noise = torch.normal(torch.zeros_like(std), std).to(w.device)
    return w + noise


def composite(w: torch.Tensor, sigma: float, scale: float, s: float) -> torch.Tensor:
    m = w.abs().amax()
    base = sigma * m * scale
    aw = w.abs()
    mask = (aw > 0.25 * m) & (aw < 0.75 * m)
    std = torch.where(mask, base * s, base)
    return w + std * torch.randn_like(w)


def _std_ok(out: torch.Tensor, w: torch.Tensor, v: nft_cuda.Variation, name: str) -> None:
    ratio = ((out.float() - w.float()) / v.sigma_w(w)).std().item()
    if abs(ratio - 1.0) > 0.02:
        raise AssertionError(f"{name}: std of (W_noisy - W)/sigma_w is {ratio:.4f}, expected 1")


def run(device: str, numel: int, quick: bool) -> list[dict]:
    dev = torch.device(device)
    v = nft_cuda.Variation(0.1, "FeFET2")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(numel // 1024, 1024, generator=g).to(dev)
    rng = torch.tensor([12345, 0], dtype=torch.int64, device=dev)
    min_time = 0.3 if quick else 1.0
    results = []

    # Correctness before timing: the kernel equals the pure-PyTorch oracle on the same stream.
    for samples in (1, 4):
        sig = torch.full((samples,), v.sigma, device=dev)
        got = nft_cuda.ops.perturb(w, v, rng=rng, samples=samples)
        want = reference.perturb(w, rng, sig, v.scale, v.state_factor)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * v.sigma_w(w).max().item() + 1e-6)
        _std_ok(got[0], w, v, "perturb")
    _std_ok(reference_way(w, v), w, v, "reference way")
    compiled = torch.compile(composite)
    _std_ok(compiled(w, v.sigma, v.scale, v.state_factor), w, v, "compiled")

    copy = common.time_fn("copy", lambda: w.clone(), min_run_time=min_time)
    ref = common.time_fn("reference way", lambda: reference_way(w, v), min_run_time=min_time)
    comp = common.time_fn("torch.compile(composite)", lambda: compiled(w, v.sigma, v.scale, v.state_factor),
                          min_run_time=min_time)
    rows = []
    for samples in (1, 4):
        t = common.time_fn(f"perturb S={samples}", lambda: nft_cuda.ops.perturb(w, v, rng=rng, samples=samples),
                           min_run_time=min_time)
        per_sample = t.median_s / samples
        bytes_moved = w.numel() * w.element_size() * (1 + samples)  # read W once, write S copies
        results.append({
            "case": f"perturb {numel / 2**20:.0f}M fp32 S={samples}", "device": device,
            **common.as_dict(t), "GB/s": bytes_moved / t.median_s / 1e9,
            "vs_copy": per_sample / copy.median_s, "speedup_vs_reference": ref.median_s / per_sample,
            "speedup_vs_compiled": comp.median_s / per_sample,
        })
        rows.append([t.name, common.fmt_ms(t), f"{bytes_moved / t.median_s / 1e9:.1f}",
                     f"{per_sample / copy.median_s:.2f}×", f"{ref.median_s / per_sample:.1f}×",
                     f"{comp.median_s / per_sample:.2f}×"])
    for b in (copy, ref, comp):
        results.append({"case": b.name, "device": device, **common.as_dict(b)})
        rows.append([b.name, common.fmt_ms(b), "", "", "", ""])
    target = "≤ 4× copy, ≥ 5× ref, ≥ 1.0× compiled" if device == "cpu" else "≤ 1.25× copy, ≥ 50× ref, ≥ 1.5× compiled"
    print(f"\nperturb, {numel} elements, {device} (DESIGN §8 target: {target}); per-sample ratios")
    print(common.markdown_table(["variant", "median (min–max)", "GB/s", "time/copy", "speed-up vs ref",
                                 "speed-up vs compiled"], rows))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--numel", type=int, default=4 * 2**20)
    p.add_argument("--quick", action="store_true", help="shorter timing runs")
    p.add_argument("--json", help="write results as JSON")
    a = p.parse_args(argv)
    env = common.environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    results = run(a.device, a.numel, a.quick)
    if a.json:
        common.write_json(a.json, env, results)


if __name__ == "__main__":
    main()
