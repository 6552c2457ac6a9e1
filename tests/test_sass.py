"""SASS of the fused variation-sampled matmul kernels (DESIGN §4.2): tensor-core instructions present,
no local-memory traffic (no register spills, no local arrays).

Needs no GPU: runs wherever the extension was compiled with CUDA (CI compiles CUDA on CPU machines),
using cuobjdump from the CUDA toolkit or the copy shipped with triton.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess

import pytest

import nft_cuda
from nft_cuda import _ext


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "cuobjdump")):
            return os.path.join(root, "bin", "cuobjdump")
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return None


def _sass_by_function() -> dict[str, list[str]]:
    info = nft_cuda.backend_info()
    if not info["cuda_compiled"]:
        pytest.skip("the extension was built without CUDA")
    tool = _cuobjdump()
    if tool is None:
        pytest.fail("the extension was compiled with CUDA but no cuobjdump was found (CUDA toolkit or triton)")
    return _disassemble(tool)


@functools.lru_cache(maxsize=1)
def _disassemble(tool: str) -> dict[str, list[str]]:
    libs = glob.glob(os.path.join(os.path.dirname(nft_cuda.__file__), "_C*.so"))
    assert libs, "compiled extension not found next to the package"
    out = subprocess.run([tool, "-sass", libs[0]], capture_output=True, text=True, timeout=300, check=True).stdout
    functions: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            functions.setdefault(current, [])
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and current is not None:
            functions[current].append(m.group(1))
    return functions


# Mangled-name fragments of the template arguments <Op, x_t, w_t, kBackward, kPooledA>: the two bools are
# Lb0ELb0E (forward), Lb1ELb0E (backward-input) and Lb0ELb1E (snapshot forward, pooling in the A loader).
VARIANTS = {
    "bf16": "6Bf16OpEN3c108BFloat16E",
    "fp16": "6Fp16OpEN3c104HalfE",
    "tf32": "6Tf32OpEff",
}


@pytest.mark.parametrize(
    "direction", ["Lb0ELb0E", "Lb1ELb0E", "Lb0ELb1E"], ids=["forward", "backward_input", "snapshot_forward"]
)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_kernels_use_tensor_cores_and_no_local_memory(variant, direction):
    if not _ext.HAS_C:
        pytest.skip("compiled extension not loaded")
    functions = _sass_by_function()
    names = [n for n in functions if "noisy_gemm_kernel" in n and VARIANTS[variant] in n and direction in n]
    assert names, f"no fused {variant} {direction} kernel in the SASS; kernels: {sorted(functions)}"
    for name in names:
        ops = functions[name]
        assert any(op in ("HMMA", "HGMMA") for op in ops), f"{name}: no HMMA/HGMMA instruction"
        local = sorted({op for op in ops if op in ("LDL", "STL")})
        assert not local, f"{name}: local-memory instructions {local} (spills or local arrays)"


@functools.lru_cache(maxsize=1)
def _resource_usage(tool: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage of the extension: {function: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}."""
    libs = glob.glob(os.path.join(os.path.dirname(nft_cuda.__file__), "_C*.so"))
    assert libs, "compiled extension not found next to the package"
    out = subprocess.run([tool, "-res-usage", libs[0]], capture_output=True, text=True, timeout=300, check=True).stdout
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in out.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current is not None and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return usage


def test_kernel_resources_from_the_cubin():
    """Every kernel (issue 13): no local memory or stack, <= 128 registers, static shared memory < 48 KB."""
    if not _ext.HAS_C:
        pytest.skip("compiled extension not loaded")
    _sass_by_function()  # skips on a CPU-only build, fails if the tool is missing
    usage = _resource_usage(_cuobjdump())
    ours = {name: u for name, u in usage.items() if "nft_cuda" in name}
    assert any("noisy_gemm_kernel" in n for n in ours) and any("perturb_kernel" in n for n in ours), sorted(usage)
    for name, u in ours.items():
        assert u.get("LOCAL", 0) == 0 and u.get("STACK", 0) == 0, f"{name}: local memory / stack {u}"
        assert u["REG"] <= 128, f"{name}: {u['REG']} registers"
        assert u.get("SHARED", 0) < 48 * 1024, f"{name}: {u.get('SHARED')} B static shared memory"
