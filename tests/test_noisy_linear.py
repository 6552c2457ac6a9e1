"""Variation-sampled matmul (DESIGN §4.2) and snapshot capture (§4.3) against float64 oracles.

CPU always; CUDA cases are parametrised and skip only when no GPU is present. On CUDA, bf16/fp16 and
TF32 run the fused tensor-core kernel (noise generated in the W-tile loads); exact fp32 and float64 run
perturb + cuBLAS. Tolerances are relative Frobenius errors ‖out − ref‖/‖ref‖: exact fp32 1e-5, TF32 5e-3,
bf16/fp16 2e-2.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA_AVAILABLE, DEVICES, normal64, scale_of, sigma_w64

import nft_cuda
from nft_cuda import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded")

SEED, OFFSET = 0x1234_5678_9ABC, 77
VAR = nft_cuda.Variation(0.1, "FeFET2")

# (M rows, N out, K in): none a multiple of the 64x64x32 tiles, K % 4 != 0 (rows straddle Philox blocks).
SHAPES = [(1, 7, 5), (37, 70, 33), (130, 67, 101)]

# name -> (x dtype, weight dtype, tf32, tolerance)
MODES = {
    "fp32": (torch.float32, torch.float32, False, 1e-5),
    "fp64": (torch.float64, torch.float64, False, 1e-5),  # normals are float32 (DESIGN §3)
    "tf32": (torch.float32, torch.float32, True, 5e-3),
    "bf16": (torch.bfloat16, torch.bfloat16, False, 2e-2),
    "bf16_w32": (torch.bfloat16, torch.float32, False, 2e-2),
    "fp16": (torch.float16, torch.float16, False, 2e-2),
    "fp16_w32": (torch.float16, torch.float32, False, 2e-2),
}


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """Sets torch's CUDA float32 matmul precision (new API only) and restores it."""
    m = torch.backends.cuda.matmul
    old = m.fp32_precision
    m.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        yield
    finally:
        m.fp32_precision = old


def cases(device_modes=("fp32", "fp64", "bf16", "bf16_w32", "fp16", "fp16_w32", "tf32")):
    out = []
    for dev in DEVICES:
        name = dev if isinstance(dev, str) else dev.values[0]
        marks = () if isinstance(dev, str) else dev.marks
        for mode in device_modes:
            if mode == "tf32" and name == "cpu":
                continue
            out.append(pytest.param(name, mode, marks=marks, id=f"{name}-{mode}"))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().cpu().to(torch.float64)
    ref = ref.detach().cpu().to(torch.float64)
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def noisy_weight64(w: torch.Tensor, sigmas, seed=SEED, offset=OFFSET) -> torch.Tensor:
    """float64 [S, N, K]: W + σ_w z evaluated in float64 (DESIGN §2/§3), independent of the kernels."""
    s = len(sigmas)
    sw = sigma_w64(w, sigmas, VAR.state_factor, scale_of(VAR.state_factor))
    z = normal64(w.numel(), seed, offset, s).view(s, *w.shape)
    return w.detach().cpu().to(torch.float64).unsqueeze(0) + sw * z


def make(device, mode, m, n, k, samples, shared, bias, requires_grad=False):
    xdt, wdt, _, _ = MODES[mode]
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k + samples)
    x_shape = (m, k) if shared else (samples, m, k)
    x = torch.randn(x_shape, generator=g).to(device=device, dtype=xdt)
    w = (torch.randn(n, k, generator=g) / math.sqrt(max(k, 1))).to(device=device, dtype=wdt)
    b = torch.randn(n, generator=g).to(device=device, dtype=xdt) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, b


def ref_forward64(x, w, b, sigmas, shared):
    wn = noisy_weight64(w, sigmas)  # [S, N, K]
    x64 = x.detach().cpu().to(torch.float64)
    out = (x64.unsqueeze(0) if shared else x64) @ wn.transpose(1, 2)
    if b is not None:
        out = out + b.detach().cpu().to(torch.float64)
    return out, wn


@pytest.mark.parametrize("device,mode", cases())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_matches_float64(device, mode, shape, samples, shared, bias):
    m, n, k = shape
    xdt, _, tf32, tol = MODES[mode]
    x, w, b = make(device, mode, m, n, k, samples, shared, bias)
    sigmas = [0.1 * (t + 1) for t in range(samples)]
    with matmul_precision(tf32) if device == "cuda" else contextlib.nullcontext():
        out = ops.noisy_linear(
            x, w, b, VAR, seed=SEED, offset=OFFSET, samples=samples, sigmas=sigmas, shared_input=shared
        )
    assert out.shape == (samples, m, n) and out.dtype == xdt and out.device.type == device
    assert not torch.isnan(out).any()
    ref, _ = ref_forward64(x, w, b, sigmas, shared)
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("device,mode", cases(("fp32", "bf16", "fp16_w32", "tf32")))
@pytest.mark.parametrize("samples", [1, 2, 5, 8])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_gradients_match_float64(device, mode, samples, shared):
    m, n, k = 45, 66, 35
    _, _, tf32, tol = MODES[mode]
    x, w, b = make(device, mode, m, n, k, samples, shared, True, requires_grad=True)
    sigmas = [0.05 + 0.02 * t for t in range(samples)]
    with matmul_precision(tf32) if device == "cuda" else contextlib.nullcontext():
        out = ops.noisy_linear(
            x, w, b, VAR, seed=SEED, offset=OFFSET, samples=samples, sigmas=sigmas, shared_input=shared
        )
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
        gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    _, wn = ref_forward64(x, w, b, sigmas, shared)
    g64 = g.cpu().to(torch.float64)
    x64 = x.detach().cpu().to(torch.float64)
    gx_ref = g64 @ wn  # [S, M, K]
    if shared:
        gx_ref = gx_ref.sum(0)
        gw_ref = g64.sum(0).t() @ x64
    else:
        gw_ref = sum(g64[t].t() @ x64[t] for t in range(samples))
    gb_ref = g64.reshape(-1, n).sum(0)
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == b.shape
    assert gx.dtype == x.dtype and gw.dtype == w.dtype and gb.dtype == b.dtype
    assert rel_err(gx, gx_ref) <= tol
    assert rel_err(gw, gw_ref) <= tol
    assert rel_err(gb, gb_ref) <= tol


@pytest.mark.parametrize("device,mode", cases(("fp32", "bf16", "fp16", "tf32")))
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_backward_input_op_matches_float64(device, mode, shared):
    samples, m, n, k = 3, 70, 131, 66
    _, wdt, tf32, tol = MODES[mode]
    _, w, _ = make(device, mode, m, n, k, samples, shared, False)
    grad = torch.randn(samples, 2, m // 2, n, generator=torch.Generator().manual_seed(9)).to(device, MODES[mode][0])
    sigmas = torch.tensor([0.1, 0.0, 0.3], device=device)
    dx = torch.ops.nft_cuda._noisy_linear_backward_input(
        grad, w, _rng(device), sigmas, VAR.scale, VAR.state_factor, shared, tf32
    )
    wn = noisy_weight64(w, [0.1, 0.0, 0.3])
    ref = grad.cpu().to(torch.float64) @ wn.unsqueeze(1)
    if shared:
        ref = ref.sum(0)
    assert dx.shape == ref.shape and dx.dtype == grad.dtype
    assert rel_err(dx, ref) <= tol


def _rng(device):
    return torch.tensor([SEED, OFFSET], dtype=torch.int64, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_equals_perturb_then_matmul(device):
    """Same noise as the materialised path: perturb then matmul, sample by sample."""
    x = torch.randn(9, 4, 23, device=device)
    w = torch.randn(17, 23, device=device)
    b = torch.randn(17, device=device)
    out = ops.noisy_linear(x, w, b, VAR, seed=SEED, offset=OFFSET, samples=4)
    wn = ops.perturb(w, VAR, seed=SEED, offset=OFFSET, samples=4)
    for t in range(4):
        torch.testing.assert_close(out[t], F.linear(x, wn[t], b), rtol=1e-5, atol=1e-5)
    # and sample t of a multi-sample call is the one-sample call at offset + t
    one = ops.noisy_linear(x, w, b, VAR, seed=SEED, offset=OFFSET + 2)
    torch.testing.assert_close(out[2], one[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_reference_twin_agrees(device):
    x = torch.randn(3, 6, 13, device=device)
    w = torch.randn(11, 13, device=device)
    sig = torch.tensor([0.1, 0.2, 0.05], device=device)
    out = torch.ops.nft_cuda.noisy_linear(x, w, None, _rng(device), sig, VAR.scale, VAR.state_factor, False)
    ref = nft_cuda.reference.noisy_linear(x, w, None, _rng(device), sig, VAR.scale, VAR.state_factor, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    dx = torch.ops.nft_cuda._noisy_linear_backward_input(g, w, _rng(device), sig, VAR.scale, VAR.state_factor, True)
    dx_ref = nft_cuda.reference.noisy_linear_backward_input(g, w, _rng(device), sig, VAR.scale, VAR.state_factor, True)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,mode", cases(("fp32", "bf16", "tf32")))
def test_poisoned_memory_fully_overwritten(device, mode):
    """Outputs come from freshly allocated memory: fill the allocator's free blocks with NaN first."""
    xdt, wdt, tf32, tol = MODES[mode]
    m, n, k, samples = 77, 90, 51, 3
    if device == "cuda":
        torch.cuda.synchronize()
        for numel in (1 << 12, 1 << 16, 1 << 20):
            junk = torch.full((numel,), float("nan"), device=device, dtype=torch.float32)
            del junk
    x, w, b = make(device, mode, m, n, k, samples, True, True)
    with matmul_precision(tf32) if device == "cuda" else contextlib.nullcontext():
        out = ops.noisy_linear(x, w, b, VAR, seed=SEED, offset=OFFSET, samples=samples)
        dx = torch.ops.nft_cuda._noisy_linear_backward_input(
            out, w, _rng(device), torch.full((samples,), 0.1, device=device), VAR.scale, VAR.state_factor, True, tf32
        )
    assert not torch.isnan(out).any() and not torch.isnan(dx).any()
    ref, _ = ref_forward64(x, w, b, [VAR.sigma] * samples, True)
    assert rel_err(out, ref) <= tol


@pytest.mark.parametrize("device", DEVICES)
def test_edge_sizes(device):
    w = torch.randn(5, 3, device=device)
    # empty batch, empty features, 1-D x
    assert ops.noisy_linear(torch.randn(0, 3, device=device), w, None, VAR, seed=1).shape == (1, 0, 5)
    b = torch.randn(4, device=device)
    out = ops.noisy_linear(
        torch.randn(2, 0, device=device), torch.randn(4, 0, device=device), b, VAR, seed=1, samples=2
    )
    torch.testing.assert_close(out, b.expand(2, 2, 4))
    assert ops.noisy_linear(torch.randn(3, device=device), w, None, VAR, seed=1).shape == (1, 5)
    # zero sigma: the clean linear layer
    x = torch.randn(4, 3, device=device)
    out = ops.noisy_linear(x, w, None, VAR, seed=1, sigmas=[0.0])
    torch.testing.assert_close(out[0], F.linear(x, w))
    # non-contiguous x and weight
    xt = torch.randn(3, 4, device=device).t()
    wt = torch.randn(3, 5, device=device).t()
    out = ops.noisy_linear(xt, wt, None, VAR, seed=2, offset=3)
    ref = ops.noisy_linear(xt.contiguous(), wt.contiguous(), None, VAR, seed=2, offset=3)
    torch.testing.assert_close(out, ref)


def test_argument_errors():
    w = torch.randn(5, 3)
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="in_features"):
        ops.noisy_linear(torch.randn(2, 4), w, None, VAR, seed=1)
    with pytest.raises(ValueError, match="samples"):
        ops.noisy_linear(torch.randn(2, 2, 3), w, None, VAR, seed=1, samples=3, shared_input=False)
    with pytest.raises(ValueError, match="bias"):
        ops.noisy_linear(x, w, torch.randn(4), VAR, seed=1)
    with pytest.raises(ValueError, match="2-D"):
        ops.noisy_linear(x, torch.randn(5, 3, 1), None, VAR, seed=1)
    with pytest.raises(TypeError, match="x must be"):
        ops.noisy_linear(x.long(), w, None, VAR, seed=1)
    with pytest.raises(TypeError, match="variation"):
        ops.noisy_linear(x, w, None, 0.1, seed=1)
    # direct torch.ops callers get the C++ checks
    with pytest.raises(ValueError, match="noisy_linear"):
        torch.ops.nft_cuda.noisy_linear(torch.randn(2, 4), w, None, _rng("cpu"), torch.ones(1), 1.0, 1.0, True)
    with pytest.raises(ValueError, match="_noisy_linear_backward_input"):
        torch.ops.nft_cuda._noisy_linear_backward_input(
            torch.randn(2, 2, 4), w, _rng("cpu"), torch.ones(2), 1.0, 1.0, True
        )


# ------------------------------------------------------------------------------------------------
# Snapshot capture (DESIGN §4.3)
# ------------------------------------------------------------------------------------------------


def adaptive_pool64(act: torch.Tensor, p: int) -> torch.Tensor:
    """float64 [B, C*p*p] snapshot with PyTorch's adaptive window rule, written out explicitly."""
    a = act.detach().cpu().to(torch.float64)
    b, c, h, w = a.shape
    out = torch.empty(b, c, p, p, dtype=torch.float64)
    for i in range(p):
        h0, h1 = (i * h) // p, -((-(i + 1) * h) // p)
        for j in range(p):
            w0, w1 = (j * w) // p, -((-(j + 1) * w) // p)
            out[:, :, i, j] = a[:, :, h0:h1, w0:w1].mean(dim=(2, 3))
    return out.reshape(b, c * p * p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hw", [(32, 32), (16, 16), (8, 8), (7, 13), (5, 3)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pool", [1, 2, 3, 4, 5, 6])
def test_snapshot_linear_equals_pool_flatten_noisy_linear(device, hw, pool):
    h, w_ = hw
    c, n, samples = 3, 10, 2
    act = torch.randn(4, c, h, w_, device=device, requires_grad=True)
    weight = torch.randn(n, c * pool * pool, device=device, requires_grad=True)
    bias = torch.randn(n, device=device, requires_grad=True)
    out = ops.snapshot_linear(act, pool, weight, bias, VAR, seed=SEED, offset=OFFSET, samples=samples)
    snap = torch.flatten(F.adaptive_avg_pool2d(act, pool), 1)
    ref = ops.noisy_linear(snap, weight, bias, VAR, seed=SEED, offset=OFFSET, samples=samples)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # the pooling rule itself, in float64
    snap64 = adaptive_pool64(act, pool)
    out64, wn = ref_forward64(snap64, weight, bias, [VAR.sigma] * samples, True)
    assert rel_err(out, out64) <= 1e-5
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (act, weight, bias), g)
    grads_ref = torch.autograd.grad(ref, (act, weight, bias), g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # dAct spreads dSnapshot = Σ_s g_s · W_noisy_s uniformly over each window
    act64 = act.detach().cpu().to(torch.float64).requires_grad_(True)
    gsnap = (g.cpu().to(torch.float64) @ wn).sum(0)
    (adaptive_pool64_autograd(act64, pool) * gsnap).sum().backward()
    assert rel_err(grads[0], act64.grad) <= 1e-5


def adaptive_pool64_autograd(a: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = a.shape
    cols = []
    for i in range(p):
        h0, h1 = (i * h) // p, -((-(i + 1) * h) // p)
        for j in range(p):
            w0, w1 = (j * w) // p, -((-(j + 1) * w) // p)
            cols.append(a[:, :, h0:h1, w0:w1].mean(dim=(2, 3)))
    return torch.stack(cols, dim=-1).reshape(b, c * p * p)


@pytest.mark.parametrize("device,mode", cases())
@pytest.mark.parametrize(
    "geom", [(5, 3, 8, 8, 3), (70, 4, 7, 13, 6), (2, 2, 5, 3, 4)], ids=lambda g: "b{}c{}_{}x{}_p{}".format(*g)
)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_snapshot_linear_modes_match_float64(device, mode, geom, shared):
    """Every dtype path (on CUDA: the fused pool-in-loader kernel for bf16/fp16/TF32) against float64:
    the pooling rule, the noise, the bias, and the gradients of act (spread over the windows), weight
    (straight-through) and bias. Batches of 70 rows cross the 64-row tile; C·p² is never a tile multiple."""
    b_, c, h, w_, pool = geom
    xdt, wdt, tf32, tol = MODES[mode]
    samples, n = 2, 37
    gen = torch.Generator().manual_seed(b_ * 1000 + pool)
    act = torch.randn(*(() if shared else (samples,)), b_, c, h, w_, generator=gen).to(device, xdt)
    act.requires_grad_(True)
    weight = (0.3 * torch.randn(n, c * pool * pool, generator=gen)).to(device, wdt).requires_grad_(True)
    bias = torch.randn(n, generator=gen).to(device, wdt).requires_grad_(True)
    sigmas = [0.1, 0.25]
    with matmul_precision(tf32) if device == "cuda" else contextlib.nullcontext():
        out = ops.snapshot_linear(
            act, pool, weight, bias, VAR, seed=SEED, offset=OFFSET, samples=samples, sigmas=sigmas, shared_input=shared
        )
        assert out.shape == (samples, b_, n) and out.dtype == xdt
        g = torch.randn(out.shape, generator=gen).to(device, xdt)
        ga, gw, gb = torch.autograd.grad(out, (act, weight, bias), g)
    act64 = act.detach().cpu().to(torch.float64).requires_grad_(True)
    planes = act64.reshape(-1, c, h, w_)
    snap64 = adaptive_pool64_autograd(planes, pool).reshape(*act64.shape[:-3], c * pool * pool)
    wn = noisy_weight64(weight, sigmas)
    out64 = (snap64.unsqueeze(0) if shared else snap64) @ wn.transpose(1, 2) + bias.detach().cpu().double()
    assert rel_err(out, out64) <= tol
    g64 = g.cpu().to(torch.float64)
    (out64 * g64).sum().backward()
    assert rel_err(ga, act64.grad) <= tol
    snap_rows = snap64.detach().reshape(-1, c * pool * pool)
    gw64 = (g64.sum(0) if shared else g64).reshape(-1, n).t() @ snap_rows
    assert rel_err(gw, gw64) <= tol
    assert rel_err(gb, g64.reshape(-1, n).sum(0)) <= tol


def test_snapshot_linear_errors():
    with pytest.raises(ValueError, match="act must be"):
        ops.snapshot_linear(torch.randn(3, 4, 4), 2, torch.randn(2, 12), None, VAR, seed=1)
    with pytest.raises(ValueError, match="pool"):
        ops.snapshot_linear(torch.randn(1, 3, 4, 4), 0, torch.randn(2, 12), None, VAR, seed=1)
    with pytest.raises(ValueError, match="in_features"):
        ops.snapshot_linear(torch.randn(1, 3, 4, 4), 2, torch.randn(2, 13), None, VAR, seed=1)


# ------------------------------------------------------------------------------------------------
# Registration, compile, memory
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
def test_opcheck(device, shared):
    samples = 2
    x = torch.randn(*(() if shared else (samples,)), 5, 9, device=device, requires_grad=True)
    w = torch.randn(6, 9, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    sig = torch.tensor([0.1, 0.2], device=device)
    torch.library.opcheck(
        torch.ops.nft_cuda.noisy_linear.default,
        (x, w, b, _rng(device), sig, VAR.scale, VAR.state_factor, shared, False),
    )
    torch.library.opcheck(
        torch.ops.nft_cuda.noisy_linear.default,
        (x.detach(), w.detach(), None, _rng(device), sig, VAR.scale, VAR.state_factor, shared, False),
    )
    g = torch.randn(samples, 5, 6, device=device)
    torch.library.opcheck(
        torch.ops.nft_cuda._noisy_linear_backward_input.default,
        (g, w.detach(), _rng(device), sig, VAR.scale, VAR.state_factor, shared, False),
    )
    act = torch.randn(*(() if shared else (samples,)), 3, 2, 7, 5, device=device, requires_grad=True)
    ws = torch.randn(6, 2 * 3 * 3, device=device, requires_grad=True)
    for bias in (b, None):
        torch.library.opcheck(
            torch.ops.nft_cuda.snapshot_linear.default,
            (act, 3, ws, bias, _rng(device), sig, VAR.scale, VAR.state_factor, shared, False),
        )


def test_meta_shapes():
    meta = dict(device="meta")
    out = torch.ops.nft_cuda.noisy_linear(
        torch.empty(2, 3, 7, **meta),
        torch.empty(5, 7, **meta),
        None,
        torch.empty(2, dtype=torch.int64, **meta),
        torch.empty(4, **meta),
        1.0,
        1.0,
        True,
    )
    assert out.shape == (4, 2, 3, 5)
    dx = torch.ops.nft_cuda._noisy_linear_backward_input(
        torch.empty(4, 2, 3, 5, **meta),
        torch.empty(5, 7, **meta),
        torch.empty(2, dtype=torch.int64, **meta),
        torch.empty(4, **meta),
        1.0,
        1.0,
        False,
    )
    assert dx.shape == (4, 2, 3, 7)
    snap = torch.ops.nft_cuda.snapshot_linear(
        torch.empty(4, 6, 3, 9, 9, **meta),
        2,
        torch.empty(5, 12, **meta),
        None,
        torch.empty(2, dtype=torch.int64, **meta),
        torch.empty(4, **meta),
        1.0,
        1.0,
        False,
    )
    assert snap.shape == (4, 6, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()

    def step(x, w, b, rng):
        out = ops.noisy_linear(x, w, b, VAR, rng=rng, samples=3)
        return out.square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    x = torch.randn(4, 10, device=device, requires_grad=True)
    w = torch.randn(8, 10, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    rng = _rng(device)
    loss = compiled(x, w, b, rng)
    grads = torch.autograd.grad(loss, (x, w, b))
    loss_ref = step(x, w, b, rng)
    grads_ref = torch.autograd.grad(loss_ref, (x, w, b))
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def _saved_sizes(fn, params):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    ptrs = {p.data_ptr() for p in params}
    return [tuple(t.shape) for t in saved if t.data_ptr() not in ptrs]


@pytest.mark.parametrize("device", DEVICES)
def test_training_step_keeps_no_weight_sized_tensor(device):
    n, k, samples = 64, 48, 4
    w = torch.randn(n, k, device=device, requires_grad=True)
    b = torch.randn(n, device=device, requires_grad=True)
    x = torch.randn(5, k, device=device, requires_grad=True)
    sizes = _saved_sizes(lambda: ops.noisy_linear(x, w, b, VAR, seed=1, samples=samples).sum(), [w])
    assert all(math.prod(s) < n * k for s in sizes), sizes

    layer = nft_cuda.NoisyLinear(k, n, variation=VAR, device=device)
    sizes = _saved_sizes(lambda: layer(x).sum(), [layer.weight])
    assert all(math.prod(s) < n * k for s in sizes), sizes


# ------------------------------------------------------------------------------------------------
# CUDA only: the fused path of NoisyLinear
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [3, 200, 700])
def test_noisy_linear_layer_fused_matches_materialised_cuda(dtype, rows, monkeypatch):
    from nft_cuda.nn import linear

    monkeypatch.setattr(linear, "FUSED_LINEAR_ENABLED", True)

    layer = nft_cuda.NoisyLinear(100, 70, variation=VAR, device="cuda")
    x = torch.randn(rows, 100, device="cuda", requires_grad=True)
    rng = _rng("cuda")
    layer.set_sample_plan(rng)
    assert linear._fused_linear_ok(x, layer.weight, 1, dtype, VAR) == (rows <= linear.FUSED_LINEAR_MAX_ROWS)
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x)
    wn = ops.perturb(layer.weight, VAR, rng=rng)[0].to(dtype)
    ref = F.linear(x.to(dtype), wn, layer.bias.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out, ref) <= 2e-2
    out.float().sum().backward()
    assert rel_err(x.grad, torch.ones(rows, 70, device="cuda", dtype=torch.float64) @ wn.double()) <= 2e-2
    layer.set_sample_plan(None)


@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")
def test_cpu_and_cuda_fused_same_noise():
    x = torch.randn(33, 47)
    w = torch.randn(29, 47)
    cpu = ops.noisy_linear(x, w, None, VAR, seed=SEED, offset=OFFSET, samples=2)
    with matmul_precision(True):
        gpu = ops.noisy_linear(x.cuda().bfloat16(), w.cuda(), None, VAR, seed=SEED, offset=OFFSET, samples=2)
        tf = ops.noisy_linear(x.cuda(), w.cuda(), None, VAR, seed=SEED, offset=OFFSET, samples=2)
    assert rel_err(gpu, cpu) <= 2e-2
    assert rel_err(tf, cpu) <= 5e-3
