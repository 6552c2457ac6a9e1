"""The paper's bit-sliced Gaussian device model (DESIGN §2): ``Variation`` (alias ``BitSlicedGaussian``)."""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import ClassVar

import torch

from nft_cuda.devices.base import DeviceModel, check_positive_int

__all__ = ["PRESETS", "Variation"]

#: State factor s of each device model preset: RRAM1 is state-independent; the others multiply
#: sigma by s for weights in the middle band 0.25·max|W| < |w| < 0.75·max|W|.
PRESETS: dict[str, float] = {"RRAM1": 1.0, "FeFET2": 2.0, "RRAM4": 4.0, "FeFET6": 6.0}


@dataclasses.dataclass(frozen=True)
class Variation(DeviceModel):
    """Device variation of an NVCIM crossbar (DESIGN §2).

    Args:
        sigma: nominal device variation σ_d (≥ 0, relative to max|W|).
        device_model: preset name: "RRAM1" (s=1), "FeFET2" (s=2), "RRAM4" (s=4), "FeFET6" (s=6).
        weight_bits: bits of a weight (default 8).
        device_bits: bits stored per device (default 2); weight_bits must be a multiple of it.
        mvm: optional converter / read-noise settings (keyword only; :class:`~nft_cuda.devices.MVM`).

    A weight W is perturbed as ``W + σ_w · z`` with z ~ N(0, 1) and
    ``σ_w = σ_base · s`` if ``0.25·m < |w| < 0.75·m`` (m = max|W|) else ``σ_base``, where
    ``σ_base = σ_d · m · scale`` and ``scale = sqrt(A)/B / sqrt(0.4 s² + 0.6)``.
    """

    sigma: float
    device_model: str = "RRAM1"
    weight_bits: int = 8
    device_bits: int = 2

    kind: ClassVar[str] = "bitsliced-gaussian"
    KERNEL_ID: ClassVar[int] = 0

    def __post_init__(self):
        super().__post_init__()

        if not isinstance(self.device_model, str):
            raise TypeError(f"device_model must be a str, got {type(self.device_model).__name__}")
        canonical = {k.lower(): k for k in PRESETS}.get(self.device_model.lower())
        if canonical is None:
            close = difflib.get_close_matches(self.device_model, list(PRESETS), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown device_model '{self.device_model}'{hint}; choose one of {', '.join(PRESETS)}")
        object.__setattr__(self, "device_model", canonical)

        wb = check_positive_int("weight_bits", self.weight_bits)
        db = check_positive_int("device_bits", self.device_bits)
        if wb % db:
            raise ValueError(f"weight_bits ({wb}) must be a multiple of device_bits ({db})")
        object.__setattr__(self, "weight_bits", wb)
        object.__setattr__(self, "device_bits", db)

    @property
    def name(self) -> str:
        """The preset's name (RRAM1, FeFET2, RRAM4, FeFET6)."""
        return self.device_model

    @property
    def devices_per_weight(self) -> int:
        """K = weight_bits / device_bits."""
        return self.weight_bits // self.device_bits

    @property
    def state_factor(self) -> float:
        """The device model's state factor s."""
        return PRESETS[self.device_model]

    @property
    def scale(self) -> float:
        """sqrt(A)/B / sqrt(0.4 s² + 0.6), so that σ_base = σ_d · max|W| · scale."""
        k, d = self.devices_per_weight, self.device_bits
        a = sum(2 ** (2 * i * d) for i in range(k))
        b = sum(2 ** (i * d) for i in range(k))
        s = self.state_factor
        return math.sqrt(a) / b / math.sqrt(0.4 * s * s + 0.6)

    def sigma_w(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-element σ_w of ``weight`` (float32, same shape and device)."""
        from nft_cuda import reference

        sigmas = torch.full((1,), self.sigma, dtype=torch.float32, device=weight.device)
        return reference.sigma_w(weight.detach(), sigmas, self.scale, self.state_factor)[0]

    def __str__(self) -> str:
        bits = "" if (self.weight_bits, self.device_bits) == (8, 2) else f", {self.weight_bits}/{self.device_bits} bits"
        return f"{self.device_model}(σ_d={self.sigma:g}{bits}{self._tiles_note()})"
