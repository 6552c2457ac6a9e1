"""What :func:`nft_cuda.convert` did: the layers made noisy and the weight matrices left digital, with why.

A *weight matrix* is a parameter with two or more dimensions whose name does not start with ``bias``
(``bias_k``/``bias_v`` of attention are biases); 1-D parameters (biases, normalisation scales) are
counted but not listed. ``nft_cuda.conversion_summary(model)`` returns the summary of the last
:func:`~nft_cuda.convert` of ``model``; ``print()`` it for a table.
"""

from __future__ import annotations

import dataclasses
import weakref

import torch.nn as nn

from nft_cuda.nn.layers import NoisyModule

__all__ = ["ConversionSummary", "ConvertedLayer", "DigitalWeight", "conversion_summary", "is_weight_matrix"]


def is_weight_matrix(name: str, param) -> bool:
    """Whether a parameter is a weight matrix (≥ 2-D, not a bias) that a crossbar could hold."""
    return param.dim() >= 2 and not name.rsplit(".", 1)[-1].startswith("bias")


@dataclasses.dataclass(frozen=True)
class ConvertedLayer:
    """A noisy layer: its module name, the type it had and has, its crossbar weights and their size."""

    name: str
    original_type: str
    noisy_type: str
    weights: tuple[str, ...]
    params: int


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
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    """The result of a conversion (``print(summary)`` shows it as a table)."""

    converted: tuple[ConvertedLayer, ...]
    digital: tuple[DigitalWeight, ...]
    other_params: int  #: elements of the 1-D parameters and biases (always digital)

    @property
    def noisy_params(self) -> int:
        return sum(layer.params for layer in self.converted)

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
        lines = [
            f"nft_cuda.convert: {count} noisy layer{'' if count == 1 else 's'}, {self.noisy_params:,} of {total:,} "
            f"weight-matrix parameters noisy ({share:.1f}%); {self.other_params:,} 1-D/bias parameters digital"
        ]
        for layer in self.converted:
            lines.append(
                f"  noisy    {layer.name or '<model>'}: {layer.original_type} -> {layer.noisy_type}, "
                f"{', '.join(layer.weights)} ({layer.params:,})"
            )
        for w in self.digital:
            lines.append(f"  digital  {w.name} {list(w.shape)} ({w.params:,}): {w.reason}")
        return "\n".join(lines)


def build_summary(
    model: nn.Module, converted: dict[str, NoisyModule], reasons: dict[str, tuple[str, bool]]
) -> ConversionSummary:
    """The summary of converting ``model``: ``converted`` maps module names to their noisy layers (new or
    already noisy), ``reasons`` maps the other modules' names to (why digital, chosen)."""
    layers, digital, other = [], [], 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        layer = converted.get(name)
        crossbar = set(layer.crossbar_weight_names()) if layer is not None else set()
        if layer is not None:
            prefix = f"{name}." if name else ""
            weights = tuple(f"{prefix}{w}" for w in sorted(crossbar))
            numel = sum(getattr(layer, w).numel() for w in crossbar)
            layers.append(ConvertedLayer(name, type(module).__name__, type(layer).__name__, weights, numel))
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{name}.{pname}" if name else pname
            if pname in crossbar:
                continue
            if not is_weight_matrix(pname, param):
                other += param.numel()
                continue
            reason, chosen = (
                reasons.get(full)
                or reasons.get(name)
                or (f"{pname} is not a crossbar weight of {type(layer).__name__}", False)
            )
            digital.append(DigitalWeight(full, tuple(param.shape), reason, chosen))
    return ConversionSummary(tuple(layers), tuple(digital), other)


_summaries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remember(model: nn.Module, summary: ConversionSummary) -> None:
    _summaries[model] = summary


def conversion_summary(model: nn.Module) -> ConversionSummary:
    """The :class:`ConversionSummary` of the last :func:`nft_cuda.convert` call that returned ``model``.

    Raises LookupError when ``model`` has not been converted (or was stripped since)."""
    summary = _summaries.get(model)
    if summary is None:
        raise LookupError(f"{type(model).__name__} has no conversion summary: call nft_cuda.convert(model, ...) first")
    return summary


def forget(model: nn.Module) -> None:
    _summaries.pop(model, None)
