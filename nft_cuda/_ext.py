"""Loading the compiled extension and choosing, per op and device, who serves a call.

The compiled module ``nft_cuda._C`` registers the ``torch.ops.nft_cuda.*`` operators (schemas in
csrc/ops.cpp, CPU kernels in csrc/cpu, CUDA kernels in csrc/cuda). When it is missing, every op
runs on its pure-PyTorch twin in :mod:`nft_cuda.reference` after one warning.

Environment switches:
  NFT_CUDA_STRICT=1          a call that would fall back to pure PyTorch raises instead
                             (benchmarks and CI use it so they never time the wrong backend)
  NFT_CUDA_FORCE_FALLBACK=1  ignore the compiled extension (testing the fallback)
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import torch

__all__ = ["BUILD_INFO", "HAS_C", "LOAD_ERROR", "OPS", "STRICT", "backend_info", "has_kernel", "use_kernel"]

# The compiled ops (CPU kernels always, CUDA kernels when built with CUDA).
OPS = (
    "philox4x32",
    "philox_normal",
    "perturb",
    "perturb_device",
    "noisy_linear",
    "_noisy_linear_backward_input",
    "snapshot_linear",
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


STRICT = _env_flag("NFT_CUDA_STRICT")
FORCE_FALLBACK = _env_flag("NFT_CUDA_FORCE_FALLBACK")

HAS_C = False
LOAD_ERROR: str | None = None
_C_PATH: str | None = None
try:
    if FORCE_FALLBACK:
        raise ImportError("NFT_CUDA_FORCE_FALLBACK=1 is set")
    if importlib.util.find_spec("nft_cuda._C") is None:
        raise ImportError("nft_cuda._C was not built (installed without the extension?)")
    from nft_cuda import _C  # noqa: F401  (loading it runs the TORCH_LIBRARY initialisers)

    HAS_C = True
    _C_PATH = getattr(_C, "__file__", None)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    LOAD_ERROR = str(exc)
    if not STRICT:
        warnings.warn(
            f"nft_cuda: compiled extension not available ({LOAD_ERROR}); every op runs on the "
            "pure-PyTorch implementation (same noise, slower). Build it with "
            "`pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=2,
        )


def _read_build_info() -> dict | None:
    """setup.py's build decisions (nft_cuda/_build_info.json), or None when it left none."""
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


BUILD_INFO = _read_build_info()

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}
_warned: set[tuple[str, str]] = set()


def _registered(op: str, key: str) -> bool:
    """Whether the dispatcher has a ``key`` kernel of ``nft_cuda::op``; False when the extension was built
    before the op existed (the dispatcher raises for an unknown operator)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"nft_cuda::{op}", key))
    except RuntimeError:
        return False


# Which (op, device type) pairs have a compiled kernel, read once from the dispatcher at import:
# a plain dict lookup is a constant to torch.compile, while the dispatcher query cannot be traced.
_KERNELS = {
    (op, device_type): HAS_C and _registered(op, key) for op in OPS for device_type, key in _DISPATCH_KEY.items()
}


def has_kernel(op: str, device_type: str) -> bool:
    """True when a compiled kernel of ``nft_cuda::op`` is registered for ``device_type``."""
    return _KERNELS.get((op, device_type), False)


def use_kernel(op: str, device: torch.device) -> bool:
    """Whether a call of ``op`` on ``device`` goes to the compiled kernel (else: pure PyTorch).

    Raises RuntimeError under NFT_CUDA_STRICT=1 instead of falling back.
    """
    if has_kernel(op, device.type):
        return True
    reason = LOAD_ERROR if not HAS_C else f"the extension was built without {device.type} kernels"
    if HAS_C and device.type == "cuda" and BUILD_INFO and not BUILD_INFO.get("cuda"):
        reason += (
            f": {BUILD_INFO.get('why')}; rebuild with "
            "`FORCE_CUDA=1 pip install --no-build-isolation -e .` on a machine with a CUDA toolkit"
        )
    if STRICT:
        raise RuntimeError(
            f"nft_cuda: no compiled {device.type} kernel for '{op}' ({reason}) and NFT_CUDA_STRICT=1 "
            "forbids the pure-PyTorch fallback"
        )
    if HAS_C and (op, device.type) not in _warned and device.type == "cuda":
        _warned.add((op, device.type))
        warnings.warn(
            f"nft_cuda: '{op}' on {device.type} runs on pure PyTorch ({reason})", RuntimeWarning, stacklevel=3
        )
    return False


def backend_info() -> dict:
    """Which backend serves each op on each device type, and how the extension was built.

    Returns a dict: ``{"extension": path or None, "load_error": str or None, "cuda_compiled": bool,
    "cuda_version": int or None, "strict": bool, "build": setup.py's decisions (``{"cuda": bool,
    "why": str, ...}``) or None, "ops": {op: {"cpu": ..., "cuda": ...}}}`` where each backend is
    "C++ kernel", "CUDA kernel" or "pure PyTorch".
    """
    cuda_version = int(torch.ops.nft_cuda._cuda_version()) if HAS_C else -1
    ops = {}
    for op in OPS:
        ops[op] = {
            "cpu": "C++ kernel" if has_kernel(op, "cpu") else "pure PyTorch",
            "cuda": "CUDA kernel" if has_kernel(op, "cuda") else "pure PyTorch",
        }
    return {
        "extension": _C_PATH,
        "load_error": LOAD_ERROR,
        "cuda_compiled": cuda_version >= 0,
        "cuda_version": cuda_version if cuda_version >= 0 else None,
        "cuda_available": torch.cuda.is_available(),
        "strict": STRICT,
        "build": BUILD_INFO,
        "ops": ops,
    }
