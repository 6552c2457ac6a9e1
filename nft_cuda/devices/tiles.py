"""Crossbar tiles: a layer larger than one crossbar is split over several, each with its own conductance
scale (docs/device-models.md, "Tiles").

A layer's weight W [O, *rest] is an [O, I] matrix (I = prod(rest): a convolution's receptive field
C/g·k_h·k_w), outputs along rows. With ``Tiles(max_input_size=a, max_output_size=b)`` it is cut as
aihwkit and aihwkit-lightning map a layer onto tiles of a×b cells (their ``mapping.max_input_size`` /
``max_output_size`` and ``get_split_sizes``): ⌈I/a⌉ input tiles and ⌈O/b⌉ output tiles of near-equal
sizes (the first ones one larger). For a convolution an input tile holds whole kernels (near-equal
counts of channels, at most ⌊a / (k_h·k_w)⌋), where lightning may cut a kernel. ``per_channel=True``
gives every output row its own scale (aihwkit-lightning's per-channel weight noise): rows of one output
each, within the input tiles.

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
from typing import NamedTuple

import torch

__all__ = ["TileLayout", "Tiles", "blocks", "tile_max", "tile_maxima", "tiled", "unblocks"]


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

    def split(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(outputs of each output tile, inputs of each input tile) of a weight of ``shape`` [O, *rest]: a
        size over its limit is cut into ⌈size/limit⌉ near-equal tiles, the first ones one larger (aihwkit's
        and lightning's ``get_split_sizes``); a convolution's input tiles hold whole kernels."""
        if len(shape) < 2:
            raise ValueError(f"tiles need a weight of at least 2 dimensions [outputs, inputs...], got {list(shape)}")
        outputs, inputs = shape[0], 1
        for size in shape[1:]:
            inputs *= size
        kernel = inputs // shape[1]  # k_h·k_w of a convolution, 1 for a matrix
        if self.max_input_size is not None and self.max_input_size < min(kernel, inputs):
            raise ValueError(
                f"max_input_size {self.max_input_size} is smaller than one kernel of this convolution "
                f"({kernel} inputs, weight {list(shape)}): a tile holds whole kernels"
            )
        rows = (1,) * outputs if self.per_channel else _near_equal(outputs, self.max_output_size, 1)
        return rows, _near_equal(inputs, self.max_input_size, kernel)

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(outputs, inputs) of the largest tile of a weight of ``shape``."""
        rows, cols = self.split(shape)
        return max(rows), max(cols)

    def count(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(output tiles, input tiles) of a weight of ``shape``."""
        rows, cols = self.split(shape)
        return len(rows), len(cols)

    def layout(self, shape: tuple[int, ...], device=None) -> TileLayout:
        """The index tensors that lay a weight of ``shape`` out tile by tile (:class:`TileLayout`), built once
        per (tiles, shape, device): every forward of a tiled layer asks for them."""
        key = (self, tuple(shape), torch.device(device) if device is not None else None)
        layout = _LAYOUTS.get(key)
        if layout is None:
            rows, cols = self.split(shape)
            out_index, out_pos, row_tile = _indices(rows, device)
            in_index, in_pos, _ = _indices(cols, device)
            layout = _LAYOUTS[key] = TileLayout(out_index, in_index, out_pos, in_pos, row_tile)
        return layout

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


class TileLayout(NamedTuple):
    """Where each weight element sits tile by tile. Tiles are padded to the largest one: ``out_index`` [T_out,
    rows] and ``in_index`` [T_in, cols] hold the output rows / flattened inputs of each tile, the size of
    that axis (one past the end) where a smaller tile is padded; ``out_pos`` [O] / ``in_pos`` [I] the
    position of each row / input in that padded layout; ``row_tile`` [O] the output tile of each row."""

    out_index: torch.Tensor
    in_index: torch.Tensor
    out_pos: torch.Tensor
    in_pos: torch.Tensor
    row_tile: torch.Tensor

    @property
    def inputs_padded(self) -> bool:
        """Whether some input tile is smaller than the largest (else tile k's inputs are k·cols … (k+1)·cols − 1,
        and blocking the inputs is a reshape)."""
        return self.in_index.numel() != self.in_pos.numel()


#: Tiles.layout's cache; its tensors are read-only by convention (no caller writes into an index tensor).
_LAYOUTS: dict = {}


def _near_equal(size: int, limit: int | None, unit: int) -> tuple[int, ...]:
    """``size`` (a multiple of ``unit``) cut into ⌈size/limit⌉ near-equal parts of whole units."""
    units = size // unit
    if limit is None or limit >= size:
        return (size,)
    parts = -(-units // (limit // unit))
    base, extra = divmod(units, parts)
    return tuple((base + (k < extra)) * unit for k in range(parts))


def _indices(sizes: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index [T, max] with the padding value sum(sizes), position [sum] in the padded layout, tile [sum])."""
    total, width = sum(sizes), max(sizes)
    starts = torch.tensor((0, *sizes[:-1]), dtype=torch.int64, device=device).cumsum(0)
    sizes_t = torch.tensor(sizes, dtype=torch.int64, device=device)
    j = torch.arange(width, dtype=torch.int64, device=device)
    index = torch.where(j < sizes_t[:, None], starts[:, None] + j, torch.full_like(j, total))
    tile = torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes_t)
    pos = tile * width + (torch.arange(total, device=device) - starts[tile])
    return index, pos, tile


def blocks(t: torch.Tensor, tiles: Tiles, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` [..., *shape] as [..., T_out, rows, T_in, cols] (smaller tiles zero-padded)."""
    lay = tiles.layout(shape, t.device)
    lead = t.shape[: t.dim() - len(shape)]
    m = torch.nn.functional.pad(t.reshape(*lead, shape[0], -1), (0, 1, 0, 1))  # the padding row and column
    m = m.index_select(-2, lay.out_index.flatten()).index_select(-1, lay.in_index.flatten())
    return m.reshape(*lead, *lay.out_index.shape, *lay.in_index.shape)


def unblocks(b: torch.Tensor, tiles: Tiles, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`blocks`: [..., T_out, rows, T_in, cols] → [..., *shape] (padding dropped)."""
    lay = tiles.layout(shape, b.device)
    lead = b.shape[:-4]
    n_out, rows, n_in, cols = b.shape[-4:]
    m = b.reshape(*lead, n_out * rows, n_in * cols).index_select(-2, lay.out_pos).index_select(-1, lay.in_pos)
    return m.reshape(*lead, *shape)


def _runs(sizes: tuple[int, ...]):
    """(start, first tile, tiles, size) of each run of equal consecutive sizes: near-equal splits have at most
    two, so a loop over runs (not tiles) lets every run be one reshaped, broadcast operation."""
    start, k = 0, 0
    while k < len(sizes):
        end = k
        while end < len(sizes) and sizes[end] == sizes[k]:
            end += 1
        yield start, k, end - k, sizes[k]
        start, k = start + (end - k) * sizes[k], end


def _segment_amax(x: torch.Tensor, sizes: tuple[int, ...], dim: int) -> torch.Tensor:
    """The max of ``x`` over consecutive segments of ``sizes`` along ``dim`` (that axis becomes len(sizes))."""
    dim = dim % x.dim()
    out = [x.narrow(dim, start, n * size).unflatten(dim, (n, size)).amax(dim + 1) for start, _, n, size in _runs(sizes)]
    return out[0] if len(out) == 1 else torch.cat(out, dim)


def _per_tile_op(op, t: torch.Tensor, small: torch.Tensor, tiles: Tiles, shape: tuple[int, ...]) -> torch.Tensor:
    """``op(t, v)`` with v the per-tile value ``small`` [T_out, T_in] of each element of ``t`` [..., *shape],
    broadcast run by run (nothing of t's size is built for v), in the promoted dtype."""
    rows, cols = tiles.split(shape)
    per_row = small.repeat_interleave(torch.tensor(rows, device=small.device), 0)  # [O, T_in]
    flat = t.reshape(*t.shape[: t.dim() - len(shape)], shape[0], -1)
    out = torch.empty(flat.shape, dtype=torch.promote_types(t.dtype, small.dtype), device=t.device)
    for start, first, n, size in _runs(cols):
        src = flat.narrow(-1, start, n * size).unflatten(-1, (n, size))
        op(src, per_row[:, first : first + n, None], out=out.narrow(-1, start, n * size).unflatten(-1, (n, size)))
    return out.reshape(t.shape)


def tile_maxima(weight: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """The max|W| of every tile, [T_out, T_in] (float32, or float64 for a float64 weight): one pass over W."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    rows, cols = tiles.split(tuple(weight.shape))
    a = weight.detach().reshape(weight.shape[0], -1).abs().to(acc)
    return _segment_amax(_segment_amax(a, cols, 1), rows, 0)


def _per_element(small: torch.Tensor, tiles: Tiles, shape: tuple[int, ...]) -> torch.Tensor:
    """A per-tile value [T_out, T_in] spread over the elements of a weight of ``shape``."""
    rows, cols = tiles.split(shape)
    r = torch.tensor(rows, device=small.device)
    c = torch.tensor(cols, device=small.device)
    return small.repeat_interleave(r, 0).repeat_interleave(c, 1).reshape(shape)


def tile_max(weight: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """Per element, the max|W| of its tile ([*weight.shape], float32, or float64 for a float64 weight)."""
    return _per_element(tile_maxima(weight, tiles), tiles, tuple(weight.shape))


def tiled(perturb: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """``perturb`` (a function of the weight returning [S, *weight.shape], homogeneous of degree 1 in W, keyed
    by element index) applied tile by tile: each tile scaled by its own max|W| (the module docstring).
    Straight-through gradient dL/dW = Σ_t dL/dout[t], as the untiled perturbations."""
    m = tile_maxima(weight, tiles)  # small: the rescaling factor is computed per tile, then spread
    top = m.amax() if m.numel() else m.new_zeros(())
    ones = torch.ones_like(m)
    up, shape = torch.where(m > 0, top / torch.where(m > 0, m, ones), ones), tuple(weight.shape)
    out = perturb(_per_tile_op(torch.mul, weight.detach(), up, tiles, shape))
    out = _per_tile_op(torch.div, out, up, tiles, shape).to(weight.dtype)
    if weight.requires_grad:
        out = out + (weight - weight.detach())
    return out
