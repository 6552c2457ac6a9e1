"""The benchmark suite: every case in one process, one summary table (Markdown) and JSON.

    python -m benchmarks [--quick] [--device cpu|cuda] [--only CASE[,CASE]] [--json [PATH]] [--markdown PATH]
                         [--numel N] [--no-compile] [--no-ceiling] [--threads N] [--list]
    python -m benchmarks --compare A.json B.json
    python -m benchmarks --render RUN.json [--markdown PATH]

Cases (in this order): ceiling (always, unless --no-ceiling: copy bandwidth and a clean GEMM's FLOP/s,
the floors throughputs are compared with), perturb, linear, fused, snapshot, conv, train, transformer, hwa, eval, chip. Each variant is
checked for correctness before it is timed, and NFT_CUDA_STRICT=1 (set by the benchmarks package) turns a
fallback to pure PyTorch into an error. --quick: fewer repeats, shorter runs, smaller or fewer shapes
where the full ones are slow on a 2-core CPU, and torch.compile baselines for perturb only; on a CPU
busy with other processes (torch's threads measured slower than one before a case) that case runs on
one thread. It finishes in under 2 minutes on 2 CPU cores, busy or not. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from benchmarks import config, environment, history, peer, report, runner  # benchmarks sets NFT_CUDA_STRICT=1 first
from benchmarks.bench_conv import conv_case  # noqa: E402
from benchmarks.bench_eval import chip_case, eval_case  # noqa: E402
from benchmarks.bench_hwa import hwa_case  # noqa: E402
from benchmarks.bench_noisy_linear import fused_case, linear_case, snapshot_case  # noqa: E402
from benchmarks.bench_perturb import perturb_case  # noqa: E402
from benchmarks.bench_train import train_case  # noqa: E402
from benchmarks.bench_transformer import transformer_case  # noqa: E402
from nft_cuda import _files  # noqa: E402

CASES = {
    "perturb": perturb_case,
    "linear": linear_case,
    "fused": fused_case,
    "snapshot": snapshot_case,
    "conv": conv_case,
    "train": train_case,
    "transformer": transformer_case,
    "hwa": hwa_case,
    "eval": eval_case,
    "chip": chip_case,
}

CASE_HELP = {
    "perturb": "perturb 4M elements, S = 1, 4 vs copy / reference / compiled",
    "linear": "NoisyLinear fwd+bwd (batch 128: 1024², 4096²; the DESIGN target shape) vs clean / reference / compiled"
    " / aihwkit-lightning",
    "fused": "ops.noisy_linear forward at M = 1, 16 vs perturb + GEMM vs clean GEMM",
    "snapshot": "ops.snapshot_linear (IRS heads of VGG-8/CIFAR) vs pool + noisy_linear vs pool + clean GEMM",
    "conv": "NoisyConv2d fwd+bwd on VGG-8 layer shapes vs clean / reference / compiled / aihwkit-lightning",
    "train": "VGG-8 training step: clean, noise, reference, OVF, reference OVF, IRS, aihwkit-lightning",
    "transformer": "BERT / GPT-2 / ViT training step (small, random weights): clean vs noise injection"
    " / aihwkit-lightning",
    "hwa": "MLP training step with crossbar tiles and each hardware-aware-training knob added in turn (the"
    " lightning-hwa preset) vs clean / the step before / aihwkit-lightning",
    "eval": "Monte-Carlo evaluation R = 100 (small model, embedded test slice) vs clean passes / reference loop",
    "chip": "one chip of a converted ViT: clean forward vs instance mode drawn per forward / cached vs monte_carlo",
}

LEGEND = """\
median (min–max): per call, over the timed runs after warm-up. throughput: GB/s (bytes read + written),
FLOP/s (2·M·N·K per GEMM; fwd+bwd = 3 GEMMs) or images/s, with the percentage of the ceiling measured in
the same run (copy bandwidth; a clean fp32 GEMM). ratio: "k× X" = time / time of X (lower is better);
"speed-up k× vs X" = time of X / time. met?: against the DESIGN §8 target for this device; "(yes)"/"(no)"
when the measured configuration is not the one DESIGN §8 names (e.g. --quick's VGG-8 at width 0.25 on CPU,
or a quick run that dropped to one thread on a busy machine)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    config.add_common_args(p)
    p.add_argument("--markdown", help="write the summary (environment + table) as Markdown to this path")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument(
        "--render",
        metavar="JSON",
        help="print (and with --markdown write) the table of a saved JSON run instead of running",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="print every ratio of two saved runs side by side with its spread and the change B / A",
    )
    return p


def render_markdown(
    env: dict, cfg: config.Config, rows: list, failures: list, elapsed: float, load_end, complete: bool = True
) -> str:
    mode = "quick" if cfg.quick else "full"
    lines = [
        f"## {cfg.device.upper()} ({mode} run{'' if complete else ', incomplete'})",
        "",
        f"{environment.env_line(env)} load_average_end={load_end} elapsed={elapsed:.0f}s",
        "",
    ]
    reduced = list(dict.fromkeys(r.case for r in rows if r.threads and r.threads < (env.get("cpu_threads") or 0)))
    if reduced:
        lines += [
            "Note: the machine was busy (torch's threads measured slower than one on a parallel op), so "
            f"these cases ran on 1 thread and none of their comparisons is the DESIGN configuration: "
            f"{'; '.join(reduced)}.",
            "",
        ]
    if any(r.variant.startswith(peer.NAME) for r in rows):
        missing = peer.missing()
        lines += [
            f"Peer: not run: {missing}."
            if missing
            else f"Peer: {peer.describe(config.LAYER_VARIATION)}; matched to nft_cuda's {config.LAYER_VARIATION} "
            "(the noise of the layer and training cases).",
            "",
        ]
    lines += [report.summary_table(rows), "", LEGEND]
    side_by_side = report.peer_summary_table(rows, peer.NAME)
    if side_by_side:
        lines += [
            "",
            "nft_cuda vs the peer, per case (medians; the peer's Triton path where it ran):",
            "",
            side_by_side,
        ]
    if failures:
        lines += ["", "**Failed cases:**", ""] + [f"- {f['case']}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


def render_saved(path: str, markdown: str | None) -> int:
    import json

    with open(path) as f:
        data = json.load(f)
    c = data["config"]
    cfg = config.Config(device=c["device"], quick=c["quick"], numel=c["numel"], compile=c["compile"])
    text = render_markdown(
        data["environment"],
        cfg,
        report.rows_from_json(data),
        data.get("failures", []),
        data.get("elapsed_s", float("nan")),
        data.get("load_average_end"),
        data.get("complete", True),
    )
    print(text)
    if markdown:
        _files.atomic_write_text(markdown, text)
    return 0


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.list:
        for name, text in CASE_HELP.items():
            print(f"{name:8s} {text}")
        return 0
    if a.render:
        return render_saved(a.render, a.markdown)
    if a.compare:
        print(history.compare_text(*a.compare), end="")
        return 0
    cfg = config.config_from_args(a)
    names = list(CASES) if not a.only else config.parse_only(a.only, CASES)
    t0 = time.perf_counter()
    env = environment.environment()
    json_path = history.json_path(a.json, env, asdict(cfg))
    print(environment.env_line(env), flush=True)
    print(f"[bench] {'quick' if cfg.quick else 'full'} run on {cfg.device}: {', '.join(names)}", flush=True)

    def save(ceilings, rows, failures, final=False):
        elapsed = time.perf_counter() - t0
        load_end = environment.load_average()
        if json_path:
            report.write_json(
                json_path,
                env,
                rows,
                config=asdict(cfg),
                cases=names,
                ceilings=ceilings,
                failures=failures,
                complete=final,
                elapsed_s=elapsed,
                load_average_end=load_end,
            )
        if a.markdown:
            _files.atomic_write_text(a.markdown, render_markdown(env, cfg, rows, failures, elapsed, load_end, final))
        return elapsed, load_end

    ceilings, rows, failures = runner.run_cases(cfg, CASES, names, ceilings=not a.no_ceiling, after_case=save)
    elapsed, load_end = save(ceilings, rows, failures, final=True)
    print()
    print(report.summary_table(rows))
    print()
    print(LEGEND)
    print(f"\n[bench] total {elapsed:.1f} s; load average at start {env['load_average']}, at end {load_end}")
    if json_path:
        print(f"[bench] JSON: {json_path}")
    if failures:
        print(f"[bench] FAILED: {', '.join(f['case'] for f in failures)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
