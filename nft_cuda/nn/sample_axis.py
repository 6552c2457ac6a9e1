"""S noise samples of a whole model in one pass, along the batch axis (DESIGN §5 batched OVF,
§6 batched Monte-Carlo instances).

Inside :func:`sample_plan`, every noisy layer multiplies chunk t of its batch axis ([S·B, ...]: S
chunks of B rows) by its noisy weight of stream offset + t at σ_d = sigmas[t] (see
``NoisyModule.set_sample_plan``), and every BatchNorm normalises each chunk with that chunk's own
statistics, updating its running statistics chunk by chunk in order — exactly what S sequential
forwards would do. Each chunk is computed as a one-sample forward would be, so the batched pass
matches the sequential one.

Batch safety. A model can run this way only when nothing in it mixes the rows of the batch axis.
:func:`batch_blockers` decides it in two steps, and OVF and Monte-Carlo fall back to sequential forwards
(one warning saying why) whenever either step is in doubt:

1. By type *and arguments* (:func:`unbatchable_modules`, certain blockers): a leaf must be of a type known
   to act on each row (:data:`BATCHABLE_LEAVES`, BatchNorm handled chunk by chunk) and its batch-related
   argument must not touch dim 0: ``Softmax``/``LogSoftmax``/``Softmin``/``GLU`` with ``dim=0`` or
   ``dim=None`` (the legacy implicit dim, which is 0 for 0-, 1- and 3-D inputs), ``Flatten`` from
   ``start_dim=0``, ``Unflatten`` of dim 0 block. Dropout in training draws its mask from the batch size
   and blocks; an inactive dropout is the identity. Unknown leaf types block.
2. By a runtime probe (:func:`modules_to_probe`, :func:`probe_blockers`) for what the arguments cannot
   settle: containers with their own ``forward`` (a model class, a residual block: its code may e.g.
   centre over dim 0), a negative dim that may resolve to 0 (``Softmax(dim=-1)`` on a 1-D input,
   ``Softmax2d``), and layers that are not batch-first (their batch axis is where the model's code puts
   it). On the first batched call for a model, the probe runs that batch once batched and S times
   sequentially (no gradients, torch's RNG and every buffer, BatchNorm statistics included, restored)
   and compares them chunk by chunk: a difference above 1e-3 of the output's largest magnitude (3e-2 in
   half precision; rounding of a different GEMM path is far below, mixing the chips' rows is far above)
   or a batched forward that fails means "mixes rows". The verdict is cached per model and structure
   (module names, types, training flags), input shape and dtype, so it costs one batch once. The probe
   sees one batch: a forward that mixes rows only for other inputs (a data-dependent branch), or by
   less than the tolerance, is not caught — declare it.

Declaring. A module class (or instance) may set ``nft_acts_per_row = True``: its own ``forward`` acts on
each row independently, so it is trusted without a probe (its children are still checked); an unknown
leaf type so marked counts as batchable. ``nft_acts_per_row = False`` always blocks. ``nn.Sequential``,
``nn.ModuleList``/``nn.ModuleDict`` and batch-first noisy layers (their sample axis is the library's
own) are trusted.
"""

from __future__ import annotations

import contextlib
import types
import weakref
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda import _args
from nft_cuda.nn.base import NoisyModule, SamplePlan, instance_offset

__all__ = [
    "BATCHABLE_LEAVES",
    "RUNNING_STATS",
    "batch_blockers",
    "instance_plans",
    "modules_to_probe",
    "probe_blockers",
    "repeat_samples",
    "sample_plan",
    "unbatchable_modules",
]

#: Leaf module types known to act on each row of the batch independently.
BATCHABLE_LEAVES: tuple[type, ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Softmax,  # these five: see _BATCH_DIM_ARGUMENT
    nn.LogSoftmax,
    nn.Softmin,
    nn.Softmax2d,
    nn.GLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.Embedding,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,  # handled chunk by chunk
)

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


#: Leaf types whose effect on the batch axis hangs on one argument: type → (attribute, whether None means
#: the legacy implicit dim of softmax, which picks dim 0 for 0-, 1- and 3-D inputs).
_BATCH_DIM_ARGUMENT: dict[type, tuple[str, bool]] = {
    nn.Softmax: ("dim", True),
    nn.LogSoftmax: ("dim", True),
    nn.Softmin: ("dim", True),
    nn.GLU: ("dim", False),
    nn.Flatten: ("start_dim", False),
    nn.Unflatten: ("dim", False),
}
#: Containers whose own code only calls their children in turn (or that have no forward at all).
_PLAIN_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_BLOCK, _PROBE = "block", "probe"


def _dim_verdict(module: nn.Module) -> tuple[str, str] | None:
    """(block or probe, why) from the batch-related argument of a :data:`_BATCH_DIM_ARGUMENT` leaf."""
    if isinstance(module, nn.Softmax2d):
        return _PROBE, "Softmax2d works over dim -3, which is the batch axis of a 3-D input"
    for cls, (attr, none_is_implicit) in _BATCH_DIM_ARGUMENT.items():
        if isinstance(module, cls):
            dim = getattr(module, attr)
            label = f"{type(module).__name__}({attr}={dim})"
            if dim is None and none_is_implicit:
                return _BLOCK, f"{label}: the implicit dim is 0 (the batch axis) for 0-, 1- and 3-D inputs"
            if dim == 0:
                return _BLOCK, f"{label} acts across the batch axis"
            if isinstance(dim, int) and dim < 0:
                return _PROBE, f"{label} is the batch axis for a {-dim}-D input"
            return None
    return None


def _verdict(module: nn.Module) -> tuple[str, str] | None:
    """None when ``module``'s own computation acts on each row of the batch axis, else (block, why) for a
    certain blocker or (probe, why) for one the runtime probe must settle. Children are judged separately."""
    declared = getattr(module, "nft_acts_per_row", None)
    if declared is False:
        return _BLOCK, f"{type(module).__name__} declares nft_acts_per_row = False"
    leaf = next(module.children(), None) is None
    if isinstance(module, NoisyModule):
        if getattr(module, "batch_first", True) is False and declared is not True:
            return _PROBE, f"{type(module).__name__} with batch_first=False: its batch axis is dim 1"
        return None
    if isinstance(module, nn.modules.dropout._DropoutNd):
        if module.p == 0 or not module.training:
            return None  # an inactive dropout is the identity
        return _BLOCK, f"{type(module).__name__} in training draws its mask from the batch size"
    if declared is True or isinstance(module, _PLAIN_CONTAINERS):
        return None
    if not leaf:
        return _PROBE, f"{type(module).__name__} has its own forward"
    if isinstance(module, BATCHABLE_LEAVES):
        return _dim_verdict(module)
    return _BLOCK, f"unknown leaf type {type(module).__name__}"


def _verdicts(model: nn.Module, kind: str) -> list[tuple[str, str]]:
    out = []
    for name, module in model.named_modules():
        verdict = _verdict(module)
        if verdict is not None and verdict[0] == kind:
            out.append((name or type(module).__name__, verdict[1]))
    return out


def unbatchable_modules(model: nn.Module) -> list[str]:
    """Names of the modules that certainly prevent running ``model`` along a sample axis (step 1 of the
    module docstring: judged by type and arguments)."""
    return [name for name, _ in _verdicts(model, _BLOCK)]


def modules_to_probe(model: nn.Module) -> list[str]:
    """Names of the modules whose batch safety only a runtime probe can settle (step 2)."""
    return [name for name, _ in _verdicts(model, _PROBE)]


def batch_blockers(
    model: nn.Module,
    x: torch.Tensor,
    plans: Mapping[NoisyModule, SamplePlan | tuple[torch.Tensor, torch.Tensor]],
    samples: int,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> list[str]:
    """[] when ``model`` can run ``samples`` samples of ``plans`` along the batch axis of input ``x``
    ([B, ...], one copy), else one ``"name: why"`` per reason: the certain blockers, or the probe's
    verdict (:func:`probe_blockers`), e.g. ``"'3': Dropout in training draws its mask from the batch size"``. ``forward`` (default: ``model``) maps the input to the output."""
    certain = [f"'{name}': {why}" for name, why in _verdicts(model, _BLOCK)]
    return certain or probe_blockers(model, x, plans, samples, forward)


_probe_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: blockers}


def probe_blockers(
    model: nn.Module,
    x: torch.Tensor,
    plans: Mapping[NoisyModule, SamplePlan | tuple[torch.Tensor, torch.Tensor]],
    samples: int,
    forward: Callable[[torch.Tensor], object] | None = None,
) -> list[str]:
    """Step 2 of the module docstring: [] when no module needs a probe or the batched pass of ``x``
    equals ``samples`` sequential forwards chunk by chunk, else one ``"name: why"`` line. Cached per
    model, structure, input shape (but the batch size) and dtype."""
    suspects = _verdicts(model, _PROBE)
    if not suspects or samples == 1:
        return []
    key = (
        tuple((name, type(m), m.training) for name, m in model.named_modules()),
        tuple(x.shape[1:]),
        x.dtype,
        x.device.type,
        samples,
        torch.is_autocast_enabled(x.device.type) if x.device.type in ("cpu", "cuda") else False,
    )
    cache = _probe_cache.setdefault(model, {})
    if key not in cache:
        failure = _probe(model, x, plans, samples, model if forward is None else forward)
        names = ", ".join(f"'{name}' ({why})" for name, why in suspects)
        cache[key] = [] if failure is None else [f"{names}: {failure}"]
    return list(cache[key])


def repeat_samples(x: torch.Tensor, samples: int) -> torch.Tensor:
    """[S·B, ...]: ``x`` [B, ...] repeated S times along the batch axis (chunk t for sample t)."""
    return x if samples == 1 else x.repeat((samples,) + (1,) * (x.dim() - 1))


def _probe(model, x, plans, samples, forward) -> str | None:
    """None when the batched pass of ``x`` matches ``samples`` sequential ones, else what differed. Runs
    without gradients; torch's RNG and every buffer of the model are restored afterwards."""
    plans = {layer: SamplePlan(*plan) for layer, plan in plans.items()}
    kept = [(b, b.detach().clone()) for b in model.buffers()]
    cuda = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            outs = []
            for t in range(samples):
                with sample_plan(model, {layer: plan.select(t) for layer, plan in plans.items()}, 1):
                    outs.append(forward(x))
            try:
                with sample_plan(model, plans, samples):
                    batched = forward(repeat_samples(x, samples))
            except Exception as err:  # any failure of the batched pass means "do not batch"
                return f"the batched forward failed ({type(err).__name__}: {err})"
    finally:
        with torch.no_grad():
            for buf, value in kept:
                buf.copy_(value)
    if not all(isinstance(o, torch.Tensor) for o in outs + [batched]):
        return f"the output is a {type(batched).__name__}, not a tensor the probe can compare"
    return _compare(batched, torch.cat(outs), samples)


#: The probe's tolerance per output dtype, relative to the output's largest magnitude (default 3e-2).
_PROBE_TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3}


def _compare(batched: torch.Tensor, sequential: torch.Tensor, samples: int) -> str | None:
    if batched.shape != sequential.shape:
        return f"the batched output has shape {list(batched.shape)}, {samples} sequential ones {list(sequential.shape)}"
    if batched.numel() == 0:
        return None
    if not batched.is_floating_point():
        return None if torch.equal(batched, sequential) else "its batched output differs from sequential forwards"
    diff = float((batched.double() - sequential.double()).abs().max())
    scale = float(sequential.double().abs().max())
    tol = _PROBE_TOLERANCE.get(batched.dtype, 3e-2)
    if diff <= tol * scale:  # False for NaN: in doubt, do not batch
        return None
    return (
        f"a forward mixes the rows of the batch (its batched output differs from {samples} sequential "
        f"forwards by {diff:.3g}, {diff / scale if scale else float('inf'):.2g} of the output's scale)"
    )


#: Which chunks of a sample-plan forward update the BatchNorm running statistics (:func:`sample_plan`).
RUNNING_STATS = ("all", "first", "none")


def _batch_stats_only(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``bn`` in training mode without touching its running statistics: normalised with the batch's."""
    return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)


def _per_chunk_batch_norm(samples: int, running_stats: str):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each chunk goes through the module's own forward, in order: per-chunk batch statistics,
        # running statistics and num_batches_tracked updated as S sequential calls would (with
        # "first"/"none": only chunk 0 / no chunk updates them; every chunk keeps its batch statistics).
        outs = []
        for t, chunk in enumerate(x.chunk(samples, dim=0)):
            updates = running_stats == "all" or (running_stats == "first" and t == 0)
            outs.append(type(self).forward(self, chunk) if updates else _batch_stats_only(self, chunk))
        return torch.cat(outs, dim=0)

    return forward


@contextlib.contextmanager
def sample_plan(
    model: nn.Module,
    plans: Mapping[NoisyModule, SamplePlan | tuple[torch.Tensor, torch.Tensor]],
    samples: int,
    *,
    running_stats: str = "all",
) -> Iterator[None]:
    """Run ``model`` with the given noise plan per noisy layer for the duration of the block.

    Args:
        model: the model (its BatchNorms are switched to per-chunk statistics when ``samples`` > 1
            and they are in training mode).
        plans: noisy layer → :class:`~nft_cuda.nn.base.SamplePlan` or (rng int64[2], sigmas float32
            [samples]) on the layer's device.
        samples: S, the number of chunks of the batch axis.
        running_stats: which chunks update the running statistics of the BatchNorms in training mode:
            ``"all"`` (default, as S sequential forwards), ``"first"`` (chunk 0 only) or ``"none"``.
    """
    running_stats = _args.check_choice("running_stats", running_stats, RUNNING_STATS)
    patched = []
    try:
        for layer, plan in plans.items():
            plan = SamplePlan(*plan)
            if plan.sigmas.shape != (samples,):
                raise ValueError(f"sigmas must have shape [{samples}], got {list(plan.sigmas.shape)}")
            layer.set_sample_plan(plan.rng, plan.sigmas, weights=plan.weights)
        if samples > 1 or running_stats != "all":
            for module in model.modules():
                if isinstance(module, _BATCH_NORMS) and module.training:
                    module.forward = types.MethodType(_per_chunk_batch_norm(samples, running_stats), module)
                    patched.append(module)
        yield
    finally:
        for layer in plans:
            layer.set_sample_plan(None)
        for module in patched:
            del module.forward


def instance_plans(
    layers: list[NoisyModule], seed: int, first: int, samples: int, *, draw: bool = False
) -> dict[NoisyModule, SamplePlan]:
    """The sample plans of chip instances ``first`` .. ``first + samples - 1`` (DESIGN §2, §6).

    ``layers`` are the model's noisy layers, keyed (:func:`nft_cuda.nn.keys.assign_layer_keys`,
    which returns them). The layer of key ℓ = ``layer.layer_index`` gets
    rng = (seed, instance_offset(ℓ, first)), so stream t is instance first + t, at the layer's σ_d:
    sample t of a plan forward equals ``nft_cuda.set_instance(model, seed, first + t)``. With ``draw``
    the S noisy weights are drawn now (once, e.g. for a whole test set) and carried by the plan."""
    plans = {}
    for layer in layers:
        if layer.variation is None:
            raise ValueError("every noisy layer needs a variation (or pass variation=)")
        device = layer.weight.device
        sigmas = torch.full((samples,), layer.variation.sigma, dtype=torch.float32, device=device)
        rng = _args.make_rng(seed, instance_offset(layer.layer_index, first), device)
        plans[layer] = SamplePlan(rng, sigmas, layer.noisy_weights(rng, sigmas) if draw else None)
    return plans
