"""Pure-PyTorch twins of every nft_cuda op: the fallback and the oracle of the tests.

Written for clarity and exactness, not speed; torch.compile-friendly (no data-dependent Python
control flow). They follow Note [nft Philox counter layout] (csrc/include/nft_cuda/philox.h) word
for word, so the raw uint32 words and state-band decisions are bit-identical to the C++ and CUDA
kernels; normals are evaluated in float64 and rounded to float32.

Unsigned 32-bit arithmetic is emulated in int64: a 32x32-bit product is split into 16-bit halves
of the constant so that no intermediate exceeds 2^49.
"""

from __future__ import annotations

import math

import torch

__all__ = ["philox4x32", "philox_normal", "philox_normal_blocks", "sigma_w", "perturb", "noisy_linear", "noisy_linear_backward_input"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of a * m for int64 tensors a in [0, 2^32) and a constant m < 2^32."""
    p = a * (m & 0xFFFF)  # < 2^48
    q = a * (m >> 16)  # < 2^48
    lo = (p + ((q & 0xFFFF) << 16)) & _MASK32
    hi = (q + (p >> 16)) >> 16
    return hi, lo


def _philox_words(c0, c1, c2, c3, k0, k1):
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def philox4x32(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Raw Philox4x32-10: counter int64 [..., 4], key int64 [2] (words in [0, 2^32)) -> int64 [..., 4]."""
    c0, c1, c2, c3 = counter.unbind(-1)
    out = _philox_words(c0, c1, c2, c3, key[0], key[1])
    return torch.stack(out, dim=-1)


def _lo_hi(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Two's-complement bits of an int64, so a wrapped (offset + t) still gives the uint64 words.
    return x & _MASK32, (x >> 32) & _MASK32


def philox_normal(rng: torch.Tensor, numel: int, streams: int) -> torch.Tensor:
    """float32 [streams, numel]: DESIGN §3 normals of elements 0..numel-1 for streams offset+t."""
    device = rng.device
    nq = (numel + 3) // 4
    q = torch.arange(nq, dtype=torch.int64, device=device)
    stream = rng[1] + torch.arange(streams, dtype=torch.int64, device=device)
    q_lo, q_hi = _lo_hi(q)
    s_lo, s_hi = _lo_hi(stream)
    k0, k1 = _lo_hi(rng[0])
    shape = (streams, nq)
    x0, x1, x2, x3 = _philox_words(
        q_lo.expand(shape), q_hi.expand(shape), s_lo[:, None].expand(shape), s_hi[:, None].expand(shape), k0, k1
    )
    z = _box_muller(x0, x1, x2, x3)
    return z.reshape(streams, 4 * nq)[:, :numel].to(torch.float32)


def _box_muller(x0, x1, x2, x3) -> torch.Tensor:
    """float64 [..., 4]: the DESIGN §3 normals (lanes 0..3) of Philox blocks given as their four words."""
    u = [((x >> 9).to(torch.float64) + 0.5) * 2.0**-23 for x in (x0, x1, x2, x3)]
    r01 = torch.sqrt(-2.0 * torch.log(u[0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[2]))
    a01 = 2.0 * math.pi * u[1]
    a23 = 2.0 * math.pi * u[3]
    return torch.stack([r01 * torch.cos(a01), r01 * torch.sin(a01), r23 * torch.cos(a23), r23 * torch.sin(a23)], dim=-1)


def philox_normal_blocks(rng: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float32 [*q.shape, 4]: the DESIGN §3 normals of Philox blocks ``q`` (int64 block counters, read as
    uint64) in stream rng[1] under key rng[0]: lane l of block q is element 4q + l of that stream.

    The general form of :func:`philox_normal` (blocks 0, 1, ... of consecutive streams) for draws that
    live at other block counters, e.g. the per-MVM read noise (draw k = 8, docs/device-models.md)."""
    q_lo, q_hi = _lo_hi(q)
    s_lo, s_hi = _lo_hi(rng[1])
    k0, k1 = _lo_hi(rng[0])
    words = _philox_words(q_lo, q_hi, s_lo.expand(q.shape), s_hi.expand(q.shape), k0, k1)
    return _box_muller(*words).to(torch.float32)


def _max_abs(weight: torch.Tensor) -> torch.Tensor:
    if weight.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=weight.device)
    return weight.detach().abs().amax().to(torch.float32)


def sigma_w(weight: torch.Tensor, sigmas: torch.Tensor, scale: float, state_factor: float) -> torch.Tensor:
    """float32 [S, *weight.shape]: per-element σ_w for each per-sample σ_d in ``sigmas`` (DESIGN §2).

    Evaluated in float32 in the same order as csrc/include/nft_cuda/variation.h, so the state-band
    decisions are bit-identical to the kernels.
    """
    f32 = dict(dtype=torch.float32, device=weight.device)
    m = _max_abs(weight)
    t_lo = m * torch.tensor(0.25, **f32)
    t_hi = m * torch.tensor(0.75, **f32)
    sig = sigmas.to(torch.float32)
    base = (sig * m) * torch.tensor(scale, **f32)
    base = torch.where(sig < 0, torch.full_like(base, float("nan")), base)
    inside = base * torch.tensor(state_factor, **f32)
    abs_w = weight.detach().abs().to(torch.float32)
    band = (abs_w > t_lo) & (abs_w < t_hi)
    view = (-1,) + (1,) * weight.dim()
    return torch.where(band.unsqueeze(0), inside.view(view), base.view(view))


def perturb(
    weight: torch.Tensor, rng: torch.Tensor, sigmas: torch.Tensor, scale: float, state_factor: float
) -> torch.Tensor:
    """[S, *weight.shape]: W + σ_w · z_t for t < S = sigmas.numel() (DESIGN §2, §4.1).

    Differentiable: the noise is a constant, so dL/dW = Σ_t dL/dW_noisy[t] (straight-through).
    """
    samples = sigmas.numel()
    n = weight.numel()
    sw = sigma_w(weight, sigmas, scale, state_factor)
    z = philox_normal(rng, n, samples).view(sw.shape)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    noise = (sw * z).to(acc)
    w = weight.to(acc).unsqueeze(0)
    out = torch.where(sw == 0, w, w + noise)
    return out.to(weight.dtype)


# Signature twin of noisy_linear_backward_input below: each reference function takes exactly the
# arguments of its compiled op (torch.ops.nft_cuda.*), which it stands in for one to one, so the
# argument lists stay spelled out per op.
def noisy_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rng: torch.Tensor,
    sigmas: torch.Tensor,
    scale: float,
    state_factor: float,
    shared_input: bool,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """out[s] = x(s) · perturb(weight)[s]ᵀ + bias (DESIGN §4.2): [S, ..., N] in x's dtype.

    ``shared_input``: x [..., K] for every sample; else x [S, ..., K]. The noisy weight is rounded to
    the weight's dtype (as perturb returns it), then cast to x's dtype. Differentiable (autograd
    through :func:`perturb`: straight-through for the weight). ``allow_tf32`` is accepted for
    signature parity and ignored (torch's own matmul setting applies).
    """
    samples = sigmas.numel()
    wn = perturb(weight, rng, sigmas, scale, state_factor).to(x.dtype)  # [S, N, K]
    k = weight.shape[1]
    if shared_input:
        lead = x.shape[:-1]
        out = torch.matmul(x.reshape(1, math.prod(lead), k), wn.transpose(1, 2))
        out = out.reshape(samples, *lead, weight.shape[0])
    else:
        lead = x.shape[1:-1]
        out = torch.bmm(x.reshape(samples, math.prod(lead), k), wn.transpose(1, 2))
        out = out.reshape(samples, *lead, weight.shape[0])
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out


# Signature twin of noisy_linear above: the argument list of its compiled op, see the note there.
def noisy_linear_backward_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    rng: torch.Tensor,
    sigmas: torch.Tensor,
    scale: float,
    state_factor: float,
    shared_input: bool,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """dX of :func:`noisy_linear`: grad [S, ..., N] · perturb(weight)[s], summed over s if shared_input."""
    samples = sigmas.numel()
    wn = perturb(weight.detach(), rng, sigmas, scale, state_factor).to(grad.dtype)
    n, k = weight.shape
    dx = torch.bmm(grad.reshape(samples, math.prod(grad.shape[1:-1]), n), wn)
    if shared_input:
        return dx.sum(0).reshape(*grad.shape[1:-1], k)
    return dx.reshape(*grad.shape[:-1], k)
