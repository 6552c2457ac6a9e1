"""Measured time of the fused CUDA GEMM cases of docs/kernels.md against their H200 roofline prediction.

The cases and the prediction model are tests/emulator.py's (the emulator itself is not built here); the
prediction assumes no split reduction (the GPU's own choice may add a few µs of partial traffic). Run on
a GPU (benchmarks/gpu_check.sh does):  python benchmarks/kernel_roofline.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import emulator as model  # noqa: E402

import nft_cuda  # noqa: E402,F401  (registers the ops)


def time_op(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here as well")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_roofline: needs a CUDA device")
    ops = torch.ops.nft_cuda
    rows = []
    print("| case | measured µs | predicted µs (bound) | measured / predicted |\n|---|---|---|---|")
    for label, op, mode, m, n, k, samples, shared in model.REPORT_CASES:
        a, w, pool, rows_m, red_k = model._case_tensors(op, mode, m, n, k, samples, shared)
        a, w = a.cuda(), w.cuda()
        sig = torch.full((samples,), 0.1, device="cuda")
        rng = torch.tensor([1, 2], dtype=torch.int64, device="cuda")
        tf32 = op == "tf32"
        if mode == "forward":

            def fn():
                return ops.noisy_linear(a, w, None, rng, sig, 0.7, 2.0, shared, tf32)
        elif mode == "backward":

            def fn():
                return ops._noisy_linear_backward_input(a, w, rng, sig, 0.7, 2.0, shared, tf32)
        else:

            def fn():
                return ops.snapshot_linear(a, pool, w, None, rng, sig, 0.7, 2.0, shared, tf32)

        out = fn()
        measured = time_op(fn)
        p = model.predict(op, mode, a, w.numel(), out, rows_m, n, red_k, samples, shared, 1)
        name = model.case_label(label, op, mode, m, n, k, samples)
        rows.append(dict(case=name, measured_us=measured * 1e6, predicted_us=p["t"] * 1e6, bound=p["bound"]))
        print(f"| {name} | {measured * 1e6:.1f} | {p['t'] * 1e6:.1f} ({p['bound']}) | {measured / p['t']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
