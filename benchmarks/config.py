"""What a run measures: the noise models, :class:`Config`, the command-line options, the threads.

The thread policy: a quick CPU run on a machine busy with other processes runs a case on one thread when
torch's threads are measured slower than one (:func:`adapt_threads`).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

import nft_cuda

#: ``--json`` given without a path: write the run into the history (benchmarks.history.json_path).
TO_HISTORY = "<history>"

#: The variation of the kernel cases (perturb, fused, snapshot, eval): σ_d = 0.1 on the two-state-factor
#: preset, so the state-band mask matters (RRAM1 would make both bands equal).
VARIATION = nft_cuda.Variation(0.1, "FeFET2")

#: The variation of the layer and training cases (linear, conv, train), which the peer library
#: (benchmarks/peer.py) can match: additive Gaussian noise relative to max|W| with no state bands. The
#: noise costs nft_cuda and the reference way the same as FeFET2 (both still compute the band mask).
LAYER_VARIATION = nft_cuda.Variation(0.1, "RRAM1")


@dataclass
class Config:
    """What a run measures and how long it times each figure.

    quick: fewer repeats, shorter runs, and smaller or fewer shapes where the full ones are slow on a
    2-core CPU (each case says which); the ``exact`` flag of a comparison says whether the measured
    configuration is the one DESIGN §8 names.
    """

    device: str = "cpu"
    quick: bool = False
    numel: int = 4 * 2**20  # perturb's weight
    compile: bool = True  # time torch.compile baselines (the perturb one always, layers' in full runs)
    auto_threads: bool = False  # quick CPU runs: one thread for a case when the machine is busy
    threads_reduced: str = ""  # why the current case runs on one thread (then no comparison is "exact")

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def warmup(self) -> int:
        return 1 if self.quick else 2

    @property
    def min_run_time(self) -> float:
        """Seconds of timed calls per variant (spread over the rounds)."""
        return 0.2 if self.quick else 1.0

    @property
    def min_runs(self) -> int:
        """Rounds: timed blocks per variant (calls longer than the budget are repeated this often)."""
        return 3 if self.quick else 5

    @property
    def slow_runs(self) -> int:
        """Fewest rounds of seconds-long calls (training steps, Monte-Carlo evaluations): one call of
        each variant per round."""
        return 3

    @property
    def slow_budget(self) -> float:
        """Seconds of timed seconds-long calls per case, all variants together: more rounds (up to 15)
        while the budget lasts."""
        return 6.0 if self.quick else 60.0

    @property
    def flop_unit(self) -> str:
        return "TFLOP/s" if self.cuda else "GFLOP/s"

    @property
    def compile_layers(self) -> bool:
        """torch.compile baselines of the layer cases: full runs only (each costs a cold compile)."""
        return self.compile and not self.quick


def add_common_args(p) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="fewer repeats, shorter runs, smaller shapes where slow")
    p.add_argument("--only", help="comma-separated case names")
    p.add_argument("--numel", type=int, default=4 * 2**20, help="elements of perturb's weight (default 4M)")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile baseline")
    p.add_argument("--no-ceiling", action="store_true", help="skip measuring the copy/GEMM ceilings")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument(
        "--json",
        nargs="?",
        const=TO_HISTORY,
        metavar="PATH",
        help="write the results as JSON to PATH; without PATH to a new file in benchmarks/history/",
    )


def config_from_args(a) -> Config:
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if a.numel < 1024 or a.numel % 1024:
        raise SystemExit(f"--numel must be a positive multiple of 1024, got {a.numel}")
    cfg = Config(device=a.device, quick=a.quick, numel=a.numel, compile=not a.no_compile)
    # A quick run must finish in minutes on a busy machine too, where torch's threads wait for each other
    # and small ops run many times slower than on one thread (see adapt_threads). Full runs, and runs
    # given --threads, keep their threads.
    cfg.auto_threads = a.quick and a.device == "cpu" and not a.threads and torch.get_num_threads() > 1
    return cfg


def parse_only(only: str, cases: dict) -> list[str]:
    names = [s.strip() for s in only.split(",") if s.strip()]
    unknown = [n for n in names if n not in cases]
    if unknown:
        raise SystemExit(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(cases)}")
    return names


def thread_contention(samples: int = 7) -> float:
    """Time of a small parallel op with torch's threads / with one thread (median of ``samples``).

    About 0.5 on an idle 2-core machine. Well above 1 when other processes keep the cores busy: every
    parallel region then waits for a descheduled OpenMP thread, which makes small ops many times
    slower (8–150× measured with two busy-looping processes on the 2-core development machine)."""
    n = torch.get_num_threads()
    if n < 2:
        return 0.0
    x = torch.randn(1 << 18)

    def run(k: int) -> float:
        torch.set_num_threads(k)
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(20):
                torch.exp(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    try:
        run(n)
        t1, tn = run(1), run(n)
    finally:
        torch.set_num_threads(n)
    return tn / t1


DEFAULT_THREADS = torch.get_num_threads()


def adapt_threads(cfg: Config, log=print) -> None:
    """Quick CPU runs (``cfg.auto_threads``): before each case, torch's threads, or one thread when
    :func:`thread_contention` finds them slower than one (a busy machine); the reason is kept in
    ``cfg.threads_reduced`` and that case's comparisons are marked as not the DESIGN configuration."""
    if not cfg.auto_threads:
        return
    torch.set_num_threads(DEFAULT_THREADS)
    cfg.threads_reduced = ""
    ratio = thread_contention(samples=5)
    if ratio >= 1.0:
        cfg.threads_reduced = (
            f"{DEFAULT_THREADS} threads were {ratio:.1f}× slower than 1 on a parallel op (busy machine): 1 thread"
        )
        torch.set_num_threads(1)
        log(f"[bench] {cfg.threads_reduced}", flush=True)


@contextlib.contextmanager
def matmul_precision(device: str, mode: str):
    """fp32 matmul precision on CUDA for ``mode`` "tf32" (TF32 allowed) or anything else (ieee)."""
    if device != "cuda":
        yield
        return
    mm = torch.backends.cuda.matmul
    old = mm.fp32_precision
    mm.fp32_precision = "tf32" if mode == "tf32" else "ieee"
    try:
        yield
    finally:
        mm.fp32_precision = old
