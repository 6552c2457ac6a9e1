"""Every CUDA kernel of csrc/cuda, run on the CPU by the emulator (csrc/emu, tests/emulator.py), against
the CPU kernels of the built extension (issue 13).

The emulator compiles the same kernel sources as nvcc (csrc/cuda/*.cuh) with the system C++ compiler;
its mma follows the PTX ISA fragment tables (written independently of the kernels' loaders) and checks
that every A/B element is supplied exactly once. Noisy weights and normals must be bit-identical to the
CPU kernels' (scalar normals: NFT_CUDA_CPU_SIMD=0, the emulator evaluates normal4() on the host, as the
CPU's scalar path does); GEMM outputs must match a float64 GEMM of the same compute-type operands to
fp32-accumulation accuracy, and the CPU op within the tolerances of tests/test_noisy_linear.py. A
mutation self-test builds the kernels with deliberate bugs and asserts that the comparisons catch each.
"""

from __future__ import annotations

import emulator as emu_lib
import pytest
import torch
from conftest import FLOAT_DTYPES, PRESET_FACTORS

from nft_cuda import Variation, _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_C, reason="compiled extension not loaded (the CPU kernels are the oracle)")

OPS = torch.ops.nft_cuda
VAR = Variation(0.1, "FeFET2")
U64 = 2**64

# (offset as stored in the int64 rng tensor): the stream carries into its high word at 2^32 - 1 and
# wraps around 2^64 at 2^64 - 2 (S = 3 samples use streams 2^64 - 2, 2^64 - 1, 0).
OFFSETS = [2**32 - 1, U64 - 2]

# name -> (compute op, x dtype, weight dtype, tolerance of tests/test_noisy_linear.py MODES)
GEMM_MODES = {
    "bf16": ("bf16", torch.bfloat16, torch.bfloat16, 2e-2),
    "bf16_w32": ("bf16", torch.bfloat16, torch.float32, 2e-2),
    "fp16": ("fp16", torch.float16, torch.float16, 2e-2),
    "fp16_w32": ("fp16", torch.float16, torch.float32, 2e-2),
    "tf32": ("tf32", torch.float32, torch.float32, 5e-3),
}

# (M, N, K): 1, 2, 3; odd sizes across the 64 x 64 x 32 tile edges; K % 4 != 0 (rows straddle Philox blocks).
GEMM_SHAPES = [(1, 1, 1), (2, 3, 1), (3, 2, 3), (1, 65, 33), (65, 3, 2), (37, 70, 33), (67, 129, 97)]

# (B, C, H, W, p): p > H, global pooling (p = 1), 1 x 1 planes, windows that overlap (H % p != 0).
POOL_SHAPES = [(3, 2, 2, 3, 3), (5, 3, 7, 5, 1), (2, 9, 1, 1, 2), (33, 4, 5, 7, 3), (4, 10, 8, 8, 4)]


@pytest.fixture(scope="session")
def emu() -> emu_lib.Emulator:
    return emu_lib.Emulator(emu_lib.build(0))


@pytest.fixture(autouse=True)
def _scalar_cpu_normals(monkeypatch):
    # The emulator computes normals with normal4() on the host, as the CPU kernels' scalar path does
    # (the SIMD path may differ in the last bit: DESIGN §3 tolerance).
    monkeypatch.setenv("NFT_CUDA_CPU_SIMD", "0")


def rng_tensor(seed: int, offset: int) -> torch.Tensor:
    return torch.tensor([seed, offset if offset < 2**63 else offset - U64], dtype=torch.int64)


# ---- raw words, normals, max|W|, perturb: bit-identical -------------------------------------------


def test_philox_words_bit_identical(emu):
    g = torch.Generator().manual_seed(1)
    counter = torch.randint(0, 2**32, (1001, 4), dtype=torch.int64, generator=g)
    counter[:40] = 2**32 - 1 - torch.randint(0, 4, (40, 4), generator=g)
    for key in ([0, 0], [2**32 - 1, 2**32 - 1], [0xA4093822, 0x299F31D0]):
        k = torch.tensor(key, dtype=torch.int64)
        assert torch.equal(emu.philox4x32(counter, k), OPS.philox4x32(counter, k))


@pytest.mark.parametrize("seed,offset", [(0, 0), (123, 2**32 - 1), (2**63 - 1, U64 - 2)])
@pytest.mark.parametrize("numel", [1, 3, 1003])
def test_normals_bit_identical(emu, seed, offset, numel):
    r = rng_tensor(seed, offset)
    assert torch.equal(emu.philox_normal(r, numel, 3), OPS.philox_normal(r, numel, 3))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_max_abs(emu, dtype):
    g = torch.Generator().manual_seed(2)
    for n in (1, 255, 2049):
        w = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
        assert emu.max_abs(w) == w.abs().max().float().item()
    w = torch.randn(999, dtype=torch.float64).to(dtype)
    w[500] = float("nan")
    assert torch.tensor(emu.max_abs(w)).isnan()


@pytest.mark.parametrize("preset", list(PRESET_FACTORS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_perturb_bit_identical(emu, dtype, preset):
    v = Variation(0.3, preset)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(65, 33, 3, generator=g, dtype=torch.float64).to(dtype)
    w.view(-1)[:64] = torch.tensor([1.0, 0.25, 0.75, 0.5] * 16, dtype=dtype) * w.abs().max()  # band edges
    sig = torch.tensor([0.3, 0.0, 0.1])
    for offset in OFFSETS:
        r = rng_tensor(9, offset)
        got = emu.perturb(w, r, sig, v.scale, v.state_factor)
        want = OPS.perturb(w, r, sig, v.scale, v.state_factor)
        assert torch.equal(got, want), f"offset {offset}: emulated perturb differs from the CPU kernel"
        assert torch.equal(got[1], w)


# (kind, params) of the device models (issue 16): PCM at t = 0 and after a year (drift and read noise on),
# with this library's and aihwkit's read step, LogNormal, StuckAt.
DEVICE_MODELS = {
    "pcm-t0": (1, [0.0, 25.0, 0.26348, 1.9650, -1.1731, 20.0, 250e-9, 1.0, 1.0, 0.0]),
    "pcm-1y": (1, [3.15e7, 25.0, 0.26348, 1.9650, -1.1731, 20.0, 250e-9, 1.5, 2.0, 0.0]),
    "pcm-1h-read-only": (1, [3600.0, 25.0, 0.26348, 1.9650, -1.1731, 20.0, 250e-9, 0.0, 1.0, 0.0]),
    # aihwkit's read step (PCM(aihwkit_read=True)): read noise at t = 0, Q_s at g_p, clamp at 0
    "pcm-t0-aihwkit-read": (1, [0.0, 25.0, 0.26348, 1.9650, -1.1731, 20.0, 250e-9, 1.0, 1.0, 1.0]),
    "pcm-1y-aihwkit-read": (1, [3.15e7, 25.0, 0.26348, 1.9650, -1.1731, 20.0, 250e-9, 1.5, 2.0, 1.0]),
    "lognormal": (2, []),
    "stuck-at": (3, [0.1, 0.05]),
}


@pytest.mark.parametrize("model", list(DEVICE_MODELS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_perturb_device_bit_identical(emu, dtype, model):
    kind, params = DEVICE_MODELS[model]
    g = torch.Generator().manual_seed(4)
    w = torch.randn(65, 33, 3, generator=g, dtype=torch.float64).to(dtype)  # 6435 elements: not a multiple of 4
    w.view(-1)[:4] = torch.tensor([0.0, -0.0, 1e-6, -1e-6], dtype=dtype)
    sig = torch.tensor([1.0, 0.0, 2.5])
    for offset in OFFSETS:
        r = rng_tensor(9, offset)
        got = emu.perturb_device(w, r, sig, kind, params)
        want = OPS.perturb_device(w, r, sig, kind, params)
        assert torch.equal(got, want), f"offset {offset}: emulated perturb_device differs from the CPU kernel"
        # severity 0 at t = 0 or time-independent: the weight (aihwkit's read step adds read noise at t = 0)
        if not model.startswith(("pcm-1y", "pcm-1h")) and "aihwkit-read" not in model:
            assert torch.equal(got[1], w)


def test_tiled_1024x768_layer_through_the_emulated_kernels(emu):
    """Tiles need no kernel of their own (nft_cuda.devices.tiles rescales each tile to the layer's max|W|
    around the per-element kernel): the 1024-input, 768-output layer with 512×512 tiles gives, through
    the emulated CUDA perturb / perturb_device, the CPU's result bit for bit, for both kernels."""
    from nft_cuda import ops
    from nft_cuda.devices import PCM, Tiles
    from nft_cuda.devices.tiles import tiled

    g = torch.Generator().manual_seed(6)
    w = torch.randn(768, 1024, generator=g)
    w[:512, :512] *= 4.0
    tiles = Tiles(max_input_size=512, max_output_size=512)
    r, sig = rng_tensor(5, 2**40 + 3), torch.tensor([0.1, 0.25])
    v = Variation(0.1, "FeFET2", tiles=tiles)
    got = tiled(lambda x: emu.perturb(x, r, sig, v.scale, v.state_factor), w, tiles)
    assert torch.equal(got, ops.perturb(w, v, rng=r, samples=2, sigmas=sig))
    pcm = PCM(time=3600.0, tiles=tiles)
    got = tiled(lambda x: emu.perturb_device(x, r, sig, pcm.KERNEL_ID, pcm.kernel_params()), w, tiles)
    assert torch.equal(got, ops.perturb(w, pcm, rng=r, samples=2, sigmas=sig))
    assert not torch.equal(got, ops.perturb(w, PCM(time=3600.0), rng=r, samples=2, sigmas=sig))


# ---- the fused GEMM --------------------------------------------------------------------------------


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: keep 10 mantissa bits, ties away from zero (finite values)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def compute_round(t: torch.Tensor, op: str) -> torch.Tensor:
    """The value the tensor cores see: the shared tiles hold the compute type."""
    t = t.float()
    if op == "tf32":
        return tf32_round(t).double()
    return t.to(torch.bfloat16 if op == "bf16" else torch.float16).double()


def output_eps(dtype: torch.dtype) -> float:
    return {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]


def assert_gemm_close(out: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, what: str):
    """out (kernel dtype) vs a float64 ref: fp32 accumulation error plus one output rounding."""
    err = (out.double() - ref).abs()
    tol = output_eps(out.dtype) * ref.abs() + 1e-5 * mag + 1e-30
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {bad.numel()} outputs off, worst {(err - tol).max().item():.3g} over tolerance"
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_gemm_inputs(mode: str, m: int, n: int, k: int, samples: int, shared: bool, bias: bool):
    _, xdt, wdt, _ = GEMM_MODES[mode]
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k + samples)
    x = torch.randn((m, k) if shared else (samples, m, k), generator=g).to(xdt)
    w = (torch.randn(n, k, generator=g) / max(k, 1) ** 0.5).to(wdt)
    b = torch.randn(n, generator=g).to(xdt) if bias else None
    sig = torch.tensor([0.1 * (t + 1) for t in range(samples)])
    return x, w, b, sig


def noisy_weights(w, r, sig, op):
    """The CPU kernel's noisy weights [S, N, K] (bit-identical to the device's), in the compute type."""
    return compute_round(OPS.perturb(w, r, sig, VAR.scale, VAR.state_factor), op)


def check_forward(emu, mode, shape, samples, shared, bias, offset, **launch):
    m, n, k = shape
    op, _, _, tol = GEMM_MODES[mode]
    x, w, b, sig = make_gemm_inputs(mode, m, n, k, samples, shared, bias)
    r = rng_tensor(0x1234_5678_9ABC, offset)
    out = emu.noisy_gemm(op, "forward", x, w, b, r, sig, VAR.scale, VAR.state_factor, shared_input=shared, **launch)
    wn = noisy_weights(w, r, sig, op)
    x64 = compute_round(x, op)
    xs = x64.unsqueeze(0) if shared else x64
    ref = xs @ wn.transpose(1, 2)
    mag = xs.abs() @ wn.abs().transpose(1, 2)
    if b is not None:
        ref = ref + b.double()
        mag = mag + b.double().abs()
    assert_gemm_close(out, ref, mag, f"forward {mode} {shape} S={samples}")
    cpu = OPS.noisy_linear(x, w, b, r, sig, VAR.scale, VAR.state_factor, shared, False)
    assert rel_err(out, cpu) <= tol


@pytest.mark.parametrize("mode", list(GEMM_MODES))
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward(emu, mode, shape):
    for samples, shared, bias, offset in (
        (1, True, True, OFFSETS[0]),
        (3, False, False, OFFSETS[1]),
        (3, True, False, OFFSETS[0]),
        (2, False, True, OFFSETS[1]),
    ):
        check_forward(emu, mode, shape, samples, shared, bias, offset)


def check_backward(emu, mode, shape, samples, shared, offset, **launch):
    m, n, k = shape
    op, _, _, tol = GEMM_MODES[mode]
    _, w, _, sig = make_gemm_inputs(mode, m, n, k, samples, True, False)
    dy = torch.randn(samples, m, n, generator=torch.Generator().manual_seed(9)).to(GEMM_MODES[mode][1])
    r = rng_tensor(0xBEEF, offset)
    out = emu.noisy_gemm(
        op, "backward", dy, w, None, r, sig, VAR.scale, VAR.state_factor, shared_input=shared, **launch
    )
    wn = noisy_weights(w, r, sig, op)
    dy64 = compute_round(dy, op)
    ref, mag = dy64 @ wn, dy64.abs() @ wn.abs()
    if shared:
        ref, mag = ref.sum(0), mag.sum(0)
    assert_gemm_close(out, ref, mag, f"backward {mode} {shape} S={samples} shared={shared}")
    cpu = OPS._noisy_linear_backward_input(dy, w, r, sig, VAR.scale, VAR.state_factor, shared, False)
    assert rel_err(out, cpu) <= tol


@pytest.mark.parametrize("mode", list(GEMM_MODES))
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_input(emu, mode, shape):
    for samples, shared, offset in ((1, True, OFFSETS[0]), (3, True, OFFSETS[1]), (3, False, OFFSETS[1])):
        check_backward(emu, mode, shape, samples, shared, offset)


def pooled_fp32(act: torch.Tensor, p: int) -> torch.Tensor:
    """adaptive_avg_pool2d in the kernel's fp32 order (rows, then columns, of each window), flattened."""
    *lead, c, h, w = act.shape
    a = act.float()
    out = torch.empty(*lead, c, p, p)
    for i in range(p):
        h0, h1 = (i * h) // p, -((-(i + 1) * h) // p)
        for j in range(p):
            w0, w1 = (j * w) // p, -((-(j + 1) * w) // p)
            s = torch.zeros(*lead, c)
            for hh in range(h0, h1):
                for ww in range(w0, w1):
                    s = s + a[..., hh, ww]
            out[..., i, j] = s / float((h1 - h0) * (w1 - w0))
    return out.flatten(-3)


def check_pooled(emu, mode, shape, samples, shared, bias, offset, **launch):
    bsz, c, h, wd, p = shape
    op, xdt, wdt, tol = GEMM_MODES[mode]
    g = torch.Generator().manual_seed(bsz + c + h + wd + p)
    act = torch.randn((bsz, c, h, wd) if shared else (samples, bsz, c, h, wd), generator=g).to(xdt)
    n = 70
    w = (torch.randn(n, c * p * p, generator=g) / (c * p * p) ** 0.5).to(wdt)
    b = torch.randn(n, generator=g).to(xdt) if bias else None
    sig = torch.tensor([0.1 * (t + 1) for t in range(samples)])
    r = rng_tensor(77, offset)
    out = emu.noisy_gemm(
        op, "pooled", act, w, b, r, sig, VAR.scale, VAR.state_factor, shared_input=shared, pool=p, **launch
    )
    snap = compute_round(pooled_fp32(act, p), op)
    snap = snap.unsqueeze(0) if shared else snap
    wn = noisy_weights(w, r, sig, op)
    ref, mag = snap @ wn.transpose(1, 2), snap.abs() @ wn.abs().transpose(1, 2)
    if b is not None:
        ref, mag = ref + b.double(), mag + b.double().abs()
    assert_gemm_close(out, ref, mag, f"pooled {mode} {shape} S={samples}")
    cpu = OPS.snapshot_linear(act, p, w, b, r, sig, VAR.scale, VAR.state_factor, shared, False)
    assert rel_err(out, cpu) <= tol


@pytest.mark.parametrize("mode", list(GEMM_MODES))
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_snapshot_forward(emu, mode, shape):
    for samples, shared, bias, offset in ((1, True, True, OFFSETS[0]), (3, False, False, OFFSETS[1])):
        check_pooled(emu, mode, shape, samples, shared, bias, offset)


# ---- split reduction and grid-stride tiles ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["bf16_w32", "fp16", "tf32"])
@pytest.mark.parametrize("parts", [2, 3, 7])
def test_split_reduction(emu, mode, parts):
    # K = 200: 7 slices of 32 split into `parts` ranges (7: one slice each); fp32 partials summed in order.
    offset = OFFSETS[parts % 2]
    check_forward(emu, mode, (37, 70, 200), 3, False, True, offset, parts=parts)
    check_forward(emu, mode, (2, 3, 97), 1, True, False, offset, parts=parts)
    check_pooled(emu, mode, (5, 12, 5, 7, 3), 2, True, True, offset, parts=parts)
    # shared-x backward: the split runs over (sample, slice) pairs, i.e. also over samples
    check_backward(emu, mode, (37, 70, 40), 5, True, offset, parts=parts)
    check_backward(emu, mode, (37, 70, 40), 2, False, offset, parts=parts)
    assert emu.last_parts == parts


def test_split_reduction_is_deterministic(emu):
    x, w, b, sig = make_gemm_inputs("bf16_w32", 37, 70, 200, 2, True, True)
    r = rng_tensor(3, 4)
    runs = [
        emu.noisy_gemm("bf16", "forward", x, w, b, r, sig, VAR.scale, VAR.state_factor, shared_input=True, parts=5)
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_split_heuristic(emu):
    x, w, b, sig = make_gemm_inputs("bf16_w32", 64, 64, 512, 1, True, False)
    r = rng_tensor(3, 4)
    # one tile on 132 SMs: split to reach 2 blocks per SM, but keep >= 4 slices (128-deep) per part
    emu.noisy_gemm("bf16", "forward", x, w, b, r, sig, VAR.scale, VAR.state_factor, shared_input=True)
    assert emu.last_parts == 512 // 32 // 4
    # enough tiles for the device (3 row blocks >= 2 blocks per SM on one SM): no split
    x, w, b, sig = make_gemm_inputs("bf16_w32", 130, 64, 512, 1, True, False)
    emu.noisy_gemm("bf16", "forward", x, w, b, r, sig, VAR.scale, VAR.state_factor, shared_input=True, sm_count=1)
    assert emu.last_parts == 1
    # shallow reductions are never split
    x, w, b, sig = make_gemm_inputs("bf16_w32", 64, 64, 100, 1, True, False)
    emu.noisy_gemm("bf16", "forward", x, w, b, r, sig, VAR.scale, VAR.state_factor, shared_input=True)
    assert emu.last_parts == 1


def test_tiles_beyond_the_grid_loop(emu):
    # A grid capped below the tile count (as CUDA's 65535 limit in y and z caps large problems): the
    # kernel's grid-stride tile loops must still cover every tile, split parts included.
    for cap in ((1, 1, 1), (2, 1, 2)):
        check_forward(emu, "bf16_w32", (130, 140, 70), 3, False, True, OFFSETS[1], grid_cap=cap)
        check_backward(emu, "tf32", (130, 70, 140), 3, True, OFFSETS[0], grid_cap=cap, parts=2)
        check_pooled(emu, "fp16", (65, 20, 5, 7, 3), 2, False, False, OFFSETS[1], grid_cap=cap)
    r = rng_tensor(5, U64 - 2)
    assert torch.equal(emu.philox_normal(r, 101, 5, grid_y=2), OPS.philox_normal(r, 101, 5))


def test_counters_count_the_mma_instructions(emu):
    x, w, b, sig = make_gemm_inputs("bf16", 70, 65, 33, 2, True, False)
    emu.noisy_gemm("bf16", "forward", x, w, b, rng_tensor(1, 2), sig, VAR.scale, VAR.state_factor, shared_input=True)
    # 2 x 2 tiles x 2 samples = 8 blocks, 2 reduction slices of 32, 4 warps x 2 x 4 tiles x 2 k16 steps
    assert emu.counters()["mma"] == 8 * 2 * 4 * 16
    assert emu.counters()["barriers"] == 8 * 2 * 2


@pytest.mark.parametrize("mode", ["bf16_w32", "tf32"])
def test_shared_memory_bank_conflicts(emu, mode):
    # Interior tiles (every size a multiple of the tile, K % 4 == 0): no lane skips an access, so the
    # emulator's lock-step grouping is exact. Sites in first-run order: A-tile store, W-tile store, loads.
    op = GEMM_MODES[mode][0]
    x, w, _, sig = make_gemm_inputs(mode, 64, 128, 128, 1, True, False)
    dy = torch.randn(1, 64, 128).to(x.dtype)
    emu.noisy_gemm(
        op, "backward", dy, w, None, rng_tensor(1, 2), sig, VAR.scale, VAR.state_factor, shared_input=False, parts=1
    )
    sites = emu.site_counters()
    (a_store, w_store), loads = [x for x in sites if x[0]], [x for x in sites if not x[0]]
    assert a_store[2] == a_store[1], "A-tile stores must be conflict-free"
    # the transposed W-tile store (backward) was ~7.6-way before its task mapping was reordered
    assert w_store[2] <= 1.1 * w_store[1], f"backward W-tile store: {w_store[2] / w_store[1]:.2f} wavefronts/request"
    assert all(wf == req for _, req, wf in loads), "mma fragment loads must be conflict-free (padded rows)"


# ---- mutation self-test ------------------------------------------------------------------------------


def check_perturb_tail(emu):
    """perturb of a weight whose size is not a multiple of 4 (a partial last Philox block), fp32."""
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(5))
    r, sig = rng_tensor(9, OFFSETS[0]), torch.tensor([0.3, 0.1])
    got = emu.perturb(w, r, sig, VAR.scale, VAR.state_factor)
    assert torch.equal(got, OPS.perturb(w, r, sig, VAR.scale, VAR.state_factor)), "perturb tail differs"


def mutation_suite(emu) -> list[str]:
    """Failures of a small, fast set of the comparisons above (bf16 activations, fp32 weights)."""
    failures = []
    checks = [
        lambda: check_perturb_tail(emu),
        lambda: check_forward(emu, "bf16_w32", (37, 70, 33), 2, False, True, OFFSETS[1]),
        lambda: check_backward(emu, "bf16_w32", (37, 70, 33), 2, True, OFFSETS[0]),
        lambda: check_pooled(emu, "bf16_w32", (33, 4, 5, 7, 3), 2, False, False, OFFSETS[1]),
    ]
    for check in checks:
        try:
            check()
        except (AssertionError, emu_lib.EmulatorError) as e:
            failures.append(str(e).splitlines()[0])
    return failures


@pytest.fixture(scope="module")
def mutants() -> dict[int, emu_lib.Emulator]:
    return {m: emu_lib.Emulator(path) for m, path in emu_lib.build_all(emu_lib.MUTATIONS).items()}


def test_mutation_suite_passes_on_the_real_kernels(emu):
    assert mutation_suite(emu) == []


@pytest.mark.parametrize("mutation", list(emu_lib.MUTATIONS), ids=lambda m: emu_lib.MUTATIONS[m])
def test_every_mutation_is_caught(mutants, mutation):
    mutant = mutants[mutation]
    assert mutant.mutation == mutation
    failures = mutation_suite(mutant)
    assert failures, f"mutation {mutation} ({emu_lib.MUTATIONS[mutation]}) went unnoticed"
    if mutation in emu_lib.CAUGHT_BY:
        assert any(emu_lib.CAUGHT_BY[mutation] in f for f in failures), failures


def test_race_report_names_the_threads_and_sites(mutants):
    # The removed slice-loop barrier: warp 1's fragment loads of slice u and warp 0's A-tile stores of
    # slice u + 1 fall in one barrier interval.
    with pytest.raises(emu_lib.EmulatorError) as err:
        check_forward(mutants[6], "bf16_w32", (37, 70, 33), 1, True, False, OFFSETS[0])
    msg = str(err.value)
    assert "shared-memory race" in msg and msg.count("thread ") == 2 and msg.count("access site") == 2, msg
    assert "stores" in msg and "loads" in msg and "(block 0,0,0)" in msg, msg


def test_out_of_bounds_report_names_the_allocation(mutants):
    # 35 elements, 2 samples: the tail block of the last sample stores out[70], one element past the end.
    with pytest.raises(emu_lib.EmulatorError) as err:
        check_perturb_tail(mutants[7])
    msg = str(err.value)
    assert "global out-of-bounds store of 4 B" in msg and "byte 280 of 'out', which has 280 B" in msg, msg


# ---- source rules --------------------------------------------------------------------------------


def test_asm_only_in_the_intrinsics_header():
    import pathlib
    import re

    root = pathlib.Path(emu_lib.CSRC)
    hits = [
        str(p.relative_to(root))
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "intrinsics.cuh" and re.search(r"\b(__)?asm(__)?\b", p.read_text())
    ]
    assert hits == [], f"inline assembly outside include/nft_cuda/intrinsics.cuh: {hits}"
