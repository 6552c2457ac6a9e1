"""The baselines every noisy variant is measured against (DESIGN §8).

"Reference way": the paper code's method written in plain PyTorch — max|W| read back to the host
(``.item()``, one synchronisation per layer per forward), the state-band mask, ``torch.normal`` on the host,
copied to the weight's device, added, then ``F.linear``/``F.conv2d``; per layer, per forward. "Compiled":
``torch.compile`` of that composite without the host read (the noise from ``randn_like``). The clean layer
or step is the third baseline (no noise at all: the floor); the peer library is in :mod:`benchmarks.peer`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_cuda


def reference_noise(
    w: torch.Tensor, variation: nft_cuda.Variation, sigma: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The reference's device-variation noise for weight ``w``, on ``w``'s device (a constant: no grad).

    max|W| read to the host, the state-band mask, ``torch.normal`` on the host, copied to the device —
    as :func:`benchmarks.reference_loop.reference_perturb_` (same draws for the same generator).
    """
    v = variation if sigma is None else variation.with_sigma(sigma)
    w = w.detach()
    m = w.abs().max().item()  # host read: one synchronisation per layer per forward
    base = v.sigma * m * v.scale
    aw = w.abs()
    mask = (aw > 0.25 * m) & (aw < 0.75 * m)
    std = torch.where(mask, base * v.state_factor, base).cpu()
    return torch.normal(torch.zeros_like(std), std, generator=generator).to(w.device)


def reference_weight(w: torch.Tensor, variation: nft_cuda.Variation, sigma: float | None = None) -> torch.Tensor:
    """W + reference noise (differentiable in W: the noise is a constant, as in the reference)."""
    return w + reference_noise(w, variation, sigma).to(w.dtype)


def reference_linear(x, w, b, variation: nft_cuda.Variation):
    return F.linear(x, reference_weight(w, variation), b)


def reference_conv2d(x, w, b, variation: nft_cuda.Variation, padding=1):
    return F.conv2d(x, reference_weight(w, variation), b, padding=padding)


def compile_fresh(fn):
    """``torch.compile(fn)`` with dynamo's caches cleared first, and hitting the recompile limit made an
    error: past it dynamo would silently run ``fn`` eagerly and the "compiled" figure would be eager."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn)


def composite_weight(w: torch.Tensor, sigma: float, scale: float, s: float) -> torch.Tensor:
    """The reference composite without the host read (what torch.compile is given): max|W| and the
    mask on the device, noise from ``randn_like``; straight-through in W."""
    wd = w.detach()
    m = wd.abs().amax()
    base = sigma * m * scale
    aw = wd.abs()
    mask = (aw > 0.25 * m) & (aw < 0.75 * m)
    std = torch.where(mask, base * s, base)
    return w + std * torch.randn_like(wd)


def composite_linear(x, w, b, sigma: float, scale: float, s: float):
    return F.linear(x, composite_weight(w, sigma, scale, s), b)


def composite_conv2d(x, w, b, sigma: float, scale: float, s: float):
    return F.conv2d(x, composite_weight(w, sigma, scale, s), b, padding=1)


class _ReferenceNoisy:
    """Mixin: the layer's forward uses W + reference noise at ``self.sigma`` (drawn per forward)."""

    variation: nft_cuda.Variation
    sigma: float

    def noisy_weight(self) -> torch.Tensor:
        return reference_weight(self.weight, self.variation, self.sigma)


class ReferenceLinear(_ReferenceNoisy, nn.Linear):
    def forward(self, x):
        return F.linear(x, self.noisy_weight(), self.bias)


class ReferenceConv2d(_ReferenceNoisy, nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.noisy_weight(), self.bias)


def reference_convert(model: nn.Module, variation: nft_cuda.Variation) -> nn.Module:
    """Swap every plain ``nn.Linear``/``nn.Conv2d`` of ``model`` (in place) for its reference-way twin,
    keeping the parameters. Set ``layer.sigma`` of the returned layers to change σ_d per forward."""
    for _name, child in list(model.named_children()):
        if type(child) in (nn.Linear, nn.Conv2d):
            child.__class__ = ReferenceLinear if type(child) is nn.Linear else ReferenceConv2d
            child.variation, child.sigma = variation, variation.sigma
        else:
            reference_convert(child, variation)
    return model


def reference_layers(model: nn.Module) -> list[_ReferenceNoisy]:
    return [m for m in model.modules() if isinstance(m, _ReferenceNoisy)]
