"""Training configuration: :class:`TrainConfig`, every field validated on construction."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from nft_cuda import _args
from nft_cuda.train.weight_clip import WeightClip

__all__ = ["RESUME_MAY_DIFFER", "TrainConfig", "default_out"]

_OPTIMIZERS = ("adam", "sgd")
_SCHEDULERS = ("cosine", "none")
#: Fields that may differ between a checkpoint's config and the config that resumes it.
RESUME_MAY_DIFFER = ("data_dir", "device", "out", "num_workers", "resume", "overwrite")
_DEFAULT_DELTAS = (0.15, 0.10, 0.05)
_U63 = 2**63


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


# The validators are nft_cuda._args's (one set for the whole package); short names keep __post_init__ readable.
_real = _args.check_real
_int = _args.check_int
_choice = _args.check_choice
_bool = _args.check_bool


def _path_or_none(name: str, value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got {type(value).__name__}")
    value = os.fspath(value)
    if not value:
        raise ValueError(f"{name} must not be empty")
    return value


@dataclasses.dataclass
class TrainConfig:
    """Everything :func:`train` needs (validated and normalised on construction).

    Attributes:
        model: ``"small"`` (CPU-friendly, default), ``"vgg8"``, ``"resnet18"``, or the sequence models
            ``"vit"`` and ``"lstm"`` (1-channel 28×28 data: the MNIST family; see nft_cuda.models);
            ``"custom"`` with a ``model_factory`` (set so when a factory is given).
        model_factory: any ``nn.Module`` instead of a built-in model: the import path
            ``"package.module:function"`` of a function (or class) returning it, or that callable itself
            when it is a module-level one of an importable module (it is stored as its import path, so
            checkpoints, ``--resume`` and ``nft eval`` rebuild the same model). docs/custom-models.md.
        model_kwargs: the factory's keyword arguments (JSON-safe values), e.g. ``{"depth": 2}``.
        output: where the logits are in the model's output (the output adapter,
            :func:`nft_cuda.nn.custom.resolve_output`): None (the output is the logits tensor), an
            attribute or key name (``"logits"`` for Hugging Face models), an index of a tuple, or a
            callable's import path ``"package.module:function"`` (a module-level callable is accepted and
            stored as its path). Recorded in the exported model for ``nft eval``.
        taps: IRS taps, module path → snapshot pool size (default: the built-in model's
            :data:`nft_cuda.models.IRS_TAPS`; a model factory's model needs them).
        dataset: ``"embedded"`` (default: a Fashion-MNIST slice shipped with the package, no download),
            ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, ``"cifar100"``.
        data_dir: the data folder (default ``$NFT_DATA_DIR``, else ``~/.cache/nft_cuda/data``).
        method: ``"clean"``, ``"noise"`` (noise injection, default), ``"ovf"``, ``"irs"``, or the baselines
            ``"ortho"``, ``"trice"``, ``"kd"`` (:mod:`nft_cuda.train.methods`; ``"kd"`` needs ``teacher``).
        sigma: the device model's severity during training (≥ 0): σ_d for the bit-sliced Gaussian presets
            (0.1 by default, the reference README's example) and the log-normal model (default 0.1);
            the multiplier of the programming noise / fault rates for ``"pcm"`` / ``"stuck-at"``
            (default 1.0). None: that default.
        device_model: ``"RRAM1"``, ``"FeFET2"``, ``"RRAM4"``, ``"FeFET6"`` (the bit-sliced Gaussian
            presets), ``"pcm"``, ``"lognormal"`` or ``"stuck-at"`` (:func:`nft_cuda.devices.make_device_model`).
        device_options: the model's other fields, e.g. ``{"time": 3600.0, "drift_compensation": True}``
            for PCM, ``{"p0": 0.01, "p1": 0.01}`` for stuck-at (JSON-safe values).
        beta: the feedback gain β of OVF/IRS (None: the DESIGN §5 default for model/dataset).
        deltas: OVF variation offsets δ_n, noisiest first.
        head_sigma: σ of the IRS heads (None: ``sigma``; the heads use RRAM1 with the bit-sliced Gaussian
            presets, the backbone's device model otherwise).
        epochs: number of epochs (default 2: ``nft train --method ovf`` ends in about two minutes on
            two CPU cores).
        batch_size, lr: mini-batch size and learning rate.
        optimizer: ``"adam"`` (default, as the paper) or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum (ignored by Adam).
        scheduler: ``"cosine"`` (CosineAnnealingLR, T_max = epochs, stepped per epoch) or ``"none"``.
        weight_decay: L2 weight decay of the optimizer.
        val_fraction: share of the training split held out for model selection, in [0, 1).
        seed: the run's seed, in [0, 2^63).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        width: channel multiplier of the model (the token / hidden width for vit / lstm).
        augment: random crop (padding 4, filled with normalised black) and horizontal flip of every
            training batch (:class:`nft_cuda.data.augment.CropFlip`); None (default): on for CIFAR-10/100,
            off for the MNIST-like datasets, as the reference. Validation and test batches are never
            augmented.
        out: the run folder (None: ``runs/<method>-<model>-<dataset>-s<sigma>``, see :func:`default_out`).
        num_workers: DataLoader worker processes.
        resume: continue the run in ``out`` from its checkpoint.
        overwrite: start afresh in an ``out`` that already holds a run (its checkpoints are replaced).
        limit_train, limit_eval: debugging option — cap the number of training samples, and of
            validation and test samples (None: all).
        init: the weight initialisation of ``"vgg8"`` / ``"resnet18"``: ``"torch"`` (default, PyTorch's)
            or ``"paper"`` (the authors': Kaiming-normal fan_out on every Conv and Linear, biases 0;
            :func:`nft_cuda.models.paper_init`).
        preprocess: the MNIST family's preprocessing: ``"standard"`` (default: zero-pad 28→32, the
            dataset's mean/std) or ``"paper"`` (the authors': bilinear resize 28→32, scaled to [−1, 1],
            background −1); see :func:`nft_cuda.data.load_dataset`. Recorded in the exported model, so
            ``nft eval`` preprocesses the test set the same way.
        temperature: the loss's logit temperature T of ``"clean"`` / ``"noise"``: CE(logits / T, y)
            (default 1: plain cross-entropy). OVF and IRS already divide by N+1.
        ovf_scope: which layers OVF's oriented forwards raise σ in: ``"all"`` (default, the library's
            OVF: every noisy layer) or ``"paper"`` (the authors' scope,
            :data:`nft_cuda.models.OVF_PAPER_SCOPE`: for ResNet-18 the stem conv and the FC only).
        ovf_bn_stats: ``"all"`` (default: every OVF forward updates the BatchNorm running statistics,
            as the authors') or ``"main"`` (only the backbone forward does).
        teacher: method ``"kd"``: the clean teacher, an exported model or run folder of ``nft train``
            (required by ``"kd"``, refused by the other methods); recorded as a path, so a resumed run
            loads the same file again.
        kd_alpha, kd_temperature: method ``"kd"``: the soft term's weight α in [0, 1] (default 0.5) and
            its temperature T > 0 (default 4); :class:`nft_cuda.train.methods.KnowledgeDistillation`.
        weight_clip: hardware-aware weight clipping after every optimizer step, a
            :class:`nft_cuda.train.WeightClip` (or its ``to_dict()``, or None): ``kind`` ``"fixed"``
            (±value), ``"gaussian"`` (±sigma·std of the layer) or ``"gaussian-per-channel"`` (±sigma·std
            of each output channel) on the crossbar weights of every noisy layer
            (:func:`nft_cuda.train.clip_weights`; docs/hwa-training.md). Default: no clipping, the
            training of before bit for bit.
    """

    model: str = "small"
    dataset: str = "embedded"
    data_dir: str | None = None
    method: str = "noise"
    sigma: float | None = None
    device_model: str = "RRAM1"
    device_options: dict = dataclasses.field(default_factory=dict)
    beta: float | None = None
    deltas: tuple[float, ...] = _DEFAULT_DELTAS
    head_sigma: float | None = None
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    width: float = 1.0
    augment: bool | None = None
    out: str | None = None
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False
    limit_train: int | None = None
    limit_eval: int | None = None
    # Custom models (after the original fields, so positional construction keeps its meaning).
    model_factory: str | None = None
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    output: str | int | None = None
    taps: dict | None = None
    # The fidelity study's options (docs/fidelity-study.md).
    init: str = "torch"
    preprocess: str = "standard"
    temperature: float = 1.0
    ovf_scope: str = "all"
    ovf_bn_stats: str = "all"
    # Knowledge distillation (method "kd").
    teacher: str | None = None
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    # Hardware-aware training knobs (docs/hwa-training.md).
    weight_clip: WeightClip = WeightClip()

    def __post_init__(self):
        from nft_cuda.data import canonical_name
        from nft_cuda.models import MODELS
        from nft_cuda.train.methods import METHODS

        self._check_model(MODELS)
        if not isinstance(self.dataset, str):
            raise TypeError(f"dataset must be a str, got {type(self.dataset).__name__}")
        self.dataset = canonical_name(self.dataset)
        self.data_dir = _path_or_none("data_dir", self.data_dir)
        self.method = _choice("method", self.method, tuple(METHODS))
        self._check_device()
        if self.beta is not None:
            self.beta = _real("beta", self.beta, minimum=0.0)
            if self.method not in ("ovf", "irs"):
                raise ValueError(f"beta applies to method 'ovf' or 'irs', not '{self.method}'")
        if isinstance(self.deltas, (str, bytes)) or not isinstance(self.deltas, Sequence):
            raise TypeError(f"deltas must be a sequence of numbers, got {type(self.deltas).__name__}")
        self.deltas = tuple(_real(f"deltas[{i}]", d, minimum=0.0) for i, d in enumerate(self.deltas))
        if not self.deltas:
            raise ValueError("deltas must hold at least one value")
        if self.method != "ovf" and self.deltas != _DEFAULT_DELTAS:
            raise ValueError(f"deltas apply to method 'ovf', not '{self.method}'")
        if self.head_sigma is not None:
            self.head_sigma = _real("head_sigma", self.head_sigma, minimum=0.0)
            if self.method != "irs":
                raise ValueError(f"head_sigma applies to method 'irs', not '{self.method}'")
        self._check_taps()
        self.epochs = _int("epochs", self.epochs, 1)
        self.batch_size = _int("batch_size", self.batch_size, 1)
        self.lr = _real("lr", self.lr, minimum=0.0, strict=True)
        self.optimizer = _choice("optimizer", self.optimizer, _OPTIMIZERS)
        self.momentum = _real("momentum", self.momentum, minimum=0.0, maximum=1.0, max_strict=True)
        self.scheduler = _choice("scheduler", self.scheduler, _SCHEDULERS)
        self.weight_decay = _real("weight_decay", self.weight_decay, minimum=0.0)
        self.val_fraction = _real("val_fraction", self.val_fraction, minimum=0.0, maximum=1.0, max_strict=True)
        self.seed = _int("seed", self.seed, 0, _U63 - 1)
        if not isinstance(self.device, str):
            raise TypeError(
                f"device must be a str ('auto', 'cpu', 'cuda' or 'cuda:N'), got {type(self.device).__name__}"
            )
        self.device = self.device.strip().lower()
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        self.width = _real("width", self.width, minimum=0.0, strict=True)
        if self.model_factory is not None and self.width != 1.0:
            raise ValueError("width applies to the built-in models; pass a model_factory's sizes in model_kwargs")
        if self.augment is not None:
            self.augment = _bool("augment", self.augment)
        self.out = _path_or_none("out", self.out)
        self.num_workers = _int("num_workers", self.num_workers, 0)
        self.resume = _bool("resume", self.resume)
        self.overwrite = _bool("overwrite", self.overwrite)
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite exclude each other")
        if self.limit_train is not None:
            self.limit_train = _int("limit_train", self.limit_train, 1)
        if self.limit_eval is not None:
            self.limit_eval = _int("limit_eval", self.limit_eval, 1)
        self._check_fidelity_options()
        self._check_kd()
        self.weight_clip = WeightClip.from_dict(self.weight_clip)

    def _check_kd(self) -> None:
        """teacher, kd_alpha and kd_temperature: checked, and only with method "kd" (which needs a teacher)."""
        from nft_cuda.train.methods import KD_DEFAULTS

        self.teacher = _path_or_none("teacher", self.teacher)
        self.kd_alpha = _real("kd_alpha", self.kd_alpha, minimum=0.0, maximum=1.0)
        self.kd_temperature = _real("kd_temperature", self.kd_temperature, minimum=0.0, strict=True)
        if self.method != "kd":
            given = {
                "teacher": self.teacher is not None,
                "kd_alpha": self.kd_alpha != KD_DEFAULTS["alpha"],
                "kd_temperature": self.kd_temperature != KD_DEFAULTS["temperature"],
            }
            named = [name for name, set_ in given.items() if set_]
            if named:
                verb = "applies" if len(named) == 1 else "apply"
                raise ValueError(f"{', '.join(named)} {verb} to method 'kd', not '{self.method}'")
        elif self.teacher is None:
            raise ValueError(
                "method 'kd' needs a teacher: the clean model to distil from (an exported model or run folder "
                "of nft train: teacher=PATH, nft train --teacher PATH)"
            )
        else:
            from nft_cuda.io import resolve_model_path

            resolve_model_path(self.teacher)  # a missing teacher fails here, before any run folder exists

    def _check_fidelity_options(self) -> None:
        """init, preprocess and the ablation options (docs/fidelity-study.md), each where it applies."""
        from nft_cuda.data import PREPROCESSINGS, check_preprocess
        from nft_cuda.models import INITS, OVF_PAPER_SCOPE
        from nft_cuda.train.methods import OVF_BN_STATS

        self.init = _choice("init", self.init, INITS)
        if self.init != "torch" and self.model not in ("vgg8", "resnet18"):
            raise ValueError(f"init '{self.init}' applies to model 'vgg8' or 'resnet18', not '{self.model}'")
        self.preprocess = _choice("preprocess", self.preprocess, PREPROCESSINGS)
        check_preprocess(self.dataset, self.preprocess)
        self.temperature = _real("temperature", self.temperature, minimum=0.0, strict=True)
        if self.temperature != 1.0 and self.method not in ("clean", "noise"):
            raise ValueError(
                f"temperature applies to method 'clean' or 'noise', not '{self.method}' (OVF and IRS divide by N+1)"
            )
        self.ovf_scope = _choice("ovf_scope", self.ovf_scope, ("all", "paper"))
        self.ovf_bn_stats = _choice("ovf_bn_stats", self.ovf_bn_stats, OVF_BN_STATS)
        for name, default in (("ovf_scope", "all"), ("ovf_bn_stats", "all")):
            if getattr(self, name) != default and self.method != "ovf":
                raise ValueError(f"{name} applies to method 'ovf', not '{self.method}'")
        if self.ovf_scope == "paper" and self.model not in OVF_PAPER_SCOPE:
            raise ValueError(f"ovf_scope 'paper' is defined for {', '.join(OVF_PAPER_SCOPE)}, not '{self.model}'")

    def ovf_layer_scope(self) -> tuple[str, ...] | None:
        """The noisy layers whose σ OVF raises (None: all), from ``ovf_scope``."""
        from nft_cuda.models import OVF_PAPER_SCOPE

        return OVF_PAPER_SCOPE[self.model] if self.ovf_scope == "paper" else None

    def _check_model(self, builtin) -> None:
        """Normalises model, model_factory (a callable becomes its import path), model_kwargs and output."""
        from nft_cuda.models import CUSTOM
        from nft_cuda.nn.custom import import_object, import_path_of, recordable_output

        if self.model_factory is None:
            if isinstance(self.model, str) and self.model.strip().lower() == CUSTOM:
                raise ValueError("model 'custom' needs a model_factory ('package.module:function')")
            self.model = _choice("model", self.model, tuple(builtin))
            if self.model_kwargs:
                raise ValueError("model_kwargs apply to a model_factory, not to the built-in models")
        else:
            if self.model not in ("small", CUSTOM):  # "small": the default, left as it was
                raise ValueError(f"model {self.model!r} and model_factory exclude each other: give one of them")
            self.model = CUSTOM
            if callable(self.model_factory):
                self.model_factory = import_path_of(self.model_factory, "model_factory")
            if not isinstance(self.model_factory, str):
                raise TypeError(
                    "model_factory must be an import path 'package.module:function' or a module-level callable, "
                    f"got {type(self.model_factory).__name__}"
                )
            self.model_factory = self.model_factory.strip()
            if not callable(import_object(self.model_factory, "model_factory")):
                raise TypeError(f"model_factory {self.model_factory!r} does not name a callable")
        self.model_kwargs = _json_dict("model_kwargs", self.model_kwargs)
        self.output = recordable_output(self.output)

    def _check_taps(self) -> None:
        if self.taps is None:
            if self.method == "irs" and self.model_factory is not None:
                raise ValueError(
                    "method 'irs' with a model_factory needs taps (module path → pool size, e.g. "
                    "taps={'blocks.0': 4}; nft train --taps blocks.0=4)"
                )
            return
        if self.method != "irs":
            raise ValueError(f"taps apply to method 'irs', not '{self.method}'")
        if not isinstance(self.taps, dict) or not self.taps:
            raise TypeError(f"taps must be a non-empty dict module path → pool size, got {self.taps!r}")
        self.taps = {str(name): _int(f"taps[{name!r}]", pool, 1) for name, pool in self.taps.items()}

    def _check_device(self) -> None:
        """Normalises sigma, device_model and device_options by building the model once."""
        from nft_cuda.devices import Variation, make_device_model, training_severity

        if not isinstance(self.device_model, str):
            raise TypeError(f"device_model must be a str, got {type(self.device_model).__name__}")
        if not isinstance(self.device_options, dict):
            raise TypeError(f"device_options must be a dict, got {type(self.device_options).__name__}")
        self.device_options = dict(self.device_options)
        if self.sigma is None:  # the model's default severity (PCM, stuck-at: 1.0), else σ = 0.1
            self.sigma = training_severity(self.device_model)
        self.sigma = _real("sigma", self.sigma, minimum=0.0)
        model = make_device_model(self.device_model, self.sigma, **self.device_options)
        self.device_model = model.device_model if isinstance(model, Variation) else model.kind

    def variation(self):
        """The :class:`nft_cuda.devices.DeviceModel` of training (``device_model`` at ``sigma`` with
        ``device_options``)."""
        from nft_cuda.devices import make_device_model

        return make_device_model(self.device_model, self.sigma, **self.device_options)

    def augments(self) -> bool:
        """Whether training batches are augmented (``augment``, or the dataset's default)."""
        if self.augment is not None:
            return self.augment
        from nft_cuda.data import get_spec

        return get_spec(self.dataset).kind == "cifar"

    def to_dict(self) -> dict:
        """Plain types only (lists for tuples): what the checkpoint stores."""
        d = dataclasses.asdict(self)
        d["deltas"] = list(self.deltas)
        d["device_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.device_options.items()}
        d["weight_clip"] = self.weight_clip.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def resolved_out(self) -> Path:
        return Path(self.out) if self.out is not None else default_out(self)


def _json_dict(name: str, value) -> dict:
    """A dict of JSON values (str keys), as a checkpoint and ``torch.load(weights_only=True)`` keep it."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must hold JSON values only (str keys; numbers, str, lists, dicts): {exc}") from None


def default_out(config: TrainConfig) -> Path:
    """``runs/<method>-<model>-<dataset>-s<sigma>`` (relative to the working directory; a model factory's
    model is named by its function); a device model other than the bit-sliced Gaussian presets is named
    before the severity (``...-pcm-s1``)."""
    from nft_cuda.devices import PRESETS

    device = "" if config.device_model in PRESETS else f"-{config.device_model}"
    model = config.model if config.model_factory is None else config.model_factory.rpartition(":")[2]
    return Path("runs") / f"{config.method}-{model}-{config.dataset}{device}-s{config.sigma:g}"
