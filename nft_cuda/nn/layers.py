"""Drop-in noisy layers: :class:`NoisyLinear`, :class:`NoisyConv1d`, :class:`NoisyConv2d` (DESIGN §2, §3, §4.4, §5).

Each layer subclasses its ``torch.nn`` counterpart (same constructor arguments, ``device=``/``dtype=``
included, same parameters and ``state_dict`` keys) and adds:

* ``variation``: the device model of the layer (a plain attribute, not a parameter): a
  :class:`~nft_cuda.Variation` or any :class:`nft_cuda.devices.DeviceModel` (PCM, LogNormal, StuckAt;
  the name stays ``variation`` for compatibility);
* ``mode``: the noise mode (DESIGN §2 "When noise is drawn"):

  - ``"train"``: a fresh draw on every forward call. The layer draws its rng tensor int64[2] =
    (seed, offset) with ``torch.randint`` on the weight's device from torch's default generator, or from
    ``generator`` when one is set, so ``torch.manual_seed`` reproduces a run, nothing synchronises with
    the host and a captured CUDA graph draws fresh noise on every replay;
  - ``"instance"``: one fixed draw per chip instance: layer ℓ (``layer_index``, the layer's key: in
    noise stream version 2, :data:`NOISE_STREAM_VERSION`, 31 bits of the SHA-256 of its qualified name,
    :func:`name_key`; in version 1 its position among the noisy layers) of instance r uses
    (seed = the evaluation seed, offset = (ℓ << 32) | r), the same on every forward. Without
    gradients the layer computes that noisy weight once per chip and keeps it (see
    :meth:`NoisyModule.set_instance`, "Cached chip weights");
  - ``"off"``: the clean weight (plain ``F.linear`` / ``F.conv``).

  The noise mode is independent of ``module.training``: **``model.eval()`` does not switch the noise
  off** (unlike aihwkit's layers, whose noise follows ``training``); it only sets BatchNorm/Dropout to
  inference, and robustness evaluation runs noisy layers in ``eval()`` mode. Switch the noise
  explicitly: ``model.eval(); nft_cuda.set_noise_mode(model, "off")`` for clean weights, or
  ``with nft_cuda.noise_mode(model, "off"): ...`` for one block.
* ``generator``: an optional ``torch.Generator`` (on the weight's device) for the train-mode draws.

The noise of a forward is exactly ``nft_cuda.ops.perturb(weight, variation, rng=rng)[0]`` for that
forward's rng. The noisy weight is a temporary of the forward: backward saves only the inputs, the
(clean) weight parameter and the rng tensor, and regenerates the noisy weight from the rng (DESIGN §3).
The weight gradient is straight-through (DESIGN §2): dL/dW = dL/dW_noisy, e.g. gᵀx for a linear layer.
Double backward raises a RuntimeError. Under ``torch.autocast`` the weight is perturbed in its own dtype
and the matmul/convolution runs in the autocast dtype, as ``F.linear``/``F.conv2d`` would.

A layer constructed without a variation has mode ``"off"`` (a plain layer); asking for ``"train"`` or
``"instance"`` without a variation raises ValueError.

Every mode traces under ``torch.compile(fullgraph=True)`` without graph breaks (autocast included); the
compiled graph, too, saves only the rng and regenerates the noise in backward. (On CPU with torch 2.14
the compiled and eager draws are the same for one ``torch.manual_seed``; inductor does not promise that
for random ops in general, only reproducibility of each.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda import _args, _ext, ops
from nft_cuda._autograd import once_differentiable
from nft_cuda.devices import DeviceModel
from nft_cuda.nn import mvm as _mvm

__all__ = [
    "MODES",
    "NOISE_STREAM_VERSION",
    "NoiseState",
    "NoisyConv1d",
    "NoisyConv2d",
    "NoisyLinear",
    "NoisyModule",
    "SamplePlan",
    "check_stream_version",
    "instance_offset",
    "name_key",
]

#: Noise modes of a noisy layer.
MODES = ("train", "instance", "off")

#: The version of the chip noise stream (DESIGN §2 instance mode), i.e. how a noisy layer's key ℓ is
#: chosen: 2 (the default since this version): ℓ = :func:`name_key` of the layer's qualified name, so a
#: layer's chips do not depend on which other layers are noisy; 1: ℓ = the layer's position among the
#: model's noisy layers (every result made before version 2; a file or report without a version is 1).
NOISE_STREAM_VERSION = 2

_DOUBLE_BACKWARD_MSG = (
    b"nft_cuda noisy layers do not support double backward: their backward regenerates the noise and "
    b"is differentiable only once (the straight-through weight gradient has no second derivative)"
)


# --------------------------------------------------------------------------------------------------
# Noise: exactly nft_cuda.ops.perturb (traced by torch.compile without a graph break).
# --------------------------------------------------------------------------------------------------


def _programmed(weight: torch.Tensor, variation: DeviceModel) -> torch.Tensor:
    """The weight as programmed (detached; model 4's weight levels, :func:`nft_cuda.nn.mvm.programmed`)."""
    return _mvm.programmed(weight.detach(), variation)


def _noisy_weight(weight: torch.Tensor, rng: torch.Tensor, variation: DeviceModel) -> torch.Tensor:
    """W_noisy [*weight.shape] = ``ops.perturb(weight, variation, rng=rng, samples=1)[0]`` (detached)."""
    return ops.perturb(_programmed(weight, variation), variation, rng=rng)[0]


def _noisy_weights(
    weight: torch.Tensor, rng: torch.Tensor, variation: DeviceModel, sigmas: torch.Tensor | None
) -> torch.Tensor:
    """[S, *weight.shape]: the S noisy weights of a sample-axis forward (S = 1 without ``sigmas``)."""
    programmed = _programmed(weight, variation)
    if sigmas is None:
        return ops.perturb(programmed, variation, rng=rng)
    return ops.perturb(programmed, variation, rng=rng, samples=sigmas.shape[0], sigmas=sigmas)


def _split_samples(t: torch.Tensor, samples: int) -> list[torch.Tensor]:
    """The S chunks of a tensor whose batch axis holds S samples of B rows each ([S·B, ...])."""
    if samples == 1:
        return [t]
    if t.shape[0] % samples:
        raise ValueError(
            f"a sample-axis forward with {samples} samples needs a batch that is a multiple of "
            f"{samples}, got {t.shape[0]}"
        )
    return list(t.chunk(samples, dim=0))


def _per_sample(fn, weights: torch.Tensor, *batched: torch.Tensor) -> torch.Tensor:
    """``fn(weights[t], chunk t of each tensor in batched)`` for the S = len(weights) samples, concatenated
    along the batch axis (the per-sample loop of every sample-axis forward and backward). Each chunk goes
    through the same operations on the same shapes as a one-sample call, so results do not depend on S."""
    samples = weights.shape[0]
    parts = [_split_samples(t, samples) for t in batched]
    outs = []  # a plain loop: a comprehension would make the caller's weights a cell dynamo cannot `del`
    for t in range(samples):
        outs.append(fn(weights[t], *[p[t] for p in parts]))
    return outs[0] if samples == 1 else torch.cat(outs, dim=0)


def _save_and_apply(ctx, op, x, weight, bias, rng, sigmas, variation, compute_dtype) -> torch.Tensor:
    """The forward of the noisy autograd Functions: chunk t of the batch through ``op(chunk, W_noisy[t],
    bias)`` in the compute dtype, with W_noisy drawn here and freed before returning. Saves only the
    input, the clean weight and the rng (backward regenerates the noise, DESIGN §3)."""
    w_noisy = _noisy_weights(weight, rng, variation, sigmas)
    xc = _cast(x, compute_dtype)
    bc = _cast(bias, compute_dtype)
    with torch.autocast(x.device.type, enabled=False):
        w_noisy = _cast(w_noisy, compute_dtype)
        out = _per_sample(lambda w, chunk: op(chunk, w, bc), w_noisy, xc)
    del w_noisy
    ctx.save_for_backward(xc, weight, rng, sigmas)
    ctx.variation = variation
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, xc.dtype)
    return out


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul/conv of ``x`` in, or None outside autocast."""
    device_type = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.to(dtype)


class _NoisyLinearFn(torch.autograd.Function):
    """y = x · W_noisyᵀ + b with W_noisy regenerated in backward (never saved).

    With ``sigmas`` (float32 [S]) the batch axis of x holds S samples of B rows each and chunk t is
    multiplied by the noisy weight of stream offset + t at σ_d = sigmas[t] (the sample axis of OVF and
    batched Monte-Carlo instances); each chunk is the same computation as a one-sample forward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rng, sigmas, variation, compute_dtype):
        return _save_and_apply(ctx, F.linear, x, weight, bias, rng, sigmas, variation, compute_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xc, weight, rng, sigmas = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype, c_dtype = ctx.dtypes
        g = grad_out.to(c_dtype)
        gx = gw = gb = None
        with torch.no_grad(), torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                w_noisy = _noisy_weights(weight, rng, ctx.variation, sigmas).to(c_dtype)
                gx = _per_sample(lambda w, chunk: torch.matmul(chunk, w), w_noisy, g).to(x_dtype)
                del w_noisy
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[1]:
                # Straight-through: dL/dW = Σ_samples dL/dW_noisy = gᵀx over every row; needs no weight.
                gw = g2.t().matmul(xc.reshape(-1, xc.shape[-1])).to(w_dtype)
            if b_dtype is not None and ctx.needs_input_grad[2]:
                gb = g2.sum(0).to(b_dtype)
        gx, gw, gb = once_differentiable((gx, gw, gb), _DOUBLE_BACKWARD_MSG)
        return gx, gw, gb, None, None, None, None


#: NoisyLinear on CUDA uses the fused variation-sampled matmul (ops.noisy_linear: noise generated inside the
#: GEMM's weight-tile loads) when each sample has at most this many rows and the compute dtype has a fused
#: tensor-core kernel (bf16/fp16 with an fp32 or same-dtype weight; fp32 weight and input with TF32 allowed).
#: Above it the fused kernel regenerates each weight tile for every 64-row block of the input and is bound by
#: instruction issue (~125 per weight element per row block on sm_90: docs/kernels.md cost model), so
#: perturbing once and calling cuBLAS wins; the model puts even one row block at ~0.9x of that path, so the
#: limit is one block until a GPU measurement (benchmarks/kernel_roofline.py's M sweep) moves it. Both paths
#: give the same noise for one rng; only the GEMM rounding differs.
FUSED_LINEAR_MAX_ROWS = 64

#: The fused kernels compile (tensor-core SASS checked in CI) but have not yet run on a GPU, so
#: NoisyLinear routes to them only when NFT_CUDA_FUSED_LINEAR=1 until a GPU check verifies them
#: (benchmarks/gpu_check.sh; see benchmarks/RESULTS.md). ops.noisy_linear itself always uses them.
FUSED_LINEAR_ENABLED = os.environ.get("NFT_CUDA_FUSED_LINEAR", "0").strip().lower() in ("1", "true", "yes", "on")


def _fused_linear_ok(x: torch.Tensor, weight: torch.Tensor, samples: int, compute_dtype, variation) -> bool:
    """Whether a CUDA NoisyLinear forward takes the fused path (see FUSED_LINEAR_MAX_ROWS)."""
    if not FUSED_LINEAR_ENABLED or x.device.type != "cuda" or not _ext.has_kernel("noisy_linear", "cuda"):
        return False
    if getattr(variation, "mvm", None) is not None and variation.mvm.weight_levels:
        return False  # the fused kernel perturbs the raw weight, not its programmed grid
    if compute_dtype is None and x.dtype != weight.dtype:
        return False  # as nn.Linear: mismatched dtypes go to F.linear, which raises
    dtype = compute_dtype if compute_dtype is not None else x.dtype
    if dtype in (torch.bfloat16, torch.float16):
        if weight.dtype not in (torch.float32, dtype):
            return False
    elif dtype == torch.float32:
        if weight.dtype != torch.float32 or not ops.tf32_allowed():
            return False
    else:
        return False
    if x.dim() == 0:
        return False
    rows = 1
    for size in x.shape[:-1]:
        rows *= size
    return rows <= FUSED_LINEAR_MAX_ROWS * samples


def _fused_linear(x, weight, bias, rng, sigmas, variation, compute_dtype):
    """NoisyLinear's forward through ops.noisy_linear (autograd registered with the op: it saves x, the
    clean weight and rng only). The sample axis of a sample plan is the leading chunking of x's batch."""
    xc = _cast(x, compute_dtype)
    bc = _cast(bias, compute_dtype)
    with torch.autocast(x.device.type, enabled=False):
        if sigmas is None:
            return ops.noisy_linear(xc, weight, bc, variation, rng=rng)[0]
        samples = sigmas.shape[0]
        if xc.dim() < 2 or xc.shape[0] % samples:
            raise ValueError(
                f"a sample-axis forward with {samples} samples needs a batch that is a multiple of "
                f"{samples}, got {xc.shape[0] if xc.dim() else 0}"
            )
        xs = xc.reshape(samples, xc.shape[0] // samples, *xc.shape[1:])
        out = ops.noisy_linear(xs, weight, bc, variation, rng=rng, samples=samples, sigmas=sigmas, shared_input=False)
        return out.reshape(xc.shape[0], *out.shape[2:])


_CONV = {1: F.conv1d, 2: F.conv2d}

#: Default ``bias`` of the conv helpers: the layer's own (an MVM forward passes None and adds it digitally).
_OWN_BIAS = object()


class _NoisyConvFn(torch.autograd.Function):
    """y = conv(x, W_noisy, b) with W_noisy regenerated in backward (never saved). x is pre-padded
    for non-zero padding modes and string paddings, so ``padding`` is a tuple of ints here.
    ``sigmas`` adds a sample axis as in :class:`_NoisyLinearFn`."""

    @staticmethod
    def forward(ctx, x, weight, bias, rng, sigmas, variation, compute_dtype, stride, padding, dilation, groups):
        conv = _CONV[weight.dim() - 2]
        ctx.conv = (stride, padding, dilation, groups)
        return _save_and_apply(
            ctx,
            lambda chunk, w, b: conv(chunk, w, b, stride, padding, dilation, groups),
            x,
            weight,
            bias,
            rng,
            sigmas,
            variation,
            compute_dtype,
        )

    @staticmethod
    def backward(ctx, grad_out):
        xc, weight, rng, sigmas = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype, c_dtype = ctx.dtypes
        stride, padding, dilation, groups = ctx.conv
        need_x = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = b_dtype is not None and ctx.needs_input_grad[2]
        gx = gw = gb = None
        if need_x or need_w or need_b:
            g = grad_out.to(c_dtype)
            conv_args = (list(stride), list(padding), list(dilation), False, [0] * len(stride), groups)
            with torch.no_grad(), torch.autocast(g.device.type, enabled=False):
                if need_w or need_b:
                    # Straight-through: the weight gradient does not depend on the weight's values and
                    # sums over every row of every sample, so one call over the whole batch serves all.
                    _, gw, gb = torch.ops.aten.convolution_backward(
                        g,
                        xc,
                        weight.detach().to(c_dtype),
                        [weight.shape[0]] if need_b else None,
                        *conv_args,
                        [False, need_w, need_b],
                    )
                    gw = gw.to(w_dtype) if need_w else None
                    gb = gb.to(b_dtype) if need_b else None
                if need_x:
                    w_noisy = _noisy_weights(weight, rng, ctx.variation, sigmas).to(c_dtype)

                    def input_grad(w, gc, xs):
                        return torch.ops.aten.convolution_backward(gc, xs, w, None, *conv_args, [True, False, False])[0]

                    gx = _per_sample(input_grad, w_noisy, g, xc).to(x_dtype)
                    del w_noisy
        gx, gw, gb = once_differentiable((gx, gw, gb), _DOUBLE_BACKWARD_MSG)
        return gx, gw, gb, None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------


def name_key(name: str) -> int:
    """ℓ of noise stream version 2 for the layer of qualified name ``name`` (its ``named_modules()`` name,
    wrappers left out, see :func:`nft_cuda.nn.conversion.assign_layer_keys`): the first 31 bits of the
    SHA-256 of the UTF-8 name, read big-endian. Two names of one model may share a key (a chance of about
    n²/2^32 for n layers); :func:`~nft_cuda.nn.conversion.assign_layer_keys` resolves that. The model
    itself (name ``""``: a converted lone layer) has key 0, as a lone layer has in every version."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (a module name), got {type(name).__name__}")
    if not name:
        return 0
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big") >> 1


def check_stream_version(value, name: str = "stream_version") -> int:
    """A noise stream version: 1 (positional layer keys) or 2 (:data:`NOISE_STREAM_VERSION`, name keys)."""
    return _args.check_int(name, value, 1, NOISE_STREAM_VERSION)


def instance_offset(layer_index: int, instance: int) -> int:
    """The stream offset of chip instance r of noisy layer ℓ: (ℓ << 32) | r (DESIGN §2). The one place
    this formula is written: instance mode, :func:`nft_cuda.set_instance` and Monte-Carlo plans use it."""
    layer_index = _args.check_uint("layer_index", layer_index, 31)
    instance = _args.check_uint("instance", instance, 32)
    return (layer_index << 32) | instance


def _check_mode(mode) -> str:
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, one of {', '.join(MODES)}; got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown noise mode '{mode}'; choose one of {', '.join(MODES)}")
    return mode


class SamplePlan(NamedTuple):
    """The noise of a layer's following forwards, set by :meth:`NoisyModule.set_sample_plan`.

    The batch axis holds S = len(sigmas) chunks; chunk t uses stream t of ``rng`` (offset + t) at
    σ_d = ``sigmas[t]``. ``weights`` [S, *weight.shape], when given, are those S noisy weights drawn in
    advance (:meth:`NoisyModule.noisy_weights`), so a Monte-Carlo pass draws them once for a whole test
    set instead of once per batch; the forward then uses them as they are (no weight gradient).
    """

    rng: torch.Tensor
    sigmas: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def samples(self) -> int:
        return self.sigmas.shape[0]

    def select(self, t: int) -> SamplePlan:
        """The one-sample plan of sample t (stream offset + t)."""
        rng = torch.stack((self.rng[0], self.rng[1] + t))
        weights = None if self.weights is None else self.weights[t : t + 1]
        return SamplePlan(rng, self.sigmas[t : t + 1], weights)


@dataclasses.dataclass(frozen=True)
class NoiseState:
    """A snapshot of a layer's noise settings (:meth:`NoisyModule.noise_state`), restored by
    :meth:`NoisyModule.restore_noise_state`. The instance rng buffer is kept as the same tensor object
    (a captured graph may hold it) together with a copy of its values."""

    variation: DeviceModel | None
    mode: str
    layer_index: int
    instance_seed: int | None
    instance: int | None
    instance_rng: torch.Tensor | None
    instance_rng_values: torch.Tensor | None
    sample_plan: SamplePlan | None
    layer_name: str | None = None
    stream_version: int | None = None


class NoisyModule(nn.Module):
    """Noise state shared by the noisy layers (a mixin; see the module docstring).

    Attributes:
        variation: the device model (:class:`~nft_cuda.Variation` or another
            :class:`nft_cuda.devices.DeviceModel`) or None (then the mode is ``"off"``).
        mode: ``"train"``, ``"instance"`` or ``"off"``.
        generator: ``torch.Generator`` or None (torch's default) for train-mode draws.
        layer_index: ℓ, the layer's key in its model's noise stream (DESIGN §2; set by
            :func:`nft_cuda.convert` / :func:`nft_cuda.set_instance`, see
            :func:`nft_cuda.nn.conversion.assign_layer_keys`; 0 for a lone layer).
        layer_name: the qualified name ℓ was made from (version 2), or the layer's name when it was
            numbered (version 1); None before a model-level call gave it a key.
        stream_version: the noise stream version ℓ belongs to (:data:`NOISE_STREAM_VERSION` or 1), or
            None (not yet keyed by a model-level call).
        instance_seed, instance: the (seed, r) of the last :meth:`set_instance`, or None.
        sample_plan: the :class:`SamplePlan` overriding the noise of the next forwards, or None.
        cache_instance_weights: whether instance mode keeps the chip's noisy weight (default True; see
            :meth:`set_instance`).

    The noise state (all of the above but ``generator``) is read with :meth:`noise_state`, put back
    with :meth:`restore_noise_state`, and kept over a block with ``with layer.kept_noise_state(): ...``.
    """

    #: The attributes (and the buffer ``_instance_rng``) :meth:`_init_noise` adds to the plain module.
    NOISE_ATTRIBUTES = (
        "_variation",
        "_mode",
        "generator",
        "layer_index",
        "layer_name",
        "stream_version",
        "instance_seed",
        "instance",
        "_sample_plan",
        "_mvm_ranges",
        "cache_instance_weights",
        "_instance_generation",
        "_instance_cache",
    )
    #: The non-persistent buffers of the noise state: the instance rng and the MVM forward counter.
    NOISE_BUFFERS = ("_instance_rng", "_mvm_counter")

    def _init_noise(self, variation, mode, generator) -> None:
        self._variation = None
        self._mode = "off"
        self.variation = variation
        self.mode = ("train" if variation is not None else "off") if mode is None else mode
        self.generator = generator
        self.layer_index = 0
        self.layer_name: str | None = None
        self.stream_version: int | None = None
        self.instance_seed: int | None = None
        self.instance: int | None = None
        self.register_buffer("_instance_rng", None, persistent=False)
        self.register_buffer("_mvm_counter", None, persistent=False)
        self._sample_plan: SamplePlan | None = None
        self._mvm_ranges: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.cache_instance_weights = True
        self._instance_generation = 0  # bumped whenever the instance rng may change (the cache's key)
        self._instance_cache: tuple[tuple, torch.Tensor] | None = None

    # -- attributes ---------------------------------------------------------------------------------

    @property
    def variation(self) -> DeviceModel | None:
        return self._variation

    @variation.setter
    def variation(self, value) -> None:
        if value is not None and not isinstance(value, DeviceModel):
            raise TypeError(
                "variation must be an nft_cuda.Variation, another nft_cuda.devices device model, or None, "
                f"got {type(value).__name__}"
            )
        if value is None and getattr(self, "_mode", "off") != "off":
            raise ValueError(
                f"cannot remove the variation of a layer in noise mode '{self._mode}'; set mode='off' first"
            )
        self._variation = value

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value) -> None:
        value = _check_mode(value)
        if value != "off" and self._variation is None:
            raise ValueError(
                f"noise mode '{value}' needs a variation; pass variation=nft_cuda.Variation(...) or use mode='off'"
            )
        if value == "instance" and self._buffers.get("_instance_rng") is None:
            raise ValueError(
                "noise mode 'instance' needs a chip instance: call set_instance(seed, instance) "
                "(or nft_cuda.set_instance(model, seed, instance))"
            )
        if value != "instance":
            self._instance_cache = None  # leaving instance mode frees the chip's cached weight
        self._mode = value

    @property
    def sample_plan(self) -> SamplePlan | None:
        return self._sample_plan

    def set_instance(self, seed: int, instance: int, layer_index: int | None = None) -> None:
        """Switch to mode ``"instance"``: rng = (seed, instance_offset(layer_index, instance)) (DESIGN §2).

        Args:
            seed: the evaluation seed, in [0, 2^63).
            instance: the chip instance r, in [0, 2^32).
            layer_index: ℓ in [0, 2^31); default: the layer's current ``layer_index``.

        The rng is a non-persistent int64[2] buffer on the weight's device (it follows ``.to()``);
        an existing one is updated in place without a host synchronisation, so a CUDA graph or a
        compiled graph captured in instance mode sees the new instance.

        Cached chip weights. A forward without gradients (``torch.no_grad()``, ``inference_mode``) in
        instance mode computes the chip's noisy weight once and keeps it for the following forwards
        (exactly the weight it would draw: the results are bit-identical; memory: one noisy copy of the
        layer's crossbar weight). The copy is recomputed when :meth:`set_instance` or
        :meth:`restore_noise_state` runs, the variation changes, or a crossbar weight parameter is
        changed in place or replaced (its ``_version`` or storage moves, e.g. an optimizer step,
        ``load_state_dict`` or ``.to()``); it is dropped when the layer leaves instance mode. The check
        reads only Python-side state (no host synchronisation). Forwards with gradients, inside
        ``torch.compile`` tracing or CUDA graph capture always draw the weight (they keep the
        documented graph behaviour). Change the instance only through :meth:`set_instance`; set
        ``cache_instance_weights = False`` (or ``nft_cuda.set_instance(model, ..., cache=False)``) to
        trade the memory for a draw per forward.
        """
        if self._variation is None:
            raise ValueError("set_instance needs a variation; set layer.variation first")
        seed = _args.check_seed_int("seed", seed)
        instance = _args.check_uint("instance", instance, 32)
        if layer_index is None:
            layer_index = self.layer_index
        layer_index = _args.check_uint("layer_index", layer_index, 31)
        offset = instance_offset(layer_index, instance)
        device = self.weight.device
        buf = self._buffers.get("_instance_rng")
        if buf is None or buf.device != device:
            self._instance_rng = _args.make_rng(seed, offset, device)
        else:
            buf[0].fill_(seed)
            buf[1].fill_(offset)
        self.layer_index = layer_index
        self.instance_seed, self.instance = seed, instance
        self._mode = "instance"
        self._instance_generation += 1
        self._instance_cache = None
        self._reset_mvm_counter()

    # -- noise state --------------------------------------------------------------------------------

    def noise_state(self) -> NoiseState:
        """A snapshot of the noise settings (variation, mode, instance, sample plan)."""
        buf = self._buffers.get("_instance_rng")
        return NoiseState(
            self._variation,
            self._mode,
            self.layer_index,
            self.instance_seed,
            self.instance,
            buf,
            None if buf is None else buf.clone(),
            self._sample_plan,
            self.layer_name,
            self.stream_version,
        )

    def restore_noise_state(self, state: NoiseState) -> None:
        """Put back a snapshot of :meth:`noise_state` exactly (the instance rng buffer in place)."""
        if not isinstance(state, NoiseState):
            raise TypeError(f"state must be a NoiseState from noise_state(), got {type(state).__name__}")
        if state.instance_rng is not None:
            state.instance_rng.copy_(state.instance_rng_values)
        self._buffers["_instance_rng"] = state.instance_rng
        self._variation = state.variation
        self._mode = state.mode
        self.layer_index, self.instance_seed, self.instance = state.layer_index, state.instance_seed, state.instance
        self.layer_name, self.stream_version = state.layer_name, state.stream_version
        self._sample_plan = state.sample_plan
        self._instance_generation += 1  # the rng values were put back: the cached chip may be another
        self._instance_cache = None

    @contextlib.contextmanager
    def kept_noise_state(self) -> Iterator[NoisyModule]:
        """Context manager: whatever the block changes, the noise state is restored on exit."""
        state = self.noise_state()
        try:
            yield self
        finally:
            self.restore_noise_state(state)

    # -- noise ------------------------------------------------------------------------------------

    def set_sample_plan(
        self, rng: torch.Tensor | None, sigmas: torch.Tensor | None = None, *, weights: torch.Tensor | None = None
    ) -> None:
        """Override the noise of the following forwards (used by OVF, IRS and batched Monte-Carlo; see
        :class:`SamplePlan` and :mod:`nft_cuda.nn.sample_axis`): stream t of ``rng`` (offset + t) at
        σ_d = ``sigmas[t]`` for the t-th chunk of the batch axis, S = len(sigmas) (default: one sample at
        the layer's σ_d). ``weights`` [S, *weight.shape]: those noisy weights, drawn in advance with
        :meth:`noisy_weights`. ``rng=None`` restores the layer's own mode."""
        self._reset_mvm_counter()
        if rng is None:
            self._sample_plan = None
            return
        if self._variation is None:
            raise ValueError("a sample plan needs a variation; set layer.variation first")
        if sigmas is None:
            sigmas = torch.full((1,), self._variation.sigma, dtype=torch.float32, device=rng.device)
        if weights is not None and weights.shape != (sigmas.shape[0], *self.weight.shape):
            raise ValueError(
                f"plan weights must have shape [{sigmas.shape[0]}, *weight.shape] = "
                f"{[sigmas.shape[0], *self.weight.shape]}, got {list(weights.shape)}"
            )
        self._sample_plan = SamplePlan(rng, sigmas, weights)

    def _check_input(self, input) -> None:
        """A clear error for an input that is not a tensor or is on another device than the weight (the
        same exception types as the plain layer, but naming both devices); checked before any draw."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(input).__name__}")
        if input.device != self.weight.device:
            raise RuntimeError(
                f"{type(self).__name__}: input is on {input.device} but the weight is on "
                f"{self.weight.device}; move one of them (e.g. layer.to(input.device))"
            )

    def forward_noise(self) -> SamplePlan | None:
        """The noise of the next forward: the sample plan if one is set, else a one-sample plan with the
        rng of the layer's own mode (sigmas None: the layer's σ_d; a fresh draw in mode train), or None
        for a clean forward (mode off)."""
        plan = self._sample_plan
        if plan is None:
            rng = self._forward_rng()
            if rng is None:
                return None
            plan = SamplePlan(rng, None)
        if self.weight.device.type == "meta":
            raise RuntimeError(
                f"{type(self).__name__}: its weight is on the meta device (a shape without values), so there "
                "is nothing to perturb; materialise the model first (model.to_empty(device=...) then "
                "load_state_dict(...)), or use noise mode 'off' for shape-only runs"
            )
        if self._sample_plan is None and self._mode == "instance" and self._may_cache(plan.rng):
            return self._cached_instance_plan(plan.rng)
        return plan

    # -- cached chip weights (instance mode, see set_instance) ----------------------------------------

    def _may_cache(self, rng: torch.Tensor) -> bool:
        """Whether this instance-mode forward may use (and fill) the cached chip weight: no gradients,
        not traced by torch.compile, not captured into a CUDA graph (a replay must redraw)."""
        if not self.cache_instance_weights or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        return not (rng.is_cuda and torch.cuda.is_current_stream_capturing())

    def _weight_stamp(self) -> tuple | None:
        """What the cached chip weight was computed from, read on the host only: the instance generation,
        the variation, and each crossbar parameter's storage, version counter, dtype and device (None when
        a parameter has no version counter, e.g. an inference tensor: then nothing is cached)."""
        stamp = [self._instance_generation, self._variation]
        for name in self.crossbar_weight_names():
            p = getattr(self, name)
            try:
                stamp.append((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)))
            except RuntimeError:
                return None
        return tuple(stamp)

    def _cached_instance_plan(self, rng: torch.Tensor) -> SamplePlan:
        """The one-sample plan of this chip with its noisy weight [1, *weight.shape], drawn on the first
        forward after a change of the stamp and kept."""
        stamp = self._weight_stamp()
        if stamp is None:
            return SamplePlan(rng, None)
        cache = self._instance_cache
        if cache is None or cache[0] != stamp:
            with torch.no_grad():
                cache = (stamp, _noisy_weights(self.weight, rng, self._variation, None))
            self._instance_cache = cache
        return SamplePlan(rng, None, cache[1])

    def _forward_rng(self) -> torch.Tensor | None:
        """The rng tensor of this forward in the layer's own mode, or None in mode off."""
        mode = self._mode
        if mode == "off":
            return None
        if self._variation is None:
            raise RuntimeError(f"{type(self).__name__} in noise mode '{mode}' has no variation")
        if mode == "instance":
            rng = self._instance_rng
            if rng.device != self.weight.device:
                raise RuntimeError(
                    f"the instance rng is on {rng.device} but the weight is on {self.weight.device}; "
                    "call set_instance again after moving the weight"
                )
            return rng
        gen = self.generator
        if gen is not None and gen.device != self.weight.device:
            raise ValueError(f"generator is on {gen.device} but the weight is on {self.weight.device}")
        return _args.random_rng(self.weight.device, gen)

    def noisy_weight(self, rng: torch.Tensor | None = None) -> torch.Tensor:
        """The noisy weight W_noisy [*weight.shape] (detached) for ``rng`` (int64[2] on the weight's
        device), or for the rng the layer's next forward would use (a fresh draw in mode train).
        Equal to ``nft_cuda.ops.perturb(weight, variation, rng=rng)[0]``; the clean weight in mode off
        when no rng is given."""
        if rng is None:
            rng = self._forward_rng()
            if rng is None:
                return self.weight.detach().clone()
        elif self._variation is None:
            raise ValueError("noisy_weight needs a variation")
        with torch.no_grad():
            return _noisy_weight(self.weight, rng, self._variation)

    def noisy_weights(self, rng: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The S = len(sigmas) noisy weights [S, *weight.shape] (detached) a sample plan (rng, sigmas)
        gives: exactly what the layer's sample-plan forward draws, ready for ``set_sample_plan(weights=)``."""
        if self._variation is None:
            raise ValueError("noisy_weights needs a variation")
        with torch.no_grad():
            return _noisy_weights(self.weight, rng, self._variation, sigmas)

    # -- per-MVM effects (models 4 and 5, nft_cuda.nn.mvm) ------------------------------------------

    @property
    def mvm_ranges(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(r_in, r_out): the DAC and ADC ranges of this layer (0-d float32 tensors on the weight's
        device, set by :func:`nft_cuda.nn.mvm.calibrate_mvm`), None where uncalibrated."""
        return self._mvm_ranges

    def set_mvm_ranges(self, input_range, output_range) -> None:
        """Set the converter ranges r_in, r_out (floats or 0-d tensors >= 0, or None for the per-chunk max)."""
        ranges = []
        for name, r in (("input_range", input_range), ("output_range", output_range)):
            if r is not None:
                r = torch.as_tensor(r, dtype=torch.float32).detach().to(self.weight.device)
                if r.dim() != 0 or not bool(torch.isfinite(r)) or float(r) < 0:
                    raise ValueError(f"{name} must be a finite number >= 0 or None, got {r}")
            ranges.append(r)
        self._mvm_ranges = (ranges[0], ranges[1])

    def mvm_counter(self) -> torch.Tensor:
        """The layer's MVM forward counter c (int64 0-d, on the weight's device): the read noise of a
        forward is drawn at c (nft_cuda.mvm_ops.read_noise_normals); 0 after set_instance/set_sample_plan.
        It counts the forwards of a fixed stream (instance mode, sample plans); in mode train every forward
        has a fresh rng already, so c stays 0 there and torch's generator alone decides the draws."""
        buf = self._buffers.get("_mvm_counter")
        if buf is None or buf.device != self.weight.device:
            buf = torch.zeros((), dtype=torch.int64, device=self.weight.device)
            self._mvm_counter = buf
        return buf

    def advance_mvm_counter(self) -> None:
        """c += 1 in place (no host synchronisation) after a forward of a fixed stream."""
        if self._sample_plan is not None or self._mode == "instance":
            with torch.no_grad():
                self.mvm_counter().add_(1)

    def _reset_mvm_counter(self) -> None:
        buf = self._buffers.get("_mvm_counter")
        if buf is not None:
            with torch.no_grad():
                buf.zero_()

    def _mvm_forward(self, input: torch.Tensor, noise: SamplePlan):
        """The forward under the model's MVM effects, or None when none acts around the GEMM."""
        mvm = _mvm.active_mvm(self._variation)
        if mvm is None:
            return None
        return _mvm.mvm_forward(self, input, noise, mvm)

    def _noise_repr(self) -> str:
        return f"variation={self._variation}, mode={self._mode}"

    def crossbar_weight_names(self) -> tuple[str, ...]:
        """Names of the parameters this layer perturbs (``weight`` is their crossbar tensor)."""
        return ("weight",)

    @torch.no_grad()
    def load_crossbar_(self, value: torch.Tensor) -> None:
        """Copy ``value`` [*weight.shape] into the parameter(s) behind ``weight``, in place."""
        self.weight.copy_(value)


class _ParameterSharingLayer(NoisyModule):
    """The shared part of NoisyLinear and NoisyConv1d/2d, noisy versions of the plain class ``_base``:
    ``from_module`` (sharing the plain layer's Parameter objects) and the repr."""

    _base: type

    @classmethod
    def from_module(
        cls,
        module,
        variation: DeviceModel | None = None,
        *,
        mode: str | None = None,
        generator: torch.Generator | None = None,
    ):
        """The ``cls`` layer made from plain ``module`` (an ``_base``), sharing its Parameter objects."""
        if not isinstance(module, cls._base):
            raise TypeError(
                f"{cls.__name__}.from_module expects an nn.{cls._base.__name__}, got {type(module).__name__}"
            )
        return layer_sharing_parameters(cls, module, variation=variation, mode=mode, generator=generator)

    def extra_repr(self) -> str:
        return f"{self._base.extra_repr(self)}, {self._noise_repr()}"


class NoisyLinear(_ParameterSharingLayer, nn.Linear):
    """Drop-in ``nn.Linear`` whose weight is perturbed by device variation on every forward.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        variation: the device model (:class:`~nft_cuda.Variation` or any :class:`nft_cuda.devices.DeviceModel`);
            None gives a plain linear layer (mode off).
        mode: ``"train"`` (default when a variation is given), ``"instance"`` (after
            :meth:`set_instance`) or ``"off"`` (default without a variation).
        generator: ``torch.Generator`` on the weight's device for train-mode draws (default: torch's).

    Shapes: input [*, in_features] → output [*, out_features]; weight [out_features, in_features].

    The noise mode is explicit: ``.eval()`` leaves it as it is (still noisy in ``"train"`` mode). For clean
    outputs: ``nft_cuda.set_noise_mode(model, "off")`` or ``with nft_cuda.noise_mode(model, "off"):``.
    """

    _base = nn.Linear

    # Constructor twin of _NoisyConvNd's and NoisyMultiheadAttention's (nn/attention.py): each repeats
    # its torch class's signature, then the same keyword-only noise settings. Kept spelled out: a drop-in
    # layer must show and check the very arguments of its torch class (``*args, **kwargs`` would hide
    # them); the shared part is the one line ``self._init_noise(variation, mode, generator)``.
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        variation: DeviceModel | None = None,
        mode: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_noise(variation, mode, generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        noise = self.forward_noise()
        if noise is None:
            return F.linear(input, self.weight, self.bias)
        out = self._mvm_forward(input, noise)
        if out is not None:
            return out
        if noise.weights is not None:
            return _per_sample(lambda w, chunk: F.linear(chunk, w, self.bias), noise.weights, input)
        rng, sigmas, _ = noise
        compute_dtype = _compute_dtype(input)
        samples = 1 if sigmas is None else sigmas.shape[0]
        if _fused_linear_ok(input, self.weight, samples, compute_dtype, self._variation):
            return _fused_linear(input, self.weight, self.bias, rng, sigmas, self._variation, compute_dtype)
        return _NoisyLinearFn.apply(input, self.weight, self.bias, rng, sigmas, self._variation, compute_dtype)

    # The four steps of an MVM forward (nft_cuda.nn.mvm): the noisy matmul without bias for a one-sample
    # plan, its clean twin (calibration), ‖x‖₂² of each output's input vector and the digital bias.
    def noisy_matmul(self, input: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
        if plan.weights is not None:
            return F.linear(input, plan.weights[0])
        compute_dtype = _compute_dtype(input)
        return _NoisyLinearFn.apply(input, self.weight, None, plan.rng, plan.sigmas, self._variation, compute_dtype)

    def clean_matmul(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight)

    def input_sq_norm(self, input: torch.Tensor) -> torch.Tensor:
        x = input.detach().float()
        return (x * x).sum(-1, keepdim=True)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)


class _NoisyConvNd(_ParameterSharingLayer):
    """The shared body of NoisyConv1d/2d: the constructor of ``_base`` (same signature and state) plus the
    noise settings, and the noisy forward."""

    # Constructor twin of NoisyLinear's (see the note there): nn.ConvNd's signature, spelled out on purpose.
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        variation: DeviceModel | None = None,
        mode: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self._base.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_noise(variation, mode, generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        noise = self.forward_noise()
        if noise is None:
            return self._conv_with_weight(input, self.weight)
        n = self.weight.dim() - 2
        if _mvm.active_mvm(self._variation) is not None and input.dim() == n + 1:
            return self._mvm_forward(input.unsqueeze(0), noise).squeeze(0)  # unbatched, as nn.ConvNd accepts
        out = self._mvm_forward(input, noise)
        if out is not None:
            return out
        if noise.weights is not None:
            return _per_sample(lambda w, chunk: self._conv_with_weight(chunk, w), noise.weights, input)
        if input.dim() == n + 1:  # unbatched input, as nn.ConvNd accepts
            return self._conv_with_rng(input.unsqueeze(0), noise.rng, noise.sigmas).squeeze(0)
        return self._conv_with_rng(input, noise.rng, noise.sigmas)

    def _conv_with_weight(self, input: torch.Tensor, weight: torch.Tensor, bias=_OWN_BIAS) -> torch.Tensor:
        """The plain convolution of ``nn.ConvNd`` with another weight (the same calls as its forward);
        ``bias``: the layer's own by default, or a tensor / None."""
        conv = _CONV[weight.dim() - 2]
        bias = self.bias if bias is _OWN_BIAS else bias
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(input, weight, bias, self.stride, (0,) * (weight.dim() - 2), self.dilation, self.groups)
        return conv(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    # The four steps of an MVM forward (nft_cuda.nn.mvm), as NoisyLinear's; each output position's input
    # vector is its receptive field (its group's channels), so ‖x‖₂² is a convolution of x² with ones.
    def noisy_matmul(self, input: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
        if plan.weights is not None:
            return self._conv_with_weight(input, plan.weights[0], None)
        return self._conv_with_rng(input, plan.rng, plan.sigmas, None)

    def clean_matmul(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_with_weight(input, self.weight, None)

    def input_sq_norm(self, input: torch.Tensor) -> torch.Tensor:
        x = input.detach().float()
        ones = torch.ones(self.weight.shape, dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            return self._conv_with_weight(x * x, ones, None)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        return y + self.bias.to(y.dtype).view(-1, *([1] * (self.weight.dim() - 2)))

    def _conv_with_rng(
        self, input: torch.Tensor, rng: torch.Tensor, sigmas: torch.Tensor | None, bias=_OWN_BIAS
    ) -> torch.Tensor:
        n = self.weight.dim() - 2
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            # As nn.ConvNd: explicit padding (also resolves 'same'/'valid', possibly asymmetric).
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            if any(self._reversed_padding_repeated_twice):
                input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * n
        else:
            padding = tuple(self.padding)
        return _NoisyConvFn.apply(
            input,
            self.weight,
            self.bias if bias is _OWN_BIAS else bias,
            rng,
            sigmas,
            self._variation,
            _compute_dtype(input),
            tuple(self.stride),
            padding,
            tuple(self.dilation),
            self.groups,
        )


class NoisyConv1d(_NoisyConvNd, nn.Conv1d):
    """Drop-in ``nn.Conv1d`` whose weight is perturbed by device variation on every forward.

    Args: as ``nn.Conv1d``, plus ``variation``, ``mode`` and ``generator`` as :class:`NoisyLinear`.

    Shapes: input [N, C_in, L] (or [C_in, L]) → [N, C_out, L_out]; weight [C_out, C_in/groups, k].

    The noise mode is explicit, as :class:`NoisyLinear`'s: ``.eval()`` does not switch the noise off.
    """

    _base = nn.Conv1d


class NoisyConv2d(_NoisyConvNd, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose weight is perturbed by device variation on every forward.

    Args: as ``nn.Conv2d`` (all padding modes, string paddings, groups, dilation), plus ``variation``,
    ``mode`` and ``generator`` as :class:`NoisyLinear`.

    Shapes: input [N, C_in, H, W] (or [C_in, H, W]) → [N, C_out, H_out, W_out];
    weight [C_out, C_in/groups, kh, kw].

    The noise mode is explicit, as :class:`NoisyLinear`'s: ``.eval()`` does not switch the noise off.
    """

    _base = nn.Conv2d


def layer_sharing_parameters(cls: type, module: nn.Module, **noise) -> nn.Module:
    """A ``cls`` layer with the constructor settings of ``module`` (an ``nn.Linear`` or ``nn.ConvNd``,
    noisy or not) that shares its Parameter objects and train/eval flag: the one way both
    ``from_module`` (plain → noisy, ``noise`` = variation/mode/generator) and :func:`nft_cuda.strip`
    (noisy → plain, no ``noise``) rebuild a layer. Built on the meta device, so it allocates nothing."""
    if isinstance(module, nn.Linear):
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta", **noise)
    else:
        new = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            device="meta",
            **noise,
        )
    new.weight = module.weight
    new.bias = module.bias
    new.train(module.training)
    return new


#: plain module class → noisy class
NOISY_CLASSES: dict[type, type] = {nn.Linear: NoisyLinear, nn.Conv1d: NoisyConv1d, nn.Conv2d: NoisyConv2d}
#: noisy class → plain module class
PLAIN_CLASSES: dict[type, type] = {v: k for k, v in NOISY_CLASSES.items()}
