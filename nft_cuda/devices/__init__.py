"""Device models (DESIGN §2.1): immutable, hashable value objects describing how a chip perturbs weights.

- :class:`BitSlicedGaussian` (= :class:`nft_cuda.Variation`): the paper's model and its four presets;
- :class:`PCM`: conductance-dependent programming noise, drift and 1/f read noise;
- :class:`LogNormal`: W·exp(σ·z);
- :class:`StuckAt`: cells stuck at g_min / g_max;
- :class:`MVM`: converter precision and per-MVM read noise, carried by any model as ``model.mvm``;
- :class:`Tiles`: crossbar tiles (per-tile conductance scale), carried by any model as ``model.tiles``.

Adding a model is one frozen dataclass subclass of :class:`DeviceModel` with a ``kind`` and a
``KERNEL_ID`` (plus its per-element function in the kernels and in ``reference.perturb_device``), and
its row in :data:`~nft_cuda.devices.catalog.DEVICE_MODELS`, the one table of device-model names and
default severities.
"""

from __future__ import annotations

from nft_cuda.devices.base import DeviceModel
from nft_cuda.devices.bitsliced import PRESETS, Variation
from nft_cuda.devices.catalog import (
    DEVICE_MODELS,
    MODEL_NAMES,
    SEVERITY_SWEEP,
    TRAINING_SEVERITY,
    default_severity,
    lookup,
    model_classes,
    severity_sweep,
    training_severity,
)
from nft_cuda.devices.lognormal import LogNormal
from nft_cuda.devices.mvm import MVM, InputRange
from nft_cuda.devices.pcm import COMPENSATION_RULES, PCM
from nft_cuda.devices.stuck_at import StuckAt
from nft_cuda.devices.tiles import Tiles

__all__ = [
    "COMPENSATION_RULES",
    "DEVICE_MODELS",
    "MODEL_NAMES",
    "SEVERITY_SWEEP",
    "TRAINING_SEVERITY",
    "BitSlicedGaussian",
    "DeviceModel",
    "InputRange",
    "LogNormal",
    "MVM",
    "PCM",
    "PRESETS",
    "StuckAt",
    "Tiles",
    "Variation",
    "default_severity",
    "device_model_from_dict",
    "lookup",
    "make_device_model",
    "severity_sweep",
    "training_severity",
]

#: The paper's bit-sliced Gaussian model: the same class as :class:`nft_cuda.Variation`.
BitSlicedGaussian = Variation


def make_device_model(name: str, sigma: float, **options) -> DeviceModel:
    """The device model called ``name`` at severity ``sigma`` (the CLI's ``--device-model``).

    Args:
        name: a preset of the bit-sliced Gaussian (RRAM1, FeFET2, RRAM4, FeFET6) or "pcm",
            "lognormal", "stuck-at" (case-insensitive).
        sigma: the severity (σ_d for the presets; see docs/device-models.md for the others).
        options: the model's other fields, e.g. ``time=3600.0, drift_compensation=True`` for PCM,
            ``p0=0.01, p1=0.01`` for stuck-at, ``weight_bits=8`` for a preset; ``mvm`` may be an
            :class:`MVM` or its dict.
    """
    row = lookup(name)
    if isinstance(options.get("mvm"), dict):  # the JSON form of the converter settings
        options = {**options, "mvm": MVM.from_dict(options["mvm"])}
    if isinstance(options.get("tiles"), dict):
        options = {**options, "tiles": Tiles.from_dict(options["tiles"])}
    if row.preset is not None:
        return Variation(sigma, row.preset, **options)
    return row.model(sigma=sigma, **options)


def device_model_from_dict(d: dict) -> DeviceModel:
    """The model of :meth:`DeviceModel.to_dict`; a dict without ``"kind"`` is a legacy Variation
    dict ``{"sigma", "device_model", "weight_bits", "device_bits"}`` (old checkpoints)."""
    if not isinstance(d, dict):
        raise TypeError(f"a device-model dict is expected, got {type(d).__name__}")
    fields = dict(d)
    kind = fields.pop("kind", Variation.kind)
    classes = model_classes()
    if kind not in classes:
        raise ValueError(f"unknown device-model kind {kind!r}; known: {', '.join(classes)}")
    return classes[kind].from_fields(fields)
