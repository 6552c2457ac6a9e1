"""The one random stream of nft_cuda (DESIGN §3), exposed for checking.

Every backend (C++, CUDA, pure PyTorch) produces the same raw Philox words for the same
(seed, offset); see Note [nft Philox counter layout] in csrc/include/nft_cuda/philox.h.
"""

from __future__ import annotations

import torch

from nft_cuda import _args, _ext, reference

__all__ = ["philox4x32", "normal"]


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10 output.

    Args:
        counter: int64 tensor [..., 4], each word in [0, 2^32).
        key: int64 tensor [2], each word in [0, 2^32), on the same device.

    Returns:
        int64 tensor [..., 4]: the four output words of each counter block.

    This is a checking API: the word ranges are validated, which reads the values back on CUDA.
    """
    for name, t in (("counter", counter), ("key", key)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be an int64 tensor, got {t.dtype}")
    if counter.dim() < 1 or counter.shape[-1] != 4:
        raise ValueError(f"counter must have shape [..., 4], got {list(counter.shape)}")
    if key.shape != (2,):
        raise ValueError(f"key must have shape [2], got {list(key.shape)}")
    if counter.device != key.device:
        raise ValueError(f"counter is on {counter.device} but key is on {key.device}")
    for name, t in (("counter", counter), ("key", key)):
        if t.numel() and not bool(((t >= 0) & (t <= 0xFFFFFFFF)).all()):
            raise ValueError(f"every word of {name} must be in [0, 2^32)")
    if _ext.use_kernel("philox4x32", counter.device):
        return torch.ops.nft_cuda.philox4x32(counter, key)
    return reference.philox4x32(counter, key)


def normal(numel: int, seed: int, offset: int, streams: int = 1, device=None) -> torch.Tensor:
    """Standard normals of the noise stream.

    Args:
        numel: number of elements (flat indices 0 .. numel-1).
        seed, offset: ints in [0, 2^63); stream t uses (offset + t) mod 2^64.
        streams: number of consecutive streams (samples).
        device: where to compute (default: CPU).

    Returns:
        float32 tensor [streams, numel]: z of element e in stream offset + t (DESIGN §3).
    """
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    streams = _args.check_positive_int("streams", streams)
    seed = _args.check_seed_int("seed", seed)
    offset = _args.check_seed_int("offset", offset)
    device = torch.device("cpu" if device is None else device)
    rng = _args.make_rng(seed, offset, device)
    if _ext.use_kernel("philox_normal", device):
        return torch.ops.nft_cuda.philox_normal(rng, numel, streams)
    return reference.philox_normal(rng, numel, streams)


def normals_of_blocks(rng: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float32 [*q.shape, 4]: :func:`nft_cuda.reference.philox_normal_blocks` (the DESIGN §3 normals of
    Philox blocks ``q`` in stream rng[1] under key rng[0]) with the ten Philox rounds in the compiled kernel
    where it is built, the Box–Muller step in PyTorch (float64, as the reference): the same bits, without
    the ~100 elementwise int64 operations of the pure-PyTorch rounds. Internal: the words are in range by
    construction, so nothing is validated (or read back)."""
    if not _ext.use_kernel("philox4x32", q.device):
        return reference.philox_normal_blocks(rng, q)
    return reference.normals_of_words(torch.ops.nft_cuda.philox4x32(*reference.block_counters(rng, q)))
