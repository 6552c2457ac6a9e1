"""Model-wide noise control: the noisy layers of a model and their noise modes, chip instances, read time
and noise state (DESIGN §2 "When noise is drawn").

:func:`noisy_layers` lists them; :func:`set_noise_mode` and the context manager :func:`noise_mode` set
every layer's mode; :func:`set_instance` puts the model on one chip (keying its layers first,
:mod:`nft_cuda.nn.keys`); :func:`set_time` reads a drifting chip at a time; :func:`kept_noise_state`
restores whatever a block changed. Each layer's own state is :class:`nft_cuda.nn.base.NoisyModule`'s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn

from nft_cuda import _args
from nft_cuda.devices.base import check_time
from nft_cuda.nn.base import MODES, NoisyModule
from nft_cuda.nn.keys import assign_layer_keys

__all__ = ["kept_noise_state", "noise_mode", "noisy_layers", "set_instance", "set_noise_mode", "set_time"]


def noisy_layers(model: nn.Module) -> list[tuple[str, NoisyModule]]:
    """(name, layer) of every noisy layer in ``named_modules()`` order: element ℓ is layer ℓ."""
    _args.check_module("model", model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NoisyModule)]


def set_noise_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the noise mode of every noisy layer of ``model``: ``"train"``, ``"off"``, or ``"instance"``
    (only for layers that already have an instance, see :func:`set_instance`). Returns ``model``.

    Raises ValueError for an unknown mode or for a layer that cannot take it (no variation, no instance);
    then no layer is changed."""
    _args.check_module("model", model)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"unknown noise mode {mode!r}; choose one of {', '.join(MODES)}")
    layers = noisy_layers(model)
    for name, layer in layers:
        if mode != "off" and layer.variation is None:
            raise ValueError(f"layer '{name}' has no variation and cannot use noise mode '{mode}'")
        if mode == "instance" and layer.instance is None:
            raise ValueError(f"layer '{name}' has no chip instance: use nft_cuda.set_instance(model, seed, instance)")
    for _, layer in layers:
        layer.mode = mode
    return model


def set_instance(
    model: nn.Module, seed: int, instance: int, *, stream_version: int | None = None, cache: bool | None = None
) -> nn.Module:
    """Put every noisy layer of ``model`` in instance mode for chip instance ``instance`` (DESIGN §2):
    layer ℓ (its key, :func:`assign_layer_keys`) uses
    rng = (seed, nft_cuda.nn.base.instance_offset(ℓ, instance)) = (seed, (ℓ << 32) | instance). Returns ``model``.

    Args:
        seed: the evaluation seed, in [0, 2^63).
        instance: the chip instance r, in [0, 2^32).
        stream_version: the noise stream version of the layer keys (default: the model's own, the one
            :func:`convert` chose; 1 renumbers the layers by position, as before version 2).
        cache: set every layer's ``cache_instance_weights`` (default: leave it; see
            :meth:`NoisyModule.set_instance`, "Cached chip weights").

    No host synchronisation: an existing instance rng buffer is updated in place, so a CUDA graph or a
    compiled graph captured in instance mode evaluates the new instance."""
    _args.check_module("model", model)
    _args.check_seed_int("seed", seed)
    _args.check_uint("instance", instance, 32)
    if cache is not None:
        _args.check_bool("cache", cache)
    for name, layer in noisy_layers(model):
        if layer.variation is None:
            raise ValueError(f"layer '{name}' has no variation and cannot use instance mode")
    for layer in assign_layer_keys(model, stream_version):
        if cache is not None:
            layer.cache_instance_weights = cache
        layer.set_instance(seed, instance)
    return model


def set_time(model: nn.Module, t: float) -> nn.Module:
    """Read the chip ``t`` seconds after programming: every noisy layer of ``model`` whose device model
    has a time (:class:`~nft_cuda.devices.PCM`) gets ``variation.at_time(t)`` (device models are
    immutable values, so each is replaced); layers with time-independent models are left as they are.
    Returns ``model``.

    Raises ValueError (nothing changed) when ``t`` is negative or not finite, or when no noisy layer's
    device model has a time."""
    _args.check_module("model", model)
    t = check_time(t)
    timed = [layer for _, layer in noisy_layers(model) if hasattr(layer.variation, "time")]
    if not timed:
        models = sorted({type(layer.variation).__name__ for _, layer in noisy_layers(model)})
        raise ValueError(
            "set_time: no noisy layer of the model has a time-dependent device model (e.g. nft_cuda.devices.PCM); "
            f"its device models are {models or '[] (it has no noisy layer)'}"
        )
    for layer in timed:
        layer.variation = layer.variation.at_time(t)
    return model


@contextlib.contextmanager
def noise_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Context manager: every noisy layer of ``model`` in ``mode`` inside the block, each layer's
    previous mode restored on exit. ``with nft_cuda.noise_mode(model, "off"): clean = model(x)``."""
    previous = [(layer, layer.mode) for _, layer in noisy_layers(model)]
    set_noise_mode(model, mode)
    try:
        yield model
    finally:
        for layer, m in previous:
            layer.mode = m


@contextlib.contextmanager
def kept_noise_state(model: nn.Module) -> Iterator[list[NoisyModule]]:
    """Context manager: the noisy layers of ``model`` (in ℓ order) for the block; whatever the block
    changes in their noise state (variations, modes, instances, sample plans), it is restored on exit
    (:meth:`NoisyModule.noise_state`)."""
    layers = [layer for _, layer in noisy_layers(model)]
    states = [layer.noise_state() for layer in layers]
    try:
        yield layers
    finally:
        for layer, state in zip(layers, states):
            layer.restore_noise_state(state)
