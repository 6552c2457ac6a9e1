"""The hardware floors throughputs are compared with: copy bandwidth and a clean GEMM's FLOP/s."""

from __future__ import annotations

import torch

from benchmarks.config import Config
from benchmarks.results import Case, Row


def measure_ceilings(cfg: Config) -> tuple[dict, list[Row]]:
    """The hardware floor the throughputs are compared with: a plain copy's bandwidth (64 MiB float32
    into a preallocated buffer, read + write) and a clean square float32 GEMM's FLOP/s (torch defaults;
    bf16 too on CUDA). A ceiling is what the machine can do, so its figure is the best round (the
    fastest), not the median."""
    case = Case(cfg)
    dev = cfg.dev
    src = torch.randn(16 * 2**20, device=dev)
    dst = torch.empty_like(src)  # preallocated: the bandwidth, not the allocator's page faults
    fns = {"copy 64 MiB": lambda: dst.copy_(src)}
    work = {"copy 64 MiB": 2 * src.numel() * 4}
    units = {"copy 64 MiB": "GB/s"}
    keys = {"copy 64 MiB": "copy"}
    sizes = [("fp32", torch.float32, 8192 if cfg.cuda else (1024 if cfg.quick else 2048))]
    if cfg.cuda:
        sizes.append(("bf16", torch.bfloat16, 8192))
    for label, dtype, n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        name = f"GEMM {label} {n}³"
        fns[name] = lambda a=a, b=b: a @ b
        work[name], units[name], keys[name] = 2.0 * n**3, cfg.flop_unit, f"GEMM {label}"
    ceilings = {}
    for name, fn in fns.items():
        row = case.time("ceiling", {name: fn}, work=work[name], unit=units[name], notes={name: "best round"})[name]
        scale = {"GB/s": 1e9, "TFLOP/s": 1e12, "GFLOP/s": 1e9}[units[name]]
        if row.timing.min_s > 0:
            row.throughput = work[name] / row.timing.min_s / scale
        ceilings[keys[name]] = (row.throughput, units[name])
    return ceilings, case.rows
