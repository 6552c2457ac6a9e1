"""Public operators of nft_cuda.

Each op dispatches to the compiled kernel of the input's device when there is one
(``torch.ops.nft_cuda.*``: C++ on CPU, CUDA on GPUs) and to its pure-PyTorch twin in
:mod:`nft_cuda.reference` otherwise; both produce the same noise for the same rng.
"""

from __future__ import annotations

import torch

from nft_cuda import _args, _ext, reference
from nft_cuda.variation import Variation

__all__ = ["perturb"]


def perturb(weight: torch.Tensor, variation: Variation, *, seed: int | None = None, offset: int | None = None,
            rng: torch.Tensor | None = None, samples: int = 1, sigmas=None) -> torch.Tensor:
    """Noisy copies of a weight under device variation (DESIGN §2, §4.1).

    Args:
        weight: float32/float64/float16/bfloat16 tensor of any shape and layout. Element e is its
            flat index in the logical row-major shape, whatever the memory layout.
        variation: the :class:`~nft_cuda.Variation` (σ_d and device model).
        seed, offset: ints in [0, 2^63) keying the noise stream; sample t uses stream offset + t.
        rng: alternatively, an int64 tensor [2] = (seed, offset) on the weight's device, read on
            the device (no host synchronisation). If neither is given, a pair is drawn with
            ``torch.randint`` from torch's default generator.
        samples: number of noisy copies S.
        sigmas: optional per-sample absolute σ_d, a 1-D float tensor of length S on the weight's
            device (never read back to the host) or a sequence of floats; default variation.sigma.

    Returns:
        Tensor [S, *weight.shape] of the weight's dtype: ``W + σ_w · z_t``. Differentiable with the
        straight-through gradient dL/dW = Σ_t dL/dout[t] (the noise is a constant).
    """
    _args.check_weight(weight)
    _args.check_variation(variation)
    samples = _args.check_positive_int("samples", samples)
    rng = _args.resolve_rng(weight.device, seed, offset, rng)
    sig = _args.resolve_sigmas(variation, samples, sigmas, weight.device)
    if _ext.use_kernel("perturb", weight.device):
        return torch.ops.nft_cuda.perturb(weight, rng, sig, variation.scale, variation.state_factor)
    return reference.perturb(weight, rng, sig, variation.scale, variation.state_factor)
