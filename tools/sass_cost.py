"""Instruction counts of the fused noisy GEMM from its sm_90 SASS (issue 28): the cost model of docs/kernels.md.

    python tools/sass_cost.py                # every variant, Markdown table
    python tools/sass_cost.py --json         # the same numbers as JSON

Needs the CUDA toolkit (nvcc, which CI has) and nvdisasm (the toolkit's, or the copy shipped with triton);
no GPU. Each variant is one kernel instantiation compiled alone, with the flags of the CI build (-O3
-lineinfo, sm_90), then disassembled with `nvdisasm -gi`, which prints each instruction's chain of
inlined source lines: the innermost one, and the line of gemm_tile it was inlined from (which loader
call it belongs to).

How the count is made (one thread, one 32-deep reduction slice of an interior 64 x 64 tile):
- the slice loop is the innermost loop (backward branch) whose body holds the BAR.SYNC and the HMMA;
  loops inside it are the A-tile loader's, the W-tile zero-fill's and the W-tile task loop (one task =
  one Philox block = four weights);
- an instruction in an inner loop counts once per iteration of its (unrolled) body: the loop's logical
  trip count per thread (tile elements / 128 threads: 16 for the A tile and the zero-fill — 0 for the
  zero-fill where the source skips it for tiles inside W —, 4.5 tasks of
  which 4 generate noise for a K % 4 = 0 tile) divided by the unroll factor (the STS.U16 in the body per
  logical iteration); the half task that exits early at `4 q >= e_end` counts the instructions up to that
  branch. Predicated instructions count (they issue whether or not their predicate holds);
- straight-line instructions of the slice count once, except the remainder paths of the unrolled loops
  (jumped over when the trip count is a multiple of the unroll, as for full tiles) and the libm slow
  paths (the `@P BRA` … CALL.REL … BRA around a `*_slowpath` call, not taken for in-range arguments);
- categories: noise generation = instructions whose innermost line is in philox.h or normal.h (the
  Philox rounds and Box–Muller); A-tile loader, zero-fill (the zero-fill loop's instructions) and W tile
  (W loads, σ_w, the noise add, rounding, the shared stores, task indexing) by the loader call they were
  inlined from; tensor core = HMMA and the fragment loads of mma_tile; other = the slice loop's own work
  (state band, pointers, barriers).
Result: lane instructions per weight element per 64-row block = count x 128 threads / (64 x 32) weights.
The epilogue (once per tile) and max|W| are not in it; the kernel-level model is docs/kernels.md's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
TILE = os.path.join(CSRC, "cuda", "noisy_tile.cuh")
KERNEL = os.path.join(CSRC, "cuda", "noisy_gemm_kernel.cuh")

# variant -> (Op, x_t, w_t, kBackward)
VARIANTS = {
    "bf16 forward": ("Bf16Op", "c10::BFloat16", "float", "false"),
    "bf16 backward-input": ("Bf16Op", "c10::BFloat16", "float", "true"),
    "tf32 forward": ("Tf32Op", "float", "float", "false"),
}
CATEGORIES = ("noise", "a_loader", "zero_fill", "w_tile", "tensor_core", "other")

PROBE = """#include <c10/util/BFloat16.h>
#include "cuda/noisy_gemm_kernel.cuh"
template __global__ void nft_cuda::fused::noisy_gemm_kernel<nft_cuda::fused::{op}, {x}, {w}, {bwd}, false>(
    const {x}*, int64_t, const {w}*, const {x}*, {x}*, float*, int64_t, int64_t, int64_t, int64_t, bool, int,
    const int64_t*, const float*, const unsigned*, float, float, nft_cuda::fused::PoolGeom);
"""


def _tool(name: str) -> str:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", name)):
            return os.path.join(root, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    raise FileNotFoundError(f"{name} not found (CUDA toolkit, $CUDA_HOME, or triton's copy)")


def compile_variant(variant: str, workdir: str) -> str:
    """The cubin of one fused-GEMM instantiation, compiled as CI compiles the extension (sm_90)."""
    from torch.utils.cpp_extension import include_paths

    op, x, w, bwd = VARIANTS[variant]
    src = os.path.join(workdir, "probe.cu")
    with open(src, "w") as f:
        f.write(PROBE.format(op=op, x=x, w=w, bwd=bwd))
    out = os.path.join(workdir, "probe.cubin")
    cmd = [_tool("nvcc"), "-std=c++17", "-arch=sm_90", "-O3", "-lineinfo", "-cubin"]
    cmd += [f"-I{CSRC}", f"-I{os.path.join(CSRC, 'include')}", f"-I{include_paths()[0]}", src, "-o", out]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    return out


@dataclass
class Instr:
    addr: int
    text: str
    inner: tuple[str, int] = ("", 0)  # innermost source file (basename) and line
    call: tuple[str, int] = ("", 0)  # the line it was inlined from, one level below the kernel
    labels: list[str] = field(default_factory=list)

    @property
    def opcode(self) -> str:
        """The mnemonic without modifiers: HMMA.16816.F32.BF16 -> HMMA."""
        return re.sub(r"^@!?U?P\w+\s+", "", self.text).split()[0].split(".")[0]

    @property
    def conditional(self) -> bool:
        return self.text.startswith("@")

    def branch_target(self) -> str | None:
        m = re.search(r"\bBRA\s+`\((\.L_x_\d+)\)", self.text)
        return m.group(1) if m else None


def _parse(listing: str) -> list[Instr]:
    """Instructions with the source chain nvdisasm prints before them (innermost first; carried over
    until the next annotation): `inner` is the chain's first location, `call` the one just below the
    kernel's own line (with -gi: the gemm_tile line the instruction was inlined from)."""
    out, chain, fresh, labels = [], [("", 0)], False, []
    for line in listing.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            chain = chain if fresh else []
            chain.append((os.path.basename(m.group(1)), int(m.group(2))))
            fresh = True
            continue
        m = re.match(r"^(\.L_x_\d+):", line.strip())
        if m:
            labels.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            call = chain[-2] if len(chain) > 1 else chain[-1]
            out.append(Instr(int(m.group(1), 16), m.group(2), inner=chain[0], call=call, labels=labels))
            labels, fresh = [], False
    return out


def disassemble(cubin: str) -> list[Instr]:
    """Instructions of the one kernel in `cubin` with their innermost line and their gemm_tile call line."""
    tool = _tool("nvdisasm")
    listing = subprocess.run([tool, "-gi", "-c", cubin], check=True, capture_output=True, text=True).stdout
    return _parse(listing)


def source_lines() -> dict:
    """Lines of the loaders and loops in noisy_tile.cuh / noisy_gemm_kernel.cuh the count keys on."""
    tile = open(TILE).read().splitlines()
    kern = open(KERNEL).read().splitlines()

    def line(lines, pattern, start=0):
        return next(n + 1 for n in range(start, len(lines)) if re.search(pattern, lines[n]))

    consts = {k: int(v) for k, v in re.findall(r"constexpr int (k\w+) = (\d+);", "\n".join(tile))}
    zero_begin = line(tile, r"Zero the positions outside W")
    return dict(
        consts=consts,
        threads=32 * consts["kWarps"],
        a_call=line(kern, r"load_a_tile<Op>\("),
        w_calls={
            line(kern, r"load_noisy_w_tile<Op, w_t, kBK, kBN, true>"),
            line(kern, r"load_noisy_w_tile<Op, w_t, kBN"),
        },
        mma_call=line(kern, r"mma_tile<Op>\(smem"),
        zero=(zero_begin, line(tile, r"constexpr int kGroups", zero_begin)),
        # the zero-fill loop is skipped for a tile inside W (its block-uniform `inside` test)
        zero_skipped_inside=bool(re.search(r"const bool inside =", "\n".join(tile[zero_begin : zero_begin + 12]))),
        task_for=line(tile, r"for \(int task = ", zero_begin),
        task_exit=line(tile, r"if \(4 \* q >= e_end\)", zero_begin),
    )


def loops(ins: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) instruction index of every loop: a branch back to a label at or before it."""
    where = {label: n for n, i in enumerate(ins) for label in i.labels}
    found = []
    for n, i in enumerate(ins):
        target = i.branch_target()
        if target is not None and where[target] <= n:
            found.append((where[target], n))
    return found


def cold(ins: list[Instr], first: int, last: int) -> set[int]:
    """Indexes of the libm slow paths: from the conditional branch before each CALL to the BRA after it."""
    out = set()
    for n in range(first, last + 1):
        if ins[n].opcode.startswith("CALL"):
            j = max(k for k in range(first, n) if ins[k].conditional and ins[k].opcode == "BRA")
            k = min(k for k in range(n, last + 1) if ins[k].opcode == "BRA" and not ins[k].conditional)
            out.update(range(j + 1, k + 1))
    return out


def category(i: Instr, src: dict, in_zero_loop: bool) -> str:
    if i.inner[0] in ("philox.h", "normal.h"):
        return "noise"
    if i.opcode == "HMMA" or (i.call[0] == "noisy_gemm_kernel.cuh" and i.call[1] == src["mma_call"]):
        return "tensor_core"
    if i.call[0] == "noisy_gemm_kernel.cuh" and i.call[1] == src["a_call"]:
        return "a_loader"
    if in_zero_loop or (i.inner[0] == "noisy_tile.cuh" and src["zero"][0] <= i.inner[1] < src["zero"][1]):
        return "zero_fill"
    if i.call[0] == "noisy_gemm_kernel.cuh" and i.call[1] in src["w_calls"]:
        return "w_tile"
    return "other"


def _loop_role(ins: list[Instr], loop: tuple[int, int], src: dict) -> str:
    branch = ins[loop[1]]
    if branch.call == ("noisy_gemm_kernel.cuh", src["a_call"]):
        return "a_loader"
    if branch.inner[0] == "noisy_tile.cuh" and src["zero"][0] <= branch.inner[1] < src["zero"][1]:
        return "zero_fill"
    if branch.inner == ("noisy_tile.cuh", src["task_for"]):
        return "task"
    raise AssertionError(f"unrecognised loop in the slice: {branch.text} at {branch.inner}")


def _remainder_paths(ins: list[Instr], first: int, last: int, inner: list[tuple[int, int]]) -> set[int]:
    """Straight-line code jumped over when an unrolled loop's trip count is a multiple of its unroll:
    the forward branches of the loader code before each unrolled loop that land before that loop."""
    where = {label: n for n, i in enumerate(ins) for label in i.labels}
    out = set()
    for start, _ in inner:
        call = ins[start].call
        for n in range(first, start):
            target = ins[n].branch_target()
            if ins[n].conditional and target and ins[n].call == call and n < where[target] <= start:
                out.update(range(n + 1, where[target]))
    return out


def slice_weights(ins: list[Instr], src: dict) -> dict[int, float]:
    """Executions per thread and slice of each instruction of the slice loop (see the module docstring)."""
    all_loops = loops(ins)
    first, last = min(
        (lp for lp in all_loops if any(ins[n].opcode == "HMMA" for n in range(lp[0], lp[1] + 1))),
        key=lambda lp: lp[1] - lp[0],
    )
    inner = sorted(lp for lp in all_loops if first < lp[0] and lp[1] < last)
    c, threads = src["consts"], src["threads"]
    skip = cold(ins, first, last) | _remainder_paths(ins, first, last, inner)
    weight = {n: 1.0 for n in range(first, last + 1) if n not in skip}
    for start, end in inner:
        body = range(start, end + 1)
        stores = sum(ins[n].opcode == "STS" for n in body)
        role = _loop_role(ins, (start, end), src)
        if role == "task":
            full = c["kBN"] * (c["kBK"] // 4) / threads  # tasks that generate noise, per thread
            extra = c["kBN"] * (c["kBK"] // 4 + 1) / threads - full  # tasks that exit early
            exit_at = max(n for n in body if ins[n].inner == ("noisy_tile.cuh", src["task_exit"]))
            unroll = stores / 4
            for n in body:
                weight[n] = 0.0 if n in skip else (full + (extra if n <= exit_at else 0.0)) / unroll
        elif role == "zero_fill" and src["zero_skipped_inside"]:
            for n in body:
                weight[n] = 0.0
        else:
            trips = c["kBM"] * c["kBK"] / threads / stores
            for n in body:
                weight[n] = trips
    return weight


def count(variant: str) -> dict:
    """Lane instructions per weight element per 64-row block, by category, for one variant."""
    src = source_lines()
    with tempfile.TemporaryDirectory() as d:
        ins = disassemble(compile_variant(variant, d))
    weight = slice_weights(ins, src)
    zero_loops = [lp for lp in loops(ins) if lp[0] in weight and _is_zero_loop(ins, lp, src)]
    per_elem = src["threads"] / (src["consts"]["kBN"] * src["consts"]["kBK"])
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for n, w in weight.items():
        in_zero = any(a <= n <= b for a, b in zero_loops)
        totals[category(ins[n], src, in_zero)] += w * per_elem
    totals = {k: round(v, 1) for k, v in totals.items()}
    totals["total"] = round(sum(totals[k] for k in CATEGORIES), 1)
    totals["hmma_per_slice_per_warp"] = sum(ins[n].opcode == "HMMA" for n in weight)
    return totals


def _is_zero_loop(ins, lp, src) -> bool:
    b = ins[lp[1]]
    return b.inner[0] == "noisy_tile.cuh" and src["zero"][0] <= b.inner[1] < src["zero"][1]


def markdown(results: dict[str, dict]) -> str:
    head = "| variant | noise (Philox, Box–Muller) | A-tile loader | zero-fill | W tile (load, σ, add, store) "
    head += "| tensor core (HMMA + fragments) | other | total |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = " | ".join(f"{r[k]:.1f}" for k in (*CATEGORIES, "total"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    parser.add_argument("--variant", choices=sorted(VARIANTS), action="append", help="default: all")
    args = parser.parse_args(argv)
    results = {v: count(v) for v in (args.variant or VARIANTS)}
    print(json.dumps(results, indent=2) if args.json else markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
