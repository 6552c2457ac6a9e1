"""Turning any ``nn.Module`` into a noisy one and back, and setting the noise mode of a whole model.

* :func:`convert` swaps ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layers for their noisy
  counterparts (sharing the same Parameter objects, so devices, dtypes and weights are kept), with
  name filters and per-layer variations;
* :func:`strip` gives back a plain model with the same parameters;
* :func:`noisy_layers`, :func:`set_noise_mode`, :func:`set_instance` and the context manager
  :func:`noise_mode` act on every noisy layer of a model.

Layer names are those of ``model.named_modules()`` (e.g. ``"features.0"``, ``"classifier.2"``).
A name pattern is an ``fnmatch`` glob (``*``, ``?``, ``[...]``, case-sensitive; ``*`` also matches dots)
and matches a layer when it matches the layer's name or the name of one of its ancestors, so
``"classifier"`` selects every layer inside ``classifier``, ``"features.0"`` selects that layer (or
everything inside it when it is a container) and ``"*.downsample"`` every layer of every downsample.

Only modules whose type is exactly ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` are converted: subclasses
(e.g. the ``out_proj`` of ``nn.MultiheadAttention``, whose weight is used without calling its
``forward``, or parametrized modules) are left alone. Forward/backward hooks registered on a replaced
module are not carried over.

Fast paths. Some ``torch.nn`` modules (:data:`FAST_PATH_MODULES`: the Transformer encoder, its layers, the
decoder layer and ``nn.MultiheadAttention``) run, in eval mode without gradients, one fused kernel that
reads their submodules' weights directly instead of calling the submodules: noisy layers inside them
would be skipped and every chip would give the clean output. :func:`convert` therefore puts each such
module that holds a noisy layer on its module-calling path (see :func:`guard_fast_paths`);
:func:`strip` takes the guard off again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from nft_cuda import _args
from nft_cuda.layers import MODES, NOISY_CLASSES, PLAIN_CLASSES, NoisyModule, _check_uint
from nft_cuda.variation import Variation

__all__ = ["FAST_PATH_MODULES", "convert", "guard_fast_paths", "noise_mode", "noisy_layers", "set_instance",
           "set_noise_mode", "strip"]


def _check_model(model) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _patterns(name: str, value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a list of module-name patterns (str), got {type(value).__name__}")
    out = list(value)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{name} must hold module-name patterns (str), got {type(p).__name__}")
    return out


def _matches(layer_name: str, pattern: str) -> bool:
    """A pattern matches a layer when it matches its name or the name of one of its ancestors."""
    if fnmatch.fnmatchcase(layer_name, pattern):
        return True
    parts = layer_name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts)))


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return f"[{shown}{more}]" if names else "[] (the model has none)"


def _replace(model: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    """Replace every occurrence of the modules in memo (id → new), shared modules included; returns
    the new root."""
    if id(model) in memo:
        return memo[id(model)]
    for module in model.modules():
        for child_name, child in list(module._modules.items()):
            if child is not None and id(child) in memo:
                setattr(module, child_name, memo[id(child)])
    return model


def _renumber(model: nn.Module) -> list[NoisyModule]:
    layers = [m for _, m in noisy_layers(model)]
    for i, layer in enumerate(layers):
        layer.layer_index = i
    return layers


def convert(model: nn.Module, variation: Variation, include=None, exclude=None,
            per_layer: Mapping[str, Variation] | None = None, *, mode: str = "train") -> nn.Module:
    """Swap the Linear/Conv1d/Conv2d layers of ``model`` for noisy ones, in place.

    Args:
        model: any ``nn.Module`` (Sequential, ModuleDict, torchvision-style models, a lone layer).
        variation: the :class:`~nft_cuda.Variation` of every converted layer without a
            ``per_layer`` entry.
        include: module-name patterns; only matching layers are converted (default: all).
        exclude: module-name patterns of layers to keep digital (e.g. the first and last layer).
        per_layer: pattern → Variation overriding ``variation`` for the matching converted layers. An
            exact layer name wins over globs; among globs, the first matching entry wins.
        mode: the noise mode of the converted layers, ``"train"`` (default) or ``"off"``.

    Returns:
        ``model`` itself with its layers replaced (or the new layer when ``model`` is itself a
        Linear/Conv layer). The noisy layers share the original Parameter objects, so the state_dict,
        devices and dtypes are unchanged. Layers already noisy and selected get the new variation.
        Every noisy layer's ``layer_index`` is set to its position among the noisy layers in
        ``named_modules()`` order (DESIGN §2).

    Raises:
        TypeError: wrong argument types.
        ValueError: a pattern of ``include``/``exclude``/``per_layer`` matching no convertible layer
            (the message lists them and the layer names), or an unknown mode.
    """
    _check_model(model)
    if not isinstance(variation, Variation):
        raise TypeError(f"variation must be an nft_cuda.Variation, got {type(variation).__name__}")
    include = _patterns("include", include)
    exclude = _patterns("exclude", exclude)
    if per_layer is None:
        per_layer = {}
    if not isinstance(per_layer, Mapping):
        raise TypeError(f"per_layer must be a mapping of module-name pattern -> Variation, "
                        f"got {type(per_layer).__name__}")
    for pat, var in per_layer.items():
        if not isinstance(pat, str):
            raise TypeError(f"per_layer keys must be module-name patterns (str), got {type(pat).__name__}")
        if not isinstance(var, Variation):
            raise TypeError(f"per_layer['{pat}'] must be an nft_cuda.Variation, got {type(var).__name__}")
    if not isinstance(mode, str) or mode not in ("train", "off"):
        raise ValueError(f"convert: mode must be 'train' or 'off' (use set_instance for instance mode), got {mode!r}")

    candidates = [(name, m) for name, m in model.named_modules()
                  if type(m) in NOISY_CLASSES or isinstance(m, NoisyModule)]
    names = [n for n, _ in candidates]

    unknown = []
    for label, pats in (("include", include), ("exclude", exclude), ("per_layer", list(per_layer))):
        for p in pats or ():
            if not any(_matches(n, p) for n in names):
                unknown.append(f"{label} {p!r}")
    if unknown:
        raise ValueError(f"convert: {', '.join(unknown)} match no Linear/Conv1d/Conv2d layer; "
                         f"the convertible layers are {_listing(names)}")

    selected = [(n, m) for n, m in candidates
                if (include is None or any(_matches(n, p) for p in include))
                and not any(_matches(n, p) for p in exclude or ())]
    sel_names = [n for n, _ in selected]
    unused = [p for p in per_layer if not any(_matches(n, p) for n in sel_names)]
    if unused:
        raise ValueError(f"convert: per_layer {', '.join(map(repr, unused))} match only layers left out by "
                         f"include/exclude; the converted layers are {_listing(sel_names)}")

    def variation_of(name: str) -> Variation:
        if name in per_layer:
            return per_layer[name]
        for pat, var in per_layer.items():
            if _matches(name, pat):
                return var
        return variation

    memo: dict[int, nn.Module] = {}
    for name, module in selected:
        var = variation_of(name)
        if isinstance(module, NoisyModule):
            module.variation = var
            continue
        memo[id(module)] = NOISY_CLASSES[type(module)].from_module(module, var, mode=mode)
    model = _replace(model, memo)
    _renumber(model)
    guard_fast_paths(model)
    return model


def strip(model: nn.Module) -> nn.Module:
    """Replace every noisy layer by the plain ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` with the same
    Parameter objects, in place; returns ``model`` (or the plain layer when ``model`` is a noisy
    layer). The state_dict is unchanged."""
    _check_model(model)
    memo: dict[int, nn.Module] = {}
    for _, module in model.named_modules():
        if isinstance(module, NoisyModule) and id(module) not in memo:
            plain_cls = next((p for noisy, p in PLAIN_CLASSES.items() if isinstance(module, noisy)), None)
            if plain_cls is None:
                raise TypeError(f"strip: no plain counterpart known for {type(module).__name__}")
            memo[id(module)] = _plain_copy(module, plain_cls)
    model = _replace(model, memo)
    guard_fast_paths(model)
    return model


# --------------------------------------------------------------------------------------------------
# Fast-path guard
# --------------------------------------------------------------------------------------------------

#: Module types whose forward may bypass their submodules: in eval mode without gradients they call
#: one fused kernel (``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_attention``, the
#: nested-tensor encoder) that reads the submodules' weights directly. All of them look at
#: ``torch.backends.mha.get_fastpath_enabled()`` first.
FAST_PATH_MODULES: tuple[type[nn.Module], ...] = (
    nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention,
)

_guards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its two hook handles
_saved_flags = threading.local()  # per-thread stack of the fast-path flags our pre-hooks replaced


def _fast_path_off(module: nn.Module, args) -> None:
    # The flag is global: switch it off for the duration of this module's forward only. (Having a
    # pre-hook at all also makes TransformerEncoderLayer skip its fast path.)
    stack = _saved_flags.__dict__.setdefault("stack", [])
    stack.append(torch.backends.mha.get_fastpath_enabled())
    torch.backends.mha.set_fastpath_enabled(False)


def _fast_path_restore(module: nn.Module, args, output) -> None:
    stack = _saved_flags.__dict__.get("stack")
    if stack:
        torch.backends.mha.set_fastpath_enabled(stack.pop())


def _is_guarded(module: nn.Module) -> bool:
    return any(hook is _fast_path_off for hook in module._forward_pre_hooks.values())


def guard_fast_paths(model: nn.Module) -> list[str]:
    """Put every :data:`FAST_PATH_MODULES` module of ``model`` that contains a noisy layer on its
    module-calling path, so its noisy layers are used in every mode (eval, ``no_grad``,
    ``inference_mode``), and take the guard off modules that no longer contain one. Idempotent;
    :func:`convert` and :func:`strip` call it. Returns the names of the guarded modules.

    The guard is a forward pre-hook that switches ``torch.backends.mha`` fast paths off while the module
    runs (restored afterwards, even on error) — only for the guarded modules: other transformer layers
    keep their fast path. A deep copy of a guarded model keeps working guards; :func:`strip` on that copy
    leaves them in place (they then only cost the fast path's speed).
    """
    _check_model(model)
    guarded = []
    for name, module in model.named_modules():
        if not isinstance(module, FAST_PATH_MODULES):
            continue
        wants = any(isinstance(m, NoisyModule) for m in module.modules())
        if wants:
            guarded.append(name)
            if not _is_guarded(module):
                _guards[module] = (module.register_forward_pre_hook(_fast_path_off),
                                   module.register_forward_hook(_fast_path_restore, always_call=True))
        elif module in _guards:
            for handle in _guards.pop(module):
                handle.remove()
    return guarded


def _plain_copy(module: nn.Module, plain_cls: type) -> nn.Module:
    if plain_cls is nn.Linear:
        new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    else:
        new = plain_cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                        padding=module.padding, dilation=module.dilation, groups=module.groups,
                        bias=module.bias is not None, padding_mode=module.padding_mode, device="meta")
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    return new


def noisy_layers(model: nn.Module) -> list[tuple[str, NoisyModule]]:
    """(name, layer) of every noisy layer in ``named_modules()`` order: element ℓ is layer ℓ."""
    _check_model(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NoisyModule)]


def set_noise_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the noise mode of every noisy layer of ``model``: ``"train"``, ``"off"``, or ``"instance"``
    (only for layers that already have an instance, see :func:`set_instance`). Returns ``model``.

    Raises ValueError for an unknown mode or for a layer that cannot take it (no variation, no instance);
    then no layer is changed."""
    _check_model(model)
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


def set_instance(model: nn.Module, seed: int, instance: int) -> nn.Module:
    """Put every noisy layer of ``model`` in instance mode for chip instance ``instance`` (DESIGN §2):
    layer ℓ (its position among noisy layers in ``named_modules()`` order) uses
    rng = (seed, (ℓ << 32) | instance). Returns ``model``.

    Args:
        seed: the evaluation seed, in [0, 2^63).
        instance: the chip instance r, in [0, 2^32).

    No host synchronisation: an existing instance rng buffer is updated in place, so a CUDA graph or a
    compiled graph captured in instance mode evaluates the new instance."""
    _check_model(model)
    _args.check_seed_int("seed", seed)
    _check_uint("instance", instance, 32)
    layers = _renumber(model)
    for name, layer in noisy_layers(model):
        if layer.variation is None:
            raise ValueError(f"layer '{name}' has no variation and cannot use instance mode")
    for layer in layers:
        layer.set_instance(seed, instance)
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
            layer._mode = m
