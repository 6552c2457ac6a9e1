"""Where the time goes: torch.profiler over a few calls of the suite's noisy variants, top operators by
self time. Evidence for the DESIGN §8 rows (e.g. how much of a noise-injection step is nft_cuda::perturb).

The transformer targets (bert, gpt2, vit: the models of benchmarks/bench_transformer.py) profile the
noise-injection step and the clean step alike and print, per operator, what the noise step adds per step
(self time and calls): where its time over the clean step goes.

    python -m benchmarks.profile_ops [--device cpu|cuda] [--only perturb,linear,train,ovf,eval,bert,gpt2,vit]
                                     [--rows 12] [--width 1.0] [--calls 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import nft_cuda  # noqa: E402
from benchmarks import config, environment, timing  # benchmarks sets NFT_CUDA_STRICT=1 first
from nft_cuda.eval import TensorBatches, monte_carlo  # noqa: E402
from nft_cuda.models import build_model  # noqa: E402
from nft_cuda.train import build_method  # noqa: E402


def _targets(dev: torch.device, width: float) -> dict:
    v = config.VARIATION
    batch = 128 if dev.type == "cuda" else 32
    out = {}

    w = torch.randn(4096, 1024, device=dev)
    out["perturb"] = ("perturb 4M S=1", lambda: nft_cuda.ops.perturb(w, v, seed=1))

    lin = nft_cuda.NoisyLinear(1024, 1024, variation=v, device=dev)
    x = torch.randn(2048, 1024, device=dev, requires_grad=True)
    gy = torch.randn(2048, 1024, device=dev)
    out["linear"] = (
        "NoisyLinear fwd+bwd 1024² batch 2048",
        lambda: torch.autograd.grad(lin(x), (x, lin.weight, lin.bias), gy),
    )

    torch.manual_seed(0)
    base = build_model("vgg8", in_channels=3, num_classes=10, width=width).to(dev)
    xb = torch.randn(batch, 3, 32, 32, device=dev)
    yb = torch.randint(0, 10, (batch,), device=dev)
    for key, method in (("train", "noise"), ("ovf", "ovf")):
        m = build_method(method, v, model_name="vgg8", dataset="cifar10")
        model = m.prepare(copy.deepcopy(base))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            m.loss(model, xb, yb)[0].backward()
            opt.step()

        out[key] = (f"VGG-8 {method} step batch {batch} width {width:g}", step)

    small = nft_cuda.convert(build_model("small", in_channels=1, num_classes=10), v).to(dev).eval()
    xs = torch.randn(512, 1, 32, 32, device=dev)
    ys = torch.randint(0, 10, (512,), device=dev)
    loader = TensorBatches(xs, ys, 128)
    out["eval"] = ("monte_carlo R=16 512 images", lambda: monte_carlo(small, loader, v, 16, seed=0, progress=False))
    return out


#: The transformer targets: name → the model's key in bench_transformer.BUILDERS.
TRANSFORMERS = {"bert": "BERT", "gpt2": "GPT-2", "vit": "ViT"}


def _transformer_target(name: str, dev: torch.device):
    """(label, noise step, clean step) of one bench_transformer model in its full configuration."""
    from benchmarks import bench_transformer

    torch.manual_seed(0)
    w = bench_transformer.BUILDERS[TRANSFORMERS[name]](False, dev)
    noisy = nft_cuda.convert(copy.deepcopy(w.model.train()), config.LAYER_VARIATION)
    noise = bench_transformer.train_step(noisy, w.loss, w.x, w.y, f"{w.label} noise")
    clean = bench_transformer.train_step(w.model, w.loss, w.x, w.y, f"{w.label} clean")
    return w.label, noise, clean


def _profiled(fn, calls: int, activities):
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        timing.synchronize()
    return prof


def _self_us(profs: list, cuda: bool) -> dict:
    """Operator → (calls per step, self µs per step) over ``profs``, one profiled step each."""
    out: dict = {}
    for prof in profs:
        for e in prof.key_averages():
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            calls, total = out.get(e.key, (0.0, 0.0))
            out[e.key] = (calls + e.count / len(profs), total + us / len(profs))
    return out


def interleaved_profiles(noise, clean, calls: int, activities) -> tuple[list, list]:
    """``calls`` profiled steps of each, alternating noise and clean step by step (as the benchmark's
    timing interleaves them), so a change of the machine's load hits both alike."""
    noise(), clean()
    timing.synchronize()
    out: tuple[list, list] = ([], [])
    for _ in range(calls):
        for fn, profs in ((noise, out[0]), (clean, out[1])):
            profs.append(_profiled(fn, 1, activities))
    return out


def added_table(noise_profs: list, clean_profs: list, rows: int, cuda: bool = False) -> str:
    """What the noise step adds over the clean step, per operator (self time and calls per step; medians
    would hide rare operators, so means over the profiled steps), largest first, and the totals."""
    noise, clean = _self_us(noise_profs, cuda), _self_us(clean_profs, cuda)
    diff = {k: noise.get(k, (0, 0.0))[1] - clean.get(k, (0, 0.0))[1] for k in noise.keys() | clean.keys()}
    lines = [
        "| operator | calls/step clean → noise | self ms/step clean → noise | added ms/step |",
        "|---|---|---|---|",
    ]
    for k in sorted(diff, key=lambda k: -abs(diff[k]))[:rows]:
        (cc, ct), (nc, nt) = clean.get(k, (0, 0.0)), noise.get(k, (0, 0.0))
        lines.append(f"| {k[:60]} | {cc:g} → {nc:g} | {ct / 1e3:.2f} → {nt / 1e3:.2f} | {diff[k] / 1e3:+.2f} |")
    ct, nt = sum(t for _, t in clean.values()), sum(t for _, t in noise.values())
    lines.append(f"| **all operators** | | {ct / 1e3:.2f} → {nt / 1e3:.2f} | {(nt - ct) / 1e3:+.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--only", help="comma-separated: perturb, linear, train, ovf, eval, bert, gpt2, vit")
    p.add_argument("--rows", type=int, default=12, help="operators shown per target")
    p.add_argument("--width", type=float, default=1.0, help="VGG-8 width multiplier")
    p.add_argument("--calls", type=int, default=3, help="profiled calls per target (after one warm-up)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    print(environment.env_line(environment.environment()))
    known = ["perturb", "linear", "train", "ovf", "eval", *TRANSFORMERS]
    names = known if not a.only else config.parse_only(a.only, dict.fromkeys(known))
    targets = _targets(dev, a.width) if set(names) - set(TRANSFORMERS) else {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    for name in names:
        if name in TRANSFORMERS:
            label, noise, clean = _transformer_target(name, dev)
            noise_profs, clean_profs = interleaved_profiles(noise, clean, a.calls, activities)
            print(f"\n### {label}: what the noise step adds over the clean step ({a.calls} steps each)\n")
            print(added_table(noise_profs, clean_profs, a.rows, dev.type == "cuda"))
            continue
        label, fn = targets[name]
        fn()
        timing.synchronize()
        prof = _profiled(fn, a.calls, activities)
        print(f"\n### {label} ({a.calls} calls)\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=a.rows))


if __name__ == "__main__":
    main()
