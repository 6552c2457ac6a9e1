"""Weight clipping of hardware-aware training: :class:`WeightClip` and :func:`clip_weights`.

After every optimizer step the crossbar weights of every noisy layer are clamped, in place, to ±b:

* ``"fixed"``: b = ``value`` (aihwkit's ``WeightClipType.FIXED_VALUE``);
* ``"gaussian"``: b = ``sigma`` · std(W), one bound per layer (aihwkit's and aihwkit-lightning's
  ``LAYER_GAUSSIAN``);
* ``"gaussian-per-channel"``: b_i = ``sigma`` · std(W_i) for every output channel i, the rows along dim 0
  of each crossbar weight, a conv kernel [out, in/groups, k…] flattened per output channel
  (aihwkit-lightning's ``LAYER_GAUSSIAN_PER_CHANNEL``);
* ``"none"`` (the default): nothing is touched.

std is the sample standard deviation about the mean (n − 1 in the denominator), as ``torch.std`` and both
IBM kits compute it. A layer with several crossbar weights (attention's q/k/v projections, the weights of
a recurrent layer) is one crossbar tensor: ``"gaussian"`` takes one std over all of them, as one max|W|
scales their noise (:class:`nft_cuda.nn.generic.SeveralWeightCrossbar`); ``"gaussian-per-channel"`` takes
each row of each of them. A bound that is not positive and finite — a constant layer or row (std 0), a row
of one element (std undefined) — leaves that layer or row as it is: aihwkit's clipper only clips with a
positive bound. Biases, the layers that stay digital (BatchNorm, unconverted layers) and a weight's
parametrization's extra parameters are never touched; a parametrized crossbar weight is clipped as the
weight the noise acts on and written back through its ``right_inverse``. A parameter shared by several
layers is clipped once, by the first layer that holds it.

docs/hwa-training.md has the formulas, the IBM equivalents and how ``nft train`` applies them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from nft_cuda import _args
from nft_cuda.nn import noisy_layers

__all__ = ["CLIP_KINDS", "WeightClip", "clip_bound", "clip_weights"]

#: The clipping kinds of :class:`WeightClip`, ``"none"`` first.
CLIP_KINDS = ("none", "fixed", "gaussian", "gaussian-per-channel")
_GAUSSIAN = ("gaussian", "gaussian-per-channel")


@dataclasses.dataclass(frozen=True)
class WeightClip:
    """How the crossbar weights are clipped after every optimizer step (frozen, hashable).

    Attributes:
        kind: ``"none"`` (default: no clipping), ``"fixed"`` (clamp to ±``value``), ``"gaussian"``
            (±``sigma``·std(W) of the layer) or ``"gaussian-per-channel"`` (±``sigma``·std(W_i) of each
            output channel i, the rows along dim 0). Case and ``_`` for ``-`` are accepted.
        value: the bound of ``"fixed"``, > 0 (required by it, refused by the other kinds).
        sigma: the multiple α of the std of the Gaussian kinds, > 0 (required by them, refused by the
            other kinds; aihwkit's default is 2.5).

    ``WeightClip.from_dict(clip.to_dict()) == clip``; :class:`nft_cuda.train.TrainConfig` stores it so.
    """

    kind: str = "none"
    value: float | None = None
    sigma: float | None = None

    def __post_init__(self):
        if not isinstance(self.kind, str):
            raise TypeError(f"weight clip kind must be a str, one of {', '.join(CLIP_KINDS)}; got {self.kind!r}")
        kind = self.kind.strip().lower().replace("_", "-")
        if kind not in CLIP_KINDS:
            raise ValueError(f"weight clip kind must be one of {', '.join(CLIP_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "kind", kind)
        for name in ("value", "sigma"):
            given = getattr(self, name)
            if given is not None:
                object.__setattr__(self, name, _args.check_real(f"weight clip {name}", given, minimum=0.0, strict=True))
        if kind == "fixed" and self.value is None:
            raise ValueError("weight clip 'fixed' needs a value: the bound ±value (--weight-clip-value X)")
        if kind in _GAUSSIAN and self.sigma is None:
            raise ValueError(f"weight clip '{kind}' needs a sigma: the bound ±sigma·std (--weight-clip-sigma A)")
        if kind != "fixed" and self.value is not None:
            raise ValueError(f"weight clip value applies to kind 'fixed', not '{kind}'")
        if kind not in _GAUSSIAN and self.sigma is not None:
            raise ValueError(f"weight clip sigma applies to kind 'gaussian' or 'gaussian-per-channel', not '{kind}'")

    @property
    def enabled(self) -> bool:
        """Whether this clips anything (every kind but ``"none"``)."""
        return self.kind != "none"

    def to_dict(self) -> dict:
        """``{"kind": ..., "value": ..., "sigma": ...}`` (plain types, as a checkpoint stores it)."""
        return {"kind": self.kind, "value": self.value, "sigma": self.sigma}

    @classmethod
    def from_dict(cls, d) -> WeightClip:
        """A :class:`WeightClip` from its :meth:`to_dict` (or from a WeightClip, or None: no clipping)."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise TypeError(f"weight_clip must be a WeightClip, a dict or None, got {type(d).__name__}")
        unknown = sorted(set(d) - {"kind", "value", "sigma"})
        if unknown:
            raise ValueError(f"unknown weight clip field(s): {', '.join(map(str, unknown))}")
        return cls(**d)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed ±{self.value:g}"
        if self.kind in _GAUSSIAN:
            return f"{self.kind} ±{self.sigma:g}·std"
        return "none"


def _std_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def clip_bound(weights, clip: WeightClip) -> list[torch.Tensor]:
    """The bound b of each tensor in ``weights`` (one tensor or a sequence: the crossbar weights of one
    layer) under ``clip``, broadcastable to it: a 0-dim tensor for ``"fixed"`` and ``"gaussian"``,
    [rows, 1, …] for ``"gaussian-per-channel"``; +inf where nothing is clipped (kind ``"none"``, or a
    bound that is not positive and finite). Computed in float32 (float64 for float64 weights)."""
    if not isinstance(clip, WeightClip):
        raise TypeError(f"clip must be a WeightClip, got {type(clip).__name__}")
    weights = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(f"weights[{i}] must be a floating-point torch.Tensor")
    if not weights:
        return []
    dtype = _std_dtype(weights[0])
    if clip.kind in ("none", "fixed"):
        b = math.inf if clip.kind == "none" else clip.value
        return [torch.tensor(b, dtype=_std_dtype(w), device=w.device) for w in weights]
    if clip.kind == "gaussian":
        flat = torch.cat([w.detach().reshape(-1).to(dtype) for w in weights]) if len(weights) > 1 else None
        std = (flat if flat is not None else weights[0].detach().to(dtype)).std()
        return [_usable(clip.sigma * std.to(w.device)) for w in weights]
    out = []
    for w in weights:  # per channel: the rows along dim 0
        rows = w.detach().to(_std_dtype(w)).reshape(w.shape[0] if w.dim() else 1, -1)
        std = (
            rows.std(dim=1)
            if rows.shape[1] > 1
            else torch.full((rows.shape[0],), math.nan, dtype=rows.dtype, device=rows.device)
        )
        out.append(_usable(clip.sigma * std.to(w.device)).reshape((-1,) + (1,) * max(w.dim() - 1, 0)))
    return out


def _usable(bound: torch.Tensor) -> torch.Tensor:
    """+inf where ``bound`` is not positive and finite (nothing is clipped there)."""
    return torch.where(torch.isfinite(bound) & (bound > 0), bound, torch.full_like(bound, math.inf))


@torch.no_grad()
def clip_weights(model: nn.Module, clip: WeightClip) -> nn.Module:
    """Clip, in place and without gradients, the crossbar weights of every noisy layer of ``model``
    (:func:`nft_cuda.noisy_layers`, each layer's ``crossbar_weight_names()``) to ±``clip_bound``;
    returns ``model``. Kind ``"none"`` returns at once. Biases and digital layers are left as they are;
    the Parameter objects stay the same, so an optimizer's state follows them. See the module docstring
    for layers with several weights, parametrized and shared weights."""
    _args.check_module("model", model)
    if not isinstance(clip, WeightClip):
        raise TypeError(f"clip must be a WeightClip, got {type(clip).__name__}")
    return clip_checked(model, clip)


@torch.no_grad()
def clip_checked(model: nn.Module, clip: WeightClip) -> nn.Module:
    """:func:`clip_weights` without the argument checks: the trainer's call after every optimizer step,
    whose model and clip were checked when the training was set up."""
    if not clip.enabled:
        return model
    seen: set[int] = set()
    for _, layer in noisy_layers(model):
        names = [n for n in layer.crossbar_weight_names() if id(_stored(layer, n)) not in seen]
        if not names:
            continue
        values = [getattr(layer, n) for n in names]  # a parametrized weight: the weight the noise acts on
        # fixed: plain scalars (no bound tensor, no host-to-device copy per step)
        bounds = [clip.value] * len(values) if clip.kind == "fixed" else clip_bound(values, clip)
        for name, value, bound in zip(names, values, bounds):
            seen.add(id(_stored(layer, name)))
            if isinstance(bound, torch.Tensor):
                bound = bound.to(value.dtype)
            if parametrize.is_parametrized(layer, name):
                setattr(layer, name, torch.clamp(value, -bound, bound))
            else:
                value.clamp_(-bound, bound)
    return model


def _stored(layer: nn.Module, name: str) -> torch.Tensor:
    """The tensor that holds weight ``name`` of ``layer`` (its parametrization's ``original``, if any)."""
    if parametrize.is_parametrized(layer, name):
        plist = layer.parametrizations[name]
        return getattr(plist, "original", plist)  # several originals: the list stands for them
    return getattr(layer, name)
