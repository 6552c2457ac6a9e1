"""PCM-like device model (DESIGN §2.1): conductance-dependent programming noise, drift and 1/f read noise.

The statistical model of Nandakumar et al. (ICECS 2019), with the constants of Joshi et al.
(Nat. Commun. 11, 2473, 2020) as used by aihwkit's PCMLikeNoiseModel; formulas in docs/device-models.md.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from nft_cuda.devices.base import DeviceModel, check_bool, check_real, check_time

__all__ = ["PCM", "COMPENSATION_RULES"]

#: The global drift-compensation rules (docs/device-models.md, "Global drift compensation"): how the
#: calibration read estimates α. "one-hot" (the default) reads the array with the one-hot input vectors, so
#: α = Σ|W_0| / Σ|W_t| over every weight of the layer (aihwkit's ``GlobalDriftCompensation``); "all-ones"
#: reads it with one all-ones input, α = Σ_n |Σ_k W_0[n, k]| / Σ_n |Σ_k W_t[n, k]| (this library's rule
#: before the one-hot rule, kept for the studies made with it).
COMPENSATION_RULES = ("one-hot", "all-ones")


@dataclasses.dataclass(frozen=True)
class PCM(DeviceModel):
    """Phase-change memory: a weight is a differential pair (g⁺, g⁻) with g_max at max|W|.

    Args:
        sigma: severity, the multiplier of the programming noise σ_prog(g) (default 1.0).
        time: seconds after programming at which the chip is read (default 0: no drift, no 1/f noise).
        g_max: conductance of max|W| in µS (default 25).
        prog_coeff: (c0, c1, c2) of σ_prog = (c0 + c1·(g/g_max) + c2·(g/g_max)²)·g_max/prog_g_ref in µS.
        t0: drift reference time in seconds (default 20).
        t_read: duration of one read in seconds (default 250e-9).
        drift_scale: multiplier of the drift exponent ν (0 disables drift).
        read_noise_scale: multiplier of the accumulated 1/f read noise (0 disables it).
        drift_compensation: rescale each layer's noisy weight by the global drift-compensation
            factor α (one per layer and sample, from a calibration read of the chip at t = 0 and at t).
        compensation_rule: how that calibration read estimates α, one of :data:`COMPENSATION_RULES`:
            "one-hot" (default; aihwkit's rule, α = Σ|W_0| / Σ|W_t|) or "all-ones" (one all-ones input,
            α = Σ_n |Σ_k W_0[n, k]| / Σ_n |Σ_k W_t[n, k]|). Read only when ``drift_compensation`` is on.
        prog_g_ref: the g_max in µS at which ``prog_coeff`` was fitted (default 25, the published fit's):
            σ_prog scales by g_max/prog_g_ref, as aihwkit's ``prog_coeff_g_max_reference``, so ``g_max``
            changes the conductance units, not the programming noise relative to max|W|.
        aihwkit_read: aihwkit's read step (``PCMLikeNoiseModel.apply_drift_noise_to_conductance``) instead of
            this library's: the 1/f term counts from t + t0 (so a chip read at t = 0 has read noise), Q_s is
            evaluated at the programmed conductance instead of the target, and g_f is clamped at 0. Default
            False (the published studies' model). aihwkit's one-device collapse is not modelled either way
            (docs/device-models.md, "Differences from aihwkit's PCM model").
    """

    sigma: float = 1.0
    time: float = 0.0
    g_max: float = 25.0
    prog_coeff: tuple[float, float, float] = (0.26348, 1.9650, -1.1731)
    t0: float = 20.0
    t_read: float = 250e-9
    drift_scale: float = 1.0
    read_noise_scale: float = 1.0
    drift_compensation: bool = False
    compensation_rule: str = "one-hot"
    prog_g_ref: float = 25.0
    aihwkit_read: bool = False

    kind: ClassVar[str] = "pcm"
    KERNEL_ID: ClassVar[int] = 1

    def __post_init__(self):
        super().__post_init__()
        set_ = object.__setattr__
        set_(self, "time", check_time(self.time))
        for name in ("g_max", "t0", "t_read", "prog_g_ref"):
            value = check_real(name, getattr(self, name), minimum=0.0)
            if value == 0:
                raise ValueError(f"{name} must be > 0, got 0")
            set_(self, name, value)
        for name in ("drift_scale", "read_noise_scale"):
            set_(self, name, check_real(name, getattr(self, name), minimum=0.0))
        coeff = self.prog_coeff
        if not isinstance(coeff, (tuple, list)) or len(coeff) != 3:
            raise ValueError(f"prog_coeff must be three numbers (c0, c1, c2), got {coeff!r}")
        set_(self, "prog_coeff", tuple(check_real(f"prog_coeff[{i}]", c) for i, c in enumerate(coeff)))
        check_bool("drift_compensation", self.drift_compensation)
        check_bool("aihwkit_read", self.aihwkit_read)
        if self.compensation_rule not in COMPENSATION_RULES:
            raise ValueError(
                f"compensation_rule must be one of {', '.join(map(repr, COMPENSATION_RULES))}, "
                f"got {self.compensation_rule!r}"
            )

    @property
    def noiseless(self) -> bool:
        """No programming noise and nothing that changes with time (t = 0, or drift and read noise off)."""
        static = (self.time == 0.0 and not self._read_noise_at_0) or (
            self.drift_scale == 0.0 and self.read_noise_scale == 0.0
        )
        return super().noiseless and static

    @property
    def _read_noise_at_0(self) -> bool:
        """aihwkit's read step reads at t + t0 > 0: read noise even at t = 0."""
        return self.aihwkit_read and self.read_noise_scale > 0.0

    @property
    def compensating(self) -> bool:
        """Whether drift compensation acts on this chip: it is on and the chip read differs from the
        programmed one (t > 0, or aihwkit's read step, which reads with noise at t = 0 too)."""
        return self.drift_compensation and (self.time > 0.0 or self._read_noise_at_0)

    def at_time(self, t: float) -> PCM:
        """The same chip read ``t`` seconds after programming."""
        return dataclasses.replace(self, time=check_time(t))

    def programmed(self) -> PCM:
        """The chip as programmed (t = 0, no read noise): the reference of the drift-compensation read
        (aihwkit records its baseline when it programs the weights). With the default read step this is
        ``at_time(0)`` exactly (no read noise at t = 0)."""
        return dataclasses.replace(self, time=0.0, read_noise_scale=0.0)

    def kernel_params(self) -> list[float]:
        """[t, G, c0, c1, c2, t0, t_read, drift_scale, read_scale, aihwkit_read] (DESIGN §2.1), the
        coefficients already scaled by G/prog_g_ref (exactly ``prog_coeff`` at the default G = prog_g_ref = 25)."""
        scale = self.g_max / self.prog_g_ref
        c0, c1, c2 = (c * scale for c in self.prog_coeff) if scale != 1.0 else self.prog_coeff
        read = float(self.aihwkit_read)
        return [self.time, self.g_max, c0, c1, c2, self.t0, self.t_read, self.drift_scale, self.read_noise_scale, read]

    def __str__(self) -> str:
        comp = f", drift-compensated ({self.compensation_rule})" if self.drift_compensation else ""
        comp += ", aihwkit read" if self.aihwkit_read else ""
        return f"PCM(scale={self.sigma:g}, t={self.time:g} s{comp}{self._tiles_note()})"
