"""Monte-Carlo robustness evaluation over chip instances (DESIGN §2 instance mode, §6, §7).

:func:`monte_carlo` evaluates R chip instances of a noisy model on a whole test loader for each σ_d of a
sweep and reports accuracy statistics, mean confidence and the expected KL divergence (EKL).

Chip instances. Instance r of the noisy layer of key ℓ uses the noise stream
(seed, offset = (ℓ << 32) | r), fixed over the whole test set: exactly what
``nft_cuda.set_instance(model, seed, r)`` gives. The key depends on the noise stream version
(``stream_version``, recorded as ``noise_stream`` in every result): in version 2 (the default,
:data:`nft_cuda.nn.keys.NOISE_STREAM_VERSION`) ℓ is made from the layer's qualified name
(:func:`nft_cuda.nn.keys.name_key`), so chip r of a layer is the same whichever other layers are
noisy: an ablation ("first layer digital, same chips") compares the same chips. In version 1, the
stream of every result made before it, ℓ is the layer's position among the noisy layers in
``named_modules()`` order, so excluding a layer changes the chips of every later one; results without
``noise_stream`` are version 1, and ``stream_version=1`` evaluates those chips again.

Batched instances. Instances are evaluated in groups of S = ``instances_per_pass`` consecutive instances
r0 .. r0+S-1, one pass over the loader per group. The group's noisy weights are drawn once per pass,
for every noisy layer (key ℓ) with the call a sample-plan forward makes (:mod:`nft_cuda.nn.sample_axis`):
``ops.perturb(W, variation, rng=(seed, (ℓ << 32) | r0), samples=S, sigmas=[σ_d] × S)``, whose stream
offset + t is instance r0 + t — instead of once per batch, as a noisy layer in instance mode would. Then,
per batch, either the S instances are folded into the batch axis (``fold=True``: the batch repeated S
times, [S·B, ...], chunk t through instance t's weights, logits split into S chunks) or the S instances
run one after the other on the same batch (``fold=False``). Folded, each noisy linear/conv layer runs
the S instances as one batched GEMM / grouped convolution (:mod:`nft_cuda.nn.stacked`); unfolded, every
instance's rows go through the same operations on the same shapes as a one-instance forward. Folded and
unfolded results match to the DESIGN §6 tolerances (the stacked call may round differently from S single
calls, and its kernel may depend on S; ``NFT_CUDA_SAMPLE_AXIS=loop`` makes them bit-identical), and
both equal instance mode to those tolerances, not always bit for bit: a noisy layer may take another GEMM
path, e.g. the fused CUDA matmul, for the same noise. Models
with modules that may mix rows of the batch
(:func:`nft_cuda.nn.sample_axis.unbatchable_modules`, checked in ``eval()`` mode, where dropout is the
identity, then the runtime probe of :func:`~nft_cuda.nn.sample_axis.probe_blockers` on the first test
batch at the sweep's first noisy point) are not folded (one warning when folding was asked for).

The model runs in ``eval()`` mode (BatchNorm uses its running statistics) with ``torch.no_grad()``; its
training flags, variations, noise modes and instance state are restored afterwards. σ_d = 0 needs no
sampling: every instance is the clean model (R identical accuracies, std 0, EKL 0). Any noisy layer
works (linear, convolution, attention, recurrent, registered types): each takes the instances' noise
through its sample plan.

The loader must yield the same inputs in the same order on every pass (a test loader: no shuffling);
it is iterated once for the clean accuracy and once per pass, and the labels of every pass are checked
against the first one.

Memory is independent of R beyond a few scalars per instance: the Σ_r p_r per input needed by the EKL
is an ``[N, C]`` float64 running sum (:class:`~nft_cuda.eval.metrics.EKLAccumulator`), plus one such
buffer per open block, plus S noisy copies of the weights and (folded) S·B rows of activations.

Determinism (DESIGN §6): for the same device type, the JSON-able results are bit-identical whatever
``instances_per_pass``, ``fold`` and the number of processes when every instance runs as one-instance
calls: unfolded (the CPU default) or with ``NFT_CUDA_SAMPLE_AXIS=loop``. A folded pass with stacked calls
(the CUDA default) matches them to the DESIGN §6 tolerances; on CPU it has been bit-identical in our
tests for linear layers and most convolutions, which is not a guarantee. Per instance, the correct count (integer), the
summed max-probability and the summed p·log p (float64, summed batch by batch in loader order) are
computed by the same operations on the same shapes whatever the batching; their statistics are combined
exactly (rational arithmetic) and rounded once. Σ_r p_r is summed in a fixed tree: blocks of
:data:`~nft_cuda.eval.metrics.EKL_BLOCK` = 8 consecutive instances, each summed in instance order,
folded into the total in block order.

Scale-out (DESIGN §7). When ``torch.distributed`` is initialised (e.g. under ``torchrun``), instances
are sharded across the ranks of ``group`` by whole blocks: in round j, rank k evaluates the
c = ceil(S / 8) consecutive blocks starting at block (j·W + k)·c (W = world size). At the end of a round
the block sums are broadcast from their owners in block order and every rank folds them into its
total — the same tree as one process, so the EKL is bit-identical. The per-instance scalars are gathered
with ``all_gather_object``. Every rank returns the same results. The collectives use CPU tensors with
gloo and the current CUDA device with NCCL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from nft_cuda import _args
from nft_cuda.devices import DeviceModel
from nft_cuda.distributed import Group
from nft_cuda.distributed import current as current_group
from nft_cuda.eval.config import EvalConfig, config_or_keywords
from nft_cuda.eval.metrics import EKL_BLOCK, EKLAccumulator, accuracy_stats, exact_mean
from nft_cuda.nn import (
    NOISE_STREAM_VERSION,
    assign_layer_keys,
    check_stream_version,
    kept_noise_state,
    noise_mode,
    noisy_layers,
)
from nft_cuda.nn import stream_version as model_stream_version
from nft_cuda.nn.custom import resolve_output
from nft_cuda.nn.sample_axis import instance_plans, probe_blockers, sample_plan, unbatchable_modules

__all__ = ["instance_logits", "monte_carlo"]

#: The output adapter of ``output=None``: the model returns the logits tensor itself.
_ITSELF = resolve_output(None)


# --------------------------------------------------------------------------------------------------
# Argument checks and model state
# --------------------------------------------------------------------------------------------------


def _as_variations(variations) -> list[DeviceModel]:
    if isinstance(variations, DeviceModel):
        return [variations]
    if isinstance(variations, Iterable) and not isinstance(variations, (str, bytes)):
        out = list(variations)
        if out and all(isinstance(v, DeviceModel) for v in out):
            return out
    raise TypeError(
        "variations must be an nft_cuda.Variation (or another device model) or a non-empty list of them, "
        f"got {type(variations).__name__}"
    )


def _check_loader(loader) -> None:
    if isinstance(loader, torch.utils.data.DataLoader):
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler):
            raise ValueError(
                "monte_carlo needs a loader that yields the same inputs in the same order on every "
                "pass: use shuffle=False (a test loader)"
            )
        return
    if not isinstance(loader, Iterable) or isinstance(loader, Iterator):
        raise TypeError(
            "loader must be re-iterable (a DataLoader or a list of (inputs, labels) batches); "
            "a one-shot iterator cannot be replayed for every group of instances"
        )


def _model_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _kept_state(model: nn.Module):
    """The model's noisy layers for the block; every module's training flag and every noisy layer's
    noise state restored on exit."""
    training = [(m, m.training) for m in model.modules()]
    try:
        with kept_noise_state(model) as layers:
            yield layers
    finally:
        for m, flag in training:
            m.training = flag


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


def _broadcast_block(comm: Group, tensor: torch.Tensor | None, src: int, shape, device) -> torch.Tensor:
    """Rank ``src``'s float64 block sum on every rank (through the collectives' device)."""
    if not comm.active:
        return tensor
    if comm.rank == src:
        buf = tensor.to(comm.device, torch.float64).contiguous()
    else:
        buf = torch.empty(shape, dtype=torch.float64, device=comm.device)
    return comm.broadcast(buf, src).to(device)


# --------------------------------------------------------------------------------------------------
# Passes
# --------------------------------------------------------------------------------------------------


def _logits(model: nn.Module, x: torch.Tensor, adapt=_ITSELF) -> torch.Tensor:
    """The model's logits [batch, classes] of ``x``, taken from its output by ``adapt`` (the output
    adapter of ``output=``)."""
    out = adapt(model(x))
    if out.dim() != 2:
        raise ValueError(f"the model must return logits [batch, classes], got {list(out.shape)}")
    return out


def _clean_pass(model: nn.Module, loader, device: torch.device, adapt=_ITSELF):
    """(labels [N] on device, correct count, Σ_n max_c p, num_classes) of the clean model."""
    labels, correct, conf, classes = [], 0, [], None
    with noise_mode(model, "off"):
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = _logits(model, x, adapt)
            if logits.shape[0] != y.shape[0]:
                raise ValueError(f"the model returned {logits.shape[0]} rows for a batch of {y.shape[0]} labels")
            classes = logits.shape[1]
            p = torch.softmax(logits.to(torch.float64), dim=-1)
            labels.append(y)
            correct = correct + (logits.argmax(-1) == y).sum()
            conf.append(p.amax(-1).sum())
    if classes is None:
        raise ValueError("the loader yielded no batch")
    conf_sum = conf[0]
    for c in conf[1:]:
        conf_sum = conf_sum + c
    return torch.cat(labels), int(correct), float(conf_sum), classes


def _evaluable_layers(model: nn.Module) -> list:
    """The model's noisy layers in ``named_modules()`` order, checked to be ones monte_carlo can evaluate."""
    layers = [m for _, m in noisy_layers(model)]
    if not layers:
        raise ValueError("the model has no noisy layers: convert it with nft_cuda.convert(model, variation) first")
    if len(layers) >= 2**31:
        raise ValueError("too many noisy layers")
    return layers


def _stream_version(model: nn.Module, version: int | None) -> int:
    """The noise stream version to evaluate ``model``'s chips in: ``version``, else the model's own (the
    one :func:`nft_cuda.convert` keyed it with), else the current one."""
    if version is not None:
        return check_stream_version(version)
    return model_stream_version(model) or NOISE_STREAM_VERSION


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every pass of one :func:`monte_carlo` call shares: its settings (``config``), the model and its
    keyed noisy layers, the test loader, where it runs, the process group, the output adapter and whether
    the instances are folded into the batch axis (``fold`` resolved: False when the model cannot be)."""

    config: EvalConfig
    model: nn.Module
    layers: list
    loader: object
    device: torch.device
    comm: Group
    adapt: object
    fold: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return _logits(self.model, x, self.adapt)


def _group_pass(run: _Run, labels, ekl: EKLAccumulator, r0: int, samples: int, kept: dict | None = None):
    """Evaluate instances r0 .. r0+S-1 over the loader; returns per-instance (correct, Σ max p) as lists
    of device scalars and feeds the probabilities to ``ekl``. With ``kept``, the float32 logits of each
    batch are kept as ``kept[r] = [(start, logits), ...]`` (for :func:`_chip_kl`)."""
    correct = [0] * samples
    conf = [None] * samples
    model, device = run.model, run.device
    mismatch = torch.zeros((), dtype=torch.bool, device=device)
    start = 0
    n = labels.shape[0]
    # The group's noisy weights, drawn once for the whole loader (not once per batch) and carried by
    # the layers' sample plans: folded, chunk t of the batch axis uses instance r0 + t; unfolded, the
    # forward of instance r0 + t uses that instance's one-sample plan.
    plans = instance_plans(run.layers, run.config.seed, r0, samples, draw=True)
    one = [{layer: plan.select(t) for layer, plan in plans.items()} for t in range(samples)]
    for x, y in run.loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        b = y.shape[0]
        if start + b > n:
            raise ValueError(
                "the loader yielded more inputs than on its first pass: it must yield the same "
                "inputs in the same order on every pass (no shuffling)"
            )
        mismatch |= (y != labels[start : start + b]).any()
        if run.fold:
            with sample_plan(model, plans, samples):
                logits = run.logits(_repeat(x, samples))
            chunks = [logits[t * b : (t + 1) * b] for t in range(samples)]
        else:
            chunks = []
            for t in range(samples):
                with sample_plan(model, one[t], 1):
                    chunks.append(run.logits(x))
        for t, lt in enumerate(chunks):
            p = torch.softmax(lt.to(torch.float64), dim=-1)
            correct[t] = correct[t] + (lt.argmax(-1) == y).sum()
            c = p.amax(-1).sum()
            conf[t] = c if conf[t] is None else conf[t] + c
            ekl.update(r0 + t, p, start)
            if kept is not None:
                kept.setdefault(r0 + t, []).append((start, lt))
        start += b
    if start != n or bool(mismatch):
        raise ValueError(
            "the loader did not yield the same labels in the same order as on its first pass: "
            "monte_carlo needs a deterministic loader (shuffle=False)"
        )
    return correct, conf


def _repeat(x: torch.Tensor, samples: int) -> torch.Tensor:
    """[S·B, ...]: the batch repeated S times along the batch axis (chunk t for instance r0 + t)."""
    return x if samples == 1 else x.repeat((samples,) + (1,) * (x.dim() - 1))


def instance_logits(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    seed: int,
    instances: range,
    variation: DeviceModel | None = None,
    output=None,
    stream_version: int | None = None,
) -> torch.Tensor:
    """Logits [S, B, classes] of chip instances ``instances`` (a range of consecutive r, S = its length)
    on one batch ``inputs`` [B, ...], computed in one pass as :func:`monte_carlo` does (the model's
    current train/eval flags are used as they are; call ``model.eval()`` first for evaluation).
    Instance r equals ``nft_cuda.set_instance(model, seed, r); model(inputs)``. ``variation``
    temporarily replaces every noisy layer's variation (default: keep each layer's own); ``output`` is
    the output adapter, as in :func:`monte_carlo`; ``stream_version`` as :func:`monte_carlo`'s."""
    adapt = resolve_output(output)
    if not isinstance(instances, range) or instances.step != 1 or len(instances) == 0:
        raise ValueError(f"instances must be a non-empty range of consecutive instances, got {instances!r}")
    seed = _args.check_seed_int("seed", seed)
    if instances.start < 0 or instances.stop > 2**32:
        raise ValueError(f"instances must lie in [0, 2^32), got {instances!r}")
    if not noisy_layers(model):
        raise ValueError("the model has no noisy layers: convert it with nft_cuda.convert(model, variation) first")
    version = _stream_version(model, stream_version)
    with _kept_state(model):
        layers = assign_layer_keys(model, version)
        if variation is not None:
            for layer in layers:
                layer.variation = variation
        s, b = len(instances), inputs.shape[0]
        plans = instance_plans(layers, seed, instances.start, s)
        blockers = unbatchable_modules(model) or probe_blockers(
            model, inputs, plans, s, lambda i: _logits(model, i, adapt)
        )
        if blockers:  # the chips' rows would mix: one instance per forward (same result)
            warnings.warn(f"instance_logits: one instance at a time: {blockers}", stacklevel=2)
            outs = []
            for t in range(s):
                with sample_plan(model, {layer: plan.select(t) for layer, plan in plans.items()}, 1):
                    outs.append(_logits(model, inputs, adapt))
            return torch.stack(outs)
        with sample_plan(model, plans, s):
            out = _logits(model, _repeat(inputs, s), adapt)
        return out.view(s, b, out.shape[-1])


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def monte_carlo(
    model: nn.Module,
    loader,
    variations,
    runs: int | None = None,
    *,
    seed: int | None = None,
    instances_per_pass: int = 8,
    device=None,
    progress: bool = True,
    fold: bool | None = None,
    distributed: bool | None = None,
    group=None,
    per_instance_kl: bool = False,
    output=None,
    stream_version: int | None = None,
    config: EvalConfig | None = None,
) -> list[dict]:
    """Monte-Carlo evaluation of ``runs`` chip instances per σ_d (DESIGN §6); see the module docstring.

    Args:
        model: a model with noisy layers (:func:`nft_cuda.convert`, :func:`nft_cuda.io.load_model`)
            returning logits [batch, classes].
        loader: the test set: a re-iterable of (inputs, labels) batches in a fixed order (a
            ``DataLoader`` with ``shuffle=False``, or a list of tensor pairs).
        variations: a :class:`~nft_cuda.Variation` or any :class:`nft_cuda.devices.DeviceModel`, or a
            list of them (the σ_d sweep, or a sweep of times after programming: ``pcm.at_time(t)``);
            each replaces the variation of every noisy layer for its evaluation (restored afterwards).
        runs: R, the number of chip instances (≥ 1).
        seed: the evaluation seed, in [0, 2^63).
        instances_per_pass: S, instances evaluated together in one pass over the loader: their noisy
            weights are drawn once for the whole pass (memory S × the noisy weights). Does not change
            the results, only speed and memory.
        device: where to run (default: the device of the model's parameters); the model must be there.
        progress: show a tqdm progress bar over instances (rank 0 only).
        fold: fold the S instances of a pass into the batch axis (one forward of S·B rows per batch)
            rather than S forwards of B rows. Default: fold on CUDA (bigger kernels), not on CPU (where
            the S-times larger activations leave the caches and cost ~30% more per instance). Models
            that cannot be folded (:func:`~nft_cuda.nn.sample_axis.unbatchable_modules`) are evaluated one
            instance per forward, with one warning when folding was asked for. Changes the results only
            by GEMM/conv rounding (the stacked calls of :mod:`nft_cuda.nn.stacked`, DESIGN §6 tolerances).
        distributed: shard instances over the ranks of ``group`` (default: when torch.distributed is
            initialised). Every rank must call with the same arguments; all get the same results.
        group: the ``torch.distributed`` process group (default: the world).
        per_instance_kl: also return ``per_instance_kl`` [R], each chip's KL_r = mean_n KL(p_r,n ‖ p̄_n)
            in nats, whose mean is the EKL: what a paired comparison of EKL needs
            (:mod:`nft_cuda.eval.paired`). Costs memory: the float32 logits of this process's instances
            of one σ_d are kept until its end (R × N × C × 4 bytes).
        output: where the logits are in the model's output (None: the output is the logits tensor; a
            Hugging Face model: ``"logits"``; an index of a tuple, or a callable; see
            :func:`nft_cuda.nn.custom.resolve_output`).
        stream_version: the noise stream version of the chips (DESIGN §2): 2 (layer keys from the
            layers' names) or 1 (keys by position, the chips of results made before version 2). Default:
            the model's own (:func:`nft_cuda.convert`'s ``stream_version``; a model loaded by
            :func:`nft_cuda.io.load_model` has its file's). The layers' keys are restored afterwards.
        config: all of the settings above (``runs`` .. ``stream_version``, not ``group``) as one
            :class:`~nft_cuda.eval.EvalConfig`, instead of the arguments (not both: a setting given in
            both ways is refused). ``runs`` and ``seed`` are required when there is no config.

    Returns:
        One dict per variation: ``sigma``, ``device_model`` (the preset or model kind), ``time_s`` (the
        model's time after programming, 0 for time-independent models), ``device`` (the model's
        ``to_dict()``), ``runs``, ``seed``, ``num_inputs``,
        ``accuracy_mean``, ``accuracy_std`` (ddof=1), ``ci95``, ``ci99`` (normal approximation
        z·std/√R, as the reference), ``accuracy_min``, ``accuracy_max``, ``accuracy_percentiles``
        {"5", "25", "50", "75", "95"}, ``confidence`` (mean over instances and inputs of max_c p),
        ``ekl`` (nats), ``clean_accuracy``, ``per_instance_accuracy`` [R] and ``noise_stream`` (the
        stream version of the chips; a result without it is version 1). Accuracies are fractions
        in [0, 1]. The execution strategy (S, processes, folding) is deliberately not part of the
        results, which are bit-identical whatever it is for one-instance calls (see the module
        docstring: a folded pass with stacked calls matches to the DESIGN §6 tolerances).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    variations = _as_variations(variations)
    if config is None and (runs is None or seed is None):
        raise TypeError("monte_carlo needs runs and seed= (or config=EvalConfig(...))")
    settings = dict(runs=runs, seed=seed, instances_per_pass=instances_per_pass, device=device, progress=progress,
                    fold=fold, distributed=distributed, per_instance_kl=per_instance_kl, output=output,
                    stream_version=stream_version)  # fmt: skip
    config = config_or_keywords(monte_carlo, config, settings)
    adapt = resolve_output(config.output)
    _check_loader(loader)
    _evaluable_layers(model)
    version = _stream_version(model, config.stream_version)
    device = _model_device(model, config.device)
    comm = current_group(group, config.distributed)

    with _kept_state(model):
        layers = assign_layer_keys(model, version)
        model.eval()
        run = _Run(config, model, layers, loader, device, comm, adapt, fold=False)
        run = dataclasses.replace(run, fold=_can_fold(run, variations))
        with torch.no_grad():
            clean = _clean_pass(model, loader, device, adapt)
            results = [_sweep_result(run, clean, var) for var in variations]
    return [{**r, "noise_stream": version} for r in results]


def _can_fold(run: _Run, variations: list) -> bool:
    """Whether the instances of a pass are folded into the batch axis: ``config.fold`` (default: on CUDA),
    unless a module may mix the rows of a batch (one warning then)."""
    fold = run.device.type == "cuda" if run.config.fold is None else run.config.fold
    if not fold:
        return False
    blockers = unbatchable_modules(run.model) or _fold_probe(run, variations)
    if blockers:
        warnings.warn(
            f"monte_carlo: evaluating one instance at a time: modules {blockers} may mix the rows of "
            "a batch, so instances cannot be folded into the batch axis (same results, slower)",
            stacklevel=3,
        )
    return not blockers


def _fold_probe(run: _Run, variations: list) -> list[str]:
    """The runtime half of the fold check (:func:`nft_cuda.nn.sample_axis.probe_blockers`): instances
    0 .. S-1 of the first noisy device model of the sweep on the first test batch, folded vs one at a time."""
    var = next((v for v in variations if not v.noiseless), None)
    samples = min(run.config.runs, run.config.instances_per_pass)
    if var is None or samples == 1:
        return []  # no noisy pass, or nothing to fold
    with kept_noise_state(run.model):
        for layer in run.layers:
            layer.variation = var
        batch = next(iter(run.loader), None)
        if batch is None:
            return []  # the clean pass reports the empty loader
        x = batch[0].to(run.device)
        plans = instance_plans(run.layers, run.config.seed, 0, samples)
        return probe_blockers(run.model, x, plans, samples, forward=run.logits)


def _sweep_result(run: _Run, clean, var: DeviceModel) -> dict:
    """The result dict of one σ_d (see :func:`monte_carlo`); ``clean`` is :func:`_clean_pass`'s."""
    labels, clean_correct, clean_conf, classes = clean
    runs, chip_kl = run.config.runs, run.config.per_instance_kl
    n = labels.shape[0]
    clean_acc = clean_correct / n
    for layer in run.layers:
        layer.variation = var
    if var.noiseless:
        per_acc = [clean_acc] * runs
        conf = exact_mean([clean_conf] * runs, runs * n)
        ekl, per_kl = 0.0, [0.0] * runs
    else:
        per_acc, conf, ekl, per_kl = _sweep_point(run, labels, classes, var)
    res = {"sigma": var.sigma, "device_model": var.name, "time_s": getattr(var, "time", 0.0)}
    res.update({"device": var.to_dict(), "runs": runs, "seed": run.config.seed, "num_inputs": n})
    res.update(accuracy_stats(per_acc))
    res.update({"confidence": conf, "ekl": ekl, "clean_accuracy": clean_acc, "per_instance_accuracy": per_acc})
    if chip_kl:
        res["per_instance_kl"] = per_kl
    return res


@dataclasses.dataclass(frozen=True)
class _Rounds:
    """How the R instances are shared out (DESIGN §7): blocks of EKL_BLOCK consecutive instances, in
    rounds; in round j, rank k evaluates the ``per_round`` blocks starting at block (j·W + k)·per_round."""

    runs: int
    world: int
    per_round: int

    @property
    def blocks(self) -> int:
        return math.ceil(self.runs / EKL_BLOCK)

    @property
    def count(self) -> int:
        return math.ceil(self.blocks / (self.world * self.per_round))

    def blocks_of(self, rank: int, j: int) -> range:
        first = (j * self.world + rank) * self.per_round
        return range(min(first, self.blocks), min(first + self.per_round, self.blocks))

    def instances_of(self, rank: int, j: int) -> range:
        blocks = self.blocks_of(rank, j)
        return range(blocks.start * EKL_BLOCK, min(self.runs, blocks.stop * EKL_BLOCK))


def _sweep_point(run: _Run, labels, classes: int, var: DeviceModel):
    """(per-instance accuracies [R], mean confidence, EKL, per-instance KL [R] or None) of one σ_d."""
    config, comm = run.config, run.comm
    runs, samples = config.runs, config.instances_per_pass
    n = labels.shape[0]
    rounds = _Rounds(runs, comm.world, math.ceil(samples / EKL_BLOCK))
    ekl = EKLAccumulator(n, classes, device=run.device, auto_fold=False)
    local: dict[int, tuple] = {}
    kept: dict | None = {} if config.per_instance_kl else None
    mine = sum(len(rounds.instances_of(comm.rank, j)) for j in range(rounds.count))
    bar = _progress_bar(mine, var) if config.progress and comm.rank == 0 else None
    try:
        for j in range(rounds.count):
            span = rounds.instances_of(comm.rank, j)
            for r0 in range(span.start, span.stop, samples):
                s = min(samples, span.stop - r0)
                correct, conf = _group_pass(run, labels, ekl, r0, s, kept)
                for t in range(s):
                    local[r0 + t] = [correct[t], conf[t]]
                if bar is not None:
                    bar.update(s)
            # Exchange the block sums of this round in block order and fold them (DESIGN §7).
            for src in range(comm.world):
                for b in rounds.blocks_of(src, j):
                    mine_b = ekl.take_block(b) if src == comm.rank else None
                    ekl.put_block(b, _broadcast_block(comm, mine_b, src, (n, classes), run.device))
    finally:
        if bar is not None:
            bar.close()
    return _gathered(run, ekl, local, kept, n)


def _progress_bar(total: int, var: DeviceModel):
    from tqdm.auto import tqdm

    # disable=None: no bar (no carriage returns) when stderr is not a terminal
    return tqdm(total=total, desc=f"σ_d={var.sigma:g} {var.name}", unit="inst", leave=False, disable=None)


def _gathered(run: _Run, ekl: EKLAccumulator, local: dict, kept: dict | None, n: int):
    """The statistics of one σ_d over every rank's instances (``local``: this rank's per-instance
    correct counts and confidence sums; ``kept``: their logits for the per-chip KL, or None)."""
    runs = run.config.runs
    plogp = ekl.instance_plogp()
    kl = _chip_kl(kept, plogp, ekl, runs, n) if kept is not None else {}
    local_out = {r: (int(c), float(f), plogp[r], kl.get(r)) for r, (c, f) in local.items()}
    merged: dict[int, tuple] = {}
    for part in run.comm.gather_objects(local_out):
        merged.update(part)
    if sorted(merged) != list(range(runs)):
        raise RuntimeError(f"monte_carlo: gathered {len(merged)} instances, expected {runs}")
    for r in range(runs):
        if r not in local_out:
            ekl.add_instance_plogp(r, merged[r][2])
    per_acc = [merged[r][0] / n for r in range(runs)]
    conf = exact_mean([merged[r][1] for r in range(runs)], runs * n)
    per_kl = [merged[r][3] for r in range(runs)] if kept is not None else None
    return per_acc, conf, ekl.value(), per_kl


def _chip_kl(kept: dict, plogp: dict, ekl: EKLAccumulator, runs: int, n: int) -> dict[int, float]:
    """Per-chip KL_r = mean_n KL(p_r,n ‖ p̄_n) of the instances evaluated here (``kept``: their logits), in
    float64: (Σ p_r log p_r − Σ p_r log p̄) / N. Their mean over r is the EKL (DESIGN §6); see
    :mod:`nft_cuda.eval.paired` for why they are the per-chip EKL. Needs the complete Σ_r p_r, which every
    rank holds once the block sums are exchanged; each cross term is summed batch by batch in loader
    order, so the values do not depend on the batching or the number of processes either."""
    ekl.finish()
    p_bar = ekl.probability_sum() / runs
    out = {}
    for r, chunks in kept.items():
        cross = None
        for start, logits in chunks:
            p = torch.softmax(logits.to(torch.float64), dim=-1)  # the very probabilities the EKL summed
            c = torch.xlogy(p, p_bar[start : start + p.shape[0]]).sum()
            cross = c if cross is None else cross + c
        out[r] = (plogp[r] - float(cross)) / n
    kept.clear()
    return out
