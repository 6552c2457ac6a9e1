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

__all__ = [
    "philox4x32",
    "philox_normal",
    "draw_normal",
    "draw_uniform",
    "philox_normal_blocks",
    "block_counters",
    "normals_of_words",
    "sigma_w",
    "perturb",
    "perturb_device",
    "sampled_linear",
    "noisy_linear",
    "noisy_linear_backward_input",
]

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


#: Draw k of an element uses the Philox block of q_k = (e >> 2) + k·2^56 (DESIGN §3.1).
DRAW_SHIFT = 56
#: Elements must satisfy e < 2^58 so that the draws' counters never collide.
MAX_ELEMENTS = 2**58


def _draw_words(rng: torch.Tensor, numel: int, streams: int, draw: int):
    """The four Philox words [streams, ceil(numel/4)] of draw ``draw`` (blocks q_k, DESIGN §3.1)."""
    if not 0 <= draw < 128:
        raise ValueError(f"draw must be in [0, 128), got {draw}")
    if numel > MAX_ELEMENTS:
        raise ValueError(f"a tensor of {numel} elements exceeds the noise stream's 2^58 elements per draw")
    device = rng.device
    nq = (numel + 3) // 4
    q = torch.arange(nq, dtype=torch.int64, device=device) + (draw << DRAW_SHIFT)
    stream = rng[1] + torch.arange(streams, dtype=torch.int64, device=device)
    q_lo, q_hi = _lo_hi(q)
    s_lo, s_hi = _lo_hi(stream)
    k0, k1 = _lo_hi(rng[0])
    shape = (streams, nq)
    return _philox_words(
        q_lo.expand(shape), q_hi.expand(shape), s_lo[:, None].expand(shape), s_hi[:, None].expand(shape), k0, k1
    )


def _uniform64(x: torch.Tensor) -> torch.Tensor:
    # u = ((x >> 9) + 0.5)·2^-23: exact in float32 (and float64), inside (0, 1).
    return ((x >> 9).to(torch.float64) + 0.5) * 2.0**-23


def draw_normal(rng: torch.Tensor, numel: int, streams: int, draw: int = 0) -> torch.Tensor:
    """float32 [streams, numel]: the normals of draw ``draw`` (Box–Muller of its blocks, DESIGN §3, §3.1)."""
    z = _box_muller(*_draw_words(rng, numel, streams, draw))
    return z.reshape(streams, -1)[:, :numel].to(torch.float32)


def _box_muller(x0, x1, x2, x3) -> torch.Tensor:
    """float64 [..., 4]: the DESIGN §3 normals (lanes 0..3) of Philox blocks given as their four words."""
    u = [_uniform64(x) for x in (x0, x1, x2, x3)]
    r01 = torch.sqrt(-2.0 * torch.log(u[0]))
    r23 = torch.sqrt(-2.0 * torch.log(u[2]))
    a01 = 2.0 * math.pi * u[1]
    a23 = 2.0 * math.pi * u[3]
    return torch.stack([r01 * torch.cos(a01), r01 * torch.sin(a01), r23 * torch.cos(a23), r23 * torch.sin(a23)], dim=-1)


def block_counters(rng: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counter int64 [*q.shape, 4], key int64 [2]): the Philox inputs of blocks ``q`` (int64 block
    counters, read as uint64) in stream rng[1] under key rng[0] (DESIGN §3)."""
    q_lo, q_hi = _lo_hi(q)
    s_lo, s_hi = _lo_hi(rng[1])
    counter = torch.stack((q_lo, q_hi, s_lo.expand(q.shape), s_hi.expand(q.shape)), dim=-1)
    return counter, torch.stack(_lo_hi(rng[0]))


def normals_of_words(words: torch.Tensor) -> torch.Tensor:
    """float32 [..., 4]: the DESIGN §3 normals (Box–Muller in float64) of Philox output words [..., 4]."""
    return _box_muller(*words.unbind(-1)).to(torch.float32)


def philox_normal_blocks(rng: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """float32 [*q.shape, 4]: the DESIGN §3 normals of Philox blocks ``q`` (int64 block counters, read as
    uint64) in stream rng[1] under key rng[0]: lane l of block q is element 4q + l of that stream.

    The general form of :func:`draw_normal` for blocks that are not 0, 1, ... of one draw, e.g. the
    per-MVM read noise (draw 8 at a forward counter, :func:`nft_cuda.mvm_ops.read_noise_normals`)."""
    return normals_of_words(philox4x32(*block_counters(rng, q)))


def draw_uniform(rng: torch.Tensor, numel: int, streams: int, draw: int) -> torch.Tensor:
    """float32 [streams, numel]: the uniforms in (0, 1) of draw ``draw``: lane e & 3 of its block (DESIGN §3.1)."""
    words = torch.stack(_draw_words(rng, numel, streams, draw), dim=-1)
    return _uniform64(words).reshape(streams, -1)[:, :numel].to(torch.float32)


def philox_normal(rng: torch.Tensor, numel: int, streams: int) -> torch.Tensor:
    """float32 [streams, numel]: DESIGN §3 normals of elements 0..numel-1 for streams offset+t (draw 0)."""
    return draw_normal(rng, numel, streams, 0)


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


#: Number of ``params`` of perturb_device per model kind (DESIGN §2.1): 1 PCM, 2 LogNormal, 3 StuckAt.
DEVICE_PARAMS = {1: 10, 2: 0, 3: 2}


def _pcm_final(g, s, z_prog, z_nu, z_read, params):
    """g_f of a PCM device with target conductance g (µS), float64 (DESIGN §2.1)."""
    t, g_max, c0, c1, c2, t0, t_read, drift_scale, read_scale, aihwkit_read = params
    r = g / g_max
    sigma_prog = s * (c0 + c1 * r + c2 * (r * r))
    g_prog = torch.clamp(g + sigma_prog * z_prog, min=0.0)
    g_f = g_prog
    if t > 0 and drift_scale > 0:
        log_r = torch.log(torch.clamp(r, min=1e-7))
        mu = torch.clamp(-0.0155 * log_r + 0.0244, 0.049, 0.1)
        sd = torch.clamp(-0.0125 * log_r - 0.0059, 0.008, 0.045)
        nu = drift_scale * torch.abs(mu + sd * z_nu)
        g_f = g_f * torch.pow(torch.tensor((t + t0) / t0, dtype=torch.float64, device=g.device), -nu)
    t_r = t + t0 if aihwkit_read else t  # aihwkit's 1/f term counts from t + t0
    read_log = math.log((t_r + t_read) / (2.0 * t_read))
    if read_log > 0 and read_scale > 0:
        r_q = g_prog / g_max if aihwkit_read else r  # aihwkit: Q_s of the programmed conductance
        q_s = torch.clamp(0.0088 / torch.clamp(torch.pow(r_q, 0.65), min=1e-3), max=0.2)
        g_f = g_f + read_scale * torch.abs(g_f) * q_s * math.sqrt(read_log) * z_read
    return torch.clamp(g_f, min=0.0) if aihwkit_read else g_f


def _stuck_final(g, s, u, params):
    """g_f of a cell stuck at 0 with p0' = min(s·p0, 1), at 1 (= g_max) with p1' = min(s·p1, 1 − p0')."""
    p0 = torch.clamp(s * params[0], max=1.0)
    p1 = torch.minimum(s * params[1], 1.0 - p0)
    return torch.where(u < p0, torch.zeros_like(g), torch.where(u < p0 + p1, torch.ones_like(g), g))


def perturb_device(
    weight: torch.Tensor, rng: torch.Tensor, sigmas: torch.Tensor, kind: int, params: list[float]
) -> torch.Tensor:
    """[S, *weight.shape]: the weight perturbed by device model ``kind`` (DESIGN §2.1) for each severity
    in ``sigmas`` (S = sigmas.numel(); sample t uses stream offset + t).

    kind: 1 PCM (params [t, G, c0, c1, c2, t0, t_read, drift_scale, read_scale, aihwkit_read]), 2 LogNormal ([]),
    3 StuckAt ([p0, p1]). Computed in float64 from the float32 draws of DESIGN §3.1 and rounded once to
    the weight's dtype; zero perturbations return the weight exactly. Differentiable, straight-through:
    dL/dW = Σ_t dL/dout[t].
    """
    if kind not in DEVICE_PARAMS:
        raise ValueError(f"unknown device-model kind {kind}; perturb_device knows {sorted(DEVICE_PARAMS)}")
    if len(params) != DEVICE_PARAMS[kind]:
        raise ValueError(f"device-model kind {kind} takes {DEVICE_PARAMS[kind]} params, got {len(params)}")
    samples, n = sigmas.numel(), weight.numel()
    s = sigmas.to(torch.float32).to(torch.float64).reshape(samples, 1)
    out = _device_perturbation(
        weight,
        s,
        kind,
        params,
        lambda k: draw_normal(rng, n, samples, k).to(torch.float64),
        lambda k: draw_uniform(rng, n, samples, k).to(torch.float64),
    ).reshape(samples, *weight.shape)
    if weight.requires_grad:  # straight-through: the perturbation is a constant of W
        out = out + (weight - weight.detach()).unsqueeze(0)
    return out


def _device_perturbation(weight, s, kind, params, normal, uniform) -> torch.Tensor:
    """[S, numel] in weight's dtype: the body of :func:`perturb_device`, with the draws taken from
    ``normal(k)`` / ``uniform(k)`` ([S, numel] float64 of draw k), so the same formulas serve the noise
    stream and caller-given normals (:func:`perturb_with_normals`)."""
    n = weight.numel()
    f64 = torch.float64
    w = weight.detach().reshape(1, n).to(f64)
    if kind == 2:
        out = w * torch.exp(s * normal(0))
    else:
        m = _max_abs(weight).to(f64)
        g_max = params[1] if kind == 1 else 1.0
        safe_m = torch.where(m == 0, torch.ones_like(m), m)
        g_pos = g_max * torch.clamp(w, min=0.0) / safe_m
        g_neg = g_max * torch.clamp(-w, min=0.0) / safe_m
        if kind == 1:
            f_pos = _pcm_final(g_pos, s, normal(0), normal(2), normal(4), params)
            f_neg = _pcm_final(g_neg, s, normal(1), normal(3), normal(5), params)
        else:
            f_pos = _stuck_final(g_pos, s, uniform(6), params)
            f_neg = _stuck_final(g_neg, s, uniform(7), params)
        out = w + ((f_pos - g_pos) - (f_neg - g_neg)) * m / g_max
        out = torch.where(m == 0, w, out)
    return out.to(weight.dtype)


#: Standard-normal draws (DESIGN §3.1) a chip of each device-model kind reads per weight element:
#: 0 the bit-sliced Gaussian (draw 0), 1 PCM (draws 0..5: programming, drift and read noise of the
#: two devices of a pair), 2 log-normal (draw 0). Stuck-at cells read uniforms, not normals.
NORMAL_DRAWS = {0: 1, 1: 6, 2: 1}


def perturb_with_normals(weight: torch.Tensor, model, normals: torch.Tensor) -> torch.Tensor:
    """W_noisy [*weight.shape] of one chip of ``model`` (a device model) whose standard-normal draws are
    ``normals`` [D, *weight.shape] (D = NORMAL_DRAWS[model.KERNEL_ID]) instead of the noise stream's.

    Differentiable with respect to ``normals`` (the worst-case search, :mod:`nft_cuda.eval.worst_case`,
    climbs its gradient), not to the weight (detached). Given the stream's own draws of a chip it equals
    :func:`perturb` / :func:`perturb_device` for that chip, since it evaluates the same formulas.
    """
    if getattr(model, "tiled", False):  # each tile scaled by its own max|W| (nft_cuda.devices.tiles)
        import dataclasses

        from nft_cuda.devices.tiles import tiled

        untiled = dataclasses.replace(model, tiles=None)
        return tiled(lambda w: perturb_with_normals(w, untiled, normals).unsqueeze(0), weight.detach(), model.tiles)[0]
    kind = model.KERNEL_ID
    if kind not in NORMAL_DRAWS:
        raise ValueError(f"{model} draws no normals (its cells read uniforms): it has no normal-draw perturbation")
    draws = NORMAL_DRAWS[kind]
    if normals.shape != (draws, *weight.shape):
        raise ValueError(
            f"normals must have shape [{draws}, *weight.shape] = {[draws, *weight.shape]} for {model}, "
            f"got {list(normals.shape)}"
        )
    w = weight.detach()
    if kind == 0:
        sw = sigma_w(
            w, torch.full((1,), model.sigma, dtype=torch.float32, device=w.device), model.scale, model.state_factor
        )[0]
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        noise = (sw * normals[0].to(torch.float32)).to(acc)  # rounded to float32 before the add, as perturb
        return torch.where(sw == 0, w.to(acc), w.to(acc) + noise).to(w.dtype)
    s = torch.full((1, 1), float(torch.tensor(model.sigma, dtype=torch.float32)), dtype=torch.float64, device=w.device)
    flat = normals.reshape(draws, 1, -1).to(torch.float64)
    out = _device_perturbation(w, s, kind, model.kernel_params(), lambda k: flat[k], None)
    return out.reshape(weight.shape)


def sampled_linear(x: torch.Tensor, wn: torch.Tensor, bias: torch.Tensor | None, shared_input: bool) -> torch.Tensor:
    """out[s] = x(s) · wn[s]ᵀ + bias for per-sample weights wn [S, N, K] (x's dtype): the GEMM of noisy_linear.

    ``shared_input``: x [..., K] for every sample; else x [S, ..., K].
    """
    samples, n, k = wn.shape
    wn = wn.to(x.dtype)
    if shared_input:
        lead = x.shape[:-1]
        out = torch.matmul(x.reshape(1, math.prod(lead), k), wn.transpose(1, 2))
    else:
        lead = x.shape[1:-1]
        out = torch.bmm(x.reshape(samples, math.prod(lead), k), wn.transpose(1, 2))
    out = out.reshape(samples, *lead, n)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out


# Signature twin of noisy_linear_backward_input below: each reference function takes the arguments of
# its compiled op (torch.ops.nft_cuda.*) in the op's order, as it stands in for it one to one, so the
# argument lists stay spelled out per op. The op's trailing allow_tf32, ignored here, is keyword-only.
def noisy_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rng: torch.Tensor,
    sigmas: torch.Tensor,
    scale: float,
    state_factor: float,
    shared_input: bool,
    *,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """out[s] = x(s) · perturb(weight)[s]ᵀ + bias (DESIGN §4.2): [S, ..., N] in x's dtype.

    ``shared_input``: x [..., K] for every sample; else x [S, ..., K]. The noisy weight is rounded to
    the weight's dtype (as perturb returns it), then cast to x's dtype. Differentiable (autograd
    through :func:`perturb`: straight-through for the weight). ``allow_tf32`` is accepted for
    signature parity and ignored (torch's own matmul setting applies).
    """
    wn = perturb(weight, rng, sigmas, scale, state_factor)  # [S, N, K]
    return sampled_linear(x, wn, bias, shared_input)


# Signature twin of noisy_linear above: the argument list of its compiled op, see the note there.
def noisy_linear_backward_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    rng: torch.Tensor,
    sigmas: torch.Tensor,
    scale: float,
    state_factor: float,
    shared_input: bool,
    *,
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
