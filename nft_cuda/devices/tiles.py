"""Crossbar tiles: a layer larger than one crossbar is split over several, each with its own conductance
scale (docs/device-models.md, "Tiles").

A layer's weight W [O, *rest] is an [O, I] matrix (I = prod(rest): a convolution's receptive field
C/g·k_h·k_w), outputs along rows. With ``Tiles(max_input_size=a, max_output_size=b)`` it is cut into
blocks of at most b outputs × a inputs, as aihwkit maps a layer onto tiles of a×b cells (its
``mapping.max_input_size`` / ``max_output_size``): full tiles, the last one taking the remainder, where
aihwkit and aihwkit-lightning split a size that is not a multiple of a (or b) into near-equal tiles
(docs/device-models.md, "Tiles"). For a convolution an input tile holds whole kernels:
⌊a / (k_h·k_w)⌋ channels. ``per_channel=True`` gives every output row its own scale (aihwkit-lightning's
per-channel weight noise): rows of one output each, within the input tiles.

Every quantity a device model scales by the layer's max|W| — σ_w of the bit-sliced Gaussian, the PCM
conductance map g = |w|/max|W|·g_max, stuck-at levels, the weight-level grid — then uses the tile's own
max|W|. All these models are homogeneous of degree 1 in W (scaling W scales the perturbed W), so a tiled
perturbation is the untiled one of a rescaled weight: W' = W·M/m(e), perturbed, times m(e)/M (m(e): the
max|W| of element e's tile, M: the layer's). Element e keeps its index in the full weight, so the noise
stream stays one function of (seed, layer, element): a tiled and an untiled layer draw the same standard
normals for every weight, and ``Tiles()`` (nothing set) changes nothing, bit for bit.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable

import torch

__all__ = ["Tiles", "tile_max", "tiled"]


def _check_size(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (or None: unlimited), got {value}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """How a layer's weight is split over crossbar tiles (see the module docstring).

    Args:
        max_input_size: inputs (crossbar rows) per tile, or None for unlimited.
        max_output_size: outputs (crossbar columns) per tile, or None for unlimited.
        per_channel: every output its own conductance scale (per-channel weight noise).
    """

    max_input_size: int | None = None
    max_output_size: int | None = None
    per_channel: bool = False

    def __post_init__(self):
        object.__setattr__(self, "max_input_size", _check_size("max_input_size", self.max_input_size))
        object.__setattr__(self, "max_output_size", _check_size("max_output_size", self.max_output_size))
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"per_channel must be True or False, got {type(self.per_channel).__name__}")

    @property
    def active(self) -> bool:
        """Whether any split is asked for (``Tiles()`` is one unlimited crossbar: today's behaviour)."""
        return self.max_input_size is not None or self.max_output_size is not None or self.per_channel

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(outputs per tile, inputs per tile) for a weight of ``shape`` [O, *rest]."""
        if len(shape) < 2:
            raise ValueError(f"tiles need a weight of at least 2 dimensions [outputs, inputs...], got {list(shape)}")
        outputs, inputs = shape[0], 1
        for size in shape[1:]:
            inputs *= size
        kernel = inputs // shape[1]  # k_h·k_w of a convolution, 1 for a matrix
        rows = 1 if self.per_channel else min(self.max_output_size or outputs, outputs)
        cols = inputs
        if self.max_input_size is not None and self.max_input_size < inputs:
            if self.max_input_size < kernel:
                raise ValueError(
                    f"max_input_size {self.max_input_size} is smaller than one kernel of this convolution "
                    f"({kernel} inputs, weight {list(shape)}): a tile holds whole kernels"
                )
            cols = (self.max_input_size // kernel) * kernel
        return rows, cols

    def count(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(output tiles, input tiles) of a weight of ``shape``."""
        rows, cols = self.grid(shape)
        inputs = 1
        for size in shape[1:]:
            inputs *= size
        return -(-shape[0] // rows), -(-inputs // cols)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Tiles:
        if not isinstance(d, dict):
            raise TypeError(f"a Tiles dict must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown Tiles field(s) {', '.join(unknown)}")
        return cls(**d)

    def __str__(self) -> str:
        parts = []
        if self.max_input_size is not None or self.max_output_size is not None:
            parts.append(f"{self.max_input_size or '∞'} in × {self.max_output_size or '∞'} out")
        if self.per_channel:
            parts.append("per channel")
        return f"Tiles({', '.join(parts)})"


def blocks(t: torch.Tensor, tiles: Tiles, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` [..., *shape] as [..., n_out, rows, n_in, cols] (zero-padded to whole tiles)."""
    rows, cols = tiles.grid(shape)
    n_out, n_in = tiles.count(shape)
    lead = t.shape[: t.dim() - len(shape)]
    m = t.reshape(*lead, shape[0], -1)
    pad_in, pad_out = n_in * cols - m.shape[-1], n_out * rows - m.shape[-2]
    if pad_in or pad_out:
        m = torch.nn.functional.pad(m, (0, pad_in, 0, pad_out))
    return m.reshape(*lead, n_out, rows, n_in, cols)


def unblocks(b: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`blocks`: [..., n_out, rows, n_in, cols] → [..., *shape] (padding dropped)."""
    lead = b.shape[:-4]
    n_out, rows, n_in, cols = b.shape[-4:]
    inputs = 1
    for size in shape[1:]:
        inputs *= size
    m = b.reshape(*lead, n_out * rows, n_in * cols)[..., : shape[0], :inputs]
    return m.reshape(*lead, *shape)


def tile_max(weight: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """Per element, the max|W| of its tile ([*weight.shape], float32, or float64 for a float64 weight)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    shape = tuple(weight.shape)
    b = blocks(weight.detach().abs().to(acc), tiles, shape)
    return unblocks(b.amax(dim=(-3, -1), keepdim=True).expand(b.shape), shape)


def tiled(perturb: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """``perturb`` (a function of the weight returning [S, *weight.shape], homogeneous of degree 1 in W, keyed
    by element index) applied tile by tile: each tile scaled by its own max|W| (the module docstring).
    Straight-through gradient dL/dW = Σ_t dL/dout[t], as the untiled perturbations."""
    m = tile_max(weight, tiles)
    top = m.amax() if m.numel() else m.new_zeros(())
    up = torch.where(m > 0, top / torch.where(m > 0, m, torch.ones_like(m)), torch.ones_like(m))
    out = perturb((weight.detach().to(m.dtype) * up).contiguous())
    out = (out.to(m.dtype) / up).to(weight.dtype)
    if weight.requires_grad:
        out = out + (weight - weight.detach())
    return out
