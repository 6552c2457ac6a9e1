"""Turning any ``nn.Module`` into a noisy one and back.

* :func:`convert` swaps the layers of the registry (:mod:`nft_cuda.nn.registry`: ``nn.Linear`` /
  ``nn.Conv1d`` / ``nn.Conv2d``, attention, recurrent layers, registered types) for their noisy
  counterparts (sharing the same Parameter objects, so devices, dtypes and weights are kept), with
  name filters and per-layer variations, and keys them in the chip noise stream (:mod:`nft_cuda.nn.keys`);
* :func:`strip` gives back a plain model with the same parameters;
* :func:`conversion_summary` says what the model's conversion did.

The noise of the converted model is then set model-wide by :mod:`nft_cuda.nn.modes`.

Layer names are those of ``model.named_modules()`` (e.g. ``"features.0"``, ``"classifier.2"``).
A name pattern is an ``fnmatch`` glob (``*``, ``?``, ``[...]``, case-sensitive; ``*`` also matches dots)
and matches a layer when it matches the layer's name or the name of one of its ancestors, so
``"classifier"`` selects every layer inside ``classifier``, ``"features.0"`` selects that layer (or
everything inside it when it is a container) and ``"*.downsample"`` every layer of every downsample.

Converted are ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` and their subclasses that keep the base
class's ``forward`` (e.g. the ``out_proj`` of ``nn.MultiheadAttention``: a child whose weight its parent
reads directly is converted only together with that parent; a weight under a new-style
``torch.nn.utils.parametrize`` parametrization is noisy after its parametrization), the layer types
registered with :func:`nft_cuda.register_noisy` and, with ``embeddings=True``, ``nn.Embedding``.
Subclasses with their own ``forward``, old-style ``weight_norm``/``spectral_norm`` layers (with a warning)
and unknown types stay digital; normalisation layers and embeddings stay digital by default.
:func:`nft_cuda.conversion_summary` says what a conversion did and why each weight matrix left digital was
left; ``strict=True`` makes a gap an error.

Nothing of a converted module is lost: the noisy layer is the same object state under a noisy class
(:func:`nft_cuda.nn.base.retyped_copy`): a subclass's attributes, buffers and parameters, its hooks (whose
handles keep working) and parametrizations are kept, a subclass stays an instance of its class, and
:func:`strip` gives back the original class.

Fast paths. Some ``torch.nn`` modules (:data:`FAST_PATH_MODULES`: the Transformer encoder, its layers, the
decoder layer and ``nn.MultiheadAttention``) run, in eval mode without gradients, one fused kernel that
reads their submodules' weights directly instead of calling the submodules: noisy layers inside them
would be skipped and every chip would give the clean output. :func:`convert` therefore puts each such
module that holds a noisy layer on its module-calling path (see :func:`guard_fast_paths`);
:func:`strip` takes the guard off again.
"""

from __future__ import annotations

import fnmatch
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from nft_cuda import _args
from nft_cuda.devices import DeviceModel
from nft_cuda.nn import registry, summary, third_party
from nft_cuda.nn.base import NoisyModule
from nft_cuda.nn.keys import NOISE_STREAM_VERSION, assign_layer_keys, check_stream_version
from nft_cuda.nn.modes import noisy_layers

__all__ = ["FAST_PATH_MODULES", "conversion_summary", "convert", "guard_fast_paths", "strip"]


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
    the new root. A replaced module's fast-path guard moves to its replacement (they share hook tables)."""
    root = model
    if id(model) in memo:  # a converted root (e.g. a lone MultiheadAttention): its children are replaced too
        _carry_guard(model, memo[id(model)])
        root = memo[id(model)]
    for module in root.modules():
        for child_name, child in list(module._modules.items()):
            if child is not None and id(child) in memo:
                _carry_guard(child, memo[id(child)])
                setattr(module, child_name, memo[id(child)])
    return root


def _classify(module: nn.Module, embeddings: bool) -> tuple[type | None, str, bool]:
    """(noisy class, "", _) for a module convert can make noisy, else (None, why it stays digital, whether
    that is a documented default rather than a gap)."""
    t = type(module)
    if isinstance(module, NoisyModule):
        return t, "", True
    old_style = _old_style_norm(module)
    if old_style is not None:
        return None, old_style, False
    noisy = registry.registered(t)
    if noisy is not None:
        spec = registry.spec_of(noisy)
        if spec is not None and not spec.by_default and not embeddings:
            return None, f"{t.__name__}: embeddings stay digital by default (convert(..., embeddings=True))", True
        if spec is not None and spec.weight not in dict(module.named_parameters(recurse=False)):
            raise ValueError(
                f"convert: {t.__name__} is registered with weight {spec.weight!r}, which is not one of "
                f"its parameters {[n for n, _ in module.named_parameters(recurse=False)]}"
            )
        return noisy, "", True
    if isinstance(module, parametrize.ParametrizationList):
        return None, "the parametrization of a weight whose layer stays digital", True
    entry = registry.subclass_entry(module)
    if entry is not None:
        base, noisy = entry
        if t.forward is base.forward:  # a subclass that adds attributes, or parametrizations (MHA's out_proj)
            return noisy, "", True
        return (
            None,
            f"{t.__name__} subclasses nn.{base.__name__} with its own forward: register it with nft_cuda.register_noisy",
            False,
        )
    if parametrize.is_parametrized(module):
        return (
            None,
            f"parametrized {t.__name__} (torch.nn.utils.parametrize) of a type convert only knows exactly",
            False,
        )
    if isinstance(module, _NORMALISATIONS):
        return None, f"{t.__name__}: normalisation layers stay digital", True
    if next(module.children(), None) is not None:  # a model or block holding a tensor of its own
        return (
            None,
            (
                f"a parameter of {t.__name__} itself, not of a layer (a class or position token, say): leave it "
                "digital on purpose with exclude=[its name]"
            ),
            False,
        )
    return None, f"unsupported type {t.__name__}: register it with nft_cuda.register_noisy", False


#: The forward pre-hooks of torch's old-style weight reparametrizations, which rewrite ``module.weight`` as
#: a plain tensor before every forward, and the new-style parametrization each one has.
_OLD_STYLE_NORMS = {"WeightNorm": "weight_norm", "SpectralNorm": "spectral_norm"}


def _old_style_norm(module: nn.Module) -> str | None:
    """Why a module under ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (the old hook-based forms) stays
    digital, or None: its weight is recomputed by a hook outside the layer, so the layer cannot own it."""
    for hook in module._forward_pre_hooks.values():
        name = _OLD_STYLE_NORMS.get(type(hook).__name__)
        if name is not None and type(hook).__module__.startswith("torch.nn.utils"):
            return (
                f"old-style torch.nn.utils.{name} (a pre-hook rewrites its weight on every forward): use "
                f"torch.nn.utils.parametrizations.{name}, which convert carries over"
            )
    return None


def _warn_old_style_norms(reasons: dict[str, tuple[str, bool]]) -> None:
    """One UserWarning naming the layers left digital because of an old-style weight reparametrization."""
    old = sorted(name for name, (why, _) in reasons.items() if why.startswith("old-style"))
    if old:
        warnings.warn(f"convert left {_listing(old)} digital: {reasons[old[0]][0]}", UserWarning, stacklevel=3)


def _inherit_parametrization_reasons(modules, reasons: dict[str, tuple[str, bool]]) -> None:
    """The ``original`` of a parametrized weight left digital is digital for its layer's reason (the
    layer itself has no weight parameter to list)."""
    for name, module in modules:
        owner = name.rpartition(".parametrizations.")[0]
        if isinstance(module, parametrize.ParametrizationList) and owner in reasons:
            reasons[name] = reasons[owner]


#: Modules whose forward reads a child's weight without calling the child: the child can only be noisy
#: when its parent is converted too.
_READS_CHILD_WEIGHTS: tuple[type, ...] = (nn.MultiheadAttention,)
_NORMALISATIONS: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)


def _weight_names(module_name: str, module: nn.Module) -> list[str]:
    prefix = f"{module_name}." if module_name else ""
    return [prefix + n for n, p in module.named_parameters(recurse=False) if summary.is_weight_matrix(n, p)]


def _check_options(variation, include, exclude, per_layer, mode, embeddings, strict):
    if not isinstance(variation, DeviceModel):
        raise TypeError(f"variation must be a device model (nft_cuda.Variation, ...), got {type(variation).__name__}")
    include = _patterns("include", include)
    exclude = _patterns("exclude", exclude)
    if per_layer is None:
        per_layer = {}
    if not isinstance(per_layer, Mapping):
        raise TypeError(
            f"per_layer must be a mapping of module-name pattern -> device model, got {type(per_layer).__name__}"
        )
    for pat, var in per_layer.items():
        if not isinstance(pat, str):
            raise TypeError(f"per_layer keys must be module-name patterns (str), got {type(pat).__name__}")
        if not isinstance(var, DeviceModel):
            raise TypeError(
                f"per_layer['{pat}'] must be a device model (nft_cuda.Variation, ...), got {type(var).__name__}"
            )
    if not isinstance(mode, str) or mode not in ("train", "off"):
        raise ValueError(f"convert: mode must be 'train' or 'off' (use set_instance for instance mode), got {mode!r}")
    for flag, value in (("embeddings", embeddings), ("strict", strict)):
        if not isinstance(value, bool):
            raise TypeError(f"convert: {flag} must be a bool, got {type(value).__name__}")
    return include, exclude, per_layer


def _select(modules, kinds, include, exclude, per_layer):
    """(selected (name, module) pairs, reasons for the convertible or weight-holding modules left out)."""
    candidates = [(n, m) for n, m in modules if kinds[n][0] is not None]
    names = [n for n, _ in candidates]
    weights = {n: _weight_names(n, m) for n, m in modules}

    def excluded(name: str) -> bool:
        return any(_matches(name, p) or any(_matches(w, p) for w in weights[name]) for p in exclude or ())

    unknown = []
    for label, pats, pool in (
        ("include", include, names),
        ("exclude", exclude, names + sum(weights.values(), [])),
        ("per_layer", list(per_layer), names),
    ):
        for p in pats or ():
            if not any(_matches(n, p) for n in pool):
                unknown.append(f"{label} {p!r}")
    if unknown:
        raise ValueError(
            f"convert: {', '.join(unknown)} match no convertible layer; the convertible layers are {_listing(names)}"
        )
    reasons: dict[str, tuple[str, bool]] = {}
    selected = []
    for name, module in modules:
        if excluded(name):
            reasons[name] = ("excluded by the user (exclude=)", True)
        elif kinds[name][0] is None:
            reasons[name] = kinds[name][1:]
        elif include is not None and not any(_matches(name, p) for p in include):
            reasons[name] = ("not selected by include=", True)
        else:
            selected.append((name, module))
    return _drop_children_read_directly(modules, selected, reasons), reasons


def _drop_children_read_directly(modules, selected, reasons):
    kept = {n for n, _ in selected}
    by_name = dict(modules)
    out = []
    for name, module in selected:
        parent = name.rpartition(".")[0] if "." in name else ("" if name else None)
        owner = by_name.get(parent) if parent is not None else None
        if isinstance(owner, _READS_CHILD_WEIGHTS) and not isinstance(owner, NoisyModule) and parent not in kept:
            why, chosen = reasons.get(parent, ("", False))
            reasons[name] = (
                f"its weight is read directly by '{parent}' ({type(owner).__name__}), which stays "
                f"digital" + (f": {why}" if why else ""),
                chosen,
            )
        else:
            out.append((name, module))
    return out


def convert(
    model: nn.Module,
    variation: DeviceModel,
    include=None,
    exclude=None,
    per_layer: Mapping[str, DeviceModel] | None = None,
    *,
    mode: str = "train",
    embeddings: bool = False,
    strict: bool = False,
    stream_version: int = NOISE_STREAM_VERSION,
) -> nn.Module:
    """Swap the layers of ``model`` that a crossbar would hold for noisy ones, in place.

    Converted: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and their subclasses that keep the base
    class's forward (e.g. the ``out_proj`` of attention), the types registered with
    :func:`nft_cuda.register_noisy`, and ``nn.Embedding`` when ``embeddings=True``. What was converted and
    every weight matrix (≥ 2-D parameter, not a bias) left digital, with the reason, is in
    :func:`nft_cuda.conversion_summary` ``(model)``.

    Args:
        model: any ``nn.Module`` (Sequential, ModuleDict, torchvision-style models, a lone layer).
        variation: the :class:`~nft_cuda.Variation` of every converted layer without a
            ``per_layer`` entry.
        include: module-name patterns; only matching layers are converted (default: all).
        exclude: module-name patterns of layers to keep digital (e.g. the first and last layer); a
            pattern may also name a weight (``"pos_embedding"``) to mark it as digital on purpose.
        per_layer: pattern → Variation overriding ``variation`` for the matching converted layers. An
            exact layer name wins over globs; among globs, the first matching entry wins.
        mode: the noise mode of the converted layers, ``"train"`` (default) or ``"off"``.
        embeddings: also make ``nn.Embedding`` layers noisy (default: they stay digital).
        strict: raise ValueError, converting nothing, when a weight matrix would stay digital without
            being excluded (an unsupported or unregistered layer type, say); the message lists them all.
        stream_version: how the noisy layers' keys ℓ of the chip noise stream are chosen (DESIGN §2):
            2 (default, :data:`~nft_cuda.nn.keys.NOISE_STREAM_VERSION`): from each layer's qualified
            name, so a layer's chips do not depend on which other layers are converted; 1: by position
            among the noisy layers (the stream of results made before version 2).

    Returns:
        ``model`` itself with its layers replaced (or the new layer when ``model`` is itself a
        convertible layer). The noisy layers share the original Parameter objects, so the state_dict,
        devices and dtypes are unchanged. Layers already noisy and selected get the new variation.
        Every noisy layer of ``model`` (new or not) gets its key ``layer_index`` of ``stream_version``
        from its name in ``model`` (:func:`assign_layer_keys` with ``rekey=True``; DESIGN §2).

    Raises:
        TypeError: wrong argument types.
        ValueError: a pattern of ``include``/``exclude``/``per_layer`` matching no convertible layer
            (the message lists them and the layer names), an unknown mode, or ``strict`` with weight
            matrices left digital.
    """
    _args.check_module("model", model)
    third_party.register_known()  # e.g. transformers' Conv1D, when transformers is imported
    include, exclude, per_layer = _check_options(variation, include, exclude, per_layer, mode, embeddings, strict)
    stream_version = check_stream_version(stream_version)
    modules = list(model.named_modules())
    kinds = {name: _classify(m, embeddings) for name, m in modules}
    selected, reasons = _select(modules, kinds, include, exclude, per_layer)
    _inherit_parametrization_reasons(modules, reasons)
    sel_names = [n for n, _ in selected]
    unused = [p for p in per_layer if not any(_matches(n, p) for n in sel_names)]
    if unused:
        raise ValueError(
            f"convert: per_layer {', '.join(map(repr, unused))} match only layers left out by "
            f"include/exclude; the converted layers are {_listing(sel_names)}"
        )

    def variation_of(name: str) -> DeviceModel:
        if name in per_layer:
            return per_layer[name]
        for pat, var in per_layer.items():
            if _matches(name, pat):
                return var
        return variation

    memo: dict[int, nn.Module] = {}
    converted: dict[str, NoisyModule] = {}
    for name, module in selected:
        if not isinstance(module, NoisyModule) and id(module) not in memo:
            memo[id(module)] = kinds[name][0].from_module(module, variation_of(name), mode=mode)
        converted[name] = memo.get(id(module), module)
    result = summary.build_summary(model, converted, reasons)
    if strict and result.unexpected:
        raise ValueError(
            "convert(strict=True): these weight matrices would stay digital:\n  "
            + "\n  ".join(f"{w.name} {list(w.shape)}: {w.reason}" for w in result.unexpected)
            + "\nregister their layer types (nft_cuda.register_noisy) or leave them digital on purpose: "
            + f"exclude={[w.name for w in result.unexpected]}"
        )
    for name, module in selected:
        if isinstance(module, NoisyModule):
            module.variation = variation_of(name)
    kept = _left_as_they_were(modules, sel_names, reasons, mode)
    previous = summary.record_of(model)
    model = _replace(model, memo)
    assign_layer_keys(model, stream_version, rekey=True)
    guard_fast_paths(model)
    summary.remember(model, _record(modules, reasons, selected, previous, kept, embeddings))
    _warn_kept(modules, sel_names, exclude, mode)
    _warn_old_style_norms(reasons)
    return model


def _left_as_they_were(modules, selected: list[str], reasons, mode: str) -> tuple[summary.KeptLayer, ...]:
    """The already-noisy layers a convert call leaves as they were: not selected (convert never makes a
    layer digital again), or selected but in another noise mode than ``mode`` (they keep theirs)."""
    chosen = set(selected)
    out = []
    for name, module in modules:
        if not isinstance(module, NoisyModule):
            continue
        if name not in chosen:
            why = reasons.get(name, ("not selected", True))[0]
            out.append(
                summary.KeptLayer(
                    name,
                    f"{why}, but already noisy: left noisy at {module.variation} (nft_cuda.strip makes it digital)",
                )
            )
        elif module.mode != mode:
            out.append(
                summary.KeptLayer(
                    name,
                    f"already noisy: took the new variation but kept noise mode {module.mode!r}, not {mode!r} "
                    "(nft_cuda.set_noise_mode sets it)",
                )
            )
    return tuple(out)


def _warn_kept(modules, selected: list[str], exclude, mode: str) -> None:
    """One UserWarning when a convert call leaves an already-noisy layer otherwise than asked: named by
    ``exclude=`` yet still noisy, or selected yet not in ``mode``. (Layers merely not matched by
    ``include=`` are left as they were silently: that is what include= on a converted model is for.)"""
    chosen = set(selected)
    noisy = [(n, m) for n, m in modules if isinstance(m, NoisyModule)]
    excluded = [n for n, _ in noisy if n not in chosen and any(_matches(n, p) for p in exclude or ())]
    moded = [n for n, m in noisy if n in chosen and m.mode != mode]
    parts = []
    if excluded:
        parts.append(
            f"{_listing(excluded)} named by exclude= are already noisy and stay noisy (nft_cuda.strip "
            "makes layers digital)"
        )
    if moded:
        parts.append(
            f"{_listing(moded)} were already noisy and keep their noise mode, not {mode!r} "
            "(nft_cuda.set_noise_mode sets it)"
        )
    if parts:
        warnings.warn(
            "convert left layers as they were: " + "; ".join(parts) + " (see nft_cuda.conversion_summary(model).kept)",
            UserWarning,
            stacklevel=3,
        )


def _record(modules, reasons, selected, previous, kept, embeddings: bool) -> summary.ConversionRecord:
    """What a convert call intended (summary.ConversionRecord): the reasons of the modules it left digital
    and the original types of the layers noisy after it (those made noisy by an earlier call keep theirs)."""
    types = {name: type(m).__name__ for name, m in modules}
    originals = dict(previous.original_types) if previous is not None else {}
    for name, module in selected:
        if not isinstance(module, NoisyModule):
            originals[name] = types[name]
    return summary.ConversionRecord(
        {name: (why, chosen, types[name]) for name, (why, chosen) in reasons.items() if name in types},
        originals,
        kept,
        embeddings,
    )


def conversion_summary(model: nn.Module) -> summary.ConversionSummary:
    """The :class:`~nft_cuda.nn.summary.ConversionSummary` of ``model`` as it is now: every noisy layer
    (with its device model and mode now, whatever convert call made it noisy), every weight matrix left
    digital with why, tied parameters counted once, and the layers the last :func:`convert` call left as
    they were (``kept``). Built on each call from the model's modules and the intentions the convert
    calls recorded on it (exclusions, original types; kept by ``copy.deepcopy``).

    Raises LookupError when ``model`` has no noisy layer and was never converted (or was stripped since)."""
    _args.check_module("model", model)
    record = summary.record_of(model)
    layers = dict(noisy_layers(model))
    if record is None and not layers:
        raise LookupError(f"{type(model).__name__} has no conversion summary: call nft_cuda.convert(model, ...) first")
    if record is None:
        record = summary.ConversionRecord({}, {})
    reasons = {}
    for name, module in model.named_modules():
        if name in layers:
            continue
        why = record.reasons.get(name)
        if why is not None and why[2] == type(module).__name__:
            reasons[name] = why[:2]
            continue
        kind, why, chosen = _classify(module, record.embeddings)
        reasons[name] = (
            (why, chosen) if kind is None else (f"{type(module).__name__}: no convert call made it noisy", False)
        )
    _inherit_parametrization_reasons(model.named_modules(), reasons)
    originals = {name: record.original_types.get(name) or _plain_type_name(layer) for name, layer in layers.items()}
    return summary.build_summary(model, layers, reasons, originals, record.kept)


def _plain_type_name(layer: NoisyModule) -> str:
    """The name of the plain class a noisy layer stands for (its first non-noisy base)."""
    for cls in type(layer).__mro__:
        if issubclass(cls, nn.Module) and not issubclass(cls, NoisyModule) and cls is not nn.Module:
            return cls.__name__
    return type(layer).__name__


def strip(model: nn.Module) -> nn.Module:
    """Replace every noisy layer by the module it was made from (the layer's ``plain_copy()``: its class,
    ``nn.Linear`` or a user's subclass, with the same Parameter, buffer, submodule and hook objects), in
    place; returns ``model`` (or the plain layer when ``model`` is a noisy layer). The state_dict is
    unchanged."""
    _args.check_module("model", model)
    memo: dict[int, nn.Module] = {}
    for _, module in model.named_modules():
        if isinstance(module, NoisyModule) and id(module) not in memo:
            if not callable(getattr(module, "plain_copy", None)):
                raise TypeError(f"strip: no plain counterpart known for {type(module).__name__}")
            memo[id(module)] = module.plain_copy()
    summary.forget(model)
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
    nn.TransformerEncoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.MultiheadAttention,
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


def _carry_guard(old: nn.Module, new: nn.Module) -> None:
    """Hand the guard of ``old`` to ``new``, its retyped copy (the same hook tables, so the same handles)."""
    handles = _guards.pop(old, None)
    if handles is not None:
        _guards[new] = handles


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
    _args.check_module("model", model)
    guarded = []
    for name, module in model.named_modules():
        if not isinstance(module, FAST_PATH_MODULES):
            continue
        wants = any(isinstance(m, NoisyModule) for m in module.modules())
        if wants:
            guarded.append(name)
            if not _is_guarded(module):
                _guards[module] = (
                    module.register_forward_pre_hook(_fast_path_off),
                    module.register_forward_hook(_fast_path_restore, always_call=True),
                )
        elif module in _guards:
            for handle in _guards.pop(module):
                handle.remove()
    return guarded
