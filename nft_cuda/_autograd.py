"""Autograd helpers shared by the ops tier (the registered autograd of the compiled ops,
:mod:`nft_cuda._registrations`) and the nn tier (the autograd Functions of the noisy layers).

It sits below both, so the op registrations never import the layers (docs/architecture.md).
"""

from __future__ import annotations

import torch

__all__ = ["once_differentiable"]


def once_differentiable(grads: tuple, message: bytes) -> tuple:
    """Make a second differentiation through these gradients raise a clear RuntimeError (``message``).

    The noise-regenerating backwards (DESIGN §3) are differentiable only once: the straight-through
    weight gradient has no second derivative, and a kernel's input gradient has no autograd, so a double
    backward would silently miss terms. Only matters when backward runs with create_graph=True (grad
    mode on inside backward); compiled graphs have their own double-backward error.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not idx:
        return grads
    tensors = []
    for i in idx:
        t = grads[i].detach()
        t.requires_grad_(True)
        tensors.append(t)
    wrapped = torch._C._functions.DelayedError(message, len(tensors))(*tensors)
    if isinstance(wrapped, torch.Tensor):
        wrapped = (wrapped,)
    out = list(grads)
    for i, t in zip(idx, wrapped):
        out[i] = t
    return tuple(out)
