"""Stuck-at faults (DESIGN §2.1): each cell of a differential pair stuck at g_min or g_max, fixed per chip."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nft_cuda.devices.base import DeviceModel, check_probability

__all__ = ["StuckAt"]


@dataclasses.dataclass(frozen=True)
class StuckAt(DeviceModel):
    """Cells stuck at g_min (0) with probability p0 and at g_max (the conductance of max|W|) with p1.

    Args:
        sigma: severity, the multiplier of (p0, p1) (default 1.0): a sample with severity s uses
            p0' = min(s·p0, 1) and p1' = min(s·p1, 1 − p0').
        p0: probability that a cell is stuck at g_min.
        p1: probability that a cell is stuck at g_max.
    """

    sigma: float = 1.0
    p0: float = 0.0
    p1: float = 0.0

    kind: ClassVar[str] = "stuck-at"
    KERNEL_ID: ClassVar[int] = 3

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "p0", check_probability("p0", self.p0))
        object.__setattr__(self, "p1", check_probability("p1", self.p1))
        if self.p0 + self.p1 > 1.0:
            raise ValueError(f"p0 + p1 must be <= 1, got {self.p0:g} + {self.p1:g}")

    def kernel_params(self) -> list[float]:
        """[p0, p1] (DESIGN §2.1)."""
        return [self.p0, self.p1]

    def __str__(self) -> str:
        return f"StuckAt(p0={self.p0:g}, p1={self.p1:g}, scale={self.sigma:g}{self._tiles_note()})"
