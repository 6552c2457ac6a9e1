"""Variation-sampled linear forward: fused vs perturb + GEMM vs the reference way vs torch.compile vs clean.

Variants (all produce S outputs [S, M, N] for one input x [M, K] and weight [N, K]):
  fused        nft_cuda.ops.noisy_linear (CUDA: noise generated in the GEMM's weight-tile loads for
               bf16/fp16/TF32; exact fp32 and CPU: perturb into a temporary + ATen GEMM inside the op)
  perturb+GEMM nft_cuda.ops.perturb (S noisy copies) then torch.matmul
  reference    the paper code's way in plain PyTorch, per sample: max|W| read to the host, state-band
               mask, torch.normal on the host copied to the device, add, F.linear
  compiled     torch.compile of the reference composite without the host read (randn_like noise)
  clean        torch.matmul with S clean weights (the same GEMM work, no noise): the floor

Reports median time, TFLOP/s (2·S·M·N·K per call) and the ratio to clean. DESIGN §8 target (GPU):
fused ≥ 1.5× faster than perturb + GEMM at M ≤ 16 with 4096² fp32 weights.

    python -m benchmarks.bench_noisy_linear [--device cpu|cuda] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib

from benchmarks import common  # sets NFT_CUDA_STRICT=1 before nft_cuda is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_cuda  # noqa: E402

CPU_CASES = {"M": (1, 16, 128), "NK": (1024,), "S": (1, 4), "modes": ("fp32",)}
GPU_CASES = {"M": (1, 16, 128, 4096), "NK": (1024, 4096), "S": (1, 4), "modes": ("fp32", "tf32", "bf16")}


def reference_way(x, w, b, v: nft_cuda.Variation, samples: int):
    outs = []
    for _ in range(samples):
        m = w.abs().max().item()  # host read: one synchronisation per layer per forward
        base = v.sigma * m * v.scale
        aw = w.abs()
        mask = (aw > 0.25 * m) & (aw < 0.75 * m)
        std = torch.where(mask, base * v.state_factor, base).cpu()
        noise = torch.normal(torch.zeros_like(std), std).to(w.device)
        outs.append(F.linear(x, w + noise.to(w.dtype), b))
    return torch.stack(outs)


def composite(x, w, b, sigma: float, scale: float, s: float, samples: int):
    m = w.abs().amax()
    base = sigma * m * scale
    aw = w.abs()
    mask = (aw > 0.25 * m) & (aw < 0.75 * m)
    std = torch.where(mask, base * s, base)
    return torch.stack([F.linear(x, w + std * torch.randn_like(w), b) for _ in range(samples)])


@contextlib.contextmanager
def precision(device: str, mode: str):
    if device != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    old = mm.fp32_precision
    mm.fp32_precision = "tf32" if mode == "tf32" else "ieee"
    try:
        yield
    finally:
        mm.fp32_precision = old


def run(device: str, quick: bool, skip_compiled: bool) -> list[dict]:
    dev = torch.device(device)
    cases = GPU_CASES if device == "cuda" else CPU_CASES
    v = nft_cuda.Variation(0.1, "FeFET2")
    min_time = 0.2 if quick else 0.6
    compiled = None if skip_compiled else torch.compile(composite, dynamic=True)
    results, rows = [], []
    for mode in cases["modes"]:
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        for nk in cases["NK"]:
            g = torch.Generator().manual_seed(0)
            w = (torch.randn(nk, nk, generator=g) / nk**0.5).to(dev)  # fp32 master weight
            b = torch.randn(nk, generator=g).to(dev)
            rng = torch.tensor([12345, 0], dtype=torch.int64, device=dev)
            for m in cases["M"]:
                x = torch.randn(m, nk, generator=g).to(dev, dtype)
                bc = b.to(dtype)
                for samples in cases["S"]:
                    with precision(device, mode):
                        w_stack = w.to(dtype).unsqueeze(0).expand(samples, nk, nk).contiguous()

                        def fused():
                            return nft_cuda.ops.noisy_linear(x, w, bc, v, rng=rng, samples=samples)

                        def materialised():
                            wn = nft_cuda.ops.perturb(w, v, rng=rng, samples=samples).to(dtype)
                            return torch.matmul(x, wn.transpose(1, 2)) + bc

                        def clean():
                            return torch.matmul(x, w_stack.transpose(1, 2)) + bc

                        # correctness before timing: both paths draw the same noise
                        got, want = fused().float(), materialised().float()
                        err = ((got - want).norm() / want.norm()).item()
                        if err > (2e-2 if mode == "bf16" else 5e-3):
                            raise AssertionError(f"fused vs perturb+GEMM: relative error {err:.2e} ({mode})")
                        flop = 2.0 * samples * m * nk * nk
                        timings = {
                            "fused": common.time_fn("fused", fused, min_run_time=min_time),
                            "perturb+GEMM": common.time_fn("perturb+GEMM", materialised, min_run_time=min_time),
                            "reference": common.time_fn("reference", lambda: reference_way(x, w.to(dtype), bc, v,
                                                                                          samples),
                                                        min_run_time=min_time),
                            "clean": common.time_fn("clean", clean, min_run_time=min_time),
                        }
                        if compiled is not None:
                            wc = w.to(dtype)
                            timings["compiled"] = common.time_fn(
                                "compiled", lambda: compiled(x, wc, bc, v.sigma, v.scale, v.state_factor, samples),
                                min_run_time=min_time)
                    floor = timings["clean"].median_s
                    case = f"{mode} M={m} N=K={nk} S={samples}"
                    for name, t in timings.items():
                        results.append({"case": case, "variant": name, "device": device, **common.as_dict(t),
                                        "TFLOP/s": flop / t.median_s / 1e12, "vs_clean": t.median_s / floor,
                                        "fused_rel_err": err})
                        rows.append([case, name, common.fmt_ms(t), f"{flop / t.median_s / 1e12:.3f}",
                                     f"{t.median_s / floor:.2f}×"])
    print(f"\nnoisy linear forward on {device} (ratio = time / clean GEMM with the same work)")
    print(common.markdown_table(["case", "variant", "median (min–max)", "TFLOP/s", "vs clean"], rows))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="shorter timing runs")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--json", help="write results as JSON")
    a = p.parse_args(argv)
    env = common.environment()
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    results = run(a.device, a.quick, a.no_compile)
    if a.json:
        common.write_json(a.json, env, results)


if __name__ == "__main__":
    main()
