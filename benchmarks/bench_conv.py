"""NoisyConv2d forward+backward on the VGG-8 layer shapes (3×3, padding 1, no bias; CIFAR 32×32 input).

Variants: NoisyConv2d (train mode: perturb into a temporary + ATen/cuDNN convolution, noise regenerated
in backward), the clean nn.Conv2d (the floor), the reference way (per forward max|W| read to the host,
mask, host torch.normal copied to the device, add, F.conv2d) and torch.compile of its composite (full
runs only), and the peer aihwkit-lightning's AnalogConv2d (benchmarks/peer.py; its Triton path too on
CUDA; skipped with the reason when not installed). Noise: RRAM1 at σ_d = 0.1 (config.LAYER_VARIATION).
Batch 32 on CPU, 128 on GPU. Quick runs on CPU time block5 only (256 → 512 at 8×8). DESIGN §8: ≥ 1.0× the
peer; vs clean, the VGG-8 noise-injection step (≤ 1.10× clean) covers it.

Checked before timing: the layer's output and gradients are those of W_noisy = perturb(W, rng) for the
rng it drew (dW straight-through), every noisy variant moves the clean output by the same amount, and the
peer injects the same noise where nft_cuda does (checks.check_same_job).

    python -m benchmarks.bench_conv [--device cpu|cuda] [--quick] [--no-compile] [--json PATH]
"""

from __future__ import annotations

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_cuda  # noqa: E402
from benchmarks import baselines, checks, config, peer, results, runner  # benchmarks sets NFT_CUDA_STRICT=1 first
from nft_cuda import _args  # noqa: E402

#: VGG-8's convolutions: block → (in channels, out channels, input height = width).
VGG8_CONVS = {
    "block1": (3, 64, 32),
    "block2": (64, 128, 32),
    "block3": (128, 256, 16),
    "block4": (256, 256, 16),
    "block5": (256, 512, 8),
    "block6": (512, 512, 8),
}


def conv_shapes(cfg: config.Config) -> list[str]:
    if cfg.quick and not cfg.cuda:
        return ["block5"]
    return list(VGG8_CONVS)


def conv_case(cfg: config.Config, ceilings: dict | None = None) -> list[results.Row]:
    dev, v = cfg.dev, config.LAYER_VARIATION
    batch = 128 if cfg.cuda else 32
    c = results.Case(cfg, ceilings)
    for block in conv_shapes(cfg):
        cin, cout, hw = VGG8_CONVS[block]
        name = f"NoisyConv2d fwd+bwd VGG-8 {block} {cin}→{cout} {hw}×{hw} batch {batch}"
        torch.manual_seed(0)
        noisy = nft_cuda.NoisyConv2d(cin, cout, 3, padding=1, bias=False, variation=v, device=dev)
        clean = nn.Conv2d(cin, cout, 3, padding=1, bias=False, device=dev)
        clean.load_state_dict(noisy.state_dict())
        w = clean.weight
        x = torch.randn(batch, cin, hw, hw, device=dev, requires_grad=True)
        gy = torch.randn(batch, cout, hw, hw, device=dev)

        compiled = comp_out = None
        if cfg.compile_layers:  # one fresh compile per shape, in grad mode as timed (no recompiles)
            compiled = baselines.compile_fresh(baselines.composite_conv2d)
            comp_out = compiled(x, w, None, v.sigma, v.scale, v.state_factor).detach()
        noisy.generator = torch.Generator(device=dev).manual_seed(7)
        y = noisy(x)
        gx, gw = torch.autograd.grad(y, (x, noisy.weight), gy)
        noisy.generator = None
        rng = _args.random_rng(dev, torch.Generator(device=dev).manual_seed(7))
        w_noisy = nft_cuda.ops.perturb(w.detach(), v, rng=rng)[0]
        tol = checks.gemm_tol(cfg)
        with torch.no_grad():
            checks.check_rel_err(y, F.conv2d(x, w_noisy, padding=1), f"{name}: output vs conv(x, perturb(W))", tol)
            checks.check_rel_err(gx, torch.nn.grad.conv2d_input(x.shape, w_noisy, gy, padding=1), f"{name}: dx", tol)
            checks.check_rel_err(
                gw, torch.nn.grad.conv2d_weight(x, w.shape, gy, padding=1), f"{name}: dW (straight-through)", tol
            )
            outs = {"noisy": y, "reference": baselines.reference_conv2d(x, w, None, v)}
            if compiled is not None:
                outs["compiled"] = comp_out
            checks.check_deviation(outs, clean(x), name)

        fns = {
            "NoisyConv2d": lambda: torch.autograd.grad(noisy(x), (x, noisy.weight), gy),
            "clean": lambda: torch.autograd.grad(clean(x), (x, w), gy),
            "reference": lambda: torch.autograd.grad(baselines.reference_conv2d(x, w, None, v), (x, w), gy),
        }
        if compiled is not None:
            fns["compiled"] = lambda: torch.autograd.grad(
                compiled(x, w, None, v.sigma, v.scale, v.state_factor), (x, w), gy
            )
        peers = peer.layer_variants(
            cfg, name, noisy, clean, v, lambda layer: lambda: torch.autograd.grad(layer(x), (x, layer.weight), gy)
        )
        fns.update(peers.items)
        rows = c.time(name, fns, work=6.0 * batch * cout * cin * 9 * hw * hw, unit=cfg.flop_unit, ceiling="GEMM fp32")
        c.compare_layer(rows, "NoisyConv2d")
        peer.finish(c, rows, name, "NoisyConv2d", peers, "layer_vs_peer")
    return c.rows


CASES = {"conv": conv_case}


def main(argv=None) -> None:
    runner.cli_main(__doc__, CASES, argv)


if __name__ == "__main__":
    main()
