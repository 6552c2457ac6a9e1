"""``nft eval --lm``: exported causal language models over simulated chips (perplexity and token accuracy
with CI95, paired against a baseline on the same chips, and generation on one chip; docs/llm.md).

The text is byte-tokenized (:class:`nft_cuda.eval.lm.ByteTokenizer`, vocabulary 256), so the command
serves byte-level models (such as examples/llm_finetune.py's); a model with its own tokenizer is evaluated
from Python with :func:`nft_cuda.eval.lm.lm_chips` on its own token batches.
"""

from __future__ import annotations

import json
from pathlib import Path

from nft_cuda import _args
from nft_cuda._files import atomic_write_text, json_safe

__all__ = ["add_lm_options", "run_lm_eval"]


def add_lm_options(e) -> None:
    """The language-model options of ``nft eval`` (only read with ``--lm``)."""
    g = e.add_argument_group("language models (--lm)")
    g.add_argument(
        "--lm",
        action="store_true",
        help="the checkpoints are causal language models (ids → logits): report perplexity over chips",
    )
    g.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: the corpus shipped with nft_cuda)")
    g.add_argument("--seq-len", dest="seq_len", type=_args.int_arg(2), default=64, help="tokens per sequence (64)")
    g.add_argument(
        "--lm-batches", dest="lm_batches", type=_args.int_arg(1), help="score at most this many batches (default all)"
    )
    g.add_argument("--generate", metavar="PROMPT", help="also print each model's continuation of PROMPT on one chip")
    g.add_argument("--chip", type=_args.int_arg(0), default=0, help="the chip of --generate (default 0)")


def _table(report: dict) -> str:
    rows = [f"{'model':<36} {'σ':>6} {'clean PPL':>10} {'PPL (CI95)':>20} {'token acc':>10}"]
    for m in report["models"]:
        ppl = f"{m['ppl_mean']:.3f} ± {m['ppl_ci95']:.3f}" if m["ppl_ci95"] is not None else f"{m['ppl_mean']:.3f}"
        rows.append(
            f"{Path(m['path']).name[-36:]:<36} {m['sigma']:>6.3g} {m['clean_ppl']:>10.3f} {ppl:>20} "
            f"{100 * m['accuracy_mean']:>9.2f}%"
        )
    for path, d in (report["paired"] or {}).items():
        ci = "" if d["ci95"] is None else f" ± {d['ci95']:.4f}"
        rows.append(f"per-chip NLL of {Path(path).name} − baseline: {d['mean']:+.4f}{ci} ({d['verdict']})")
    return "\n".join(rows)


def run_lm_eval(args) -> int:
    """Run ``nft eval --lm``: print the table (and continuations), write ``--json``."""
    from nft_cuda.eval.lm import ByteTokenizer, generate_on_chip, lm_checkpoints, load_corpus, text_batches
    from nft_cuda.io import load_model

    sigmas = args.sigma or [None]
    if len(sigmas) > 1:
        raise SystemExit("nft eval --lm: give one --sigma (or none: each model's own device model)")
    text = Path(args.text).read_text(encoding="utf-8") if args.text else load_corpus()
    batches = text_batches(text, args.seq_len, min(args.batch_size, 64), args.lm_batches)
    if not batches:
        raise SystemExit(f"nft eval --lm: the text has fewer than {args.seq_len + 1} bytes per sequence needed")
    report = lm_checkpoints(
        args.checkpoints,
        batches,
        runs=args.runs,
        seed=args.seed,
        sigma=sigmas[0],
        baseline=args.baseline,
        device=args.device,
    )
    print(_table(report))
    if args.generate:
        prompt = ByteTokenizer().encode(args.generate)
        for m in report["models"]:
            model, payload = load_model(m["path"], device=args.device or "cpu")
            ids = generate_on_chip(
                model, prompt, seed=args.seed, instance=args.chip, output=payload["model"].get("output", "logits")
            )
            print(f"{Path(m['path']).name}, chip {args.chip}: {ByteTokenizer().decode(ids)!r}")
    if args.json:
        atomic_write_text(args.json, json.dumps(json_safe(report), indent=1))
        print(f"JSON: {args.json}")
    return 0
