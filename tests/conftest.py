"""Shared fixtures and independent float64 oracles for the nft_cuda core-op tests.

Device parametrisation: "cpu" always; "cuda" only when a GPU is present (the CUDA cases skip
*only* when torch.cuda.is_available() is False). No other device query happens at import.

The helpers below (imported by the test modules with ``from conftest import ...``) are float64
evaluations of DESIGN §2/§3 written here, independently of nft_cuda.reference: only the raw Philox
words come from reference.philox4x32, which test_rng.py pins to the Random123 known-answer vectors.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

CUDA_AVAILABLE = torch.cuda.is_available()

#: Parameter list of devices: CPU always, CUDA skipped only when no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")),
]

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
PRESET_FACTORS = {"RRAM1": 1.0, "FeFET2": 2.0, "RRAM4": 4.0, "FeFET6": 6.0}
_U64 = 2**64
_MASK32 = 0xFFFFFFFF


def require_optional(module: str):
    """The optional package ``module`` (matplotlib, hypothesis, ...), or a skip of the calling test (at module
    level: of the whole module) saying it is missing and how to get every test dependency."""
    return pytest.importorskip(
        module,
        reason=f"needs the optional package {module!r}, which is not installed "
        "(pip install -e .[test] installs every test dependency)",
    )


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: fast on a shared 2-core machine, and the same GEMM blocking
    everywhere (bit-identity across batchings and processes relies on it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Each test using it runs on "cpu" and, when a GPU is present, on "cuda"."""
    return request.param


@pytest.fixture(autouse=True)
def _restore_torch_rng():
    """Save torch's RNG state (CPU and, if present, CUDA), seed deterministically, restore after."""
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if CUDA_AVAILABLE else None
    torch.manual_seed(20240611)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------------------------
# Independent oracles (float64)
# ----------------------------------------------------------------------------------------------


def philox_counters(numel: int, stream: int) -> torch.Tensor:
    """int64 [nq, 4] Philox counters of elements 0..numel-1 in ``stream`` (DESIGN §3 layout)."""
    stream %= _U64
    nq = (numel + 3) // 4
    q = torch.arange(nq, dtype=torch.int64)
    c = torch.empty(nq, 4, dtype=torch.int64)
    c[:, 0] = q & _MASK32
    c[:, 1] = q >> 32
    c[:, 2] = stream & _MASK32
    c[:, 3] = stream >> 32
    return c


def philox_key(seed: int) -> torch.Tensor:
    seed %= _U64
    return torch.tensor([seed & _MASK32, seed >> 32], dtype=torch.int64)


@functools.lru_cache(maxsize=64)
def _normal64_cached(numel: int, seed: int, offset: int, streams: int) -> np.ndarray:
    from nft_cuda import reference

    out = np.empty((streams, numel), dtype=np.float64)
    key = philox_key(seed)
    for t in range(streams):
        words = reference.philox4x32(philox_counters(numel, offset + t), key).numpy().astype(np.float64)
        x = np.floor(words / 512.0)  # x >> 9
        u = (x + 0.5) * 2.0**-23
        r01 = np.sqrt(-2.0 * np.log(u[:, 0]))
        r23 = np.sqrt(-2.0 * np.log(u[:, 2]))
        z = np.stack(
            [
                r01 * np.cos(2.0 * np.pi * u[:, 1]),
                r01 * np.sin(2.0 * np.pi * u[:, 1]),
                r23 * np.cos(2.0 * np.pi * u[:, 3]),
                r23 * np.sin(2.0 * np.pi * u[:, 3]),
            ],
            axis=1,
        )
        out[t] = z.reshape(-1)[:numel]
    out.setflags(write=False)
    return out


def normal64(numel: int, seed: int, offset: int, streams: int = 1) -> torch.Tensor:
    """float64 [streams, numel]: DESIGN §3 normals evaluated in float64 (stream = offset + t mod 2^64)."""
    return torch.from_numpy(_normal64_cached(int(numel), int(seed), int(offset), int(streams)).copy())


def scale_of(state_factor: float, weight_bits: int = 8, device_bits: int = 2) -> float:
    k = weight_bits // device_bits
    a = sum(2 ** (2 * i * device_bits) for i in range(k))
    b = sum(2 ** (i * device_bits) for i in range(k))
    return math.sqrt(a) / b / math.sqrt(0.4 * state_factor**2 + 0.6)


def band_mask(weight: torch.Tensor) -> torch.Tensor:
    """bool mask of the strict state band, decided in float32 as DESIGN §2 prescribes."""
    a = weight.detach().cpu().abs().to(torch.float32)
    if a.numel() == 0:
        return torch.zeros(a.shape, dtype=torch.bool)
    m = a.max()  # float32 max|W|
    t_lo = m * torch.tensor(0.25, dtype=torch.float32)
    t_hi = m * torch.tensor(0.75, dtype=torch.float32)
    return (a > t_lo) & (a < t_hi)


def sigma_w64(weight: torch.Tensor, sigmas, state_factor: float, scale: float) -> torch.Tensor:
    """float64 [S, *shape] per-element σ_w (band in float32, magnitudes in float64), on CPU."""
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
    a = weight.detach().cpu().abs().to(torch.float32)
    m = float(a.max()) if a.numel() else 0.0
    base = sig * m * scale
    band = band_mask(weight).to(torch.float64)
    factor = 1.0 + band * (state_factor - 1.0)
    return base.view((-1,) + (1,) * weight.dim()) * factor.unsqueeze(0)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ulp of |x| in ``dtype`` (spacing to the next representable value away from 0)."""
    a = x.detach().cpu().abs().to(dtype)
    nxt = torch.nextafter(a, torch.full_like(a, float("inf")))
    return nxt.to(torch.float64) - a.to(torch.float64)


def one_error_line(stderr: str) -> str:
    """The CLI's error contract: exactly one line ``nft: error: ...`` on stderr, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("nft: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Noise must reach the output
# ----------------------------------------------------------------------------------------------


def assert_chips_differ(model: torch.nn.Module, inputs: torch.Tensor, seed: int = 0) -> None:
    """Fail unless, for every noisy layer of a converted ``model`` taken alone (the others in mode "off"),
    chips 0 and 1 give different outputs in eval mode under ``torch.no_grad`` and under
    ``torch.inference_mode``, and unless noise mode "off" gives an output different from chip 0.

    Catches modules whose fast path reads their submodules' weights directly (noise silently bypassed):
    a bypassed layer alone changes nothing.
    """
    import nft_cuda

    model.eval()
    layers = nft_cuda.noisy_layers(model)
    assert layers, "the model has no noisy layer"
    for context in (torch.no_grad, torch.inference_mode):
        for name, layer in layers:
            with context():
                outs = []
                for chip in (0, 1):
                    nft_cuda.set_instance(model, seed=seed, instance=chip)
                    for _, other in layers:
                        if other is not layer:
                            other.mode = "off"
                    outs.append(model(inputs))
                with nft_cuda.noise_mode(model, "off"):
                    clean = model(inputs)
            assert not torch.equal(outs[0], outs[1]), (
                f"chips 0 and 1 are identical with only layer '{name}' noisy, under {context.__name__}"
            )
            assert not torch.equal(outs[0], clean), f"layer '{name}' has no effect under {context.__name__}"
