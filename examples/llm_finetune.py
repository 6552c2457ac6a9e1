"""Hardware-aware fine-tuning of a tiny GPT-2 on the offline corpus, then Monte-Carlo perplexity of a
digitally trained and a noise-injection-trained model on the same chips (docs/llm.md).

    python examples/llm_finetune.py [--steps 300] [--runs 30] [--sigma 0.3] [--json results.json] [--out runs/llm]
    python -m nft_cuda eval --lm runs/llm/noise.pt runs/llm/digital.pt --baseline runs/llm/digital.pt

Both models start from one random initialisation (no download) and see the same batches; the noisy one
trains with a fresh chip per forward (noise injection, mode "train"). Evaluation: chips 0..runs-1 of one
seed on the held-out tenth of the corpus, per-chip perplexity, and the paired difference of the per-chip
NLL (noise-trained minus digital: negative is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
import transformers

import nft_cuda
from nft_cuda.eval.lm import ByteTokenizer, lm_batches, lm_chips, load_corpus
from nft_cuda.eval.paired import paired_difference
from nft_cuda.io import save_model


def tiny_gpt2() -> torch.nn.Module:
    """A 2-layer GPT-2 over byte ids (vocabulary 256), random weights of seed 0."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg)


def corpus_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """(training ids, held-out ids): the corpus as bytes, its last tenth held out."""
    ids = ByteTokenizer().encode(load_corpus())
    cut = len(ids) * 9 // 10
    return ids[:cut], ids[cut:]


def fine_tune(model: torch.nn.Module, ids: torch.Tensor, steps: int, *, seq_len: int, batch: int) -> float:
    """``steps`` AdamW steps on random windows of ``ids`` (the same windows for every model); the last loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    windows = torch.Generator().manual_seed(1)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=windows)
        x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


#: How an exported model is rebuilt: this file's factory, imported again by `nft eval` (run from the
#: repository root, so `examples` is importable).
SPEC = {"name": "custom", "factory": "examples.llm_finetune:tiny_gpt2", "kwargs": {}, "output": "logits"}


def export(model: torch.nn.Module, variation, path: str) -> None:
    """Save ``model`` as an exported nft_cuda model that `nft eval --lm` loads."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_model(path, model, spec=SPEC, variation=variation)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--runs", type=int, default=30, help="chips per model")
    p.add_argument("--sigma", type=float, default=0.3, help="σ_d of the RRAM1 model, training and evaluation")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=8, help="at most this many held-out batches of batch × seq-len")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--out", help="export both trained models here (digital.pt, noise.pt) for `nft eval --lm`")
    args = p.parse_args(argv)
    variation = nft_cuda.Variation(args.sigma, "RRAM1")
    train_ids, held_out = corpus_ids()
    batches = lm_batches(held_out, args.seq_len, args.batch)[: args.eval_batches]
    results = {"steps": args.steps, "runs": args.runs, "sigma": args.sigma, "models": {}}
    per_chip = {}
    for name, noisy_training in (("digital", False), ("noise", True)):
        model = nft_cuda.convert(tiny_gpt2(), variation, mode="train" if noisy_training else "off")
        start = time.perf_counter()
        loss = fine_tune(model, train_ids, args.steps, seq_len=args.seq_len, batch=args.batch)
        trained = time.perf_counter() - start
        if args.out:
            export(model, variation, os.path.join(args.out, f"{name}.pt"))
        start = time.perf_counter()
        report = lm_chips(model, batches, args.runs, seed=0)
        per_chip[name] = report["per_instance_nll"]
        results["models"][name] = {
            "final_train_loss": loss,
            "clean_ppl": report["clean_ppl"],
            "ppl_mean": report["ppl_mean"],
            "ppl_ci95": report["ppl_ci95"],
            "token_accuracy": report["accuracy_mean"],
            "train_s": trained,
            "eval_s": time.perf_counter() - start,
        }
        print(
            f"{name}: clean PPL {report['clean_ppl']:.2f}, under variation {report['ppl_mean']:.2f} ± "
            f"{report['ppl_ci95']:.2f} over {args.runs} chips ({trained:.0f} s training)"
        )
    diff = paired_difference(per_chip["noise"], per_chip["digital"], words=("worse", "better"))
    results["nll_noise_minus_digital"] = diff
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"per-chip NLL, noise-trained − digital: {diff['mean']:+.4f} ± {diff['ci95']:.4f} ({diff['verdict']}); "
        f"peak RSS {results['peak_rss_mb']:.0f} MB"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
