"""Builds and drives the CPU emulator of the CUDA kernels (csrc/emu, issue 13).

The emulator is a shared library compiled on demand with the system C++ compiler from the kernel
sources nvcc compiles (csrc/cuda/*.cuh) plus the emulator runtime; no GPU and no nvcc needed. Builds
are cached under build/emulator/, keyed on the SHA-256 of every source and the compile command, so a
test session compiles each variant at most once (and not at all when nothing changed).
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CACHE = os.path.join(ROOT, "build", "emulator")
SOURCES = [os.path.join(CSRC, "emu", "emulator.cpp"), os.path.join(CSRC, "emu", "kernels_emu.cpp")]

# The mutation ids of csrc/cuda/mutation.cuh; each build keeps only the bf16 GEMM (fast to compile).
MUTATIONS = {
    1: "swapped A-fragment registers",
    2: "stream + 1",
    3: "wrong noise lane",
    4: "pooling window end without the ceiling",
    5: "missing barrier between the tile loads and the mma",
    6: "missing first barrier of the GEMM slice loop",
    7: "perturb stores one element past the end",
}
# The emulator check that must name each mutation whose bug leaves no trace in the outputs (6: a
# write-after-read race that the fiber schedule happens to order; 7: the write lands in host memory
# nobody compares), or that a check exists for it besides the stale outputs (5).
CAUGHT_BY = {5: "shared-memory race", 6: "shared-memory race", 7: "global out-of-bounds store"}

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
OP_CODE = {"bf16": 0, "fp16": 1, "tf32": 2}
MODE_CODE = {"forward": 0, "backward": 1, "pooled": 2}
H200_SMS = 132


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ / c++ / $CXX) found to build the emulator")
    return cxx


def _command(mutation: int, output: str) -> list[str]:
    cmd = [
        _compiler(),
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-shared",
        "-ffp-contract=off",
        "-Wall",
        "-Werror",
        "-Wno-unknown-pragmas",
        f"-I{CSRC}",
        f"-I{os.path.join(CSRC, 'include')}",
    ]
    cmd += [f"-isystem{p}" for p in include_paths()[:1]]
    if mutation:
        cmd += [f"-DNFT_EMU_MUTATION={mutation}", "-DNFT_EMU_GEMM_ONLY_BF16"]
    return cmd + SOURCES + ["-o", output]


def _source_hash(mutation: int) -> str:
    h = hashlib.sha256()
    files = sorted(
        glob.glob(os.path.join(CSRC, "emu", "*"))
        + glob.glob(os.path.join(CSRC, "cuda", "*.cuh"))
        + glob.glob(os.path.join(CSRC, "include", "nft_cuda", "*"))
    )
    for path in files:
        h.update(os.path.relpath(path, CSRC).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(_command(mutation, "out")).encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def build(mutation: int = 0) -> str:
    """Path of the emulator library for `mutation` (0: the real kernels), compiled if not cached."""
    path = os.path.join(CACHE, f"libnft_emu_{_source_hash(mutation)}_m{mutation}.so")
    if os.path.exists(path):
        return path
    os.makedirs(CACHE, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=CACHE)
    os.close(fd)
    proc = subprocess.run(_command(mutation, tmp), capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"building the emulator (mutation {mutation}) failed:\n{proc.stderr[-6000:]}")
    os.replace(tmp, path)  # atomic: a concurrent session sees a complete library or none
    return path


def build_all(mutations) -> dict[int, str]:
    """Builds several variants in parallel (two compile jobs)."""
    mutations = list(mutations)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(mutations, pool.map(build, mutations)))


class EmulatorError(RuntimeError):
    pass


def _ptr(t: torch.Tensor | None):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


class Emulator:
    """ctypes front end of one emulator build; arguments are CPU tensors (made contiguous here)."""

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.mutation = self.lib.emu_mutation()

    def _check(self, rc: int, what: str):
        if rc == -2:
            raise EmulatorError(f"{what}: combination not compiled into this emulator build")
        if rc != 0:
            raise EmulatorError(f"{what}: {self.lib.emu_last_error().decode()}")

    COUNTERS = (
        "mma",
        "barriers",
        "shfl",
        "smem_store_requests",
        "smem_store_wavefronts",
        "smem_load_requests",
        "smem_load_wavefronts",
        "global_load_bytes",
        "global_store_bytes",
    )

    def counters(self) -> dict[str, int]:
        """Counters of the last launch; for a GEMM: of the GEMM kernel and its split reduction, not max|W|."""
        buf = (ctypes.c_int64 * len(self.COUNTERS))()
        self.lib.emu_counters(buf)
        return dict(zip(self.COUNTERS, buf))

    def site_counters(self) -> list[tuple[bool, int, int]]:
        """(store, warp requests, wavefronts) per shared-memory access site of the last launch, in the
        order the sites first ran (thread 0 of block 0 first: for the GEMM, the A-tile store comes first)."""
        cap = 64
        buf = (ctypes.c_int64 * (3 * cap))()
        n = min(self.lib.emu_site_counters(buf, cap), cap)
        return [(bool(buf[3 * i]), buf[3 * i + 1], buf[3 * i + 2]) for i in range(n)]

    def philox4x32(self, counter: torch.Tensor, key: torch.Tensor, blocks=3, threads=64) -> torch.Tensor:
        c = counter.contiguous()
        k = key.contiguous()
        out = torch.empty_like(c)
        self._check(
            self.lib.emu_philox4x32(
                _ptr(c),
                _ptr(k),
                _ptr(out),
                ctypes.c_int64(c.numel() // 4),
                ctypes.c_uint(blocks),
                ctypes.c_uint(threads),
            ),
            "philox4x32",
        )
        return out

    def philox_normal(
        self, rng: torch.Tensor, numel: int, streams: int, blocks=3, threads=64, grid_y=65535
    ) -> torch.Tensor:
        r = rng.contiguous()
        out = torch.empty(streams, numel, dtype=torch.float32)
        self._check(
            self.lib.emu_philox_normal(
                _ptr(r),
                _ptr(out),
                ctypes.c_int64(numel),
                ctypes.c_int64(streams),
                ctypes.c_uint(blocks),
                ctypes.c_uint(threads),
                ctypes.c_uint(grid_y),
            ),
            "philox_normal",
        )
        return out

    def max_abs(self, w: torch.Tensor, blocks=3) -> float:
        wc = w.contiguous()
        bits = ctypes.c_uint(0)
        self._check(
            self.lib.emu_max_abs(
                DTYPE_CODE[wc.dtype], _ptr(wc), ctypes.c_int64(wc.numel()), ctypes.byref(bits), ctypes.c_uint(blocks)
            ),
            "max_abs",
        )
        return torch.tensor([bits.value], dtype=torch.int64).to(torch.int32).view(torch.float32).item()

    def perturb(self, w, rng, sigmas, scale, state_factor, blocks=3, threads=64) -> torch.Tensor:
        wc = w.contiguous()
        r = rng.contiguous()
        sig = sigmas.to(torch.float32).contiguous()
        out = torch.empty((sig.numel(), *wc.shape), dtype=wc.dtype)
        self._check(
            self.lib.emu_perturb(
                DTYPE_CODE[wc.dtype],
                _ptr(wc),
                _ptr(out),
                ctypes.c_int64(wc.numel()),
                ctypes.c_int64(sig.numel()),
                _ptr(r),
                _ptr(sig),
                ctypes.c_float(scale),
                ctypes.c_float(state_factor),
                ctypes.c_uint(blocks),
                ctypes.c_uint(threads),
            ),
            "perturb",
        )
        return out

    def perturb_device(self, w, rng, sigmas, kind: int, params, blocks=3, threads=64) -> torch.Tensor:
        wc = w.contiguous()
        r = rng.contiguous()
        sig = sigmas.to(torch.float32).contiguous()
        p = torch.tensor(list(params) or [0.0], dtype=torch.float64)  # never a null pointer
        out = torch.empty((sig.numel(), *wc.shape), dtype=wc.dtype)
        self._check(
            self.lib.emu_perturb_device(
                DTYPE_CODE[wc.dtype],
                _ptr(wc),
                _ptr(out),
                ctypes.c_int64(wc.numel()),
                ctypes.c_int64(sig.numel()),
                _ptr(r),
                _ptr(sig),
                ctypes.c_int(kind),
                _ptr(p),
                ctypes.c_uint(blocks),
                ctypes.c_uint(threads),
            ),
            "perturb_device",
        )
        return out

    def noisy_gemm(
        self,
        op: str,
        mode: str,
        a,
        w,
        bias,
        rng,
        sigmas,
        scale,
        state_factor,
        *,
        shared_input: bool,
        pool: int = 0,
        parts: int = 0,
        sm_count: int = H200_SMS,
        grid_cap=(2**31 - 1, 65535, 65535),
    ) -> torch.Tensor:
        """The fused kernel as noisy_linear_cuda launches it (max|W|, the GEMM, the split reduction).

        parts: reduction splits (0: the launcher's heuristic for `sm_count` SMs; the choice is left in
        self.last_parts); grid_cap: the most blocks per grid dimension (smaller than the tile grid makes
        the kernel loop over tiles, as it does beyond CUDA's 65535 limit in y and z).

        forward:  a = x [M, K] (shared) or [S, M, K]  -> [S, M, N]
        backward: a = dY [S, M, N]                     -> dX [M, K] (shared: summed over S) or [S, M, K]
        pooled:   a = act [B, C, H, W] (shared) or [S, B, C, H, W], pool p -> [S, B, N]
        """
        ac = a.contiguous()
        wc = w.contiguous()
        r = rng.contiguous()
        sig = sigmas.to(torch.float32).contiguous()
        samples = sig.numel()
        n_w, k_w = wc.shape
        geom = (0, 0, 0)
        if mode == "forward":
            m = ac.shape[-2]
            stride = 0 if shared_input else m * k_w
            out = torch.empty(samples, m, n_w, dtype=ac.dtype)
        elif mode == "backward":
            m = ac.shape[-2]
            stride = m * n_w
            out = torch.empty((m, k_w) if shared_input else (samples, m, k_w), dtype=ac.dtype)
        else:
            m, c, h, wd = ac.shape[-4:]
            geom = (c, h, wd)
            stride = 0 if shared_input else m * c * h * wd
            out = torch.empty(samples, m, n_w, dtype=ac.dtype)
        b = bias.to(ac.dtype).contiguous() if bias is not None else None
        used = ctypes.c_int(0)
        rc = self.lib.emu_noisy_gemm(
            OP_CODE[op],
            DTYPE_CODE[wc.dtype],
            MODE_CODE[mode],
            _ptr(ac),
            ctypes.c_int64(stride),
            _ptr(wc),
            ctypes.c_int64(n_w),
            ctypes.c_int64(k_w),
            _ptr(b),
            _ptr(out),
            ctypes.c_int64(m),
            ctypes.c_int64(samples),
            ctypes.c_int(1 if (mode == "backward" and shared_input) else 0),
            _ptr(r),
            _ptr(sig),
            ctypes.c_float(scale),
            ctypes.c_float(state_factor),
            ctypes.c_int64(geom[0]),
            ctypes.c_int64(geom[1]),
            ctypes.c_int64(geom[2]),
            ctypes.c_int(pool),
            ctypes.c_int(parts),
            ctypes.c_int(sm_count),
            (ctypes.c_uint * 3)(*grid_cap),
            ctypes.byref(used),
        )
        self._check(rc, f"noisy_gemm {op} {mode}")
        self.last_parts = used.value
        return out


# ---- H200 roofline report (docs/kernels.md) ----------------------------------------------------------
# python tests/emulator.py  prints the Markdown table of docs/kernels.md: emulator counts per kernel
# and shape, and a roofline prediction for the H200. Peak numbers: HBM3e ~4.3 TB/s; mma.sync dense
# ~790 TFLOP/s bf16/fp16 and half that for tf32; instruction issue at 132 SMs x 128 lanes x 1.98 GHz.

H200_BYTES_PER_S = 4.3e12
H200_MMA_FLOPS = {"bf16": 790e12, "fp16": 790e12, "tf32": 395e12}
H200_LANE_OPS_PER_S = 132 * 128 * 1.98e9
# Lane instructions the fused kernel issues per weight element per 64-row block (noise generation,
# A-tile loader, zero-fill, W tile, tensor-core work, slice overhead), counted on the sm_90 SASS of
# CUDA 13.0 by tools/sass_cost.py (docs/kernels.md). fp16 has bf16's code shape; the tf32 backward and
# the snapshot forward take the nearest counted variant (the pooling loops of the snapshot's A loader
# are data-dependent and not counted: its prediction is a lower bound).
SASS_INSTR_PER_ELEMENT = {("bf16", "forward"): 124.6, ("bf16", "backward"): 127.1, ("tf32", "forward"): 132.6}


def instr_per_element(op: str, mode: str) -> float:
    """SASS_INSTR_PER_ELEMENT for a (compute op, mode), falling back as described above."""
    op = "bf16" if op == "fp16" else op
    mode = "forward" if mode == "pooled" else mode
    return SASS_INSTR_PER_ELEMENT.get((op, mode), SASS_INSTR_PER_ELEMENT[(op, "forward")])


LAUNCH_S = 2e-6  # per kernel launch (max|W|, GEMM, split reduction)
# predicted = max|W| pass (W read once) + max(GEMM memory, tensor, noise) + launches; DRAM counts each
# operand once (L2 holds the re-read W and A tiles) plus the split partials written and read back.

REPORT_CASES = [
    # (label, op, mode, M or (B, C, H, W, p), N, K, S, shared)
    ("forward, small M", "bf16", "forward", 16, 1024, 1024, 1, True),
    ("forward, small M", "tf32", "forward", 16, 1024, 1024, 1, True),
    ("forward", "bf16", "forward", 256, 1024, 1024, 1, True),
    ("forward, S=4 per-sample x", "bf16", "forward", 64, 1024, 1024, 4, False),
    ("backward-input, shared x", "bf16", "backward", 256, 1024, 1024, 4, True),
    ("backward-input, per-sample", "bf16", "backward", 64, 1024, 1024, 4, False),
    ("snapshot (VGG-8 tap, p=6)", "bf16", "pooled", (128, 64, 16, 16, 6), 512, None, 1, True),
]


def _case_tensors(op, mode, m, n, k, samples, shared):
    xdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}[op]
    g = torch.Generator().manual_seed(0)
    if mode == "pooled":
        b, c, h, w, p = m
        a = torch.randn((b, c, h, w) if shared else (samples, b, c, h, w), generator=g).to(xdt)
        weight = torch.randn(n, c * p * p, generator=g) * 0.02
        return a, weight, p, b, c * p * p
    if mode == "backward":
        a = torch.randn(samples, m, n, generator=g).to(xdt)
    else:
        a = torch.randn((m, k) if shared else (samples, m, k), generator=g).to(xdt)
    return a, torch.randn(n, k, generator=g) * 0.02, 0, m, k


def predict(
    op: str,
    mode: str,
    a: torch.Tensor,
    w_numel: int,
    out: torch.Tensor,
    rows_m: int,
    n: int,
    red_k: int,
    samples: int,
    shared: bool,
    parts: int,
) -> dict:
    """H200 roofline prediction (seconds) of one fused GEMM op call: max|W| + max(memory, tensor, ALU issue).

    ALU: every W tile is regenerated once per 64-row block (and sample), at instr_per_element() lane
    instructions per weight element, issued at H200_LANE_OPS_PER_S."""
    cols = red_k if mode == "backward" else n
    flops = 2 * rows_m * n * red_k * samples
    row_blocks = -(-rows_m // 64)
    tile_elements = samples * row_blocks * n * red_k  # each W tile regenerated once per row block
    sample_blocks = 1 if mode == "backward" and shared else samples
    partial = 0 if parts == 1 else 2 * 4 * parts * sample_blocks * rows_m * cols
    dram = a.numel() * a.element_size() + w_numel * 4 + out.numel() * out.element_size() + partial
    p = dict(
        t_max_abs=w_numel * 4 / H200_BYTES_PER_S,  # max|W| reads W once more, before the GEMM
        t_mem=dram / H200_BYTES_PER_S,
        t_tc=flops / H200_MMA_FLOPS[op],
        t_alu=tile_elements * instr_per_element(op, mode) / H200_LANE_OPS_PER_S,
        dram=dram,
        tiles=row_blocks * -(-cols // 64) * sample_blocks,
    )
    p["t"] = p["t_max_abs"] + max(p["t_mem"], p["t_tc"], p["t_alu"]) + (2 + (parts > 1)) * LAUNCH_S
    p["bound"] = max((p["t_mem"], "memory"), (p["t_tc"], "tensor"), (p["t_alu"], "ALU issue"))[1]
    return p


def case_label(label, op, mode, m, n, k, samples) -> str:
    shape = f"B,C,H,W={m[:4]} p={m[4]} N={n}" if mode == "pooled" else f"M={m} N={n} K={k}"
    return f"{label} {op}, {shape} S={samples}"


def report_rows(emu: Emulator) -> list[dict]:
    rows = []
    for label, op, mode, m, n, k, samples, shared in REPORT_CASES:
        a, w, pool, rows_m, red_k = _case_tensors(op, mode, m, n, k, samples, shared)
        sig = torch.full((samples,), 0.1)
        rng = torch.tensor([1, 2], dtype=torch.int64)
        out = emu.noisy_gemm(op, mode, a, w, None, rng, sig, 0.7, 2.0, shared_input=shared, pool=pool)
        c = emu.counters()
        p = predict(op, mode, a, w.numel(), out, rows_m, n, red_k, samples, shared, emu.last_parts)
        rows.append(
            dict(
                name=case_label(label, op, mode, m, n, k, samples),
                parts=emu.last_parts,
                mma=c["mma"],
                st=c["smem_store_wavefronts"] / max(c["smem_store_requests"], 1),
                ld=c["smem_load_wavefronts"] / max(c["smem_load_requests"], 1),
                req_mb=(c["global_load_bytes"] + c["global_store_bytes"]) / 1e6,
                **p,
            )
        )
    return rows


def report_markdown(rows: list[dict]) -> str:
    lines = [
        "| kernel, shape | tiles x parts | mma (emu) | smem wavefronts/req st / ld (emu) | global MB requested "
        "(emu) | DRAM MB | max\\|W\\| + GEMM memory / tensor / ALU µs | predicted µs (GEMM bound) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    us = 1e6
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['tiles']} x {r['parts']} | {r['mma']:,} | "
            f"{r['st']:.2f} / {r['ld']:.2f} | {r['req_mb']:.1f} | {r['dram'] / 1e6:.1f} | "
            f"{r['t_max_abs'] * us:.1f} + {r['t_mem'] * us:.1f} / {r['t_tc'] * us:.1f} / "
            f"{r['t_alu'] * us:.1f} | {r['t'] * us:.1f} ({r['bound']}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(report_markdown(report_rows(Emulator(build(0)))))
