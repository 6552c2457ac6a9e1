"""Noisy layers built around a forward function: the mechanism of :class:`NoisyMultiheadAttention`, of
embeddings and of the layer types a user registers with :func:`register_noisy` (DESIGN §2, §3, §5).

Such a layer's forward draws its noisy weight(s) with ``nft_cuda.ops.perturb`` for the layer's rng (so
the noise is exactly that of ``layer.noisy_weight(rng)``) and applies them with a plain function. The
weight gradient is straight-through (``ops.perturb``'s own gradient). Under autograd the call is
checkpointed (``torch.utils.checkpoint``, non-reentrant): forward keeps only its inputs, and backward
draws the noisy weights again from the same rng and re-runs the function, so no noisy weight is stored
(DESIGN §3). With a sample plan of S samples the inputs' batch axis holds S chunks; chunk t is applied
with noisy weight t (DESIGN §5).

A layer type becomes convertible by :func:`nft_cuda.convert` with :func:`register_noisy`::

    nft_cuda.register_noisy(MyTransposedLinear, weight="w", apply=lambda m, w, x: x @ w + m.b)

``apply(module, weight, *args, **kwargs)`` must compute the module's forward with ``weight`` in place of
the named parameter. Registering makes a noisy class ``Noisy<Name>`` (a subclass of both
:class:`~nft_cuda.nn.base.NoisyModule` and the user's class): in mode off it calls the class's own
forward (bit-identical), in modes train/instance ``apply`` with the noisy weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from nft_cuda import ops
from nft_cuda.nn import registry
from nft_cuda.nn.base import NoisyModule, RetypedNoisy, SamplePlan
from nft_cuda.nn.mvm import programmed, refuse_mvm_around_gemm
from nft_cuda.nn.registry import NoisySpec

__all__ = [
    "SeveralWeightCrossbar",
    "cat_samples",
    "make_noisy_class",
    "recomputed",
    "register_noisy",
    "sample_chunks",
    "straight_through_samples",
    "unregister_noisy",
]


def straight_through_samples(layer: NoisyModule, plan: SamplePlan | None) -> torch.Tensor:
    """[S, *layer.weight.shape]: the noisy weights of ``plan`` (straight-through gradient to the clean
    weight), the plan's precomputed weights when it carries them, or the clean weight [1, ...] for no
    plan (mode off)."""
    if plan is None:
        return layer.weight.unsqueeze(0)
    refuse_mvm_around_gemm(layer)
    if plan.weights is not None:
        return plan.weights
    weight = programmed(layer.weight, layer.variation)  # model 4's weight levels, straight-through
    if plan.sigmas is None:
        return ops.perturb(weight, layer.variation, rng=plan.rng)
    return ops.perturb(weight, layer.variation, rng=plan.rng, samples=plan.sigmas.shape[0], sigmas=plan.sigmas)


def recomputed(fn: Callable, *args):
    """``fn(*args)``; under autograd checkpointed, so backward re-runs ``fn`` (redrawing the noise from
    the same rng) instead of keeping what it saved."""
    if torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def sample_chunks(t, samples: int, dim: int = 0) -> list:
    """The S chunks of a batched tensor along ``dim`` (S copies of anything else: None, flags)."""
    if not isinstance(t, torch.Tensor) or samples == 1:
        return [t] * samples
    if t.dim() <= dim or t.shape[dim] % samples:
        raise ValueError(
            f"a sample-axis forward with {samples} samples needs inputs whose batch axis (dim {dim}) "
            f"is a multiple of {samples}, got shape {list(t.shape)}"
        )
    return list(t.chunk(samples, dim=dim))


def cat_samples(outs: list, dim: int = 0):
    """Concatenate per-sample outputs (tensors, or tuples of tensors / None) along ``dim``."""
    if len(outs) == 1:
        return outs[0]
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, dim=dim)
    if isinstance(first, tuple):
        return tuple(cat_samples(list(parts), dim) if parts[0] is not None else None for parts in zip(*outs))
    raise TypeError(f"a sample-axis forward needs tensor outputs, got {type(first).__name__}")


class SeveralWeightCrossbar(NoisyModule):
    """A noisy layer whose crossbar tensor ``weight`` is the flattened concatenation, in
    :meth:`crossbar_weight_names` order, of several weight parameters (one name: that parameter itself).
    One max|W| then scales the noise of all of them."""

    @property
    def weight(self) -> torch.Tensor:
        """The crossbar tensor (differentiable: gradients reach the parameters)."""
        names = self.crossbar_weight_names()
        if len(names) == 1:
            return getattr(self, names[0])
        return torch.cat([getattr(self, n).reshape(-1) for n in names])

    def crossbar_parts(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter name → its part of a crossbar tensor ``value`` [*weight.shape], in its shape."""
        names = self.crossbar_weight_names()
        if len(names) == 1:
            return {names[0]: value}
        params = [getattr(self, n) for n in names]
        parts = value.split([p.numel() for p in params])
        return {n: part.view(p.shape) for n, part, p in zip(names, parts, params)}

    @torch.no_grad()
    def load_crossbar_(self, value: torch.Tensor) -> None:
        for name, part in self.crossbar_parts(value).items():
            getattr(self, name).copy_(part)


class _RegisteredNoisy(RetypedNoisy):
    """Body of the classes made by :func:`register_noisy` (the user's class follows in the MRO)."""

    _spec: NoisySpec

    def forward(self, *args, **kwargs):
        noise = self.forward_noise()
        if noise is None:
            return self._spec.cls.forward(self, *args, **kwargs)
        apply = self._spec.apply

        def noisy_forward(*inputs):
            weights = straight_through_samples(self, noise)
            samples = weights.shape[0]
            chunks = [sample_chunks(a, samples) for a in inputs]
            return cat_samples([apply(self, weights[t], *[c[t] for c in chunks], **kwargs) for t in range(samples)])

        return recomputed(noisy_forward, *args)

    def _check_input(self, input) -> None:  # inputs are whatever the user's forward takes
        return None

    def crossbar_weight_names(self) -> tuple[str, ...]:
        return (self._spec.weight,)

    def extra_repr(self) -> str:
        return f"{self._spec.cls.extra_repr(self)}, {self._noise_repr()}"


def register_noisy(cls: type, weight: str, apply: Callable) -> type:
    """Make layers of type ``cls`` convertible by :func:`nft_cuda.convert`; returns the noisy class.

    Args:
        cls: an ``nn.Module`` subclass (exact type; its subclasses need their own registration).
        weight: the name of the crossbar weight, a parameter of the module itself (e.g. ``"w"``).
        apply: ``apply(module, weight, *args, **kwargs)``: the module's forward computed with ``weight``
            instead of the parameter. It is called with each sample's noisy weight; with a sample axis
            every tensor positional argument is split along dim 0.

    Registering a class again replaces its registration. Raises TypeError/ValueError for a class that
    is not an ``nn.Module`` type, a non-callable ``apply`` or a malformed ``weight`` name; a module
    without that parameter is reported by :func:`nft_cuda.convert`.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_noisy: cls must be an nn.Module subclass, got {cls!r}")
    if issubclass(cls, NoisyModule):
        raise TypeError(f"register_noisy: {cls.__name__} is already a noisy layer")
    if not isinstance(weight, str) or not weight.isidentifier():
        raise ValueError(f"register_noisy: weight must be a parameter name such as 'weight', got {weight!r}")
    if not callable(apply):
        raise TypeError(f"register_noisy: apply must be callable (module, weight, *args) -> output, got {apply!r}")
    return make_noisy_class(NoisySpec(cls, weight, apply))


def make_noisy_class(spec: NoisySpec) -> type:
    """The noisy class of ``spec`` (``Noisy<Name>``, the user's class after :class:`RetypedNoisy` in its
    MRO), registered for exactly ``spec.cls``; :func:`register_noisy` after its checks, and the built-in
    embedding (``nn/embedding.py``)."""
    cls, weight = spec.cls, spec.weight
    body = {
        "_spec": spec,
        "_plain": cls,
        "__module__": cls.__module__,
        "__doc__": f"Noisy {cls.__name__} (register_noisy).",
    }
    if weight != "weight":
        if hasattr(cls, "weight"):
            raise ValueError(
                f"register_noisy: {cls.__name__} has its own 'weight' attribute; register that one or rename it"
            )
        body["weight"] = property(
            lambda self: self._parameters[weight], doc=f"The crossbar weight (parameter '{weight}')."
        )
    noisy_cls = type(f"Noisy{cls.__name__}", (_RegisteredNoisy, cls), body)
    registry.register_class(cls, noisy_cls)
    return noisy_cls


def unregister_noisy(cls: type) -> None:
    """Undo :func:`register_noisy` for ``cls`` (its layers stay digital again); no error if absent."""
    registry.unregister_class(cls)
