"""The autograd Functions of NoisyLinear and NoisyConv1d/2d (DESIGN §2, §3, §5).

Forward draws the noisy weight W_noisy from the layer's rng (exactly ``nft_cuda.ops.perturb``, through
:func:`~nft_cuda.nn.base.perturbed_weights`), applies it and frees it; backward draws it again from the
same rng for the input gradient. Only the input, the clean weight and the rng are saved, so no noisy
weight outlives its use. The weight gradient is straight-through (dL/dW = dL/dW_noisy). With ``sigmas``
(float32 [S]) the batch axis holds S samples and chunk t uses stream offset + t at σ_d = sigmas[t], each
chunk the same computation as a one-sample forward. Under ``torch.autocast`` the noise is drawn in the
weight's dtype and the product runs in the autocast dtype, as ``F.linear``/``F.conv`` would.
"""

from __future__ import annotations

import torch

from nft_cuda._autograd import once_differentiable
from nft_cuda.nn import stacked
from nft_cuda.nn.base import perturbed_weights

__all__ = ["CONV_FUNCTIONS", "NoisyConvFn", "NoisyLinearFn", "autocast_dtype", "cast_to"]

_DOUBLE_BACKWARD_MSG = (
    b"nft_cuda noisy layers do not support double backward: their backward regenerates the noise and "
    b"is differentiable only once (the straight-through weight gradient has no second derivative)"
)


def _save_and_apply(ctx, apply, x, weight, bias, *, rng, sigmas, variation, compute_dtype) -> torch.Tensor:
    """The forward of the noisy autograd Functions: ``apply(x, W_noisy [S, ...], bias)`` (chunk t of the
    batch with W_noisy[t], :mod:`~nft_cuda.nn.stacked`) in the compute dtype, with W_noisy drawn here and
    freed before returning. Saves only the input, the clean weight and the rng (backward regenerates the
    noise, DESIGN §3)."""
    w_noisy = perturbed_weights(weight, rng, variation, sigmas)
    xc = cast_to(x, compute_dtype)
    bc = cast_to(bias, compute_dtype)
    with torch.autocast(x.device.type, enabled=False):
        w_noisy = cast_to(w_noisy, compute_dtype)
        out = apply(xc, w_noisy, bc)
    del w_noisy
    ctx.save_for_backward(xc, weight, rng, sigmas)
    ctx.variation = variation
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, xc.dtype)
    return out


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a matmul/conv of ``x`` in, or None outside autocast."""
    device_type = x.device.type
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_to(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _transposed_linear(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`~nft_cuda.nn.stacked.linear` of weights stored [S, in, out]."""
    return stacked.linear(x, weights.transpose(1, 2), bias)


class NoisyLinearFn(torch.autograd.Function):
    """y = x · W_noisyᵀ + b with W_noisy regenerated in backward (never saved).

    With ``sigmas`` (float32 [S]) the batch axis of x holds S samples of B rows each and chunk t is
    multiplied by the noisy weight of stream offset + t at σ_d = sigmas[t] (the sample axis of OVF and
    batched Monte-Carlo instances); each chunk is the same computation as a one-sample forward.
    ``transposed``: the weight is stored [in, out] (transformers' Conv1D: y = x · W_noisy + b); its noise
    is drawn in that stored shape (element = flat index of [in, out]), as for any crossbar weight.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rng, sigmas, variation, compute_dtype, transposed=False):
        ctx.transposed = transposed
        return _save_and_apply(
            ctx,
            _transposed_linear if transposed else stacked.linear,
            x,
            weight,
            bias,
            rng=rng,
            sigmas=sigmas,
            variation=variation,
            compute_dtype=compute_dtype,
        )

    @staticmethod
    def backward(ctx, grad_out):
        xc, weight, rng, sigmas = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype, c_dtype = ctx.dtypes
        g = grad_out.to(c_dtype)
        gx = gw = gb = None
        with torch.no_grad(), torch.autocast(g.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                w_noisy = perturbed_weights(weight, rng, ctx.variation, sigmas).to(c_dtype)
                gx = stacked.linear_input_grad(g, w_noisy.transpose(1, 2) if ctx.transposed else w_noisy)
                gx = gx.to(x_dtype)
                del w_noisy
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.needs_input_grad[1]:
                # Straight-through: dL/dW = Σ_samples dL/dW_noisy = gᵀx over every row; needs no weight.
                x2 = xc.reshape(-1, xc.shape[-1])
                gw = (x2.t().matmul(g2) if ctx.transposed else g2.t().matmul(x2)).to(w_dtype)
            if b_dtype is not None and ctx.needs_input_grad[2]:
                gb = g2.sum(0).to(b_dtype)
        gx, gw, gb = once_differentiable((gx, gw, gb), _DOUBLE_BACKWARD_MSG)
        return gx, gw, gb, None, None, None, None, None


#: The plain convolution of each number of spatial dimensions (defined with the sample-axis calls).
CONV_FUNCTIONS = stacked.CONV_FUNCTIONS


class NoisyConvFn(torch.autograd.Function):
    """y = conv(x, W_noisy, b) with W_noisy regenerated in backward (never saved). x is pre-padded
    for non-zero padding modes and string paddings, so ``padding`` is a tuple of ints here.
    ``sigmas`` adds a sample axis as in :class:`NoisyLinearFn`."""

    @staticmethod
    def forward(ctx, x, weight, bias, rng, sigmas, variation, compute_dtype, stride, padding, dilation, groups):
        ctx.conv = (stride, padding, dilation, groups)
        return _save_and_apply(
            ctx,
            lambda chunk, w, b: stacked.conv(chunk, w, b, stride, padding, dilation, groups),
            x,
            weight,
            bias,
            rng=rng,
            sigmas=sigmas,
            variation=variation,
            compute_dtype=compute_dtype,
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
                    w_noisy = perturbed_weights(weight, rng, ctx.variation, sigmas).to(c_dtype)
                    gx = stacked.conv_input_grad(g, xc, w_noisy, stride, padding, dilation, groups).to(x_dtype)
                    del w_noisy
        gx, gw, gb = once_differentiable((gx, gw, gb), _DOUBLE_BACKWARD_MSG)
        return gx, gw, gb, None, None, None, None, None, None, None, None
