"""The per-MVM effects of a device model: converter precision (model 4) and read noise (model 5).

An :class:`MVM` rides on a device model (``DeviceModel.mvm``) and tells the noisy layers what happens
around each crossbar matrix-vector multiplication, on top of the per-chip weight noise:

* ``input_bits`` b_in: the DAC quantises the layer input to the 2^b_in − 1 symmetric levels of the
  layer's input range (docs/device-models.md, "Converter precision");
* ``weight_levels``: the weight is programmed to the grid of its bit-sliced cells, i.e. quantised to
  ``weight_bits`` over ±max|W| (each of the weight_bits/device_bits cells holds 2^device_bits levels),
  before the per-chip noise;
* ``read_noise`` σ_r: every MVM adds fresh noise σ_r·max|W|·‖x‖₂·z to each output (equal in
  distribution to a fresh N(0, (σ_r·max|W|)²) on every weight for every input vector);
* ``output_noise`` σ_out: every MVM adds fresh Gaussian noise σ_out·max|W|·r_in/√T to each output of
  each of the T input tiles (aihwkit-lightning's ``forward.out_noise``: relative to the largest output one
  fully driven input of the tile can give; the /√T keeps the summed noise independent of the tiling);
* ``output_bound`` β: each tile's analog output saturates at ±β·max|W|·r_in (lightning's
  ``forward.out_bound``), before the ADC;
* ``output_bits`` b_out: the ADC quantises the analog output to the 2^b_out − 1 symmetric levels of the
  layer's output range; the bias is added digitally after it.

With crossbar tiles (``DeviceModel.tiles``) max|W|, r_in and r_out are those of each tile, and the
tiles' digital outputs are summed (docs/device-models.md, "Tiles").

``MVM()`` (all off) changes nothing. The math is in :mod:`nft_cuda.mvm_ops`; the layers apply it in
:mod:`nft_cuda.nn.mvm`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

__all__ = ["ADC_RANGES", "InputRange", "MVM", "MAX_CONVERTER_BITS"]

#: What an ADC's levels can span (MVM.adc_range).
ADC_RANGES = ("calibrated", "bound")
#: Largest converter resolution: the levels k·Δ with |k| < 2^(b−1) stay exact integers in float32.
MAX_CONVERTER_BITS = 24


def _check_bits(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if value < 2:
        raise ValueError(
            f"{name} must be >= 2, got {value}: a symmetric b-bit converter has the 2^b - 1 levels "
            "k·Δ, |k| <= 2^(b-1) - 1, so 1 bit would leave only the level 0"
        )
    if value > MAX_CONVERTER_BITS:
        raise ValueError(f"{name} must be <= {MAX_CONVERTER_BITS}, got {value}")
    return int(value)


def _check_real(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class InputRange:
    """Input ranges learned during training (aihwkit-lightning's ``pre_post.input_range``): each noisy
    layer (each input tile) gets a trainable DAC range r, inputs are clipped to ±r (no gradient to a
    clipped input) and r receives r·(Σ min(g, 0) over inputs clipped at +r − Σ max(g, 0) over those at −r)
    plus ``decay``·r while more than ``min_unclipped`` of the inputs pass unclipped (so r shrinks).

    Args:
        init_value: r before any data (> 0).
        init_batches: the first this many training forwards set r to the running mean of
            ``init_std_alpha``·std(x) (0: keep ``init_value``).
        init_std_alpha: that multiple of the input's std (> 0).
        decay: the shrinking term (>= 0).
        min_unclipped: the fraction of unclipped inputs above which the decay acts, in [0, 1].
    """

    init_value: float = 3.0
    init_batches: int = 100
    init_std_alpha: float = 3.0
    decay: float = 0.001
    min_unclipped: float = 0.95

    def __post_init__(self):
        object.__setattr__(self, "init_value", _check_real("init_value", self.init_value, positive=True))
        b = self.init_batches
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
            raise ValueError(f"init_batches must be an int >= 0, got {b!r}")
        object.__setattr__(self, "init_batches", int(b))
        object.__setattr__(self, "init_std_alpha", _check_real("init_std_alpha", self.init_std_alpha, positive=True))
        object.__setattr__(self, "decay", _check_real("decay", self.decay, positive=False))
        m = _check_real("min_unclipped", self.min_unclipped, positive=False)
        if m > 1:
            raise ValueError(f"min_unclipped must be a fraction in [0, 1], got {m}")
        object.__setattr__(self, "min_unclipped", m)


@dataclasses.dataclass(frozen=True)
class MVM:
    """What happens around each crossbar matrix-vector multiplication (models 4 and 5).

    Args:
        input_bits: DAC resolution b_in (>= 2), or None for exact inputs.
        output_bits: ADC resolution b_out (>= 2), or None for exact outputs.
        weight_levels: program the weight to its bit-sliced grid (weight_bits over ±max|W|).
        read_noise: σ_r >= 0 of the fresh per-MVM read noise, relative to max|W|.
        output_noise: σ_out >= 0 of the fresh per-MVM output noise, relative to max|W|·r_in.
        output_bound: β > 0 of the analog output bound ±β·max|W|·r_in, or None for unbounded.
        learned_input_range: an :class:`InputRange` to learn each layer's (each input tile's) DAC range
            during training instead of calibrating it; None: calibrated (or per-chunk) ranges.
        adc_range: what the ADC's levels span: ``"calibrated"`` (r_out of ``calibrate_mvm``, else the
            chunk's max) or ``"bound"`` (the output bound ±β·max|W|·r_in, as aihwkit and lightning
            define their ADC; needs ``output_bound``).
    """

    input_bits: int | None = None
    output_bits: int | None = None
    weight_levels: bool = False
    read_noise: float = 0.0
    output_noise: float = 0.0
    output_bound: float | None = None
    learned_input_range: InputRange | None = None
    adc_range: str = "calibrated"

    def __post_init__(self):
        object.__setattr__(self, "input_bits", _check_bits("input_bits", self.input_bits))
        object.__setattr__(self, "output_bits", _check_bits("output_bits", self.output_bits))
        if not isinstance(self.weight_levels, bool):
            raise TypeError(f"weight_levels must be a bool, got {type(self.weight_levels).__name__}")
        object.__setattr__(self, "read_noise", _check_real("read_noise", self.read_noise, positive=False))
        object.__setattr__(self, "output_noise", _check_real("output_noise", self.output_noise, positive=False))
        if self.output_bound is not None:
            object.__setattr__(self, "output_bound", _check_real("output_bound", self.output_bound, positive=True))
        learned = self.learned_input_range
        if isinstance(learned, dict):
            learned = InputRange(**learned)
        if learned is not None and not isinstance(learned, InputRange):
            raise TypeError(f"learned_input_range must be an InputRange or None, got {type(learned).__name__}")
        object.__setattr__(self, "learned_input_range", learned)
        if self.adc_range not in ADC_RANGES:
            raise ValueError(f"adc_range must be one of {', '.join(map(repr, ADC_RANGES))}, got {self.adc_range!r}")
        if self.adc_range == "bound" and self.output_bound is None:
            raise ValueError("adc_range 'bound' needs an output_bound β (the ADC spans ±β·max|W|·r_in)")

    @property
    def active(self) -> bool:
        """Whether any effect is on (``MVM()`` is the identity)."""
        return self.weight_levels or self.around_gemm

    @property
    def around_gemm(self) -> bool:
        """Whether an effect acts on the MVM's input or output (DAC, read or output noise, bound, ADC), not
        only on the weight."""
        return (
            self.input_bits is not None
            or self.output_bits is not None
            or self.read_noise > 0
            or self.output_noise > 0
            or self.output_bound is not None
            or self.learned_input_range is not None
        )

    def to_dict(self) -> dict:
        """JSON-safe fields (the inverse of :meth:`from_dict`); the output-noise and output-bound fields
        only when set, so the dict of every MVM made before they existed is unchanged."""
        d = dataclasses.asdict(self)
        if self.output_noise == 0:
            del d["output_noise"]
        if self.output_bound is None:
            del d["output_bound"]
        if self.learned_input_range is None:
            del d["learned_input_range"]
        if self.adc_range == "calibrated":
            del d["adc_range"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MVM:
        """The MVM of a :meth:`to_dict` dict (unknown keys raise ValueError)."""
        if not isinstance(d, dict):
            raise TypeError(f"an MVM dict must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown MVM field(s) {', '.join(unknown)}")
        return cls(**d)

    def __str__(self) -> str:
        parts = []
        if self.input_bits is not None:
            parts.append(f"DAC {self.input_bits} b")
        if self.output_bits is not None:
            parts.append(f"ADC {self.output_bits} b")
        if self.weight_levels:
            parts.append("weight levels")
        if self.read_noise > 0:
            parts.append(f"σ_r={self.read_noise:g}")
        if self.output_noise > 0:
            parts.append(f"σ_out={self.output_noise:g}")
        if self.output_bound is not None:
            parts.append(f"bound {self.output_bound:g}")
        if self.learned_input_range is not None:
            parts.append("learned input ranges")
        return f"MVM({', '.join(parts) or 'ideal'})"
