"""Argument checking and resolution shared by the public ops (clear TypeError/ValueError messages)."""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Sequence

import torch

from nft_cuda.devices import COMPENSATION_RULES, DeviceModel

# The package's one bool, positive-int and real-number checks are written in devices.base, the bottom of
# the import graph (this module imports the devices), and used from here.
from nft_cuda.devices.base import check_bool as check_bool
from nft_cuda.devices.base import check_positive_int as check_positive_int
from nft_cuda.devices.base import check_real as check_real
from nft_cuda.variation import Variation

_U63 = 2**63
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_seed_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2^63), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < _U63:
        raise ValueError(f"{name} must be in [0, 2^63), got {value}")
    return value


def check_uint(name: str, value, bits: int) -> int:
    """An int in [0, 2^bits) (e.g. a chip instance: bits=32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2^{bits}), got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < 2**bits:
        raise ValueError(f"{name} must be in [0, 2^{bits}), got {value}")
    return value


def resolve_device(name: str) -> torch.device:
    """The torch.device of a ``--device``-style name: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".

    One message for a CUDA device on a machine without one, whoever asks (train, eval, demo)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device '{name}' was requested but CUDA is not available (use --device cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{name}': only {torch.cuda.device_count()} CUDA device(s) present")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def check_weight(weight, name: str = "weight") -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {weight.dtype}")
    return weight


def check_variation(variation) -> Variation:
    if not isinstance(variation, Variation):
        raise TypeError(f"variation must be an nft_cuda.Variation, got {type(variation).__name__}")
    return variation


def check_device_model(model, name: str = "variation") -> DeviceModel:
    """Any device model (:class:`nft_cuda.Variation` or another :class:`nft_cuda.devices.DeviceModel`)."""
    if not isinstance(model, DeviceModel):
        raise TypeError(
            f"{name} must be a device model (nft_cuda.Variation or an nft_cuda.devices model), got {type(model).__name__}"
        )
    return model


def make_rng(seed: int, offset: int, device: torch.device) -> torch.Tensor:
    """int64[2] (seed, offset) on ``device`` without a host synchronisation."""
    rng = torch.empty(2, dtype=torch.int64, device=device)
    rng[0].fill_(seed)  # two fill kernels rather than a host->device copy (which would sync)
    rng[1].fill_(offset)
    return rng


def random_rng(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh (seed, offset) pair drawn on ``device`` from ``generator`` (default: torch's)."""
    return torch.randint(0, _U63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)


def resolve_rng(device: torch.device, seed, offset, rng) -> torch.Tensor:
    """The int64[2] rng tensor of a call: from ``rng``, from ints ``seed``/``offset``, or drawn."""
    if rng is not None:
        if seed is not None or offset is not None:
            raise ValueError("pass either rng or seed/offset, not both")
        if not isinstance(rng, torch.Tensor):
            raise TypeError(f"rng must be an int64 tensor of shape [2], got {type(rng).__name__}")
        if rng.dtype != torch.int64:
            raise TypeError(f"rng must be an int64 tensor, got {rng.dtype}")
        if rng.shape != (2,):
            raise ValueError(f"rng must have shape [2] holding (seed, offset), got {list(rng.shape)}")
        if rng.device != device:
            raise ValueError(f"rng is on {rng.device} but weight is on {device}")
        return rng
    if seed is None and offset is None:
        return random_rng(device)
    if seed is None:
        raise ValueError("offset was given without seed")
    seed = check_seed_int("seed", seed)
    offset = check_seed_int("offset", 0 if offset is None else offset)
    return make_rng(seed, offset, device)


def resolve_sigmas(variation: DeviceModel, samples: int, sigmas, device: torch.device) -> torch.Tensor:
    """float32 [samples] per-sample absolute severities on ``device`` (default: variation.sigma for all).

    A device tensor is never read back to the host; CPU tensors and Python sequences are checked.
    """
    if sigmas is None:
        return torch.full((samples,), variation.sigma, dtype=torch.float32, device=device)
    if isinstance(sigmas, torch.Tensor):
        if not sigmas.is_floating_point():
            raise TypeError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")
        if sigmas.dim() != 1 or sigmas.numel() != samples:
            raise ValueError(f"sigmas must be 1-D of length samples={samples}, got shape {list(sigmas.shape)}")
        if sigmas.device != device:
            raise ValueError(f"sigmas is on {sigmas.device} but weight is on {device}")
        if sigmas.device.type == "cpu" and not bool(((sigmas >= 0) & torch.isfinite(sigmas)).all()):
            raise ValueError(f"sigmas must be finite and >= 0, got {sigmas.tolist()}")
        return sigmas.to(torch.float32).contiguous()
    if isinstance(sigmas, Sequence):
        values = []
        for v in sigmas:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"sigmas must hold real numbers, got {type(v).__name__}")
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"sigmas must be finite and >= 0, got {v}")
            values.append(float(v))
        if len(values) != samples:
            raise ValueError(f"sigmas must have length samples={samples}, got {len(values)}")
        return torch.tensor(values, dtype=torch.float32).to(device)
    raise TypeError(f"sigmas must be a 1-D tensor or a sequence of floats, got {type(sigmas).__name__}")


# --------------------------------------------------------------------------------------------------
# Settings (TrainConfig and the like): a clear TypeError / ValueError naming the setting
# --------------------------------------------------------------------------------------------------


def check_int(name: str, value, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    key = value.strip().lower()
    if key not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return key


def check_module(name: str, value) -> torch.nn.Module:
    """``value`` if it is an ``nn.Module`` (a model or a layer), else TypeError naming the argument."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------------
# Command-line argument types (argparse ``type=``), shared by every ``nft`` command
# --------------------------------------------------------------------------------------------------


def float_arg(minimum: float | None = None, strict: bool = False):
    """An argparse type: a finite float ``>= minimum`` (``> minimum`` when ``strict``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum:g}, got {text}")
        return value

    return parse


def int_arg(minimum: int, maximum: int | None = None, why: str = ""):
    """An argparse type: an int in [minimum, maximum) (``why`` explains the lower bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}{why}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}{why}")
        if maximum is not None and value >= maximum:
            raise argparse.ArgumentTypeError(f"must be < {maximum}, got {text}")
        return value

    return parse


def floats_arg(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated numbers >= 0 (e.g. OVF's deltas ``0.15,0.10,0.05``)."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated numbers, e.g. 0.15,0.10,0.05")
    parse = float_arg(0.0)
    return tuple(parse(p) for p in parts)


def json_object_arg(text: str) -> dict:
    """An argparse type: a JSON object, e.g. a model factory's kwargs ``'{"depth": 2}'``."""
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected a JSON object such as '{{\"depth\": 2}}', got {text!r} ({exc})"
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def output_arg(text: str) -> str | int:
    """An argparse type: the output adapter of ``--output``: an attribute or key name (``logits``), an
    index of a tuple output (``0``) or an import path ``package.module:function``."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("expected an attribute name such as logits, an index or an import path")
    return int(text) if text.lstrip("-").isdigit() else text


def taps_arg(text: str) -> dict[str, int]:
    """An argparse type: IRS taps ``module.path=pool,...`` (e.g. ``blocks.0=4,blocks.1=4``)."""
    taps = {}
    for item in (p for p in text.replace(" ", ",").split(",") if p):
        name, sep, pool = item.partition("=")
        if not sep or not name or not pool.strip().isdigit() or int(pool) < 1:
            raise argparse.ArgumentTypeError(f"expected module.path=pool (pool an int >= 1), got {item!r}")
        taps[name] = int(pool)
    if not taps:
        raise argparse.ArgumentTypeError("expected taps module.path=pool,..., e.g. blocks.0=4,blocks.1=4")
    return taps


# --------------------------------------------------------------------------------------------------
# Device-model options of ``nft train`` and ``nft eval`` (docs/device-models.md)
# --------------------------------------------------------------------------------------------------


def device_model_arg(text: str) -> str:
    """An argparse type: a device model name (a preset or pcm / lognormal / stuck-at, any case), with a
    did-you-mean hint for a typo."""
    from nft_cuda.devices import make_device_model

    try:
        return make_device_model(text, 0.0).name
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def times_arg(text: str) -> tuple[float, ...]:
    """An argparse type: times after programming in seconds, ``1,3600,86400,3.15e7`` (each finite, >= 0,
    listed once)."""
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected times in seconds, e.g. 1,3600,86400,3.15e7")
    values = []
    for p in parts:
        try:
            t = float(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a time in seconds, got {p!r}") from None
        if not math.isfinite(t) or t < 0:
            raise argparse.ArgumentTypeError(f"a time after programming must be a finite number >= 0 s, got {p}")
        if t in values:
            raise argparse.ArgumentTypeError(f"time {p} listed twice")
        values.append(t)
    return tuple(values)


def add_device_options(g, *, suppress: bool) -> None:
    """The options of the device model beyond its name and severity: stuck-at rates, PCM drift
    compensation and the MVM effects (models 4, 5). ``suppress``: leave unset options off the namespace
    (``nft train``, whose defaults come from its config)."""
    default = argparse.SUPPRESS if suppress else None
    g.add_argument("--p0", type=float_arg(0.0), default=default, help="stuck-at: probability of a cell stuck at g_min")
    g.add_argument("--p1", type=float_arg(0.0), default=default, help="stuck-at: probability of a cell stuck at g_max")
    g.add_argument(
        "--drift-compensation",
        dest="drift_compensation",
        action="store_true",
        default=default,
        help="pcm: global drift compensation (one scale α per layer and chip from a calibration read)",
    )
    g.add_argument(
        "--compensation-rule",
        dest="compensation_rule",
        choices=COMPENSATION_RULES,
        default=default,
        help="pcm: how the drift-compensation read estimates α: one-hot (default; aihwkit's: one-hot inputs, "
        "α = Σ|W_0|/Σ|W_t|) or all-ones (one all-ones input: the ratio of the summed |row sums|)",
    )
    g.add_argument(
        "--aihwkit-read",
        dest="aihwkit_read",
        action="store_true",
        default=default,
        help="pcm: aihwkit's read step (1/f read noise from t + t0, so also at t = 0; Q_s at the programmed "
        "conductance; conductances clamped at 0) instead of this library's",
    )
    _add_mvm_options(g, default)
    _add_tile_options(g, default)


def _add_mvm_options(g, default) -> None:
    """The options of the MVM effects (devices.MVM: converters, read and output noise, learned ranges)."""
    g.add_argument(
        "--dac-bits", dest="dac_bits", type=int_arg(2, 25), default=default, help="DAC bits of each MVM's input"
    )
    g.add_argument(
        "--adc-bits", dest="adc_bits", type=int_arg(2, 25), default=default, help="ADC bits of each MVM's output"
    )
    g.add_argument(
        "--weight-levels",
        dest="weight_levels",
        action="store_true",
        default=default,
        help="program weights to their bit-sliced grid (weight_bits over ±max|W|)",
    )
    g.add_argument(
        "--read-noise",
        dest="read_noise",
        type=float_arg(0.0),
        default=default,
        help="σ_r of the fresh per-MVM read noise (relative to max|W|)",
    )
    g.add_argument(
        "--output-noise",
        dest="output_noise",
        type=float_arg(0.0),
        default=default,
        help="σ_out of the fresh per-MVM output noise (relative to max|W|·r_in of each tile)",
    )
    g.add_argument(
        "--output-bound",
        dest="output_bound",
        type=float_arg(0.0, strict=True),
        default=default,
        help="β of the analog output bound ±β·max|W|·r_in of each tile (before the ADC)",
    )
    g.add_argument(
        "--learn-input-range",
        dest="learn_input_range",
        action="store_true",
        default=default,
        help="learn each layer's (each input tile's) DAC range during training (aihwkit-lightning's input-range "
        "learning, devices.InputRange defaults) instead of calibrating it",
    )


def _add_tile_options(g, default) -> None:
    """The options of the crossbar tiles (devices.Tiles)."""
    g.add_argument(
        "--max-input-size",
        dest="max_input_size",
        type=int_arg(1),
        default=default,
        help="crossbar tiles: inputs per tile (each tile scales its conductances by its own max|W|)",
    )
    g.add_argument(
        "--max-output-size",
        dest="max_output_size",
        type=int_arg(1),
        default=default,
        help="crossbar tiles: outputs per tile",
    )
    g.add_argument(
        "--per-channel-noise",
        dest="per_channel",
        action="store_true",
        default=default,
        help="every output channel its own conductance scale (per-channel weight noise)",
    )


def device_options_from_args(args: argparse.Namespace) -> dict:
    """The device-model fields the options of :func:`add_device_options` set (only those given); the
    MVM effects as ``{"mvm": {...}}`` (a JSON-safe dict: the train config stores it)."""
    options = {}
    for name in ("p0", "p1", "drift_compensation", "compensation_rule", "aihwkit_read"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    mvm = {}
    for flag, field in (("dac_bits", "input_bits"), ("adc_bits", "output_bits"), ("weight_levels", "weight_levels"),
                        ("read_noise", "read_noise"), ("output_noise", "output_noise"),
                        ("output_bound", "output_bound")):  # fmt: skip
        if getattr(args, flag, None) is not None:
            mvm[field] = getattr(args, flag)
    if getattr(args, "learn_input_range", None):
        mvm["learned_input_range"] = {}  # the InputRange defaults
    if mvm:
        options["mvm"] = mvm
    tiles = {name: getattr(args, name, None) for name in ("max_input_size", "max_output_size", "per_channel")}
    tiles = {k: v for k, v in tiles.items() if v is not None}
    if tiles:
        options["tiles"] = tiles
    return options
