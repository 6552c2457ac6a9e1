"""Timing, environment capture and reporting shared by the benchmarks.

Every figure is the median of repeated runs after warm-up (torch.utils.benchmark's
blocked_autorange, which synchronises CUDA), with the min–max spread; ratios are computed between
variants timed side by side in the same run. Benchmarks set NFT_CUDA_STRICT=1 before importing
nft_cuda, so a missing kernel is an error rather than a silently timed fallback.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass

os.environ.setdefault("NFT_CUDA_STRICT", "1")

import torch  # noqa: E402
import torch.utils.benchmark as tbench  # noqa: E402


@dataclass
class Timing:
    name: str
    median_s: float
    min_s: float
    max_s: float
    runs: int


def time_fn(name: str, fn, *, min_run_time: float = 1.0, warmup: int = 2) -> Timing:
    for _ in range(warmup):
        fn()
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    times = m.times
    return Timing(name, m.median, min(times), max(times), len(times))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(__file__), timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import nft_cuda

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "nft_cuda": nft_cuda.__version__,
        "commit": git_commit(),
    }
    return env


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_ms(t: Timing) -> str:
    return f"{t.median_s * 1e3:.2f} ms ({t.min_s * 1e3:.2f}–{t.max_s * 1e3:.2f})"


def write_json(path: str, env: dict, results: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"environment": env, "results": results}, f, indent=2)


def as_dict(t: Timing) -> dict:
    return asdict(t)
