"""The SASS instruction count behind docs/kernels.md's cost model (tools/sass_cost.py, issue 28).

Needs nvcc (CI has it, as for tests/test_ptx.py; no GPU): compiles the bf16 forward GEMM for sm_90 and
checks that the count still matches the constant tests/emulator.py's prediction uses, so a kernel change
that moves the cost by more than 5 % fails until the model (and docs/kernels.md) is re-derived.
"""

from __future__ import annotations

import os
import sys

import emulator as emu_lib
import pytest
from test_ptx import _nvcc

sys.path.insert(0, os.path.join(emu_lib.ROOT, "tools"))
import sass_cost  # noqa: E402


@pytest.fixture(scope="module")
def bf16_forward() -> dict:
    if _nvcc() is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine; CI has one")
    return sass_cost.count("bf16 forward")


def test_count_matches_the_prediction_model(bf16_forward):
    model = emu_lib.SASS_INSTR_PER_ELEMENT[("bf16", "forward")]
    assert abs(bf16_forward["total"] - model) <= 0.05 * model, (bf16_forward, model)


def test_categories_add_up_and_cover_the_slice(bf16_forward):
    r = bf16_forward
    assert r["total"] == pytest.approx(sum(r[k] for k in sass_cost.CATEGORIES), abs=0.5)
    assert r["hmma_per_slice_per_warp"] == 16  # 2 x 4 mma tiles x 2 k16 steps per 32-deep slice
    # every loader part is found (a lost loop or category would show as a zero)
    assert all(r[k] > 1 for k in sass_cost.CATEGORIES), r
    assert r["noise"] > r["tensor_core"] * 5, "noise generation dominates tensor-core work"
