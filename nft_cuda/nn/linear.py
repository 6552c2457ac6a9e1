"""The noisy linear layer: :class:`NoisyLinear`, a drop-in ``nn.Linear`` (DESIGN §2, §3, §5).

Its noise, modes and state are those of every noisy layer (:mod:`nft_cuda.nn.base`). Its forward runs
the autograd Function of :mod:`nft_cuda.nn.functions`, the per-MVM effects of :mod:`nft_cuda.nn.mvm` when
the device model asks for them, or, on CUDA and when enabled, the fused variation-sampled matmul
(:data:`FUSED_LINEAR_MAX_ROWS`). ``nn.Linear`` and its subclasses that keep its forward are registered
here (:mod:`nft_cuda.nn.registry`).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda import _ext, ops
from nft_cuda.devices import DeviceModel
from nft_cuda.nn import functions, registry, stacked
from nft_cuda.nn.base import RetypedNoisy, SamplePlan

__all__ = ["FUSED_LINEAR_ENABLED", "FUSED_LINEAR_MAX_ROWS", "NoisyLinear"]

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
    xc = functions.cast_to(x, compute_dtype)
    bc = functions.cast_to(bias, compute_dtype)
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


class NoisyLinear(RetypedNoisy, nn.Linear):
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

    _plain = nn.Linear

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
            return stacked.linear(input, noise.weights, self.bias)
        rng, sigmas, _ = noise
        compute_dtype = functions.autocast_dtype(input)
        samples = 1 if sigmas is None else sigmas.shape[0]
        if _fused_linear_ok(input, self.weight, samples, compute_dtype, self._variation):
            return _fused_linear(input, self.weight, self.bias, rng, sigmas, self._variation, compute_dtype)
        return functions.NoisyLinearFn.apply(input, self.weight, self.bias, rng, sigmas, self._variation, compute_dtype)

    # The four steps of an MVM forward (nft_cuda.nn.mvm): the noisy matmul without bias for a one-sample
    # plan, its clean twin (calibration), ‖x‖₂² of each output's input vector and the digital bias.
    def noisy_matmul(self, input: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
        if plan.weights is not None:
            return F.linear(input, plan.weights[0])
        compute_dtype = functions.autocast_dtype(input)
        return functions.NoisyLinearFn.apply(
            input, self.weight, None, plan.rng, plan.sigmas, self._variation, compute_dtype
        )

    def clean_matmul(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight)

    def input_sq_norm(self, input: torch.Tensor) -> torch.Tensor:
        x = input.detach().float()
        return (x * x).sum(-1, keepdim=True)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    # The per-tile MVM (nft_cuda.nn.mvm, crossbar tiles): the inputs of each of the T_in tiles
    # (devices.TileLayout), stacked first ([T_in, *batch, cols], smaller tiles zero-padded), and their
    # partial products in one batched GEMM.
    tile_output_dim = -1

    def tile_inputs(self, input: torch.Tensor, layout) -> torch.Tensor:
        x = input
        if layout.inputs_padded:  # equal tiles are a view: no gather forward, no scatter backward
            x = F.pad(input, (0, 1)).index_select(-1, layout.in_index.flatten())
        return x.reshape(*input.shape[:-1], *layout.in_index.shape).movedim(-2, 0)

    def tile_matmul(self, xb: torch.Tensor, weight: torch.Tensor, layout) -> torch.Tensor:
        tiles, cols = layout.in_index.shape
        w = weight
        if layout.inputs_padded:
            w = F.pad(weight, (0, 1)).index_select(1, layout.in_index.flatten())
        wb = w.reshape(weight.shape[0], tiles, cols).permute(1, 2, 0).to(xb.dtype)  # [T_in, cols, O]
        out = torch.bmm(xb.reshape(tiles, -1, cols), wb)
        return out.reshape(*xb.shape[:-1], weight.shape[0])

    def tile_sq_norm(self, xb: torch.Tensor) -> torch.Tensor:
        x = xb.detach().float()
        return (x * x).sum(-1, keepdim=True)


registry.register_class(nn.Linear, NoisyLinear, subclasses=True)
