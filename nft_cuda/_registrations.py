"""Fake (meta) kernels and autograd of the compiled ops, so they trace under torch.compile and
pass torch.library.opcheck. Imported once by nft_cuda/__init__.py, only when the extension loaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nft_cuda._autograd import once_differentiable


@torch.library.register_fake("nft_cuda::philox4x32")
def _philox4x32_fake(counter, key):
    torch._check(counter.shape[-1] == 4, lambda: "philox4x32: counter must have shape [..., 4]")
    return counter.new_empty(counter.shape)


@torch.library.register_fake("nft_cuda::philox_normal")
def _philox_normal_fake(rng, numel, streams):
    torch._check(rng.numel() == 2, lambda: "philox_normal: rng must have shape [2]")
    return rng.new_empty((streams, numel), dtype=torch.float32)


@torch.library.register_fake("nft_cuda::perturb")
def _perturb_fake(weight, rng, sigmas, scale, state_factor):
    torch._check(rng.numel() == 2, lambda: "perturb: rng must have shape [2]")
    torch._check(sigmas.dim() == 1, lambda: "perturb: sigmas must be 1-D")
    return weight.new_empty((sigmas.shape[0], *weight.shape))


@torch.library.register_fake("nft_cuda::perturb_device")
def _perturb_device_fake(weight, rng, sigmas, kind, params):
    torch._check(rng.numel() == 2, lambda: "perturb_device: rng must have shape [2]")
    torch._check(sigmas.dim() == 1, lambda: "perturb_device: sigmas must be 1-D")
    return weight.new_empty((sigmas.shape[0], *weight.shape))


def _perturb_setup_context(ctx, inputs, output):
    # Straight-through (DESIGN §2): nothing to save, not even the noise.
    ctx.set_materialize_grads(False)


def _perturb_backward(ctx, grad):
    # perturb and perturb_device: dL/dW = Σ_t dL/dW_noisy[t]; None for every other input.
    # One sample (every noise-injection forward): grad[0] is that sum, a view, not a copy.
    if grad is None:
        return None, None, None, None, None
    return (grad[0] if grad.shape[0] == 1 else grad.sum(0)), None, None, None, None


torch.library.register_autograd("nft_cuda::perturb", _perturb_backward, setup_context=_perturb_setup_context)
torch.library.register_autograd("nft_cuda::perturb_device", _perturb_backward, setup_context=_perturb_setup_context)


# --------------------------------------------------------------------------------------------------
# Variation-sampled matmul (DESIGN §4.2)
# --------------------------------------------------------------------------------------------------


@torch.library.register_fake("nft_cuda::noisy_linear")
def _noisy_linear_fake(x, weight, bias, rng, sigmas, scale, state_factor, shared_input, allow_tf32=False):
    torch._check(rng.numel() == 2, lambda: "noisy_linear: rng must have shape [2]")
    torch._check(sigmas.dim() == 1, lambda: "noisy_linear: sigmas must be 1-D")
    torch._check(weight.dim() == 2, lambda: "noisy_linear: weight must be 2-D")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "noisy_linear: x and weight feature sizes differ")
    if shared_input:
        shape = (sigmas.shape[0], *x.shape[:-1], weight.shape[0])
    else:
        torch._check(x.shape[0] == sigmas.shape[0], lambda: "noisy_linear: x must have samples leading rows")
        shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape)


@torch.library.register_fake("nft_cuda::_noisy_linear_backward_input")
def _noisy_linear_backward_input_fake(grad, weight, rng, sigmas, scale, state_factor, shared_input, allow_tf32=False):
    torch._check(grad.shape[0] == sigmas.shape[0], lambda: "_noisy_linear_backward_input: grad must be [S, ..., N]")
    torch._check(grad.shape[-1] == weight.shape[0], lambda: "_noisy_linear_backward_input: grad must be [S, ..., N]")
    lead = grad.shape[1:-1] if shared_input else grad.shape[:-1]
    return grad.new_empty((*lead, weight.shape[1]))


_NOISY_LINEAR_DOUBLE_BACKWARD_MSG = (
    b"nft_cuda.ops.noisy_linear does not support double backward: its backward regenerates the noise in a "
    b"kernel that is differentiable only once (the straight-through weight gradient has no second derivative)"
)


def _noisy_linear_setup_context(ctx, inputs, output):
    x, weight, bias, rng, sigmas, scale, state_factor, shared_input, allow_tf32 = inputs
    # Only the inputs, the clean weight and the rng: backward regenerates the noise (DESIGN §3).
    ctx.save_for_backward(x, weight, rng, sigmas)
    ctx.args = (scale, state_factor, shared_input, allow_tf32)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.set_materialize_grads(False)


def _straight_through_weight_grad(grad, x, weight, shared_input: bool):
    """dW = Σ_s dY_sᵀ · X_s, no noise (DESIGN §2); with a shared x, Σ_s dY_sᵀ X = (Σ_s dY_s)ᵀ X."""
    n, k = weight.shape
    g = grad.sum(0) if shared_input else grad
    rows = math.prod(g.shape[:-1])
    return g.reshape(rows, n).t().matmul(x.reshape(rows, k).to(grad.dtype)).to(weight.dtype)


def _bias_grad(grad, dtype):
    return grad.reshape(math.prod(grad.shape[:-1]), grad.shape[-1]).sum(0).to(dtype)


def _noisy_linear_backward(ctx, grad):
    if grad is None:
        return None, None, None, None, None, None, None, None, None
    x, weight, rng, sigmas = ctx.saved_tensors
    scale, state_factor, shared_input, allow_tf32 = ctx.args
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.nft_cuda._noisy_linear_backward_input(
            grad, weight, rng, sigmas, scale, state_factor, shared_input, allow_tf32
        ).to(x.dtype)
    if ctx.needs_input_grad[1]:
        gw = _straight_through_weight_grad(grad, x, weight, shared_input)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        gb = _bias_grad(grad, ctx.bias_dtype)
    # The input gradient comes from a kernel without autograd: differentiating it again would silently
    # give wrong (missing) second-order terms, so a double backward raises instead (DESIGN §9).
    gx, gw, gb = once_differentiable((gx, gw, gb), _NOISY_LINEAR_DOUBLE_BACKWARD_MSG)
    return gx, gw, gb, None, None, None, None, None, None


torch.library.register_autograd(
    "nft_cuda::noisy_linear", _noisy_linear_backward, setup_context=_noisy_linear_setup_context
)


# --------------------------------------------------------------------------------------------------
# Snapshot capture (DESIGN §4.3)
# --------------------------------------------------------------------------------------------------


_SNAPSHOT_DOUBLE_BACKWARD_MSG = _NOISY_LINEAR_DOUBLE_BACKWARD_MSG.replace(b"ops.noisy_linear", b"ops.snapshot_linear")


@torch.library.register_fake("nft_cuda::snapshot_linear")
def _snapshot_linear_fake(act, pool, weight, bias, rng, sigmas, scale, state_factor, shared_input, allow_tf32=False):
    torch._check(act.dim() == (4 if shared_input else 5), lambda: "snapshot_linear: act must be [(S,) B, C, H, W]")
    torch._check(weight.dim() == 2, lambda: "snapshot_linear: weight must be 2-D")
    torch._check(
        act.shape[-3] * pool * pool == weight.shape[1],
        lambda: "snapshot_linear: C*pool*pool differs from weight's in_features",
    )
    if not shared_input:
        torch._check(act.shape[0] == sigmas.shape[0], lambda: "snapshot_linear: act must have samples leading rows")
    return act.new_empty((sigmas.shape[0], act.shape[-4], weight.shape[0]))


def _snapshot_linear_setup_context(ctx, inputs, output):
    act, pool, weight, bias, rng, sigmas, scale, state_factor, shared_input, allow_tf32 = inputs
    # The activation, not the snapshot: backward re-pools it (cheap) rather than keeping [B, C·p²].
    ctx.save_for_backward(act, weight, rng, sigmas)
    ctx.args = (pool, scale, state_factor, shared_input, allow_tf32)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.set_materialize_grads(False)


def _snapshot_linear_backward(ctx, grad):
    if grad is None:
        return (None,) * 10
    act, weight, rng, sigmas = ctx.saved_tensors
    pool, scale, state_factor, shared_input, allow_tf32 = ctx.args
    planes = act.reshape(math.prod(act.shape[:-3]), *act.shape[-3:])  # [(S·)B, C, H, W]
    gact = gw = gb = None
    if ctx.needs_input_grad[0]:
        # dSnapshot = Σ_s dY_s · W_noisy_s (noise regenerated), then spread over the pooling windows.
        gsnap = torch.ops.nft_cuda._noisy_linear_backward_input(
            grad, weight, rng, sigmas, scale, state_factor, shared_input, allow_tf32
        )
        gsnap = gsnap.reshape(planes.shape[0], planes.shape[1], pool, pool).to(act.dtype)
        gact = torch.ops.aten._adaptive_avg_pool2d_backward(gsnap, planes).reshape(act.shape)
    if ctx.needs_input_grad[2]:
        snap = F.adaptive_avg_pool2d(planes, pool).reshape(*act.shape[:-3], weight.shape[1])
        gw = _straight_through_weight_grad(grad, snap, weight, shared_input)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        gb = _bias_grad(grad, ctx.bias_dtype)
    gact, gw, gb = once_differentiable((gact, gw, gb), _SNAPSHOT_DOUBLE_BACKWARD_MSG)
    return gact, None, gw, gb, None, None, None, None, None, None


torch.library.register_autograd(
    "nft_cuda::snapshot_linear", _snapshot_linear_backward, setup_context=_snapshot_linear_setup_context
)
