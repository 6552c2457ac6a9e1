"""The device-model abstraction (DESIGN §2.1): one immutable, hashable value object per model.

A model is a frozen dataclass whose field ``sigma`` is its **severity**: the one parameter that
``--sigma``, per-sample ``sigmas`` tensors (OVF's oriented deltas, Monte-Carlo sweeps) and
:meth:`DeviceModel.with_sigma` move. Everything else (time after programming, coefficients, fault
rates, converter settings) is a fixed property of the model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import ClassVar

from nft_cuda.devices.mvm import MVM
from nft_cuda.devices.tiles import Tiles

__all__ = ["DeviceModel", "check_real", "check_time", "check_probability"]


def check_real(
    name: str,
    value,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    max_strict: bool = False,
) -> float:
    """``value`` as a finite float within the given bounds (``strict``/``max_strict``: excluded), else a
    TypeError / ValueError naming it. The package's one real-number check; outside devices/ it is called as
    ``nft_cuda._args.check_real``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value:g}")
    if maximum is not None and (value >= maximum if max_strict else value > maximum):
        raise ValueError(f"{name} must be {'<' if max_strict else '<='} {maximum:g}, got {value:g}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool, else a TypeError naming it (1, "yes" and None are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


def check_positive_int(name: str, value) -> int:
    """An int >= 1 (bools refused): TypeError ``<name> must be an int`` for another type, ValueError
    ``<name> must be >= 1`` below 1. The package's one positive-int check (counts, sizes, bit widths, pool
    sizes); everything outside devices/ calls it as ``nft_cuda._args.check_positive_int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_time(t) -> float:
    """A time after programming in seconds: finite and >= 0."""
    return check_real("time t (seconds after programming)", t, minimum=0.0)


def check_probability(name: str, p) -> float:
    """A probability in [0, 1]."""
    p = check_real(name, p, minimum=0.0)
    if p > 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p:g}")
    return p


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    """Base of every device model. Subclasses are ``@dataclasses.dataclass(frozen=True)`` and set
    ``kind`` (registry name) and ``KERNEL_ID`` (the ``kind`` argument of ``perturb_device``).

    Args:
        sigma: the severity parameter (>= 0); its meaning per model is in docs/device-models.md.
        mvm: optional converter / per-MVM read-noise settings (:class:`~nft_cuda.devices.MVM`).
        tiles: optional crossbar tiling (:class:`~nft_cuda.devices.Tiles`): each tile of a layer scales
            its conductances by its own max|W|. None (or ``Tiles()``): one crossbar per layer.
    """

    sigma: float
    mvm: MVM | None = dataclasses.field(default=None, kw_only=True)
    tiles: Tiles | None = dataclasses.field(default=None, kw_only=True)

    kind: ClassVar[str] = ""
    KERNEL_ID: ClassVar[int] = -1

    def __post_init__(self):
        sigma = self.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
            raise TypeError(f"sigma must be a real number, got {type(sigma).__name__}")
        if not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma must be a finite number >= 0, got {float(sigma)}")
        object.__setattr__(self, "sigma", float(sigma))
        if self.mvm is not None and not isinstance(self.mvm, MVM):
            raise TypeError(f"mvm must be an nft_cuda.devices.MVM or None, got {type(self.mvm).__name__}")
        if self.tiles is not None and not isinstance(self.tiles, Tiles):
            raise TypeError(f"tiles must be an nft_cuda.devices.Tiles or None, got {type(self.tiles).__name__}")

    def _tiles_note(self) -> str:
        """ ", Tiles(a×b)" for the ``__str__`` of a tiled model, else ""."""
        return f", {self.tiles}" if self.tiled else ""

    @property
    def tiled(self) -> bool:
        """Whether the layers are split over several crossbar tiles (``tiles`` set and active)."""
        return self.tiles is not None and self.tiles.active

    @property
    def noiseless(self) -> bool:
        """Whether the model leaves every weight exactly as it is (Monte-Carlo then skips the draws)."""
        return self.sigma == 0.0 and (self.mvm is None or not self.mvm.active)

    @property
    def name(self) -> str:
        """Short name for reports (the ``device_model`` column): the kind, or a preset's name."""
        return self.kind

    def with_sigma(self, sigma: float) -> DeviceModel:
        """The same model at another severity."""
        return dataclasses.replace(self, sigma=sigma)

    def at_time(self, t: float) -> DeviceModel:
        """The model evaluated ``t`` seconds after programming; time-independent models return self."""
        check_time(t)
        return self

    def kernel_params(self) -> list[float]:
        """The ``params`` list of ``perturb_device`` (DESIGN §2.1); empty when the model has none."""
        return []

    def to_dict(self) -> dict:
        """JSON-safe fields plus ``"kind"``; :func:`device_model_from_dict` inverts it."""
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "tiles" and value is None:
                continue  # untiled: the dict of every model written before tiles existed
            if isinstance(value, (MVM, Tiles)):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_fields(cls, fields: dict) -> DeviceModel:
        """An instance from :meth:`to_dict`'s fields (without ``"kind"``); lists become tuples."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"unknown {cls.kind} device-model field(s) {unknown}; known: {sorted(names)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        if isinstance(kwargs.get("mvm"), dict):
            kwargs["mvm"] = MVM.from_dict(kwargs["mvm"])
        if isinstance(kwargs.get("tiles"), dict):
            kwargs["tiles"] = Tiles.from_dict(kwargs["tiles"])
        return cls(**kwargs)
