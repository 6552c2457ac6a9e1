"""Where the time goes: torch.profiler over a few calls of the suite's noisy variants, top operators by
self time. Evidence for the DESIGN §8 rows (e.g. how much of a noise-injection step is nft_cuda::perturb).

    python -m benchmarks.profile_ops [--device cpu|cuda] [--only perturb,linear,train,ovf,eval] [--rows 12]
                                     [--width 1.0] [--calls 3]
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--only", help="comma-separated: perturb, linear, train, ovf, eval")
    p.add_argument("--rows", type=int, default=12, help="operators shown per target")
    p.add_argument("--width", type=float, default=1.0, help="VGG-8 width multiplier")
    p.add_argument("--calls", type=int, default=3, help="profiled calls per target (after one warm-up)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    print(environment.env_line(environment.environment()))
    targets = _targets(dev, a.width)
    names = list(targets) if not a.only else config.parse_only(a.only, targets)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    for name in names:
        label, fn = targets[name]
        fn()
        timing.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(a.calls):
                fn()
            timing.synchronize()
        print(f"\n### {label} ({a.calls} calls)\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=a.rows))


if __name__ == "__main__":
    main()
