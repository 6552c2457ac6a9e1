"""What a GPU check ran on: versions (torch, CUDA, nvcc, ninja, compute-sanitizer), the device's
properties and its clocks at the start, as Markdown lines on stdout and as JSON (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess

import torch

SMI_FIELDS = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu"


def _first_line(cmd: list[str]) -> str | None:
    """The last non-empty line of a command's version output, or None when it is not installed."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed: {exc}"
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else None


def collect() -> dict:
    env = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "nvcc": _first_line(["nvcc", "--version"]),
        "ninja": _first_line(["ninja", "--version"]),
        "compute_sanitizer": _first_line(["compute-sanitizer", "--version"]),
        "nvidia_smi": _first_line(["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader"]),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["device"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
        }
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the facts here")
    args = parser.parse_args()
    env = collect()
    for key, value in env.items():
        print(f"- {key}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(env, f, indent=1)


if __name__ == "__main__":
    main()
