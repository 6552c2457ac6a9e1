"""Evaluation configuration: :class:`EvalConfig`, the settings of a Monte-Carlo evaluation in one frozen
object (as :class:`nft_cuda.train.TrainConfig` holds a training's).

:func:`nft_cuda.eval.monte_carlo` reads its chip fields (``runs`` .. ``stream_version``);
:func:`nft_cuda.eval.eval_checkpoints` reads them all. Both still take the same settings as keyword
arguments and build an ``EvalConfig`` from them; ``config=EvalConfig(...)`` passes one directly.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from nft_cuda import _args

__all__ = ["EvalConfig", "config_or_keywords"]

#: The instance field of the noise offset is 32 bits wide (DESIGN §2): at most 2^32 chips.
_MAX_RUNS = 2**32


def _floats(name: str, values, what: str) -> tuple[float, ...] | None:
    """``values`` (one number or a sequence) as a tuple of floats; None stays None; empty is refused."""
    if values is None:
        return None
    out = tuple(float(v) for v in ([values] if isinstance(values, (int, float)) else values))
    if not out:
        raise ValueError(f"{name} must hold at least one {what}")
    return out


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything a Monte-Carlo evaluation needs (checked and normalised on construction; frozen: derive
    a changed copy with :func:`dataclasses.replace`).

    The chips (:func:`~nft_cuda.eval.monte_carlo` and :func:`~nft_cuda.eval.eval_checkpoints`):

    Attributes:
        runs: R, the number of chip instances (1 .. 2^32).
        seed: the evaluation seed, in [0, 2^63).
        instances_per_pass: S, instances evaluated together in one pass over the test set (speed and
            memory only, never the results).
        device: where to run. None: ``monte_carlo`` runs on the model's device, ``eval_checkpoints`` on
            CUDA when available, else the CPU.
        progress: show a progress bar (rank 0 only).
        fold: fold the S instances of a pass into the batch axis (None: on CUDA, not on CPU).
        distributed: shard the instances over the torch.distributed ranks (None: when initialised).
        per_instance_kl: also return each chip's KL to the mean prediction (paired EKL comparisons).
        output: the output adapter (:func:`nft_cuda.nn.custom.resolve_output`; None: the model returns
            the logits; ``eval_checkpoints``: each checkpoint's own).
        stream_version: the noise stream version of the chips (DESIGN §2; None: the model's own).

    The sweep, the test set and the report (:func:`~nft_cuda.eval.eval_checkpoints` only):

    Attributes:
        sigmas: the severities (None: each checkpoint's default sweep, see
            :func:`nft_cuda.eval.run.default_sigmas`).
        device_model: a preset or ``"pcm"``, ``"lognormal"``, ``"stuck-at"`` (None: each checkpoint's own).
        times: seconds after programming, a second sweep axis (None: none).
        drift_compensation: PCM only: override the model's global drift compensation.
        device_options: other fields of the device model, e.g. ``{"p0": 0.01}`` (None: none).
        data_dir: the data folder (see :mod:`nft_cuda.data`).
        batch_size: test batch size.
        labels: the checkpoints' names in the report (None: from their paths).
        baseline: the checkpoint (path or label) every other one is compared with chip by chip.
        resume: reuse the points an interrupted call with the same settings finished.
        json_path, csv_path, plot_path: the report files (None: not written).
    """

    runs: int = 100
    seed: int = 0
    instances_per_pass: int = 8
    device: object = None
    progress: bool = True
    fold: bool | None = None
    distributed: bool | None = None
    per_instance_kl: bool = False
    output: object = None
    stream_version: int | None = None
    sigmas: tuple[float, ...] | None = None
    device_model: str | None = None
    times: tuple[float, ...] | None = None
    drift_compensation: bool | None = None
    device_options: dict = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    batch_size: int = 256
    labels: tuple[str, ...] | None = None
    baseline: str | None = None
    resume: bool = True
    json_path: str | None = None
    csv_path: str | None = None
    plot_path: str | None = None

    def __post_init__(self):
        _args.check_positive_int("runs", self.runs)
        if self.runs > _MAX_RUNS:
            raise ValueError(f"runs must be at most 2^32 (the instance field of the noise offset), got {self.runs}")
        self._set("seed", _args.check_seed_int("seed", self.seed))
        _args.check_positive_int("instances_per_pass", self.instances_per_pass)
        _args.check_positive_int("batch_size", self.batch_size)
        self._set("sigmas", _floats("sigmas", self.sigmas, "σ_d"))
        self._set("times", _floats("times", self.times, "time after programming"))
        if not isinstance(self.device_options, (dict, type(None))):
            raise TypeError(f"device_options must be a dict, got {type(self.device_options).__name__}")
        self._set("device_options", dict(self.device_options or {}))
        if self.labels is not None:
            self._set("labels", tuple(self.labels))

    def _set(self, name: str, value) -> None:
        """Normalise a field during construction (the dataclass is frozen afterwards)."""
        object.__setattr__(self, name, value)


def config_or_keywords(caller: Callable, config: EvalConfig | None, keywords: dict) -> EvalConfig:
    """The EvalConfig of a call of ``caller`` (``monte_carlo``, ``eval_checkpoints``): ``config`` when
    given, else one built from the call's setting ``keywords``. Giving both a config and a setting that
    differs from ``caller``'s default is refused, naming the settings (one source for every setting)."""
    if config is None:
        return EvalConfig(**keywords)
    if not isinstance(config, EvalConfig):
        raise TypeError(f"config must be an nft_cuda.eval.EvalConfig, got {type(config).__name__}")
    defaults = inspect.signature(caller).parameters
    both = [name for name, value in keywords.items() if not _is_default(value, defaults[name].default)]
    if both:
        raise TypeError(
            f"{caller.__name__}: {', '.join(both)} given both in config and as arguments; give each setting once"
        )
    return config


def _is_default(value, default) -> bool:
    if value is default:
        return True
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor compared with a number
        return False
