"""The layer keys ℓ of the chip noise stream (DESIGN §2 instance mode): which key each noisy layer of a
model gets, under noise stream version 2 (from the layer's qualified name) or 1 (its position).

A chip instance r of layer ℓ draws from stream offset (ℓ << 32) | r (:func:`nft_cuda.nn.base.instance_offset`),
so the key decides which chip a layer is. Version 2 keys do not depend on which other layers are noisy;
version 1 keys (every result made before version 2) do. :func:`nft_cuda.convert` keys a converted model,
:func:`nft_cuda.set_instance` and Monte-Carlo key what was not keyed yet.
"""

from __future__ import annotations

import hashlib
import warnings

import torch.nn as nn

from nft_cuda import _args
from nft_cuda.nn.base import NoisyModule

__all__ = [
    "NOISE_STREAM_VERSION",
    "assign_layer_keys",
    "check_stream_version",
    "key_names",
    "name_key",
    "stream_version",
]

#: The version of the chip noise stream (DESIGN §2 instance mode), i.e. how a noisy layer's key ℓ is
#: chosen: 2 (the default since this version): ℓ = :func:`name_key` of the layer's qualified name, so a
#: layer's chips do not depend on which other layers are noisy; 1: ℓ = the layer's position among the
#: model's noisy layers (every result made before version 2; a file or report without a version is 1).
NOISE_STREAM_VERSION = 2


def name_key(name: str) -> int:
    """ℓ of noise stream version 2 for the layer of qualified name ``name`` (its ``named_modules()`` name,
    wrappers left out, see :func:`assign_layer_keys`): the first 31 bits of the
    SHA-256 of the UTF-8 name, read big-endian. Two names of one model may share a key (a chance of about
    n²/2^32 for n layers); :func:`assign_layer_keys` resolves that. The model
    itself (name ``""``: a converted lone layer) has key 0, as a lone layer has in every version."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (a module name), got {type(name).__name__}")
    if not name:
        return 0
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big") >> 1


def check_stream_version(value, name: str = "stream_version") -> int:
    """A noise stream version: 1 (positional layer keys) or 2 (:data:`NOISE_STREAM_VERSION`, name keys)."""
    return _args.check_int(name, value, 1, NOISE_STREAM_VERSION)


def _wrapped_child(module: nn.Module) -> str | None:
    """The child name a wrapper module adds to every name below it: ``module`` of DistributedDataParallel
    and DataParallel, ``_orig_mod`` of a ``torch.compile``'d module; None for any other module."""
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return "module"
    if type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules:
        return "_orig_mod"
    return None


def key_names(model: nn.Module) -> list[tuple[str, NoisyModule]]:
    """(name, layer) of every noisy layer in ``named_modules()`` order, each name without the segments of
    wrappers (DDP's and DataParallel's ``module.``, torch.compile's ``_orig_mod.``): the names layer keys
    are made from, the same for a model and the model wrapped."""
    seen: set[int] = set()
    out: list[tuple[str, NoisyModule]] = []
    stack: list[tuple[str, nn.Module]] = [("", _args.check_module("model", model))]
    while stack:
        prefix, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, NoisyModule):
            out.append((prefix, module))
        skip = _wrapped_child(module)
        children = []
        for name, child in module._modules.items():
            if child is not None:
                part = "" if name == skip else name
                children.append((f"{prefix}.{part}" if prefix and part else prefix or part, child))
        stack.extend(reversed(children))  # pre-order, children in order: named_modules()'s order
    return out


def stream_version(model: nn.Module) -> int | None:
    """The noise stream version (1 or 2) of the keys of ``model``'s noisy layers, or None when no layer has
    been keyed yet (a lone layer, noisy layers built by hand). ValueError when its layers were keyed
    under different versions (pass ``stream_version=`` to set_instance / monte_carlo)."""
    versions = {layer.stream_version for _, layer in key_names(model)} - {None}
    if len(versions) > 1:
        raise ValueError(
            f"the noisy layers of this model were keyed under noise stream versions {sorted(versions)}; "
            "convert it again or pass stream_version= to choose one"
        )
    return versions.pop() if versions else None


def assign_layer_keys(model: nn.Module, version: int | None = None, *, rekey: bool = False) -> list[NoisyModule]:
    """Give every noisy layer of ``model`` its key ℓ of noise stream ``version`` (DESIGN §2); returns the
    layers in ``named_modules()`` order.

    Version 1: ℓ = the layer's position among the noisy layers (always renumbered). Version 2 (default:
    the model's own version, else :data:`NOISE_STREAM_VERSION`): ℓ =
    :func:`name_key` of the layer's name in ``model`` (:func:`key_names`: wrappers
    left out). Layers that already hold a version-2 key keep it unless ``rekey`` (what :func:`convert`
    does), so a converted model keeps its chips when it is later wrapped (IRS, a Sequential). Keys are
    unique: a layer whose key another layer of the model already holds (a SHA-256 collision, about
    n²/2^32 for n layers, or two separately converted parts) takes the key of ``"<name>#1"``, ``"#2"``,
    ... instead, in sorted-name order, with one warning naming the layers: their chips then depend on
    the other layer."""
    if version is None:
        version = stream_version(model) or NOISE_STREAM_VERSION
    version = check_stream_version(version)
    named = key_names(model)
    if version == 1:
        for position, (name, layer) in enumerate(named):
            layer.layer_index, layer.layer_name, layer.stream_version = position, name, 1
        return [layer for _, layer in named]
    taken: dict[int, str] = {}
    fresh = []
    for name, layer in sorted(named, key=lambda nl: nl[0]):
        if not rekey and layer.stream_version == 2 and layer.layer_index not in taken:
            taken[layer.layer_index] = layer.layer_name
        else:
            fresh.append((name, layer))
    moved = []
    for name, layer in fresh:
        key = name_key(name)
        holder, attempt = taken.get(key), 0
        while key in taken:
            attempt += 1
            key = name_key(f"{name}#{attempt}")
        if holder is not None:
            moved.append(f"'{name}' (its key is held by '{holder}')")
        taken[key] = name
        layer.layer_index, layer.layer_name, layer.stream_version = key, name, 2
    if moved:
        warnings.warn(
            f"noise stream layer keys: {', '.join(moved)} share their key with another layer and were given "
            "the next free key; their chips depend on that layer being noisy",
            stacklevel=3,
        )
    return [layer for _, layer in named]
