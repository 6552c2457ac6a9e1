"""The one map from plain layer types to noisy ones: what :func:`nft_cuda.convert` reads and every layer
file writes (DESIGN §2).

Each layer family registers its classes when its file is imported (``nn/linear.py``, ``nn/conv.py``,
``nn/attention.py``, ``nn/recurrent.py``, ``nn/embedding.py``; the package imports them all), a user's
layer types arrive through :func:`nft_cuda.register_noisy`, and third-party types through
``nn/third_party.py``. This file imports nothing from ``nft_cuda.nn``, so every other file of the package
may read and write the map without a circle.

An entry is exact (``registered(cls)`` answers for that class only) unless registered with
``subclasses=True``: then a subclass that keeps the registered class's ``forward`` converts too (the
``out_proj`` of ``nn.MultiheadAttention`` is such an ``nn.Linear`` subclass), and one with its own
forward is refused with a reason (:func:`subclass_entry`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch.nn as nn

__all__ = ["NoisySpec", "register_class", "registered", "spec_of", "subclass_entry", "unregister_class"]


@dataclasses.dataclass(frozen=True)
class NoisySpec:
    """How a layer type becomes noisy by a forward function (``nn/generic.py``): ``cls``, its crossbar
    ``weight`` (a parameter name of the module itself) and ``apply(module, weight, *args, **kwargs)``.
    ``by_default`` False means :func:`nft_cuda.convert` converts it only when asked (embeddings)."""

    cls: type
    weight: str
    apply: Callable
    by_default: bool = True


#: plain class → noisy class, in registration order
_NOISY: dict[type, type] = {}
#: the plain classes whose subclasses (keeping the plain forward) convert to the same noisy class
_WITH_SUBCLASSES: set[type] = set()


def register_class(plain_cls: type, noisy_cls: type, *, subclasses: bool = False) -> None:
    """Make ``noisy_cls`` (a noisy class with a ``from_module`` classmethod) the noisy version of
    ``plain_cls``; a second registration of ``plain_cls`` replaces the first."""
    if not (isinstance(plain_cls, type) and issubclass(plain_cls, nn.Module)):
        raise TypeError(f"register_class: plain_cls must be an nn.Module subclass, got {plain_cls!r}")
    if not callable(getattr(noisy_cls, "from_module", None)):
        raise TypeError(f"register_class: {noisy_cls!r} has no from_module classmethod")
    _NOISY[plain_cls] = noisy_cls
    if subclasses:
        _WITH_SUBCLASSES.add(plain_cls)
    else:
        _WITH_SUBCLASSES.discard(plain_cls)


def unregister_class(plain_cls: type) -> None:
    """Forget the registration of ``plain_cls`` (its layers stay digital again); no error if absent."""
    _NOISY.pop(plain_cls, None)
    _WITH_SUBCLASSES.discard(plain_cls)


def registered(cls: type) -> type | None:
    """The noisy class registered for exactly ``cls``, or None."""
    return _NOISY.get(cls)


def subclass_entry(module: nn.Module) -> tuple[type, type] | None:
    """(registered base, its noisy class) for a module whose type subclasses a class registered with
    ``subclasses=True``, the first such registration; None when there is none. The caller decides
    whether the subclass keeps the base's forward."""
    for plain in _NOISY:
        if plain in _WITH_SUBCLASSES and isinstance(module, plain):
            return plain, _NOISY[plain]
    return None


def spec_of(noisy_cls: type) -> NoisySpec | None:
    """The forward-function registration (:class:`NoisySpec`) behind a noisy class, or None for a
    hand-written one."""
    spec = getattr(noisy_cls, "_spec", None)
    return spec if isinstance(spec, NoisySpec) else None
