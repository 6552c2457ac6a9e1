"""Fake (meta) kernels and autograd of the compiled ops, so they trace under torch.compile and
pass torch.library.opcheck. Imported once by nft_cuda/__init__.py, only when the extension loaded.
"""

from __future__ import annotations

import torch


@torch.library.register_fake("nft_cuda::philox4x32")
def _philox4x32_fake(counter, key):
    torch._check(counter.shape[-1] == 4, lambda: "philox4x32: counter must have shape [..., 4]")
    return counter.new_empty(counter.shape)


@torch.library.register_fake("nft_cuda::philox_normal")
def _philox_normal_fake(rng, numel, streams):
    torch._check(rng.numel() == 2, lambda: "philox_normal: rng must have shape [2]")
    return rng.new_empty((streams, numel), dtype=torch.float32)


@torch.library.register_fake("nft_cuda::perturb")
def _perturb_fake(weight, rng, sigmas, scale, state_factor):
    torch._check(rng.numel() == 2, lambda: "perturb: rng must have shape [2]")
    torch._check(sigmas.dim() == 1, lambda: "perturb: sigmas must be 1-D")
    return weight.new_empty((sigmas.shape[0], *weight.shape))


def _perturb_setup_context(ctx, inputs, output):
    # Straight-through (DESIGN §2): nothing to save, not even the noise.
    ctx.set_materialize_grads(False)


def _perturb_backward(ctx, grad):
    if grad is None:
        return None, None, None, None, None
    return grad.sum(0), None, None, None, None


torch.library.register_autograd("nft_cuda::perturb", _perturb_backward, setup_context=_perturb_setup_context)
