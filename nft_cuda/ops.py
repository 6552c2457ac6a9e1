"""Public operators of nft_cuda.

Each op dispatches to the compiled kernel of the input's device when there is one
(``torch.ops.nft_cuda.*``: C++ on CPU, CUDA on GPUs) and to its pure-PyTorch twin in
:mod:`nft_cuda.reference` otherwise; both produce the same noise for the same rng.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from nft_cuda import _args, _ext, reference
from nft_cuda.devices import COMPENSATION_RULES, DeviceModel, Tiles, Variation
from nft_cuda.devices.tiles import blocks, tiled, unblocks

__all__ = ["perturb", "noisy_linear", "snapshot_linear", "tf32_allowed"]


def perturb(
    weight: torch.Tensor,
    variation: DeviceModel,
    *,
    seed: int | None = None,
    offset: int | None = None,
    rng: torch.Tensor | None = None,
    samples: int = 1,
    sigmas=None,
) -> torch.Tensor:
    """Noisy copies of a weight under device variation (DESIGN §2, §2.1, §4.1).

    Args:
        weight: float32/float64/float16/bfloat16 tensor of any shape and layout. Element e is its
            flat index in the logical row-major shape, whatever the memory layout.
        variation: the device model: a :class:`~nft_cuda.Variation` (σ_d and preset) or any
            :class:`nft_cuda.devices.DeviceModel` (PCM, LogNormal, StuckAt).
        seed, offset: ints in [0, 2^63) keying the noise stream; sample t uses stream offset + t.
        rng: alternatively, an int64 tensor [2] = (seed, offset) on the weight's device, read on
            the device (no host synchronisation). If neither is given, a pair is drawn with
            ``torch.randint`` from torch's default generator.
        samples: number of noisy copies S.
        sigmas: optional per-sample absolute severities (σ_d for a Variation), a 1-D float tensor of
            length S on the weight's device (never read back to the host) or a sequence of floats;
            default variation.sigma.

    Returns:
        Tensor [S, *weight.shape] of the weight's dtype: ``W + σ_w · z_t`` for a Variation, the
        model's per-element function (DESIGN §2.1) otherwise. Differentiable with the
        straight-through gradient dL/dW = Σ_t dL/dout[t] (the noise is a constant).
    """
    _args.check_weight(weight)
    _args.check_device_model(variation)
    samples = _args.check_positive_int("samples", samples)
    rng = _args.resolve_rng(weight.device, seed, offset, rng)
    sig = _args.resolve_sigmas(variation, samples, sigmas, weight.device)
    if variation.tiled:
        return _perturb_tiled(weight, rng, sig, variation)
    if isinstance(variation, Variation):
        if _ext.use_kernel("perturb", weight.device):
            return torch.ops.nft_cuda.perturb(weight, rng, sig, variation.scale, variation.state_factor)
        return reference.perturb(weight, rng, sig, variation.scale, variation.state_factor)
    out = _perturb_device(weight, rng, sig, variation)
    if getattr(variation, "compensating", False):
        programmed = _perturb_device(weight.detach(), rng, sig, variation.programmed())
        out = _compensate_drift(out, programmed, variation.compensation_rule)
    return out


def drift_split(weight: torch.Tensor, model: DeviceModel, *, rng: torch.Tensor, sigmas=None):
    """(W_t, α) of a drift-compensated model (PCM with ``drift_compensation``, t > 0): the drifted weights
    without compensation [S, *weight.shape] and the gains α of its calibration read, float64 [S] (one per
    layer) or [S, T_out, T_in] (one per tile), so that ``perturb(weight, model)`` is α·W_t. The MVM forward
    uses them to apply α to the digital output after the ADC and output noise, as aihwkit does."""
    sig = sigmas if sigmas is not None else torch.full((1,), model.sigma, dtype=torch.float32, device=weight.device)
    plain = dataclasses.replace(model, drift_compensation=False)
    drifted = perturb(weight, plain, rng=rng, samples=sig.shape[0], sigmas=sig)
    programmed = perturb(weight.detach(), plain.programmed(), rng=rng, samples=sig.shape[0], sigmas=sig)
    if model.tiled:
        return drifted, _tile_alphas(drifted, programmed, model.compensation_rule, model.tiles)[:, :, 0, :, 0]
    return drifted, _layer_alphas(drifted, programmed, model.compensation_rule)


def _perturb_tiled(weight: torch.Tensor, rng: torch.Tensor, sig: torch.Tensor, model: DeviceModel) -> torch.Tensor:
    """perturb for a tiled model (:mod:`nft_cuda.devices.tiles`): every tile scaled by its own max|W|, the
    same draws per element as untiled; drift compensation with one α per tile and sample."""
    tiles = model.tiles
    compensate = getattr(model, "compensating", False)
    untiled = dataclasses.replace(model, tiles=None)
    if compensate:
        untiled = dataclasses.replace(untiled, drift_compensation=False)

    def one(m: DeviceModel):
        return lambda w: perturb(w, m, rng=rng, samples=sig.shape[0], sigmas=sig)

    out = tiled(one(untiled), weight, tiles)
    if compensate:
        programmed = tiled(one(untiled.programmed()), weight.detach(), tiles)
        out = _compensate_drift_tiles(out, programmed, model.compensation_rule, tiles)
    return out


def _compensate_drift_tiles(noisy: torch.Tensor, programmed: torch.Tensor, rule: str, tiles: Tiles) -> torch.Tensor:
    """:func:`_compensate_drift` with one α per tile (each tile has its own calibration read)."""
    shape = tuple(noisy.shape[1:])
    alpha = _tile_alphas(noisy, programmed, rule, tiles)
    out = unblocks(blocks(noisy.detach().to(torch.float64), tiles, shape) * alpha, tiles, shape).to(noisy.dtype)
    if noisy.requires_grad:
        out = out + (noisy - noisy.detach())
    return out


def _tile_alphas(noisy: torch.Tensor, programmed: torch.Tensor, rule: str, tiles: Tiles) -> torch.Tensor:
    """float64 [S, T_out, 1, T_in, 1]: the α of each tile (broadcasts against :func:`blocks`)."""
    shape = tuple(noisy.shape[1:])
    f64 = torch.float64
    ref = blocks(programmed.detach().to(f64), tiles, shape)  # [S, n_out, rows, n_in, cols]
    now = blocks(noisy.detach().to(f64), tiles, shape)
    if rule == "one-hot":
        num, den = ref.abs().sum((2, 4), keepdim=True), now.abs().sum((2, 4), keepdim=True)
    elif rule == "all-ones":
        num = ref.sum(4, keepdim=True).abs().sum(2, keepdim=True)
        den = now.sum(4, keepdim=True).abs().sum(2, keepdim=True)
    else:
        raise ValueError(f"rule must be one of {', '.join(map(repr, COMPENSATION_RULES))}, got {rule!r}")
    ones = torch.ones_like(den)
    return torch.where(den == 0, ones, num / torch.where(den == 0, ones, den))


def _perturb_device(weight: torch.Tensor, rng: torch.Tensor, sig: torch.Tensor, model: DeviceModel) -> torch.Tensor:
    """The per-element device function of a non-Variation model: compiled kernel or pure PyTorch."""
    if _ext.use_kernel("perturb_device", weight.device):
        return torch.ops.nft_cuda.perturb_device(weight, rng, sig, model.KERNEL_ID, model.kernel_params())
    return reference.perturb_device(weight, rng, sig, model.KERNEL_ID, model.kernel_params())


def _compensate_drift(noisy: torch.Tensor, programmed: torch.Tensor, rule: str = "one-hot") -> torch.Tensor:
    """Global drift compensation (DESIGN §2.1, docs/device-models.md): each sample's noisy weight W_t times
    one α, estimated by a calibration read of the chip at t = 0 (``programmed``, W_0) and at t:

    - ``rule="one-hot"`` (aihwkit's ``GlobalDriftCompensation``): the one-hot input vectors read every
      weight, α = Σ|W_0| / Σ|W_t| over the whole layer (the ratio of the mean |output|);
    - ``rule="all-ones"``: one all-ones input reads the row sums, α = Σ_n |Σ_k W_0[n, k]| / Σ_n |Σ_k W_t[n, k]|
      (the weight flattened to [out, rest]).

    α = 1 when the denominator is 0. α is a constant of the weight (straight-through gradient)."""
    samples = noisy.shape[0]
    alpha = _layer_alphas(noisy, programmed, rule)
    view = (samples,) + (1,) * (noisy.dim() - 1)
    out = (noisy.detach().to(torch.float64) * alpha.view(view)).to(noisy.dtype)
    if noisy.requires_grad:
        out = out + (noisy - noisy.detach())
    return out


def _layer_alphas(noisy: torch.Tensor, programmed: torch.Tensor, rule: str) -> torch.Tensor:
    """float64 [S]: the α of each sample's whole layer (:func:`_compensate_drift`)."""
    if rule not in COMPENSATION_RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, COMPENSATION_RULES))}, got {rule!r}")
    samples = noisy.shape[0]
    f64 = torch.float64
    ref = programmed.detach().to(f64).reshape(samples, programmed.shape[1] if programmed.dim() > 1 else 1, -1)
    now = noisy.detach().to(f64).reshape(ref.shape)
    if rule == "one-hot":
        num = ref.abs().sum((1, 2))
        den = now.abs().sum((1, 2))
    else:
        num = ref.sum(-1).abs().sum(-1)
        den = now.sum(-1).abs().sum(-1)
    return torch.where(den == 0, torch.ones_like(den), num / torch.where(den == 0, torch.ones_like(den), den))


@torch.compiler.assume_constant_result
def tf32_allowed() -> bool:
    """Whether torch's float32 CUDA matmul setting allows TF32 (``fp32_precision`` or legacy ``allow_tf32``)."""
    m = torch.backends.cuda.matmul
    try:
        precision = m.fp32_precision
    except (AttributeError, RuntimeError):
        precision = None
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    try:
        return bool(m.allow_tf32)
    except RuntimeError:  # legacy and new API mixed: trust the new one
        return False


def _tf32_for(x: torch.Tensor) -> bool:
    """The ``allow_tf32`` flag of the compiled matmul ops for GEMM input ``x``: float32 on CUDA with
    TF32 allowed by torch's setting (:func:`tf32_allowed`)."""
    return x.device.type == "cuda" and x.dtype == torch.float32 and tf32_allowed()


def _check_x(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _args._FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    return x


def _linear_args(
    name: str, x_shape, x_device, weight, bias, variation, *, seed, offset, rng, samples, sigmas, shared_input
):
    """Checks the matmul arguments shared by noisy_linear and snapshot_linear (``name``: the GEMM input's
    argument name, x_shape its shape, [..., K] or [S, ..., K]; the noise arguments by keyword, as the
    public functions take them); returns (samples, rng tensor, sigmas tensor)."""
    _args.check_weight(weight)
    _args.check_device_model(variation)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {list(weight.shape)}")
    if x_device != weight.device:
        raise ValueError(f"{name} is on {x_device} but weight is on {weight.device}")
    if bias is not None:
        _args.check_weight(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    samples = _args.check_positive_int("samples", samples)
    if not isinstance(shared_input, bool):
        raise TypeError(f"shared_input must be a bool, got {type(shared_input).__name__}")
    if len(x_shape) < (1 if shared_input else 2) or x_shape[-1] != weight.shape[1]:
        want = "[..., in_features]" if shared_input else "[samples, ..., in_features]"
        raise ValueError(f"x must be {want} with in_features={weight.shape[1]}, got shape {list(x_shape)}")
    if not shared_input and x_shape[0] != samples:
        raise ValueError(
            f"with shared_input=False {name} must have samples={samples} leading rows, got {list(x_shape)}"
        )
    rng = _args.resolve_rng(weight.device, seed, offset, rng)
    sig = _args.resolve_sigmas(variation, samples, sigmas, weight.device)
    return samples, rng, sig


# Signature twin of snapshot_linear below (the same noise keywords after its own leading arguments): kept
# spelled out, as public API whose help() and keyword checks must show every argument; _linear_args
# holds the checks they share.
def noisy_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    variation: DeviceModel,
    *,
    seed: int | None = None,
    offset: int | None = None,
    rng: torch.Tensor | None = None,
    samples: int = 1,
    sigmas=None,
    shared_input: bool = True,
) -> torch.Tensor:
    """Variation-sampled linear layer (DESIGN §4.2): ``out[t] = x(t) · W_noisy[t]ᵀ + bias`` for t < S.

    The noise of sample t is exactly ``perturb(weight, variation, rng=rng, samples=S, sigmas=sigmas)[t]``,
    so this equals perturb followed by a matmul up to GEMM rounding. On CUDA the noise is generated inside
    the GEMM's weight-tile loads and never written to memory (bf16/fp16 on tensor cores; float32 on TF32
    tensor cores when torch's float32 matmul precision allows TF32, else perturb + cuBLAS); on CPU the
    weight is perturbed into a temporary and multiplied by ATen's GEMM.

    Args:
        x: shared_input=True: [..., K], used by every sample; False: [S, ..., K], one slice per sample.
        weight: [N, K], any float dtype (the noisy weight is rounded to it, then cast to x's dtype).
        bias: [N] or None.
        variation, seed, offset, rng, samples, sigmas: as :func:`perturb` (any device model; models
            other than Variation run as perturb followed by the matmul).

    Returns:
        [S, ..., N] in x's dtype. Differentiable in x, weight (straight-through) and bias; backward
        saves x, the clean weight and rng only, and regenerates the noise. Differentiable once: a double
        backward through the compiled kernel raises RuntimeError (the pure-PyTorch fallback allows it).
    """
    _check_x(x)
    noise = dict(seed=seed, offset=offset, rng=rng, samples=samples, sigmas=sigmas, shared_input=shared_input)
    samples, rng, sig = _linear_args("x", x.shape, x.device, weight, bias, variation, **noise)
    if not isinstance(variation, Variation) or variation.tiled:  # other models, tiles: perturb, then the GEMM
        wn = perturb(weight, variation, rng=rng, samples=samples, sigmas=sig)
        return reference.sampled_linear(x, wn, bias, shared_input)
    allow_tf32 = _tf32_for(x)
    if _ext.use_kernel("noisy_linear", weight.device):
        return torch.ops.nft_cuda.noisy_linear(
            x, weight, bias, rng, sig, variation.scale, variation.state_factor, shared_input, allow_tf32
        )
    return reference.noisy_linear(x, weight, bias, rng, sig, variation.scale, variation.state_factor, shared_input)


# Signature twin of noisy_linear above: spelled out on purpose (public API), see the note there.
def snapshot_linear(
    act: torch.Tensor,
    pool: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    variation: DeviceModel,
    *,
    seed: int | None = None,
    offset: int | None = None,
    rng: torch.Tensor | None = None,
    samples: int = 1,
    sigmas=None,
    shared_input: bool = True,
) -> torch.Tensor:
    """IRS snapshot capture (DESIGN §4.3): ``noisy_linear(flatten(adaptive_avg_pool2d(act, pool), 1), ...)``.

    Args:
        act: the tapped activation [B, C, H, W] (shared_input=False: [S, B, C, H, W]).
        pool: p, the adaptive-average-pool output size (PyTorch's window rule: rows
            floor(i·H/p) .. ceil((i+1)·H/p)); the snapshot is C-major, index c·p² + i·p + j.
        weight: [N, C·p·p]; the rest as :func:`noisy_linear`.

    Returns:
        [S, B, N]. Backward spreads the snapshot gradient back over the pooling windows (autograd of
        the pooling).

    On CUDA, for the dtypes with a fused tensor-core kernel (bf16/fp16, float32 with TF32 allowed), the
    pooling runs inside the GEMM's A-operand loader: each snapshot value is averaged from ``act`` as the
    tile is loaded, so the snapshot [B, C·p²] is never written. Elsewhere (CPU, exact fp32, float64) it
    is ATen's adaptive_avg_pool2d into a small temporary, then the noisy matmul. Backward saves act, the
    clean weight and rng only: dSnapshot = Σ_s dY_s · W_noisy_s with the noise regenerated, spread over
    the windows by the pooling's backward; dW = Σ_s dY_sᵀ · snapshot (re-pooled).
    """
    _check_x(act, "act")
    _args.check_positive_int("pool", pool)
    want_dim = 4 if shared_input else 5
    if act.dim() != want_dim:
        raise ValueError(
            f"act must be {'[B, C, H, W]' if shared_input else '[S, B, C, H, W]'}, got shape {list(act.shape)}"
        )
    if act.shape[-2] < 1 or act.shape[-1] < 1:
        raise ValueError(f"act must have non-empty spatial dims, got shape {list(act.shape)}")
    lead = act.shape[:-3]
    snap_shape = (*lead, act.shape[-3] * pool * pool)
    noise = dict(seed=seed, offset=offset, rng=rng, samples=samples, sigmas=sigmas, shared_input=shared_input)
    samples, rng, sig = _linear_args("act", snap_shape, act.device, weight, bias, variation, **noise)
    if isinstance(variation, Variation) and not variation.tiled and _ext.use_kernel("snapshot_linear", weight.device):
        allow_tf32 = _tf32_for(act)
        return torch.ops.nft_cuda.snapshot_linear(
            act, pool, weight, bias, rng, sig, variation.scale, variation.state_factor, shared_input, allow_tf32
        )
    pooled = F.adaptive_avg_pool2d(act.reshape(math.prod(lead), *act.shape[-3:]), pool)
    snap = pooled.reshape(snap_shape)
    return noisy_linear(snap, weight, bias, variation, rng=rng, samples=samples, sigmas=sig, shared_input=shared_input)
