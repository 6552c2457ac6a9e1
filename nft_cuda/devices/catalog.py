"""The one table of device-model names and default severities.

Every name ``--device-model``, :func:`nft_cuda.devices.make_device_model`, ``TrainConfig.device_model``
and ``eval_checkpoints(device_model=)`` accept is a row of :data:`DEVICE_MODELS`; the default severity of
a model is its class's own default of ``sigma`` (PCM and StuckAt: 1.0, the published noise). Training and
evaluation read their defaults for the models without one from here too: :data:`TRAINING_SEVERITY` and
:data:`SEVERITY_SWEEP`.
"""

from __future__ import annotations

import dataclasses
import difflib

from nft_cuda.devices.base import DeviceModel
from nft_cuda.devices.bitsliced import PRESETS, Variation
from nft_cuda.devices.lognormal import LogNormal
from nft_cuda.devices.pcm import PCM
from nft_cuda.devices.stuck_at import StuckAt

__all__ = [
    "DEVICE_MODELS",
    "MODEL_NAMES",
    "SEVERITY_SWEEP",
    "TRAINING_SEVERITY",
    "DeviceModelName",
    "default_severity",
    "lookup",
    "model_classes",
    "severity_sweep",
    "training_severity",
]


@dataclasses.dataclass(frozen=True)
class DeviceModelName:
    """One row of the table: a name, the model class it builds, the bit-sliced Gaussian preset it stands
    for (None for the other models) and the other spellings it is accepted under."""

    name: str
    model: type[DeviceModel]
    preset: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def default_severity(self) -> float | None:
        """The class's default ``sigma`` (the severity of the published noise), None when it has none."""
        default = next(f.default for f in dataclasses.fields(self.model) if f.name == "sigma")
        return None if default is dataclasses.MISSING else float(default)


#: Every device-model name, in the order the command line lists them.
DEVICE_MODELS: tuple[DeviceModelName, ...] = (
    *(DeviceModelName(p, Variation, preset=p) for p in PRESETS),
    DeviceModelName("pcm", PCM),
    DeviceModelName("lognormal", LogNormal, aliases=("log-normal",)),
    DeviceModelName("stuck-at", StuckAt, aliases=("stuckat", "stuck_at")),
)
#: The names as printed (``--device-model`` choices).
MODEL_NAMES = tuple(row.name for row in DEVICE_MODELS)
#: The severity a model without a default severity trains at (σ_d = 0.1: the reference README's example).
TRAINING_SEVERITY = 0.1
#: The severity sweep of a model without a default severity (``nft eval``'s default ``--sigma 0:0.4:0.05``).
SEVERITY_SWEEP = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)

_BY_NAME = {spelling.lower(): row for row in DEVICE_MODELS for spelling in (row.name, *row.aliases)}


def lookup(name: str) -> DeviceModelName:
    """The row of ``name`` (any case, surrounding spaces ignored); a ValueError with a did-you-mean hint
    for an unknown name."""
    if not isinstance(name, str):
        raise TypeError(f"device model name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    close = difflib.get_close_matches(key, list(_BY_NAME), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ValueError(f"unknown device_model '{name}'{hint}; choose one of {', '.join(MODEL_NAMES)}")


def model_classes() -> dict[str, type[DeviceModel]]:
    """Each model class of the table by its ``kind`` (what a stored model's dict names)."""
    return {row.model.kind: row.model for row in DEVICE_MODELS}


def default_severity(model: str | DeviceModel | type[DeviceModel]) -> float | None:
    """The default severity of a model given by name, instance or class; None when it has none."""
    if isinstance(model, str):
        return lookup(model).default_severity
    cls = model if isinstance(model, type) else type(model)
    return DeviceModelName(cls.__name__, cls).default_severity


def training_severity(model: str | DeviceModel | type[DeviceModel]) -> float:
    """The severity training uses when none is given: the model's default, else :data:`TRAINING_SEVERITY`."""
    default = default_severity(model)
    return TRAINING_SEVERITY if default is None else default


def severity_sweep(model: str | DeviceModel | type[DeviceModel]) -> list[float]:
    """The severities evaluation sweeps when none are given: the model's default alone, else
    :data:`SEVERITY_SWEEP`."""
    default = default_severity(model)
    return list(SEVERITY_SWEEP) if default is None else [default]
