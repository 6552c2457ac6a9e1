"""Registration of the compiled kernels; runs on CPU-only machines too (that is how CI checks a
CUDA build): if the extension was compiled with CUDA, every op must have a CUDA kernel."""

from __future__ import annotations

import pytest
import torch

import nft_cuda
from nft_cuda import _ext


def test_cpu_kernels_registered():
    if not _ext.HAS_C:
        pytest.skip(f"compiled extension not loaded: {_ext.LOAD_ERROR}")
    for op in _ext.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nft_cuda::{op}", "CPU"), op
        assert hasattr(torch.ops.nft_cuda, op)


def test_cuda_kernels_registered_when_compiled_with_cuda():
    info = nft_cuda.backend_info()
    if not info["cuda_compiled"]:
        pytest.skip("the installed nft_cuda extension was built without CUDA (CPU-only build or not built)")
    missing = [op for op in _ext.OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"nft_cuda::{op}", "CUDA")]
    assert not missing, f"compiled with CUDA {info['cuda_version']} but no CUDA kernel for {missing}"
    for op in _ext.OPS:
        assert info["ops"][op]["cuda"] == "CUDA kernel", op


def test_fake_kernels_and_autograd_registered():
    if not _ext.HAS_C:
        pytest.skip("compiled extension not loaded")
    for op in _ext.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nft_cuda::{op}", "Meta"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nft_cuda::perturb", "Autograd")
    w = torch.empty(3, 4, device="meta")
    out = torch.ops.nft_cuda.perturb(
        w, torch.empty(2, dtype=torch.int64, device="meta"), torch.empty(5, device="meta"), 0.7, 2.0
    )
    assert out.shape == (5, 3, 4) and out.device.type == "meta"


def _setup_module():
    """setup.py imported as a module (its setup() call runs only as __main__)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("nft_setup", Path(__file__).resolve().parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_is_built_only_with_a_visible_gpu_or_force_cuda():
    decide = _setup_module().decide_cuda
    toolkit = "/usr/local/cuda"
    assert decide({}, "13.0", toolkit, gpu_visible=False) == (
        False,
        "no GPU visible; set FORCE_CUDA=1 to compile the CUDA kernels anyway",
    )
    assert decide({}, "13.0", toolkit, gpu_visible=True)[0] is True
    assert decide({"FORCE_CUDA": "1"}, "13.0", toolkit, gpu_visible=False) == (True, "FORCE_CUDA=1")
    assert decide({"FORCE_CUDA": "1", "NFT_CUDA_SKIP_CUDA": "1"}, "13.0", toolkit, gpu_visible=True)[0] is False
    assert decide({}, None, toolkit, gpu_visible=False)[0] is False
    assert decide({}, "13.0", None, gpu_visible=True)[0] is False
    with pytest.raises(SystemExit, match="CPU-only build"):
        decide({"FORCE_CUDA": "1"}, None, toolkit, gpu_visible=False)


def test_build_decisions_are_recorded_and_reported():
    """pip hides setup.py's output without -v: the decisions are in backend_info()['build']."""
    if not _ext.HAS_C:
        pytest.skip(f"compiled extension not loaded: {_ext.LOAD_ERROR}")
    build = nft_cuda.backend_info()["build"]
    assert build is not None, "setup.py left no nft_cuda/_build_info.json"
    assert build["extension"] is True and isinstance(build["why"], str) and build["why"]
    assert build["cuda"] == nft_cuda.backend_info()["cuda_compiled"]
