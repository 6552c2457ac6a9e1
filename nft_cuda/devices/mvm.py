"""Converter and per-MVM read-noise settings of a device model (models 4 and 5 of issue #16).

The value object only; the ops that apply it around each matmul live with the noisy layers.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

__all__ = ["MVM"]


def _check_bits(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class MVM:
    """Effects of one matrix-vector multiply on the crossbar.

    Args:
        input_bits: DAC precision of the inputs (None: exact).
        output_bits: ADC precision of the outputs (None: exact).
        weight_levels: program weights to the 2^device_bits levels of each bit-slice cell.
        read_noise: std of the short-term read noise drawn afresh on every forward (>= 0).
    """

    input_bits: int | None = None
    output_bits: int | None = None
    weight_levels: bool = False
    read_noise: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "input_bits", _check_bits("input_bits", self.input_bits))
        object.__setattr__(self, "output_bits", _check_bits("output_bits", self.output_bits))
        if not isinstance(self.weight_levels, bool):
            raise TypeError(f"weight_levels must be True or False, got {type(self.weight_levels).__name__}")
        r = self.read_noise
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise TypeError(f"read_noise must be a real number, got {type(r).__name__}")
        if not math.isfinite(r) or r < 0:
            raise ValueError(f"read_noise must be a finite number >= 0, got {r}")
        object.__setattr__(self, "read_noise", float(r))

    def to_dict(self) -> dict:
        """JSON-safe fields (``MVM(**d)`` inverts it)."""
        return dataclasses.asdict(self)
