"""Ops of the per-MVM effects (models 4 and 5, docs/device-models.md): converter quantisation, the
bit-sliced weight grid and the fresh per-MVM read noise.

Each is a few element-wise PyTorch operations around the GEMM, with straight-through gradients, so there
is no compiled kernel: a fused one would save one pass over the input or output, not change the result
(the read noise's Philox draws are the DESIGN §3 stream, bit-identical on every backend). They are at the
same time the reference: the tests check them against float64 NumPy.
"""

from __future__ import annotations

import torch

from nft_cuda import reference
from nft_cuda import rng as rng_ops
from nft_cuda._args import check_positive_int

__all__ = [
    "OUTPUT_NOISE_DRAW",
    "READ_NOISE_DRAW",
    "READ_NOISE_ELEMENT_BITS",
    "READ_NOISE_MAX_ELEMENTS",
    "READ_NOISE_COUNTER_BITS",
    "quantize",
    "output_noise",
    "quantize_weight",
    "read_noise",
    "read_noise_normals",
]

#: Draw index k of the read noise in the one noise stream (docs/device-models.md, "One noise stream").
READ_NOISE_DRAW = 8
#: Draw index k of the per-MVM output noise (MVM.output_noise).
OUTPUT_NOISE_DRAW = 9
#: The local element index of one MVM output takes the low 34 bits of e, the forward counter the next 24.
READ_NOISE_ELEMENT_BITS = 34
READ_NOISE_MAX_ELEMENTS = 2**READ_NOISE_ELEMENT_BITS
READ_NOISE_COUNTER_BITS = 24


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward, the identity gradient to ``x`` in the backward."""
    if not x.requires_grad:
        return q
    return x + (q - x).detach()


def quantize(x: torch.Tensor, bits: int, value_range: torch.Tensor | float | None = None) -> torch.Tensor:
    """A b-bit symmetric (mid-tread) converter: ``clamp(round(x/Δ), −n, n)·Δ`` with n = 2^(b−1) − 1 and
    Δ = r/n, so the 2^b − 1 levels k·Δ span [−r, r] and include 0 (aihwkit's ``inp_res = 1/(2^b − 2)``).

    Args:
        x: any float tensor.
        bits: b >= 2.
        value_range: r > 0 (a float or a 0-d tensor, kept on the device); None: max|x| of this tensor.
            r = 0 maps everything to 0.

    Returns:
        x's shape and dtype (computed in float32, float64 for float64 x; ``torch.round``: half to even).
        Straight-through gradient: dL/dx = dL/dout, clipped values included.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 2:
        raise ValueError(f"bits must be an int >= 2, got {bits!r}")
    acc = _compute_dtype(x)
    xd = x.detach().to(acc)
    if value_range is None:
        r = xd.abs().amax() if xd.numel() else torch.zeros((), dtype=acc, device=x.device)
    else:
        r = torch.as_tensor(value_range, dtype=acc, device=x.device)
    n = 2 ** (bits - 1) - 1
    step = r / n
    safe = torch.where(step > 0, step, torch.ones_like(step))
    k = torch.clamp(torch.round(xd / safe), -n, n)
    q = torch.where(step > 0, k * step, torch.zeros_like(xd))
    return _straight_through(x, q.to(x.dtype))


def quantize_weight(weight: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """The weight programmed to its bit-sliced grid: ``round(w/Δ)·Δ`` with Δ = max|W| / (2^weight_bits − 1)
    (the magnitude is an integer of weight_bits bits spread over weight_bits/device_bits cells of
    2^device_bits levels each; the sign is the differential pair). Straight-through gradient."""
    check_positive_int("weight_bits", weight_bits)
    acc = _compute_dtype(weight)
    wd = weight.detach().to(acc)
    m = wd.abs().amax() if wd.numel() else torch.zeros((), dtype=acc, device=weight.device)
    step = m / (2**weight_bits - 1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.where(step > 0, torch.round(wd / safe) * step, wd)
    return _straight_through(weight, q.to(weight.dtype))


def read_noise_normals(
    rng: torch.Tensor, numel: int, counter: torch.Tensor, draw: int = READ_NOISE_DRAW
) -> torch.Tensor:
    """float32 [numel]: the read-noise normals z of one MVM output (docs/device-models.md, model 5), or
    with ``draw`` = :data:`OUTPUT_NOISE_DRAW` those of its output noise.

    Element e of the output (its flat row-major index, e < 2^34) of forward ``counter`` c (an int64 0-d
    tensor, taken mod 2^24) is draw k (8: read noise, 9: output noise) of element (c << 34) | e in stream
    rng[1] under key rng[0]: Philox block q = ((c << 34 | e) >> 2) + k·2^56, lane e & 3 (the DESIGN §3
    layout with the draw offset of the device models' stream). Nothing is read back to the host."""
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be an int >= 0, got {numel!r}")
    if numel > READ_NOISE_MAX_ELEMENTS:
        raise ValueError(
            f"an MVM output of {numel} elements is too large for the read-noise stream (at most 2^34 per forward)"
        )
    nq = (numel + 3) // 4
    c = torch.bitwise_and(counter.to(torch.int64), 2**READ_NOISE_COUNTER_BITS - 1)
    # block of element (c << 34) | e is (c << 32) + (e >> 2): four elements per Philox block
    base = (c << (READ_NOISE_ELEMENT_BITS - 2)) + (draw << reference.DRAW_SHIFT)
    q = base + torch.arange(nq, dtype=torch.int64, device=rng.device)
    return rng_ops.normals_of_blocks(rng, q).reshape(4 * nq)[:numel]


def read_noise(
    sq_norm: torch.Tensor, weight_max: torch.Tensor, sigma: float, rng: torch.Tensor, counter: torch.Tensor
) -> torch.Tensor:
    """The read noise σ_r·max|W|·‖x‖₂·z of one MVM output (detached, float32, ``sq_norm``'s shape).

    ``sq_norm`` holds ‖x‖₂² of the input vector of each output element (broadcast to the output's shape
    by the caller). Per output element this is exactly a fresh N(0, (σ_r·max|W|)²) on every weight of
    its row: Σ_k ε_k·x_k ~ N(0, σ²·‖x‖²), independent across outputs and MVMs."""
    z = read_noise_normals(rng, sq_norm.numel(), counter).view(sq_norm.shape)
    scale = float(sigma) * weight_max.detach().to(torch.float32)
    return scale * torch.sqrt(sq_norm.detach().to(torch.float32)) * z


def output_noise(scale: torch.Tensor, shape: tuple[int, ...], rng: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The output noise ``scale``·z of one MVM output of ``shape`` (detached float32; ``scale`` broadcasts to
    it: σ_out·max|W|·r_in/√T per tile): z is draw 9 of the output's elements at forward ``counter``."""
    numel = 1
    for size in shape:
        numel *= size
    z = read_noise_normals(rng, numel, counter, OUTPUT_NOISE_DRAW).view(shape)
    return scale.detach().to(torch.float32) * z
