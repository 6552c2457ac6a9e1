"""Measured time of the CUDA kernels against their roofline predictions, timed by CUDA-graph replays.

Three tables (benchmarks/gpu_check.sh runs this first among the timings, since it is the most valuable):

1. the fused GEMM cases of docs/kernels.md (tests/emulator.py's REPORT_CASES and prediction model): measured
   vs predicted µs;
2. the DESIGN §8 shape (M = 16, 4096², fp32 weights, bf16 activations) and an M sweep, each fused call beside
   its twin perturb → cast → matmul on the same noise: the sweep's crossover is the fused routing threshold;
3. the memory-bound kernels (perturb, perturb_device, philox normals) against the copy bandwidth measured
   in the same run (a clone of the same bytes).

Why graphs: one op call at these shapes takes 5–50 µs, the same order as the host's launch overhead, so
back-to-back eager calls time the host. A graph of ``inner`` calls replayed ``replays`` times times the
kernels alone. ``--device cpu`` runs every row with wall-clock timing on small shapes (no prediction
check): a smoke test of this script on a machine without a GPU.

    python benchmarks/kernel_roofline.py [--json out.json] [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import emulator as model  # noqa: E402

import nft_cuda  # noqa: E402
from nft_cuda import ops  # noqa: E402

VARIATION = nft_cuda.Variation(0.1, "FeFET2")
M_SWEEP = (1, 4, 16, 64, 256, 1024, 4096)


def graph_time(fn, device: str, inner: int = 10, replays: int = 20) -> float:
    """Median seconds per call of ``fn``: CUDA-graph replays on CUDA, wall clock on CPU."""
    for _ in range(3):
        fn()
    if device != "cuda":
        times = []
        for _ in range(max(3, replays // 4)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for _ in range(inner):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(times)


def fused_cases(device: str) -> list[dict]:
    """Table 1: each REPORT_CASES row, measured vs the emulator's prediction (CUDA only)."""
    raw = torch.ops.nft_cuda
    rows = []
    for label, op, mode, m, n, k, samples, shared in model.REPORT_CASES:
        a, w, pool, rows_m, red_k = model._case_tensors(op, mode, m, n, k, samples, shared)
        a, w = a.to(device), w.to(device)
        sig = torch.full((samples,), 0.1, device=device)
        rng = torch.tensor([1, 2], dtype=torch.int64, device=device)
        tf32 = op == "tf32"
        if mode == "forward":

            def fn():
                return raw.noisy_linear(a, w, None, rng, sig, 0.7, 2.0, shared, tf32)
        elif mode == "backward":

            def fn():
                return raw._noisy_linear_backward_input(a, w, rng, sig, 0.7, 2.0, shared, tf32)
        else:

            def fn():
                return raw.snapshot_linear(a, pool, w, None, rng, sig, 0.7, 2.0, shared, tf32)

        measured = graph_time(fn, device)
        p = model.predict(op, mode, a, w.numel(), fn(), rows_m, n, red_k, samples, shared, 1)
        rows.append(
            dict(
                table="fused",
                case=model.case_label(label, op, mode, m, n, k, samples),
                measured_us=measured * 1e6,
                predicted_us=p["t"] * 1e6,
                bound=p["bound"],
                ratio=measured / p["t"],
            )
        )
    return rows


def _twin(x: torch.Tensor, w: torch.Tensor, rng: torch.Tensor):
    """perturb → cast → matmul, the materialised path the fused kernel competes with."""

    def fn():
        return x @ ops.perturb(w, VARIATION, rng=rng)[0].to(x.dtype).t()

    return fn


def sweep(device: str, quick: bool) -> list[dict]:
    """Table 2: fused vs twin at the §8 shape and over M (the routing threshold is the crossover)."""
    n = k = 1024 if quick or device != "cuda" else 4096
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    w = torch.randn(n, k, device=device) * 0.02
    rng = torch.tensor([3, 4], dtype=torch.int64, device=device)
    rows = []
    for m in M_SWEEP[:4] if device != "cuda" else M_SWEEP:
        x = torch.randn(m, k, device=device, dtype=dtype)

        def fused():
            return ops.noisy_linear(x, w, None, VARIATION, rng=rng)

        t_fused, t_twin = graph_time(fused, device), graph_time(_twin(x, w, rng), device)
        rows.append(
            dict(
                table="sweep",
                case=f"M={m} N=K={n} fp32 W, {str(dtype).replace('torch.', '')} x",
                fused_us=t_fused * 1e6,
                twin_us=t_twin * 1e6,
                twin_over_fused=t_twin / t_fused,
                design_shape=(m == 16 and n == 4096),
            )
        )
    return rows


def memory_bound(device: str, quick: bool) -> list[dict]:
    """Table 3: perturb, perturb_device (PCM), philox normals vs a clone of the same bytes."""
    numel = 2**20 if quick or device != "cuda" else 4 * 2**20
    w = torch.randn(numel, device=device)
    rng = torch.tensor([5, 6], dtype=torch.int64, device=device)
    pcm = nft_cuda.devices.make_device_model("pcm", 1.0)
    copy_s = graph_time(w.clone, device)
    nbytes = 2 * w.numel() * w.element_size()  # read + write
    cases = {  # name: (call, bytes it must move)
        "perturb (S=1)": (lambda: ops.perturb(w, VARIATION, rng=rng), nbytes),
        "perturb_device (PCM, t=0)": (lambda: ops.perturb(w, pcm, rng=rng), nbytes),
        "philox normals (write only)": (lambda: torch.ops.nft_cuda.philox_normal(rng, numel, 1), nbytes // 2),
    }
    rows = [dict(table="memory", case=f"copy {numel} fp32", measured_us=copy_s * 1e6, gbps=nbytes / copy_s / 1e9)]
    for name, (fn, moved) in cases.items():
        try:
            t = graph_time(fn, device)
        except (RuntimeError, TypeError) as exc:  # report the row, keep the others
            rows.append(dict(table="memory", case=name, error=str(exc).splitlines()[0]))
            continue
        gbps = moved / t / 1e9
        rows.append(dict(table="memory", case=name, measured_us=t * 1e6, gbps=gbps, of_copy=gbps / rows[0]["gbps"]))
    return rows


def _markdown(rows: list[dict]) -> str:
    out = []
    for table, head in (
        ("fused", "| fused case | measured µs | predicted µs (bound) | measured / predicted |"),
        ("sweep", "| fused vs perturb→cast→matmul | fused µs | twin µs | twin / fused (>1: fused wins) |"),
        ("memory", "| memory-bound kernel | µs | GB/s (read + write) | share of copy bandwidth |"),
    ):
        part = [r for r in rows if r["table"] == table]
        if not part:
            continue
        out += ["", head, "|---|---|---|---|"]
        for r in part:
            if "error" in r:
                out.append(f"| {r['case']} | failed: {r['error']} | | |")
            elif table == "fused":
                out.append(
                    f"| {r['case']} | {r['measured_us']:.1f} | {r['predicted_us']:.1f} ({r['bound']}) | {r['ratio']:.2f} |"
                )
            elif table == "sweep":
                star = " (§8 shape)" if r["design_shape"] else ""
                out.append(
                    f"| {r['case']}{star} | {r['fused_us']:.1f} | {r['twin_us']:.1f} | {r['twin_over_fused']:.2f} |"
                )
            else:
                share = f"{100 * r['of_copy']:.0f} %" if "of_copy" in r else "(the ceiling)"
                out.append(f"| {r['case']} | {r['measured_us']:.1f} | {r['gbps']:.0f} | {share} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here as well")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (1024², 1M elements)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("kernel_roofline: needs a CUDA device (or --device cpu for a smoke run)")
    rows = []
    for part in (
        (lambda: fused_cases(args.device)) if args.device == "cuda" else (lambda: []),
        lambda: sweep(args.device, args.quick),
        lambda: memory_bound(args.device, args.quick),
    ):
        rows += part()
        if args.json:  # after every table: a run killed at its cap keeps what finished
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    print(_markdown(rows))


if __name__ == "__main__":
    main()
