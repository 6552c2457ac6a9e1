"""Hardware-aware training presets: the published recipes of the field as one name (docs/hwa-training.md,
"Presets"). A preset sets the device model (its tiles, converters, noise and learned input ranges) and the
weight clipping of ``nft train``; any option given explicitly on top of it wins.

- ``lightning-hwa``: the recipe of aihwkit-lightning's user guide (IBM/aihwkit-lightning,
  ``docs/source/user_guide.rst``), the toolkit of IBM's Analog Foundation Models work: 8-bit DAC and ADC,
  output noise 0.01 per channel, output bound 12 (the ADC spans it), per-channel weight noise of std 0.05
  (of each channel's max|W|), input ranges learned from 100 batches at 3·std, 512-input tiles, weights
  clipped to 2.5 std per channel after every step.
- ``aihwkit-standard-hwa``: aihwkit's ``StandardHWATrainingPreset`` (IBM/aihwkit,
  ``src/aihwkit/simulator/presets/inference.py``): the PCM model (``PCMLikeNoiseModel`` defaults, with its
  read step: ``aihwkit_read``) with global drift compensation (one-hot rule), 512-input tiles with column-wise weight scaling, 8-bit DAC and
  ADC (``inp_res = out_res = 254``), forward weight read noise 0.0175, output noise 0.04, output bound 10,
  learned input ranges (init 3, 100 batches, 3·std, decay 0.001, 95 %). Differences: aihwkit's
  ``w_noise_type = PCM_READ`` read noise depends on the conductance, the library's read noise (model 5)
  does not; its ``clip = FIXED_VALUE 1.0`` acts on weights normalised per column (a bound the remapped
  weights never exceed), so the preset clips nothing; ``ir_drop`` and ``learn_out_scaling`` are not
  modelled. aihwkit trains such a model with the forward noise only and applies the PCM programming noise
  at inference; ``nft train`` with this preset injects the PCM chip's own noise (at t = 0) in training.
"""

from __future__ import annotations

import dataclasses

from nft_cuda.devices import DeviceModel, Variation, make_device_model
from nft_cuda.train.weight_clip import WeightClip

__all__ = ["HWA_PRESETS", "HWAPreset", "preset"]


@dataclasses.dataclass(frozen=True)
class HWAPreset:
    """A named recipe: the ``nft train`` fields it sets (see the module docstring for the sources)."""

    name: str
    source: str
    device_model: str
    sigma: float
    device_options: dict
    weight_clip: WeightClip

    def device(self) -> DeviceModel:
        """The device model of the recipe."""
        return make_device_model(self.device_model, self.sigma, **self.device_options)

    def train_fields(self) -> dict:
        """The :class:`~nft_cuda.train.TrainConfig` fields the preset sets."""
        return {
            "device_model": self.device_model,
            "sigma": self.sigma,
            "device_options": {k: dict(v) if isinstance(v, dict) else v for k, v in self.device_options.items()},
            "weight_clip": self.weight_clip,
        }


_LEARNED = {"init_value": 3.0, "init_batches": 100, "init_std_alpha": 3.0, "decay": 0.001, "min_unclipped": 0.95}
_TILES_512 = {"max_input_size": 512, "per_channel": True}

HWA_PRESETS: dict[str, HWAPreset] = {
    "lightning-hwa": HWAPreset(
        name="lightning-hwa",
        source="IBM/aihwkit-lightning docs/source/user_guide.rst",
        device_model="RRAM1",
        sigma=0.05 / Variation(1.0).scale,  # std 0.05 of max|W| (RRAM1's σ_w = σ_d·scale·max|W|)
        device_options={
            "tiles": _TILES_512,
            "mvm": {
                "input_bits": 8,
                "output_bits": 8,
                "output_noise": 0.01,
                "output_bound": 12.0,
                "adc_range": "bound",
                "learned_input_range": _LEARNED,
            },
        },  # fmt: skip
        weight_clip=WeightClip("gaussian-per-channel", sigma=2.5),
    ),
    "aihwkit-standard-hwa": HWAPreset(
        name="aihwkit-standard-hwa",
        source="IBM/aihwkit src/aihwkit/simulator/presets/inference.py (StandardHWATrainingPreset)",
        device_model="pcm",
        sigma=1.0,
        device_options={
            "drift_compensation": True,
            "compensation_rule": "one-hot",
            "aihwkit_read": True,
            "tiles": _TILES_512,
            "mvm": {
                "input_bits": 8,
                "output_bits": 8,
                "read_noise": 0.0175,
                "output_noise": 0.04,
                "output_bound": 10.0,
                "adc_range": "bound",
                "learned_input_range": _LEARNED,
            },
        },  # fmt: skip
        weight_clip=WeightClip(),
    ),
}


def preset(name: str) -> HWAPreset:
    """The preset called ``name`` (ValueError listing the known ones)."""
    if name not in HWA_PRESETS:
        raise ValueError(f"unknown HWA preset {name!r}; known: {', '.join(HWA_PRESETS)}")
    return HWA_PRESETS[name]
