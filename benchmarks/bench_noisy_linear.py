"""Noisy linear layers: NoisyLinear forward+backward, and the fused variation-sampled matmul at small M.

Case "linear" — NoisyLinear forward+backward (dx, dW, db) vs
  clean      nn.Linear with the same weights (the floor)
  reference  the reference way: per forward max|W| read to the host, mask, torch.normal on the host
             copied to the device, add, F.linear (autograd through W + constant noise)
  compiled   torch.compile of that composite without the host read (full runs only)
  aihwkit-lightning  the peer's AnalogLinear with the same noise (benchmarks/peer.py; checked first with
             checks.check_same_job; its Triton path too on CUDA; skipped with the reason when not installed)
Noise: RRAM1 at σ_d = 0.1 (config.LAYER_VARIATION, the law the peer can match). Shapes: batch 128 with
N = K = 1024 and 4096 (4096 only in full runs on CPU), and the DESIGN §8 target shapes: 1024² at batch
2048 on CPU (≤ 1.15× clean); 4096² at M = 4096 on GPU (≤ 1.10×). DESIGN §8: ≥ 1.0× the peer.

Case "fused" — ``nft_cuda.ops.noisy_linear`` forward at M ∈ {1, 16} vs perturb + GEMM and a clean GEMM
of the same work. DESIGN §8 (GPU): fused ≥ 1.5× faster than perturb + GEMM at M ≤ 16 with 4096² fp32
weights (TF32 and bf16 inputs). On CPU the op materialises (perturb + ATen GEMM) by design: no target.

Case "snapshot" — ``nft_cuda.ops.snapshot_linear`` (IRS heads 1 and 3 of VGG-8/CIFAR: 64×32×32 pooled
to 6×6, 256×8×8 to 3×3, → 512) vs adaptive_avg_pool2d + noisy_linear and vs pool + a clean GEMM. On CUDA
(TF32, bf16) the pooling runs in the fused GEMM's A-tile loader; on CPU both paths pool with ATen first.

``--sweep``: the broader forward sweep (M, N = K, S, fp32/TF32/bf16) of fused vs perturb + GEMM vs the
reference way vs compiled vs clean.

    python -m benchmarks.bench_noisy_linear [--device cpu|cuda] [--quick] [--only linear,fused,snapshot]
                                            [--no-compile] [--sweep] [--json PATH]
"""

from __future__ import annotations

import functools

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_cuda  # noqa: E402
from benchmarks import baselines, checks, config, peer, results, runner  # benchmarks sets NFT_CUDA_STRICT=1 first
from nft_cuda import _args  # noqa: E402


def _fwd_bwd(forward, inputs, grad):
    """One forward + backward of ``forward()`` w.r.t. ``inputs`` (no .grad accumulation)."""
    return torch.autograd.grad(forward(), inputs, grad)


def linear_shapes(cfg: config.Config) -> list[tuple[int, int, bool]]:
    """(batch M, N = K, is the DESIGN §8 target shape)."""
    if cfg.cuda:
        extra = [] if cfg.quick else [(8192, 4096, True)]
        return [(128, 1024, False), (128, 4096, False), (4096, 4096, True)] + extra
    return [(128, 1024, False)] + ([] if cfg.quick else [(128, 4096, False)]) + [(2048, 1024, True)]


def linear_case(cfg: config.Config, ceilings: dict | None = None) -> list[results.Row]:
    dev, v = cfg.dev, config.LAYER_VARIATION
    c = results.Case(cfg, ceilings)
    for m, nk, target in linear_shapes(cfg):
        name = f"NoisyLinear fwd+bwd {nk}² batch {m}"
        torch.manual_seed(0)
        noisy = nft_cuda.NoisyLinear(nk, nk, variation=v, device=dev)
        clean = nn.Linear(nk, nk, device=dev)
        clean.load_state_dict(noisy.state_dict())
        w, b = clean.weight, clean.bias
        x = torch.randn(m, nk, device=dev, requires_grad=True)
        gy = torch.randn(m, nk, device=dev)

        # Correctness: the layer's output and gradients are those of W_noisy = perturb(W, rng) for the
        # rng it drew (straight-through weight gradient), and every noisy variant deviates from the
        # clean output by the same relative amount.
        compiled = comp_out = None
        if cfg.compile_layers:  # one fresh compile per shape, in grad mode as timed (no recompiles)
            compiled = baselines.compile_fresh(baselines.composite_linear)
            comp_out = compiled(x, w, b, v.sigma, v.scale, v.state_factor).detach()
        noisy.generator = torch.Generator(device=dev).manual_seed(7)
        y = noisy(x)
        gx, gw, gb = torch.autograd.grad(y, (x, noisy.weight, noisy.bias), gy)
        noisy.generator = None
        rng = _args.random_rng(dev, torch.Generator(device=dev).manual_seed(7))
        w_noisy = nft_cuda.ops.perturb(w.detach(), v, rng=rng)[0]
        tol = checks.gemm_tol(cfg)
        with torch.no_grad():
            checks.check_rel_err(y, F.linear(x, w_noisy, b), f"{name}: output vs F.linear(x, perturb(W))", tol)
            checks.check_rel_err(gx, gy @ w_noisy, f"{name}: dx", tol)
            checks.check_rel_err(gw, gy.t() @ x, f"{name}: dW (straight-through)", tol)
            checks.check_rel_err(gb, gy.sum(0), f"{name}: db", tol)
            outs = {"noisy": y, "reference": baselines.reference_linear(x, w, b, v)}
            if compiled is not None:
                outs["compiled"] = comp_out
            checks.check_deviation(outs, clean(x), name)

        fns = {
            "NoisyLinear": lambda: _fwd_bwd(lambda: noisy(x), (x, noisy.weight, noisy.bias), gy),
            "clean": lambda: _fwd_bwd(lambda: clean(x), (x, w, b), gy),
            "reference": lambda: _fwd_bwd(lambda: baselines.reference_linear(x, w, b, v), (x, w, b), gy),
        }
        if compiled is not None:
            fns["compiled"] = lambda: _fwd_bwd(
                lambda: compiled(x, w, b, v.sigma, v.scale, v.state_factor), (x, w, b), gy
            )
        peers = peer.layer_variants(
            cfg,
            name,
            noisy,
            clean,
            v,
            lambda layer: lambda: _fwd_bwd(lambda: layer(x), (x, layer.weight, layer.bias), gy),
        )
        fns.update(peers.items)
        rows = c.time(name, fns, work=6.0 * m * nk * nk, unit=cfg.flop_unit, ceiling="GEMM fp32")
        c.compare_layer(rows, "NoisyLinear", "linear_vs_clean" if target else None)
        peer.finish(c, rows, name, "NoisyLinear", peers, "layer_vs_peer")
    return c.rows


def fused_shapes(cfg: config.Config) -> list[tuple[str, int, int, int]]:
    """(mode, M, N = K, S)."""
    if cfg.cuda:
        out = [(mode, m, 4096, 1) for mode in ("tf32", "bf16") for m in (1, 16)]
        if not cfg.quick:
            out += [(mode, m, 4096, 4) for mode in ("tf32", "bf16") for m in (1, 16)]
            out += [("bf16", m, 1024, 1) for m in (1, 16)]
        return out
    return [("fp32", m, nk, 1) for nk in ((1024,) if cfg.quick else (1024, 4096)) for m in (1, 16)]


def fused_case(cfg: config.Config, ceilings: dict | None = None) -> list[results.Row]:
    dev, v = cfg.dev, config.VARIATION
    c = results.Case(cfg, ceilings)
    for mode, m, nk, samples in fused_shapes(cfg):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        name = f"noisy_linear fwd {mode} M={m} {nk}² S={samples}"
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(nk, nk, generator=g) / nk**0.5).to(dev)  # fp32 weight, as DESIGN §8 names
        b = torch.randn(nk, generator=g).to(dev, dtype)
        x = torch.randn(m, nk, generator=g).to(dev, dtype)
        rng = torch.tensor([12345, 0], dtype=torch.int64, device=dev)
        with config.matmul_precision(cfg.device, mode):
            w_stack = w.to(dtype).unsqueeze(0).expand(samples, nk, nk).contiguous()

            def fused():
                return nft_cuda.ops.noisy_linear(x, w, b, v, rng=rng, samples=samples)

            def materialised():
                wn = nft_cuda.ops.perturb(w, v, rng=rng, samples=samples).to(dtype)
                return torch.matmul(x, wn.transpose(1, 2)) + b

            def clean():
                return torch.matmul(x, w_stack.transpose(1, 2)) + b

            # Correctness before timing: both paths draw the same noise (only GEMM rounding differs).
            checks.check_rel_err(
                fused(), materialised(), f"{name}: fused vs perturb+GEMM", 2e-2 if mode == "bf16" else 5e-3
            )
            r = c.time(
                name,
                {"noisy_linear": fused, "perturb+GEMM": materialised, "clean GEMM": clean},
                work=2.0 * samples * m * nk * nk,
                unit=cfg.flop_unit,
                ceiling="GEMM bf16" if mode == "bf16" else "GEMM fp32",
            )
            r_fused, r_mat, r_clean = r["noisy_linear"], r["perturb+GEMM"], r["clean GEMM"]
        target = "fused_vs_materialised" if (nk == 4096 and m <= 16) else None
        c.compare(r_fused, r_mat, "speedup", target)
        c.compare(r_fused, r_clean, "time")
        c.compare(r_mat, r_clean, "time")
    return c.rows


# ---- IRS snapshot capture (DESIGN §4.3) -------------------------------------------------------------


def snapshot_shapes(cfg: config.Config) -> list[tuple[str, int, int, int, int, int]]:
    """(mode, batch, C, H = W, pool, N): the VGG-8/CIFAR IRS heads (paper-facts §3), head 1 and head 3."""
    heads = [(64, 32, 6, 512), (256, 8, 3, 512)]
    if cfg.cuda:
        return [(mode, 128, c, hw, p, n) for mode in ("tf32", "bf16") for c, hw, p, n in heads]
    return [("fp32", 16 if cfg.quick else 128, c, hw, p, n) for c, hw, p, n in heads[: 1 if cfg.quick else 2]]


def snapshot_case(cfg: config.Config, ceilings: dict | None = None) -> list[results.Row]:
    dev, v = cfg.dev, config.VARIATION
    c = results.Case(cfg, ceilings)
    for mode, batch, ch, hw, pool, n in snapshot_shapes(cfg):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        k = ch * pool * pool
        name = f"snapshot_linear fwd {mode} B={batch} {ch}x{hw}x{hw} pool {pool} → {n}"
        g = torch.Generator().manual_seed(0)
        act = torch.randn(batch, ch, hw, hw, generator=g).to(dev, dtype)
        w = (torch.randn(n, k, generator=g) / k**0.5).to(dev)
        b = torch.randn(n, generator=g).to(dev, dtype)
        rng = torch.tensor([12345, 0], dtype=torch.int64, device=dev)
        with config.matmul_precision(cfg.device, mode):
            wc = w.to(dtype)

            def fused():
                return nft_cuda.ops.snapshot_linear(act, pool, w, b, v, rng=rng)

            def two_step():
                snap = torch.flatten(F.adaptive_avg_pool2d(act, pool), 1)
                return nft_cuda.ops.noisy_linear(snap, w, b, v, rng=rng)

            def clean():
                return F.linear(torch.flatten(F.adaptive_avg_pool2d(act, pool), 1), wc, b)

            checks.check_rel_err(
                fused(), two_step(), f"{name}: fused vs pool + noisy_linear", 2e-2 if mode == "bf16" else 5e-3
            )
            r = c.time(
                name,
                {"snapshot_linear": fused, "pool+noisy_linear": two_step, "pool+clean GEMM": clean},
                work=2.0 * batch * k * n,
                unit=cfg.flop_unit,
                ceiling="GEMM bf16" if mode == "bf16" else "GEMM fp32",
            )
        c.compare(r["snapshot_linear"], r["pool+noisy_linear"], "speedup")
        c.compare(r["snapshot_linear"], r["pool+clean GEMM"], "time")
    return c.rows


# ---- the broad forward sweep (--sweep) --------------------------------------------------------------

SWEEP_CPU = {"M": (1, 16, 128), "NK": (1024,), "S": (1, 4), "modes": ("fp32",)}
SWEEP_GPU = {"M": (1, 16, 128, 4096), "NK": (1024, 4096), "S": (1, 4), "modes": ("fp32", "tf32", "bf16")}


def reference_way(x, w, b, v: nft_cuda.Variation, samples: int):
    """S samples of the reference way's forward (one host read + host draw per sample)."""
    return torch.stack([baselines.reference_linear(x, w, b, v) for _ in range(samples)])


def composite(x, w, b, sigma: float, scale: float, s: float, samples: int):
    return torch.stack([baselines.composite_linear(x, w, b, sigma, scale, s) for _ in range(samples)])


def sweep_case(cfg: config.Config, ceilings: dict | None = None) -> list[results.Row]:
    dev, v = cfg.dev, config.VARIATION
    cases = SWEEP_GPU if cfg.cuda else SWEEP_CPU
    c = results.Case(cfg, ceilings)
    for mode in cases["modes"]:
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        for nk in cases["NK"]:
            compiled = None
            if cfg.compile:
                baselines.compile_fresh(composite)  # clears dynamo's caches between (mode, N = K) groups
                compiled = torch.compile(composite, dynamic=True)
            g = torch.Generator().manual_seed(0)
            w = (torch.randn(nk, nk, generator=g) / nk**0.5).to(dev)
            b = torch.randn(nk, generator=g).to(dev, dtype)
            rng = torch.tensor([12345, 0], dtype=torch.int64, device=dev)
            for m in cases["M"]:
                x = torch.randn(m, nk, generator=g).to(dev, dtype)
                for samples in cases["S"]:
                    name = f"fwd sweep {mode} M={m} {nk}² S={samples}"
                    with config.matmul_precision(cfg.device, mode):
                        wc = w.to(dtype)
                        w_stack = wc.unsqueeze(0).expand(samples, nk, nk).contiguous()
                        fns = {
                            "noisy_linear": lambda: nft_cuda.ops.noisy_linear(x, w, b, v, rng=rng, samples=samples),
                            "perturb+GEMM": lambda: (
                                torch.matmul(
                                    x, nft_cuda.ops.perturb(w, v, rng=rng, samples=samples).to(dtype).transpose(1, 2)
                                )
                                + b
                            ),
                            "reference": functools.partial(reference_way, x, wc, b, v, samples),
                            "clean": lambda: torch.matmul(x, w_stack.transpose(1, 2)) + b,
                        }
                        if compiled is not None:
                            fns["compiled"] = functools.partial(
                                compiled, x, wc, b, v.sigma, v.scale, v.state_factor, samples
                            )
                        checks.check_rel_err(
                            fns["noisy_linear"](),
                            fns["perturb+GEMM"](),
                            f"{name}: fused vs perturb+GEMM",
                            2e-2 if mode == "bf16" else 5e-3,
                        )
                        rows = c.time(
                            name,
                            fns,
                            work=2.0 * samples * m * nk * nk,
                            unit=cfg.flop_unit,
                            ceiling="GEMM bf16" if mode == "bf16" else "GEMM fp32",
                        )
                    for k, r in rows.items():
                        if k != "clean":
                            c.compare(r, rows["clean"], "time")
    return c.rows


CASES = {"linear": linear_case, "fused": fused_case, "snapshot": snapshot_case}


def main(argv=None) -> None:
    runner.cli_main(
        __doc__,
        lambda a: {"sweep": sweep_case} if a.sweep else CASES,
        argv,
        extra_args=lambda p: p.add_argument(
            "--sweep", action="store_true", help="the broad forward sweep instead of the cases"
        ),
    )


if __name__ == "__main__":
    main()
