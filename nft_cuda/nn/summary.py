"""What a model's conversion is: the layers that are noisy and the weight matrices left digital, with why.

A *weight matrix* is a parameter with two or more dimensions whose name does not start with ``bias``
(``bias_k``/``bias_v`` of attention are biases); 1-D parameters (biases, normalisation scales) are
counted but not listed. ``nft_cuda.conversion_summary(model)`` (:mod:`nft_cuda.nn.conversion`) builds the
summary from the model as it is now, whenever it is called: every noisy layer with its current device
model and mode, whatever convert call made it noisy; what the calls only *intended* (why a layer was
excluded, the type a layer had before) comes from a small :class:`ConversionRecord` that
:func:`~nft_cuda.convert` stores on the model (an attribute, so ``copy.deepcopy`` and pickling keep it).
One parameter reachable under several names (tied weights such as GPT-2's ``wte``/``lm_head``, a module
used twice) is counted once and listed in ``tied``. ``print()`` the summary for a table.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from nft_cuda.devices import DeviceModel
from nft_cuda.nn.base import NoisyModule

__all__ = [
    "ConversionRecord",
    "ConversionSummary",
    "ConvertedLayer",
    "DigitalWeight",
    "KeptLayer",
    "TiedWeight",
    "is_weight_matrix",
]


def is_weight_matrix(name: str, param) -> bool:
    """Whether a parameter is a weight matrix (≥ 2-D, not a bias) that a crossbar could hold."""
    return param.dim() >= 2 and not name.rsplit(".", 1)[-1].startswith("bias")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclasses.dataclass(frozen=True)
class ConvertedLayer:
    """A noisy layer: its module name, the type it had and has, its crossbar weights and their size, and
    its device model and noise mode at the time of the summary."""

    name: str
    original_type: str
    noisy_type: str
    weights: tuple[str, ...]
    params: int
    variation: DeviceModel | None = None
    mode: str = ""


@dataclasses.dataclass(frozen=True)
class DigitalWeight:
    """A weight matrix left digital. ``chosen``: by the user (exclude/include) or by a documented
    default (embeddings); otherwise ``convert(..., strict=True)`` raises for it."""

    name: str
    shape: tuple[int, ...]
    reason: str
    chosen: bool

    @property
    def params(self) -> int:
        return _numel(self.shape)


@dataclasses.dataclass(frozen=True)
class TiedWeight:
    """One parameter under several names (tied weights, a shared module), counted once in the totals.
    ``noisy``: a noisy layer perturbs it where that layer reads it; ``reason`` says who reads it how."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    noisy: bool
    reason: str

    @property
    def params(self) -> int:
        return _numel(self.shape)


@dataclasses.dataclass(frozen=True)
class KeptLayer:
    """A layer that was already noisy and that the last :func:`~nft_cuda.convert` call left as it was
    (entirely, or its noise mode), with why."""

    name: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ConversionRecord:
    """What the last :func:`~nft_cuda.convert` call of a model intended, kept on the model: per module name
    (why digital, chosen, the module's type name then), the original type of each layer made noisy,
    the layers it left as they were, and its ``embeddings`` option. Only what the model's state cannot
    tell; the summary applies a reason only while the module there still has that type and is digital."""

    reasons: dict[str, tuple[str, bool, str]]
    original_types: dict[str, str]
    kept: tuple[KeptLayer, ...] = ()
    embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """A model's conversion (``print(summary)`` shows it as a table)."""

    converted: tuple[ConvertedLayer, ...]
    digital: tuple[DigitalWeight, ...]
    other_params: int  #: elements of the 1-D parameters and biases (always digital)
    tied: tuple[TiedWeight, ...] = ()
    kept: tuple[KeptLayer, ...] = ()  #: already-noisy layers the last convert call left as they were

    @property
    def noisy_params(self) -> int:
        """Elements of the noisy crossbar weights, each parameter counted once."""
        total = sum(layer.params for layer in self.converted)
        listed = [w for layer in self.converted for w in layer.weights]
        for tie in self.tied:  # a parameter perturbed by k noisy layers is listed k times
            total -= max(sum(n in tie.names for n in listed) - 1, 0) * tie.params
        return total

    @property
    def digital_params(self) -> int:
        return sum(w.params for w in self.digital)

    @property
    def unexpected(self) -> tuple[DigitalWeight, ...]:
        """Weight matrices left digital neither by the user's choice nor by a documented default."""
        return tuple(w for w in self.digital if not w.chosen)

    def __str__(self) -> str:
        total = self.noisy_params + self.digital_params
        share = 100.0 * self.noisy_params / total if total else 0.0
        count = len(self.converted)
        ties = ", tied weights counted once" if self.tied else ""
        lines = [
            f"nft_cuda.convert: {count} noisy layer{'' if count == 1 else 's'}, {self.noisy_params:,} of {total:,} "
            f"weight-matrix parameters noisy ({share:.1f}%{ties}); {self.other_params:,} 1-D/bias parameters digital"
        ]
        for layer in self.converted:
            lines.append(
                f"  noisy    {layer.name or '<model>'}: {layer.original_type} -> {layer.noisy_type}, "
                f"{', '.join(layer.weights)} ({layer.params:,}), {layer.variation}, mode {layer.mode}"
            )
        for w in self.digital:
            lines.append(f"  digital  {w.name} {list(w.shape)} ({w.params:,}): {w.reason}")
        for tie in self.tied:
            lines.append(f"  tied     {' = '.join(tie.names)} {list(tie.shape)} ({tie.params:,}): {tie.reason}")
        for k in self.kept:
            lines.append(f"  kept     {k.name or '<model>'}: {k.reason}")
        return "\n".join(lines)


def _ties(model: nn.Module, noisy_readers: dict[int, list[str]]) -> tuple[TiedWeight, ...]:
    """The parameters of ``model`` reachable under several names; ``noisy_readers``: parameter id → the
    noisy layers that perturb it."""
    names: dict[int, list[str]] = {}
    params = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[id(param)] = param
    out = []
    for key, group in names.items():
        if len(group) < 2 or not is_weight_matrix(group[0], params[key]):
            continue
        readers = [n.rpartition(".")[0] or "<model>" for n in group]
        noisy = [r for r in readers if r in noisy_readers.get(key, ())]
        digital = [r for r in readers if r not in noisy]
        how = "; ".join(
            part
            for part in (
                f"noisy in {', '.join(noisy)}" if noisy else "",
                f"read digitally by {', '.join(digital)}" if digital else "",
            )
            if part
        )
        out.append(
            TiedWeight(tuple(group), tuple(params[key].shape), bool(noisy), f"one parameter, counted once: {how}")
        )
    return tuple(out)


def build_summary(
    model: nn.Module,
    converted: dict[str, NoisyModule],
    reasons: dict[str, tuple[str, bool]],
    original_types: dict[str, str] | None = None,
    kept: tuple[KeptLayer, ...] = (),
) -> ConversionSummary:
    """The summary of ``model`` with ``converted`` (module name → its noisy layer: the module itself, or
    the layer that will replace it) and ``reasons`` (the other modules' names → (why digital, chosen)).
    ``original_types``: module name → the type name it had before conversion (default: its type now)."""
    layers, digital, other = [], [], 0
    noisy_readers: dict[int, list[str]] = {}
    for name, layer in converted.items():
        for param in layer.crossbar_parameters():
            noisy_readers.setdefault(id(param), []).append(name or "<model>")
    seen: set[int] = set()
    for name, module in model.named_modules():
        layer = converted.get(name)
        crossbar = set(layer.crossbar_weight_names()) if layer is not None else set()
        if layer is not None:
            prefix = f"{name}." if name else ""
            weights = tuple(f"{prefix}{w}" for w in sorted(crossbar))
            numel = sum(getattr(layer, w).numel() for w in crossbar)
            original = (original_types or {}).get(name, type(module).__name__)
            layers.append(
                ConvertedLayer(name, original, type(layer).__name__, weights, numel, layer.variation, layer.mode)
            )
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{name}.{pname}" if name else pname
            if pname in crossbar or id(param) in noisy_readers:
                continue  # noisy here, or tied to a weight a noisy layer perturbs (see ``tied``)
            if not is_weight_matrix(pname, param):
                other += param.numel()
                continue
            reason, chosen = (
                reasons.get(full)
                or reasons.get(name)
                or (f"{pname} is not a crossbar weight of {type(layer or module).__name__}", False)
            )
            digital.append(DigitalWeight(full, tuple(param.shape), reason, chosen))
    return ConversionSummary(tuple(layers), tuple(digital), other, _ties(model, noisy_readers), tuple(kept))


_RECORD = "_nft_conversion"  # the attribute of the converted model holding its ConversionRecord


def remember(model: nn.Module, record: ConversionRecord) -> None:
    """Keep ``record`` on ``model`` (a plain attribute: deep copies and pickles carry it)."""
    object.__setattr__(model, _RECORD, record)


def record_of(model: nn.Module) -> ConversionRecord | None:
    return model.__dict__.get(_RECORD)


def forget(model: nn.Module) -> None:
    model.__dict__.pop(_RECORD, None)
