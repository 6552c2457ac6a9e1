"""Multiplicative (log-normal) device variation (DESIGN §2.1): W' = W·exp(σ·z)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nft_cuda.devices.base import DeviceModel

__all__ = ["LogNormal"]


@dataclasses.dataclass(frozen=True)
class LogNormal(DeviceModel):
    """Each weight is multiplied by exp(σ·z), z ~ N(0, 1) (the z of draw 0, as the Gaussian's).

    Args:
        sigma: σ of the log of the multiplicative factor (>= 0).
    """

    sigma: float

    kind: ClassVar[str] = "lognormal"
    KERNEL_ID: ClassVar[int] = 2

    def __str__(self) -> str:
        return f"LogNormal(σ={self.sigma:g}{self._tiles_note()})"
