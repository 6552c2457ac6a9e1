"""The sample axis in one call: S noisy weights stacked [S, *weight.shape] applied to the S chunks of the
batch ([S·B, ...], chunk t = rows t·B … (t+1)·B − 1) by one batched GEMM or one grouped convolution
(DESIGN §5 batched OVF, §6 batched Monte-Carlo), instead of S calls.

- Linear: ``x`` is viewed as [S, B·…, in] and multiplied by the stacked weights with one
  ``torch.baddbmm`` (``bmm`` without bias); the input gradient is one ``bmm``.
- Convolution: the S chunks go side by side along the channel axis ([B, S·C, …]) and the stacked
  weights [S·O, C/g, …] run as one convolution with S·g groups, so group block t sees only chunk t's
  channels and chip t's weight; the input gradient is one grouped ``convolution_backward``.

The noise is the same (the weights are the same tensors); only the GEMM/conv rounding may differ from S
separate calls (on CPU the batched GEMM has matched the per-chunk GEMM bit for bit on the shapes we
tried; the grouped convolution can differ by a few ulps). ``NFT_CUDA_SAMPLE_AXIS`` (or
:func:`sample_axis_calls`) picks the calls (:data:`SAMPLE_AXIS_MODES`): by default stacked GEMMs on every
device and stacked convolutions on CUDA; ``loop`` restores the per-chunk loop of
:func:`~nft_cuda.nn.base.per_sample`, whose every chunk is exactly a one-sample call. With S = 1 all are
the same single call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from nft_cuda.nn.base import check_sample_batch, per_sample

__all__ = [
    "CONV_FUNCTIONS",
    "SAMPLE_AXIS_MODES",
    "conv",
    "conv_input_grad",
    "linear",
    "linear_input_grad",
    "sample_axis_calls",
]

#: "auto" (default): stacked GEMMs everywhere, stacked convolutions on CUDA only (on CPU, oneDNN's grouped
#: convolution measured 1.4-2.3x slower than S plain ones for VGG/small-CNN shapes: docs/design-notes.md);
#: "stacked": one batched GEMM / grouped convolution per layer for the S samples on every device;
#: "loop": one call per sample (:func:`~nft_cuda.nn.base.per_sample`), each exactly a one-sample call.
SAMPLE_AXIS_MODES = ("auto", "stacked", "loop")
_mode = os.environ.get("NFT_CUDA_SAMPLE_AXIS", "auto").strip().lower()
if _mode not in SAMPLE_AXIS_MODES:
    raise ValueError(f"NFT_CUDA_SAMPLE_AXIS must be one of {', '.join(SAMPLE_AXIS_MODES)}; got '{_mode}'")

#: The plain convolution of each number of spatial dimensions.
CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@contextlib.contextmanager
def sample_axis_calls(mode: str) -> Iterator[None]:
    """Within the block, sample-axis forwards and backwards run as ``mode`` (one of :data:`SAMPLE_AXIS_MODES`)."""
    global _mode
    if mode not in SAMPLE_AXIS_MODES:
        raise ValueError(f"sample-axis mode must be one of {', '.join(SAMPLE_AXIS_MODES)}; got {mode!r}")
    old, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = old


def _stacked(weights: torch.Tensor, conv: bool = False) -> bool:
    """Whether the S samples of ``weights`` [S, ...] run as one call (see :data:`SAMPLE_AXIS_MODES`)."""
    if weights.shape[0] == 1 or _mode == "loop":
        return False
    return _mode == "stacked" or not conv or weights.device.type == "cuda"


def _chunks_first(x: torch.Tensor, samples: int) -> torch.Tensor:
    """[S·B, *rest, k] → [S, B·prod(rest), k] (chunk t is row block t), after the shape check."""
    check_sample_batch(x, samples)
    return x.reshape(samples, -1, x.shape[-1])


def linear(x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Chunk t of ``x`` [S·B, …, in] times ``weights[t]`` [out, in] (+ bias), concatenated: [S·B, …, out]."""
    if not _stacked(weights):
        return per_sample(lambda w, chunk: F.linear(chunk, w, bias), weights, x)
    xs = _chunks_first(x, weights.shape[0])
    wt = weights.transpose(1, 2)
    out = torch.bmm(xs, wt) if bias is None else torch.baddbmm(bias, xs, wt)
    # _unsafe_view (what torch.matmul itself returns): the same memory in the output's shape, not marked as
    # a view, since an autograd Function may not return a view of its own intermediate.
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weights.shape[1]))


def linear_input_grad(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """dL/dx of :func:`linear`: chunk t of ``grad`` [S·B, …, out] times ``weights[t]`` [out, in]."""
    if not _stacked(weights):
        return per_sample(lambda w, chunk: torch.matmul(chunk, w), weights, grad)
    out = torch.bmm(_chunks_first(grad, weights.shape[0]), weights)
    return out.reshape(*grad.shape[:-1], weights.shape[2])


def _side_by_side(x: torch.Tensor, samples: int) -> torch.Tensor:
    """[S·B, C, *spatial] → [B, S·C, *spatial]: chunk t's channels become channel block t."""
    check_sample_batch(x, samples)
    b = x.shape[0] // samples
    return x.reshape(samples, b, *x.shape[1:]).transpose(0, 1).reshape(b, samples * x.shape[1], *x.shape[2:])


def _back_to_chunks(y: torch.Tensor, samples: int) -> torch.Tensor:
    """The inverse of :func:`_side_by_side`: [B, S·C, *spatial] → [S·B, C, *spatial]."""
    b, c = y.shape[0], y.shape[1] // samples
    return y.reshape(b, samples, c, *y.shape[2:]).transpose(0, 1).reshape(samples * b, c, *y.shape[2:])


def conv(x, weights, bias, stride, padding, dilation, groups) -> torch.Tensor:
    """Chunk t of ``x`` [S·B, C, *spatial] convolved with ``weights[t]`` [O, C/g, *kernel] (+ bias).
    ``padding`` may be ints or torch's strings; non-zero padding modes are applied by the caller."""
    fn = CONV_FUNCTIONS[weights.dim() - 3]
    if not _stacked(weights, conv=True):
        return per_sample(lambda w, chunk: fn(chunk, w, bias, stride, padding, dilation, groups), weights, x)
    s = weights.shape[0]
    w = weights.reshape(s * weights.shape[1], *weights.shape[2:])
    b = None if bias is None else bias.repeat(s)
    return _back_to_chunks(fn(_side_by_side(x, s), w, b, stride, padding, dilation, groups * s), s)


def conv_input_grad(grad, x, weights, stride, padding, dilation, groups) -> torch.Tensor:
    """dL/dx of :func:`conv` for ``x`` (its shape only) and integer ``padding``."""
    n = weights.dim() - 3
    args = (list(stride), list(padding), list(dilation), False, [0] * n)
    if not _stacked(weights, conv=True):

        def one(w, g, xs):
            return torch.ops.aten.convolution_backward(g, xs, w, None, *args, groups, [True, False, False])[0]

        return per_sample(one, weights, grad, x)
    s = weights.shape[0]
    w = weights.reshape(s * weights.shape[1], *weights.shape[2:])
    b = x.shape[0] // s
    # The input only gives its shape to the input gradient: a one-element tensor expanded to it.
    shape_only = x.new_empty(1).expand(b, s * x.shape[1], *x.shape[2:])
    gx = torch.ops.aten.convolution_backward(
        _side_by_side(grad, s), shape_only, w, None, *args, groups * s, [True, False, False]
    )[0]
    return _back_to_chunks(gx, s)
