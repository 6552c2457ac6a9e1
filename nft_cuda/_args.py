"""Argument checking and resolution shared by the public ops (clear TypeError/ValueError messages)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from nft_cuda.variation import Variation

_U63 = 2**63
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_seed_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2^63), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < _U63:
        raise ValueError(f"{name} must be in [0, 2^63), got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def resolve_device(name: str) -> torch.device:
    """The torch.device of a ``--device``-style name: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".

    One message for a CUDA device on a machine without one, whoever asks (train, eval, demo)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' was requested but CUDA is not available (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) present")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_weight(weight, name: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    return weight


def check_variation(variation) -> Variation:
    if not isinstance(variation, Variation):
        raise TypeError(f"variation must be an nft_cuda.Variation, got {type(variation).__name__}")
    return variation


def make_rng(seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """int64[2] (seed, offset) on ``device`` without a host synchronisation."""
    rng = torch.empty(2, dtype=torch.int64, device=device)
    rng[0].fill_(seed)  # two fill kernels rather than a host->device copy (which would sync)
    rng[1].fill_(offset)
    return rng


def random_rng(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh (seed, offset) pair drawn on ``device`` from ``generator`` (default: torch's)."""
    return torch.randint(0, _U63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)


def resolve_rng(device: torch.device, seed, offset, rng) -> torch.Tensor:
    """The int64[2] rng tensor of a call: from ``rng``, from ints ``seed``/``offset``, or drawn."""
    if rng is not None:
        if seed is not None or offset is not None:
            raise ValueError("pass either rng or seed/offset, not both")
        if not isinstance(rng, torch.Tensor):
            raise TypeError(f"rng must be an int64 tensor of shape [2], got {type(rng).__name__}")
        if rng.dtype != torch.int64:
            raise TypeError(f"rng must be an int64 tensor, got {rng.dtype}")
        if rng.shape != (2,):
            raise ValueError(f"rng must have shape [2] holding (seed, offset), got {list(rng.shape)}")
        if rng.device != device:
            raise ValueError(f"rng is on {rng.device} but weight is on {device}")
        return rng
    if seed is None and offset is None:
        return random_rng(device)
    if seed is None:
        raise ValueError("offset was given without seed")
    seed = check_seed_int("seed", seed)
    offset = check_seed_int("offset", 0 if offset is None else offset)
    return make_rng(seed, offset, device)


def resolve_sigmas(variation: Variation, samples: int, sigmas, device: torch.device) -> torch.Tensor:
    """float32 [samples] per-sample absolute σ_d on ``device`` (default: variation.sigma for all).

    A device tensor is never read back to the host; CPU tensors and Python sequences are checked.
    """
    if sigmas is None:
        return torch.full((samples,), variation.sigma, dtype=torch.float32, device=device)
    if isinstance(sigmas, torch.Tensor):
        if not sigmas.is_floating_point():
            raise TypeError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")
        if sigmas.dim() != 1 or sigmas.numel() != samples:
            raise ValueError(f"sigmas must be 1-D of length samples={samples}, got shape {list(sigmas.shape)}")
        if sigmas.device != device:
            raise ValueError(f"sigmas is on {sigmas.device} but weight is on {device}")
        if sigmas.device.type == "cpu" and not bool(((sigmas >= 0) & torch.isfinite(sigmas)).all()):
            raise ValueError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
        return sigmas.to(torch.float32).contiguous()
    if isinstance(sigmas, Sequence):
        values = []
        for v in sigmas:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"sigmas must hold real numbers, got {type(v).__name__}")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"sigmas must be finite and >= 0, got {v}")
            values.append(float(v))
        if len(values) != samples:
            raise ValueError(f"sigmas must have length samples={samples}, got {len(values)}")
        return torch.tensor(values, dtype=torch.float32).to(device)
    raise TypeError(f"sigmas must be a 1-D tensor or a sequence of floats, got {type(sigmas).__name__}")
