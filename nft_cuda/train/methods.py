"""Training methods: clean, noise injection, OVF and IRS (DESIGN §5), and the competing baselines
(soft-orthogonality, right-censored noise, knowledge distillation under noise).

A method turns a plain model into what it trains (:meth:`Method.prepare`), computes the loss of one
batch (:meth:`Method.loss`) and gives back the model to export (:meth:`Method.export`): the backbone
with its noisy layers and their variation, never the IRS heads.

Every method takes ``output=``, the output adapter of models that do not return a logits tensor (a
Hugging Face ``ModelOutput``: ``output="logits"``; :func:`nft_cuda.nn.custom.resolve_output`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda import _args
from nft_cuda.devices import DeviceModel, Variation
from nft_cuda.nn import convert, noisy_layers, set_noise_mode
from nft_cuda.nn.custom import resolve_output
from nft_cuda.nn.sample_axis import batch_blockers, repeat_samples, sample_plan, unbatchable_modules
from nft_cuda.train.irs import IRSModel
from nft_cuda.train.loss import nft_loss

__all__ = [
    "METHODS",
    "OVF_BN_STATS",
    "Method",
    "Clean",
    "NoiseInjection",
    "OVF",
    "IRS",
    "OrthogonalNoise",
    "CensoredNoise",
    "KnowledgeDistillation",
    "KD_DEFAULTS",
    "default_beta",
    "build_method",
]

#: OVF's BatchNorm running-statistics policies: every forward updates them, or only the backbone's.
OVF_BN_STATS = ("all", "main")

# Default feedback gain β per (model, dataset) as in the reference code (paper-facts §2, §3).
_BETA = {
    "ovf": {
        ("vgg8", "mnist"): 1e-3,
        ("vgg8", "cifar10"): 1e-3,
        ("resnet18", "mnist"): 1e-4,
        ("resnet18", "cifar10"): 1e-1,
        ("resnet18", "cifar100"): 1e-1,
    },
    "irs": {
        ("vgg8", "mnist"): 1e-2,
        ("vgg8", "cifar10"): 1e-1,
        ("resnet18", "mnist"): 1e-1,
        ("resnet18", "cifar10"): 1e-3,
        ("resnet18", "cifar100"): 1e-3,
    },
}
_BETA_FALLBACK = {"ovf": 1e-3, "irs": 1e-2}


def default_beta(method: str, model: str, dataset: str) -> float:
    """β of the reference for (model, dataset), else 1e-3 for OVF and 1e-2 for IRS."""
    if method not in _BETA:
        raise ValueError(f"β applies to 'ovf' and 'irs', not '{method}'")
    return _BETA[method].get((model, dataset), _BETA_FALLBACK[method])


class Method:
    """Base: train with the noisy layers in one mode and cross-entropy CE(logits / T, y).

    ``temperature`` T (default 1: plain cross-entropy) is the ablation arm of the fidelity study
    (docs/fidelity-study.md): OVF and IRS divide their combined logits by N+1, which acts as T = N+1;
    noise injection with T = 4 isolates that ingredient. Only the loss sees T (the exported model and
    its accuracy are the plain logits).

    ``output``: where the logits are in the model's output (None: the output is the logits tensor; see
    :func:`nft_cuda.nn.custom.resolve_output`)."""

    name = "base"
    noise = "train"

    def __init__(self, variation: DeviceModel, temperature: float = 1.0, *, output=None):
        self.variation = _args.check_device_model(variation)
        self.temperature = _args.check_real("temperature", temperature, minimum=0.0, strict=True)
        self.output = output
        self.logits_of = resolve_output(output)

    def prepare(
        self,
        model: nn.Module,
        example_input: torch.Tensor | None = None,
        *,
        num_classes: int | None = None,
        include=None,
        exclude=None,
    ) -> nn.Module:
        """Convert ``model``'s Linear/Conv layers to noisy ones (in place) and return what is trained."""
        convert(model, self.variation, include=include, exclude=exclude)
        return model

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, backbone logits) of one batch."""
        set_noise_mode(model, self.noise)
        logits = self.logits_of(model(x))
        scaled = logits if self.temperature == 1.0 else logits / self.temperature
        return F.cross_entropy(scaled, y), logits

    def export(self, model: nn.Module) -> nn.Module:
        """The model to save for inference: the backbone, noisy layers in mode train."""
        set_noise_mode(model, "train")
        return model

    def describe(self) -> dict:
        described = {
            "method": self.name,
            "sigma": self.variation.sigma,
            "device_model": self.variation.name,
            "device": self.variation.to_dict(),
        }
        if self.temperature != 1.0:
            described["temperature"] = self.temperature
        return described


class Clean(Method):
    """Noise-free training (the "W/O noise" baseline); the exported model keeps its variation."""

    name = "clean"
    noise = "off"


class NoiseInjection(Method):
    """Noise-injection training: a fresh §2 draw for every layer on every forward."""

    name = "noise"


class OVF(Method):
    """Oriented Variational Forward (DESIGN §5).

    Per step, each noisy layer draws one rng (seed, offset); forward t = 0 (backbone) runs at σ_d
    and forward t = n at σ_d + δ_n, all with stream offset + t (σ_d: the device model's severity
    ``sigma``, see docs/device-models.md), and
    loss = CE((o_0 − β·Σ_n 10^-(n-1)·o_n)/(N+1), y) with gradients through every forward.

    Args:
        variation: σ_d and device model of training.
        beta: feedback gain β.
        deltas: δ_n, noisiest first (default 0.15, 0.10, 0.05).
        batched: run the N+1 forwards as one pass along a sample axis (default); models that cannot be
            batched fall back to sequential forwards with one warning. Both give the same result.
        scope: names of the noisy layers (:func:`nft_cuda.noisy_layers`) whose σ the oriented forwards
            raise; the others run every forward at σ_d (fresh draws still). None (default): every layer,
            the library's OVF. ``nft_cuda.models.OVF_PAPER_SCOPE`` holds the authors' scope (ResNet-18:
            the stem conv and the FC only).
        bn_stats: ``"all"`` (default: every forward updates the BatchNorm running statistics, as the
            authors' code) or ``"main"`` (only the backbone forward t = 0 does; each forward still
            normalises with its own batch statistics): the BN ablation arm of docs/fidelity-study.md.
        output: the output adapter (see :class:`Method`).
    """

    name = "ovf"

    def __init__(
        self,
        variation: DeviceModel,
        beta: float = 1e-3,
        deltas: Sequence[float] = (0.15, 0.10, 0.05),
        batched: bool = True,
        *,
        scope: Sequence[str] | None = None,
        bn_stats: str = "all",
        output=None,
    ):
        super().__init__(variation, output=output)
        deltas = [float(d) for d in deltas]
        if not deltas or any(d < 0 for d in deltas):
            raise ValueError(f"deltas must be a non-empty list of values >= 0, got {deltas}")
        self.beta = _args.check_real("beta", beta, minimum=0.0)
        self.deltas = deltas
        self.batched = batched
        self.scope = None if scope is None else tuple(scope)
        self.bn_stats = _args.check_choice("bn_stats", bn_stats, OVF_BN_STATS)
        self._warned = False
        self._offsets: dict[torch.device, torch.Tensor] = {}

    def _sigma_offsets(self, device: torch.device) -> torch.Tensor:
        # Copied to the device once; per step only a scalar is added (no host round trip).
        if device not in self._offsets:
            self._offsets[device] = torch.tensor([0.0] + self.deltas, dtype=torch.float32).to(device)
        return self._offsets[device]

    def can_batch(self, model: nn.Module) -> list[str]:
        """[] when the model can run OVF batched as far as its module types and arguments tell, else the names
        of the modules that prevent it; :meth:`forwards` also runs the runtime probe of
        :func:`~nft_cuda.nn.sample_axis.batch_blockers` once per model."""
        return unbatchable_modules(model)

    def forwards(self, model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        """[o_0, o_1, ..., o_N]: the backbone and oriented outputs for this step's draws."""
        layers = [(name, layer) for name, layer in noisy_layers(model) if layer.variation is not None]
        self._check_scope([name for name, _ in layers])
        samples = len(self.deltas) + 1
        draws = {}
        for name, layer in layers:
            rng = _args.random_rng(layer.weight.device, layer.generator)
            offsets = self._sigma_offsets(layer.weight.device)
            if self.scope is not None and name not in self.scope:
                offsets = torch.zeros_like(offsets)  # outside the scope: σ_d in every forward
            draws[layer] = (rng, offsets + layer.variation.sigma)
        batched = self.batched
        if batched:
            blockers = batch_blockers(model, x, draws, samples, lambda i: self.logits_of(model(i)))
            if blockers:
                batched = False
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"OVF: running the {samples} forwards sequentially (same result, slower): "
                        f"{'; '.join(blockers)}: cannot be batched along a sample axis",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        main_only = self.bn_stats == "main"
        if batched:
            with sample_plan(model, draws, samples, running_stats="first" if main_only else "all"):
                out = self.logits_of(model(repeat_samples(x, samples)))
            return list(out.chunk(samples, dim=0))
        outs = []
        for t in range(samples):
            step = {
                layer: (torch.stack((rng[0], rng[1] + t)), sigmas[t : t + 1]) for layer, (rng, sigmas) in draws.items()
            }
            with sample_plan(model, step, 1, running_stats="none" if main_only and t > 0 else "all"):
                outs.append(self.logits_of(model(x)))
        return outs

    def _check_scope(self, names: list[str]) -> None:
        if self.scope is not None:
            unknown = sorted(set(self.scope) - set(names))
            if unknown:
                raise ValueError(f"OVF scope names {unknown}, which are not noisy layers of the model")

    def loss(self, model, x, y):
        set_noise_mode(model, "train")
        outs = self.forwards(model, x)
        return nft_loss(outs[0], outs[1:], y, self.beta), outs[0]

    def describe(self):
        described = {**super().describe(), "beta": self.beta, "deltas": self.deltas}
        if self.scope is not None:
            described["scope"] = list(self.scope)
        if self.bn_stats != "all":
            described["bn_stats"] = self.bn_stats
        return described


class IRS(Method):
    """Intermediate Representation Snapshot (DESIGN §4.3, §5).

    Args:
        variation: σ_d and device model of training (the backbone's noise).
        beta: feedback gain β.
        taps: module path → pool size of each snapshot (model defaults in nft_cuda.models.IRS_TAPS).
        head_variation: the heads' device model (default: the paper's RRAM1 at σ_d of training with the
            bit-sliced Gaussian presets; the backbone's own model with the other device models).
        hidden: width of the heads' hidden layer.
        head_sigma: the heads' severity instead of training's (applied to the default heads' model, or to
            ``head_variation``); None: keep it.
        output: the output adapter of the backbone (see :class:`Method`); taps whose module returns a tuple
            are snapshotted from its first element (:mod:`nft_cuda.train.irs`).
    """

    name = "irs"

    def __init__(
        self,
        variation: DeviceModel,
        beta: float = 1e-2,
        taps: Mapping[str, int] | None = None,
        head_variation: DeviceModel | None = None,
        hidden: int = 512,
        *,
        output=None,
        head_sigma: float | None = None,
    ):
        super().__init__(variation, output=output)
        if not taps:
            raise ValueError("IRS needs at least one tap (module path → pool size)")
        self.beta = float(beta)
        self.taps = dict(taps)
        if head_variation is None:  # the paper's heads are RRAM1; other device models: the backbone's model
            head_variation = Variation(variation.sigma, "RRAM1") if isinstance(variation, Variation) else variation
        if head_sigma is not None:
            head_variation = head_variation.with_sigma(head_sigma)
        self.head_variation = head_variation
        self.hidden = hidden

    def prepare(self, model, example_input=None, *, num_classes=None, include=None, exclude=None):
        if example_input is None or num_classes is None:
            raise ValueError("IRS.prepare needs example_input and num_classes to build the heads")
        backbone = super().prepare(model, include=include, exclude=exclude)
        return IRSModel(
            backbone, self.taps, num_classes, self.head_variation, example_input, self.hidden, output=self.output
        )

    def loss(self, model, x, y):
        set_noise_mode(model, "train")
        logits, aux = model(x)
        return nft_loss(logits, aux, y, self.beta), logits

    def export(self, model):
        backbone = model.remove_hooks() if isinstance(model, IRSModel) else model
        return super().export(backbone)

    def describe(self):
        return {
            **super().describe(),
            "beta": self.beta,
            "taps": self.taps,
            "head_sigma": self.head_variation.sigma,
            "head_device_model": self.head_variation.name,
        }


class OrthogonalNoise(NoiseInjection):
    """Noise injection plus a soft-orthogonality (Lipschitz) regulariser on every noisy weight, as
    CorrectNet (Eldebiky et al., DATE 2023) uses to keep the layers' gains near 1 so that weight errors
    are not amplified layer after layer: loss = CE + λ·Σ_ℓ ‖G_ℓ − β·I‖²_F, with G_ℓ the Gram matrix of
    W_ℓ reshaped to [out, fan_in] on its smaller side (W·Wᵀ when out ≤ fan_in, else Wᵀ·W), so a full-rank
    layer can reach the minimum. Defaults λ = 1e-4, β = 1."""

    name = "ortho"

    def __init__(self, variation, temperature: float = 1.0, *, output=None, lam: float = 1e-4, beta: float = 1.0):
        super().__init__(variation, temperature, output=output)
        self.lam = _args.check_real("lam", lam, minimum=0.0)
        self.beta = _args.check_real("beta", beta, minimum=0.0)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """Σ_ℓ ‖G_ℓ − β·I‖²_F over the noisy layers' crossbar weights."""
        total = None
        for _, layer in noisy_layers(model):
            w = layer.weight.reshape(layer.weight.shape[0], -1).float()
            gram = w @ w.t() if w.shape[0] <= w.shape[1] else w.t() @ w
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            term = ((gram - self.beta * eye) ** 2).sum()
            total = term if total is None else total + term
        return torch.zeros(()) if total is None else total

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce, logits = super().loss(model, x, y)
        return ce + self.lam * self.penalty(model), logits

    def describe(self) -> dict:
        return {**super().describe(), "lam": self.lam, "beta": self.beta}


class CensoredNoise(NoiseInjection):
    """Noise injection with right-censored draws, in the spirit of TRICE (Yan et al., DATE 2023):
    every training draw z with |z| > c is cut to ±c (default c = 2), so training never sees the rare
    large deviations that pull a noise-injected model towards over-conservative weights. The noisy
    weight of each layer is ``reference.perturb_with_normals(W, model, clip(z, −c, c))`` from a fresh
    stream (pure PyTorch, slower than the compiled draw), passed straight-through (dL/dW = dL/dW_noisy) via
    the layers' chip weights (``set_chip_weight``). Device models with normal draws only (the Gaussian presets, PCM, log-normal)."""

    name = "trice"

    def __init__(self, variation, temperature: float = 1.0, *, output=None, cut: float = 2.0):
        super().__init__(variation, temperature, output=output)
        self.cut = _args.check_real("cut", cut, minimum=0.0, strict=True)

    def censored_weight(self, layer, rng: torch.Tensor) -> torch.Tensor:
        """[1, *weight.shape]: the layer's training weight for stream ``rng`` with censored draws."""
        from nft_cuda import reference

        v, w = layer.variation, layer.weight
        draws = reference.NORMAL_DRAWS.get(v.KERNEL_ID)
        if draws is None:
            raise ValueError(f"trice needs a device model with normal draws, not {v}")
        z = torch.stack([reference.draw_normal(rng, w.numel(), 1, k)[0].view(w.shape) for k in range(draws)])
        noise = reference.perturb_with_normals(w, v, z.clamp(-self.cut, self.cut)) - w.detach()
        return (w + noise).unsqueeze(0)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        set_noise_mode(model, self.noise)
        chips = {}
        for _, layer in noisy_layers(model):
            rng = _args.random_rng(layer.weight.device, layer.generator)
            chips[layer] = (self.censored_weight(layer, rng)[0], rng)
        try:
            for layer, (weight, rng) in chips.items():
                layer.set_chip_weight(weight, rng)
            logits = self.logits_of(model(x))
        finally:
            for layer in chips:
                layer.set_sample_plan(None)
        scaled = logits if self.temperature == 1.0 else logits / self.temperature
        return F.cross_entropy(scaled, y), logits

    def describe(self) -> dict:
        return {**super().describe(), "cut": self.cut}


#: The distillation defaults of :class:`KnowledgeDistillation`: mixing weight α and temperature T.
KD_DEFAULTS = {"alpha": 0.5, "temperature": 4.0}


class KnowledgeDistillation(NoiseInjection):
    """Knowledge distillation under noise: a noise-injected student learns from a clean teacher.

    loss = (1 − α)·CE(s, y) + α·T²·KL(softmax(t / T) ‖ softmax(s / T)), with s the student's logits on a
    fresh §2 draw (as noise injection), t the teacher's logits without noise, the KL averaged over the
    batch; T² keeps the soft term's gradients on the scale of the hard one when T changes. Distillation
    is Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531, 2015);
    distilling a clean teacher into a noise-injected student for analog hardware is Zhou, Kadambi,
    Mattina and Whatmough, "Noisy Machines" (arXiv:2001.04974, 2020). The defaults α = 0.5, T = 4 are
    this library's choice (:data:`KD_DEFAULTS`), not a value taken from either paper.

    Args:
        variation: σ_d and device model of the student's training noise.
        teacher: the clean teacher: an ``nn.Module`` or the path of an exported model / run folder of
            ``nft train`` (:func:`nft_cuda.io.load_model`). It is put in ``eval()`` mode, its noisy layers
            off, its parameters frozen, and it runs under ``torch.no_grad()``; it is never exported.
        alpha: α in [0, 1], the soft term's weight (0: noise injection).
        temperature: T > 0 of the soft term.
        output: the student's output adapter (see :class:`Method`); a teacher loaded from a path uses the
            adapter recorded in its file, a teacher module the student's.
    """

    name = "kd"

    def __init__(
        self,
        variation: DeviceModel,
        teacher=None,
        *,
        alpha: float = KD_DEFAULTS["alpha"],
        temperature: float = KD_DEFAULTS["temperature"],
        output=None,
    ):
        super().__init__(variation, output=output)
        self.alpha = _args.check_real("kd_alpha", alpha, minimum=0.0, maximum=1.0)
        self.kd_temperature = _args.check_real("kd_temperature", temperature, minimum=0.0, strict=True)
        self.teacher_source, self.teacher, self.teacher_logits_of = _load_teacher(teacher, self.logits_of)

    def soft_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """T²·KL(softmax(teacher / T) ‖ softmax(student / T)), averaged over the batch."""
        t = self.kd_temperature
        log_s = F.log_softmax(student.float() / t, dim=-1)
        log_t = F.log_softmax(teacher.float() / t, dim=-1)
        return t * t * F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The clean teacher's logits for ``x`` (moved to ``x``'s device on first use)."""
        param = next(self.teacher.parameters(), None)
        if param is not None and param.device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            return self.teacher_logits_of(self.teacher(x))

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce, logits = super().loss(model, x, y)
        teacher = self.teacher_logits(x)
        if teacher.shape != logits.shape:
            raise ValueError(
                f"the kd teacher's logits have shape {tuple(teacher.shape)}, the student's {tuple(logits.shape)}: "
                "the teacher must be a model of the same task (classes)"
            )
        return (1.0 - self.alpha) * ce + self.alpha * self.soft_loss(logits, teacher), logits

    def describe(self) -> dict:
        return {
            **super().describe(),
            "teacher": self.teacher_source,
            "kd_alpha": self.alpha,
            "kd_temperature": self.kd_temperature,
        }


def _load_teacher(teacher, student_adapter):
    """(description, frozen clean module, its output adapter) of a kd teacher given as a module or a path."""
    from nft_cuda.nn import resolve_output, set_noise_mode

    if teacher is None:
        raise ValueError(
            "method 'kd' needs a teacher: the clean model to distil from (an exported model or run folder "
            "of nft train: teacher=PATH in TrainConfig, nft train --teacher PATH)"
        )
    if isinstance(teacher, (str, os.PathLike)):
        from nft_cuda.io import load_model

        source = os.fspath(teacher)
        module, payload = load_model(source)
        adapter = resolve_output(payload["model"].get("output"))
    elif isinstance(teacher, nn.Module):
        source, module, adapter = type(teacher).__name__, teacher, student_adapter
    else:
        raise TypeError(f"teacher must be an nn.Module or a path, got {type(teacher).__name__}")
    module.eval()
    set_noise_mode(module, "off")
    for p in module.parameters():
        p.requires_grad_(False)
    return source, module, adapter


METHODS = {
    "clean": Clean,
    "noise": NoiseInjection,
    "ovf": OVF,
    "irs": IRS,
    "ortho": OrthogonalNoise,
    "trice": CensoredNoise,
    "kd": KnowledgeDistillation,
}


def build_method(
    name: str,
    variation: DeviceModel,
    *,
    model_name: str = "",
    dataset: str = "",
    beta: float | None = None,
    deltas: Sequence[float] | None = None,
    taps: Mapping[str, int] | None = None,
    head_variation: DeviceModel | None = None,
    head_sigma: float | None = None,
    batched: bool = True,
    output=None,
    temperature: float = 1.0,
    ovf_scope: Sequence[str] | None = None,
    ovf_bn_stats: str = "all",
    teacher=None,
    kd_alpha: float = KD_DEFAULTS["alpha"],
    kd_temperature: float = KD_DEFAULTS["temperature"],
) -> Method:
    """A method by name with the DESIGN §5 defaults for (model_name, dataset). ``temperature``: the
    loss's T of "clean" / "noise"; ``ovf_scope``, ``ovf_bn_stats``: :class:`OVF`'s ``scope`` and
    ``bn_stats``; ``head_variation``, ``head_sigma``: :class:`IRS`'s heads; ``teacher``, ``kd_alpha``,
    ``kd_temperature``: :class:`KnowledgeDistillation`'s teacher, α and T; ``output``: the output adapter
    (see :class:`Method`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method '{name}'; choose one of {', '.join(METHODS)}")
    if name == "ovf":
        return OVF(
            variation,
            default_beta("ovf", model_name, dataset) if beta is None else beta,
            deltas if deltas is not None else (0.15, 0.10, 0.05),
            batched=batched,
            output=output,
            scope=ovf_scope,
            bn_stats=ovf_bn_stats,
        )
    if name == "irs":
        if taps is None:
            from nft_cuda.models import IRS_TAPS

            if model_name not in IRS_TAPS:
                raise ValueError(
                    f"no default IRS taps for model '{model_name}'; IRS needs taps (module path → pool size, "
                    "e.g. {'blocks.0': 4}): pass taps (nft train --taps blocks.0=4)"
                )
            taps = IRS_TAPS[model_name]
        beta = default_beta("irs", model_name, dataset) if beta is None else beta
        return IRS(variation, beta, taps, head_variation, output=output, head_sigma=head_sigma)
    if name == "kd":
        return KnowledgeDistillation(variation, teacher, alpha=kd_alpha, temperature=kd_temperature, output=output)
    return METHODS[name](variation, temperature, output=output)


def describe(method: Method) -> dict:
    return dataclasses.asdict(method) if dataclasses.is_dataclass(method) else method.describe()
