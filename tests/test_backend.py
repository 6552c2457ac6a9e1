"""backend_info() and the pure-PyTorch fallback switches (DESIGN §5, nft_cuda/_ext.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nft_cuda
from nft_cuda import Variation, _ext, ops, rng

REPO = Path(__file__).resolve().parents[1]
BACKENDS = {"C++ kernel", "CUDA kernel", "pure PyTorch"}


def _run_python(code: str, **env_overrides) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for name in ("NFT_CUDA_FORCE_FALLBACK", "NFT_CUDA_STRICT"):
        env.pop(name, None)
    env.update(env_overrides)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_backend_info_structure():
    info = nft_cuda.backend_info()
    for key in ("extension", "load_error", "cuda_compiled", "cuda_version", "cuda_available", "strict", "ops"):
        assert key in info, f"backend_info() lacks {key!r}"
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["strict"], bool)
    assert info["cuda_available"] == torch.cuda.is_available()
    assert set(info["ops"]) == set(_ext.OPS)
    for op, per_device in info["ops"].items():
        assert set(per_device) == {"cpu", "cuda"}, op
        assert per_device["cpu"] in {"C++ kernel", "pure PyTorch"}
        assert per_device["cuda"] in {"CUDA kernel", "pure PyTorch"}
    if info["cuda_compiled"]:
        assert isinstance(info["cuda_version"], int) and info["cuda_version"] > 0
    else:
        assert info["cuda_version"] is None


def test_backend_info_with_extension_loaded():
    if not _ext.HAS_C:
        pytest.skip(f"compiled extension not loaded: {_ext.LOAD_ERROR}")
    info = nft_cuda.backend_info()
    assert info["load_error"] is None
    assert info["extension"] and Path(info["extension"]).exists()
    for op in _ext.OPS:
        assert info["ops"][op]["cpu"] == "C++ kernel", op
        expected_cuda = "CUDA kernel" if info["cuda_compiled"] else "pure PyTorch"
        assert info["ops"][op]["cuda"] == expected_cuda, op
    assert _ext.use_kernel("perturb", torch.device("cpu"))


_FALLBACK_SCRIPT = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import nft_cuda
    import torch
    from nft_cuda import Variation, ops, rng, _ext
    info = nft_cuda.backend_info()
    w = torch.linspace(-1.0, 1.0, 3 * 5 * 7).view(3, 5, 7)
    out = ops.perturb(w, Variation(0.2, "FeFET2"), seed=11, offset=2**63 - 2, samples=3)
    z = rng.normal(1029, 5, 2**63 - 2, streams=3)
    words = rng.philox4x32(torch.arange(64, dtype=torch.int64).view(16, 4) * 67108859 % 2**32,
                           torch.tensor([0xDEADBEEF, 7]))
    grad_w = w.clone().requires_grad_(True)
    ops.perturb(grad_w, Variation(0.2, "FeFET2"), seed=11, samples=2).sum().backward()
runtime = [w_ for w_ in caught if issubclass(w_.category, RuntimeWarning)]
assert not _ext.HAS_C
torch.save({"out": out, "z": z, "words": words, "grad": grad_w.grad, "info": info,
            "warnings": [str(w_.message) for w_ in runtime]}, OUT)
"""


def test_force_fallback_subprocess(tmp_path):
    path = tmp_path / "fallback.pt"
    code = f"OUT = {str(path)!r}\n" + _FALLBACK_SCRIPT
    proc = _run_python(code, NFT_CUDA_FORCE_FALLBACK="1")
    assert proc.returncode == 0, f"fallback import/run failed:\n{proc.stderr[-4000:]}"
    res = torch.load(path, weights_only=False)

    assert len(res["warnings"]) == 1, f"expected exactly one RuntimeWarning, got {res['warnings']}"
    msg = res["warnings"][0]
    assert "pure-PyTorch" in msg or "pure PyTorch" in msg, msg
    info = res["info"]
    assert info["extension"] is None and info["load_error"]
    assert not info["cuda_compiled"]
    for op in _ext.OPS:
        assert info["ops"][op] == {"cpu": "pure PyTorch", "cuda": "pure PyTorch"}, op

    # Same results as the compiled path in this process (words bit-identical, normals to 1e-5).
    w = torch.linspace(-1.0, 1.0, 3 * 5 * 7).view(3, 5, 7)
    out = ops.perturb(w, Variation(0.2, "FeFET2"), seed=11, offset=2**63 - 2, samples=3)
    z = rng.normal(1029, 5, 2**63 - 2, streams=3)
    words = rng.philox4x32(
        torch.arange(64, dtype=torch.int64).view(16, 4) * 67108859 % 2**32, torch.tensor([0xDEADBEEF, 7])
    )
    assert torch.equal(res["words"], words)
    torch.testing.assert_close(res["z"], z, rtol=0, atol=1e-5)
    torch.testing.assert_close(res["out"], out, rtol=1e-6, atol=1e-5 * 0.2)
    torch.testing.assert_close(res["grad"], torch.full_like(w, 2.0), rtol=0, atol=0)


def test_strict_with_forced_fallback_raises():
    code = """
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import nft_cuda
    import torch
    from nft_cuda import Variation, ops
    try:
        ops.perturb(torch.ones(3), Variation(0.1), seed=1)
    except RuntimeError as e:
        print("RAISED:", e)
        print("NWARN:", len([w for w in caught if issubclass(w.category, RuntimeWarning)]))
    else:
        print("NO ERROR")
    """
    proc = _run_python(code, NFT_CUDA_FORCE_FALLBACK="1", NFT_CUDA_STRICT="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RAISED:" in proc.stdout, f"perturb did not raise under NFT_CUDA_STRICT=1: {proc.stdout}"
    assert "NFT_CUDA_STRICT" in proc.stdout, proc.stdout
    assert "NWARN: 0" in proc.stdout, "strict mode should raise rather than warn"


def test_strict_flag_alone_keeps_compiled_path():
    if not _ext.HAS_C:
        pytest.skip("compiled extension not loaded")
    code = """
    import torch, nft_cuda
    from nft_cuda import Variation, ops
    print("STRICT", nft_cuda.backend_info()["strict"])
    print("SHAPE", tuple(ops.perturb(torch.ones(3), Variation(0.1), seed=1).shape))
    """
    proc = _run_python(code, NFT_CUDA_STRICT="1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "STRICT True" in proc.stdout and "SHAPE (1, 3)" in proc.stdout
