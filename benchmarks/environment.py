"""The environment a run is measured in (machine, versions, commit, load), stamped on every report."""

from __future__ import annotations

import datetime
import os
import platform

import torch

import nft_cuda
from nft_cuda import _files


def git_commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return _files.commit(root, mark_dirty=True) or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dist_version(name: str) -> str | None:
    """The installed version of an optional package (the peer, Triton), or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(name)
    except PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment() -> dict:
    info = nft_cuda.backend_info()
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {_cpu_model()}",
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "nft_cuda": nft_cuda.__version__,
        "commit": git_commit(),
        "aihwkit_lightning": dist_version("aihwkit-lightning"),
        "triton": dist_version("triton"),
        "extension": {
            "cuda_compiled": info.get("cuda_compiled"),
            "cuda_version": info.get("cuda_version"),
            "strict": info.get("strict"),
            "perturb": info.get("ops", {}).get("perturb"),
        },
    }
    return env


def env_line(env: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items() if k != "extension")
