"""S noise samples of a whole model in one pass, along the batch axis (DESIGN §5 batched OVF,
§6 batched Monte-Carlo instances).

Inside :func:`sample_plan`, every noisy layer multiplies chunk t of its batch axis ([S·B, ...]: S
chunks of B rows) by its noisy weight of stream offset + t at σ_d = sigmas[t] (see
``NoisyModule.set_sample_plan``), and every BatchNorm normalises each chunk with that chunk's own
statistics, updating its running statistics chunk by chunk in order — exactly what S sequential
forwards would do. Each chunk is computed as a one-sample forward would be, so the batched pass
matches the sequential one.

A model can be run this way when every leaf module acts on each row independently (convolutions,
linear layers, activations, pooling, normalisations over features) or is a BatchNorm.
:func:`unbatchable_modules` names the leaves that are not known to: dropout draws its mask from
the batch size, and unknown leaf types may mix rows. Custom ``forward`` code of container modules
is trusted to act per row (e.g. residual additions, flatten from dim 1).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda import _args
from nft_cuda.nn.layers import NoisyModule, SamplePlan, instance_offset

__all__ = ["BATCHABLE_LEAVES", "RUNNING_STATS", "instance_plans", "sample_plan", "unbatchable_modules"]

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
    nn.Softmax,
    nn.LogSoftmax,
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


def unbatchable_modules(model: nn.Module) -> list[str]:
    """Names of the leaf modules that prevent running ``model`` along a sample axis."""
    bad = []
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and (module.p == 0 or not module.training):
            continue  # an inactive dropout is the identity
        if not isinstance(module, BATCHABLE_LEAVES + (NoisyModule,)):
            bad.append(name or type(module).__name__)
    return bad


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
        plans: noisy layer → :class:`~nft_cuda.nn.layers.SamplePlan` or (rng int64[2], sigmas float32
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

    ``layers`` are the model's noisy layers in ℓ order (:func:`nft_cuda.noisy_layers`). Layer ℓ gets
    rng = (seed, instance_offset(ℓ, first)), so stream t is instance first + t, at the layer's σ_d:
    sample t of a plan forward equals ``nft_cuda.set_instance(model, seed, first + t)``. With ``draw``
    the S noisy weights are drawn now (once, e.g. for a whole test set) and carried by the plan."""
    plans = {}
    for ell, layer in enumerate(layers):
        if layer.variation is None:
            raise ValueError("every noisy layer needs a variation (or pass variation=)")
        device = layer.weight.device
        sigmas = torch.full((samples,), layer.variation.sigma, dtype=torch.float32, device=device)
        rng = _args.make_rng(seed, instance_offset(ell, first), device)
        plans[layer] = SamplePlan(rng, sigmas, layer.noisy_weights(rng, sigmas) if draw else None)
    return plans
