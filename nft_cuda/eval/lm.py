"""Language models under device variation: perplexity and token accuracy over R chips, paired comparisons
on common chips, and generation on a fixed chip.

Chip r is the chip :func:`nft_cuda.set_instance` calls r (the same noise stream as the classifiers'
Monte-Carlo), so two checkpoints evaluated with the same seed are compared on the same chips
(:func:`nft_cuda.eval.paired.paired_difference`). Per chip, over a fixed set of token batches [B, T]:
next-token negative log-likelihood summed over every predicted token (positions 1 .. T−1), its mean NLL_r,
perplexity PPL_r = exp(NLL_r) and token accuracy (the argmax is the next token). The report gives the mean
over chips with the DESIGN §6 normal-approximation CI95 of PPL and NLL, the per-chip values, the clean
model's, and the tail of the token accuracy (nft_cuda.eval.tails). Sums run in float64 in a fixed order.

The model maps input ids [B, T] to logits [B, T, V]; ``output`` picks the logits out of what it returns (a
Hugging Face ``CausalLMOutput``: ``output="logits"``, the default; any form of the library's one output
adapter, :func:`nft_cuda.nn.custom.resolve_output`).

Offline text: :func:`load_corpus` reads the corpus shipped in the package (this project's own
documentation, see nft_cuda/data/embedded/LICENSE) and :class:`ByteTokenizer` turns text into UTF-8 byte
ids (vocabulary 256) with nothing to download.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda._args import check_positive_int
from nft_cuda.eval.metrics import Z95, accuracy_stats, exact_mean
from nft_cuda.eval.paired import paired_difference
from nft_cuda.io import load_model, resolve_model_path
from nft_cuda.nn import kept_noise_state, noise_mode, noisy_layers, set_instance
from nft_cuda.nn.custom import resolve_output

__all__ = [
    "ByteTokenizer",
    "generate_on_chip",
    "lm_batches",
    "lm_checkpoints",
    "lm_chips",
    "load_corpus",
    "text_batches",
]

CORPUS = Path(__file__).resolve().parent.parent / "data" / "embedded" / "corpus.txt"


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): no vocabulary file, nothing to download."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_corpus() -> str:
    """The offline text corpus shipped with the package (about 41 kB of Markdown)."""
    return CORPUS.read_text(encoding="utf-8")


def lm_batches(ids: torch.Tensor, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``seq_len`` tokens of the 1-D ``ids``, ``batch_size`` a batch
    (a last partial window is dropped, so every chip sees the same tokens)."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D tensor of token ids, got shape {list(ids.shape)}")
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2 - (name == "batch_size"):
            raise ValueError(f"{name} must be an int >= {2 - (name == 'batch_size')}, got {v!r}")
    windows = ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len)
    if windows.shape[0] == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


def _score(model: nn.Module, batches: list, adapt, device) -> tuple[float, int, int]:
    """(summed NLL in float64, tokens, correct next-token predictions) of the batches."""
    nll, tokens, correct = 0.0, 0, 0
    for ids in batches:
        ids = ids.to(device)
        logits = adapt(model(ids))[:, :-1].float()
        target = ids[:, 1:]
        nll += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").double()
        )
        tokens += target.numel()
        correct += int((logits.argmax(-1) == target).sum())
    return nll, tokens, correct


def _mean_ci(values: list[float]) -> tuple[float, float | None]:
    mean = exact_mean(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, Z95 * math.sqrt(var) / math.sqrt(len(values))


def lm_chips(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    runs: int,
    *,
    seed: int,
    output: str | Callable | None = "logits",
    device=None,
) -> dict:
    """Perplexity and token accuracy of chips 0 .. runs−1 of ``seed`` and of the clean model (module
    docstring). Returns ``ppl_mean``, ``ppl_ci95``, ``nll_mean``, ``nll_ci95``, ``per_instance_ppl``,
    ``per_instance_nll``, ``per_instance_accuracy`` (token accuracy), its statistics (mean, CI, tails),
    ``clean_ppl``, ``clean_accuracy``, ``tokens``, ``runs`` and ``seed``."""
    check_positive_int("runs", runs)
    adapt = resolve_output(output)
    batches = list(batches)
    if not batches:
        raise ValueError("lm_chips needs at least one batch of token ids")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    training = model.training
    model.eval()
    nlls, accs = [], []
    try:
        with torch.no_grad(), kept_noise_state(model):
            with noise_mode(model, "off"):
                clean_nll, tokens, clean_correct = _score(model, batches, adapt, device)
            for r in range(runs):
                set_instance(model, seed, r)
                nll, _, correct = _score(model, batches, adapt, device)
                nlls.append(nll / tokens)
                accs.append(correct / tokens)
    finally:
        model.train(training)
    ppls = [math.exp(v) for v in nlls]
    ppl_mean, ppl_ci = _mean_ci(ppls)
    nll_mean, nll_ci = _mean_ci(nlls)
    return {
        "runs": runs,
        "seed": seed,
        "tokens": tokens,
        "ppl_mean": ppl_mean,
        "ppl_ci95": ppl_ci,
        "nll_mean": nll_mean,
        "nll_ci95": nll_ci,
        "clean_ppl": math.exp(clean_nll / tokens),
        "clean_accuracy": clean_correct / tokens,
        **accuracy_stats(accs),
        "per_instance_ppl": ppls,
        "per_instance_nll": nlls,
        "per_instance_accuracy": accs,
    }


def generate_on_chip(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    seed: int,
    instance: int,
    max_new_tokens: int = 32,
    output: str | Callable | None = "logits",
) -> torch.Tensor:
    """Greedy continuation of ``prompt`` (1-D ids) by chip ``instance`` of ``seed`` (the whole generation on
    that one chip); returns prompt + new ids. Recomputes the full sequence each step (no cache), so it
    works for any model mapping ids [1, T] to logits [1, T, V]."""
    if prompt.dim() != 1 or prompt.numel() == 0:
        raise ValueError("prompt must be a non-empty 1-D tensor of token ids")
    adapt = resolve_output(output)
    device = next(model.parameters()).device
    ids = prompt.to(device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), kept_noise_state(model):
            set_instance(model, seed, instance)
            for _ in range(max_new_tokens):
                nxt = adapt(model(ids.unsqueeze(0)))[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1)])
    finally:
        model.train(training)
    return ids.cpu()


def text_batches(text: str, seq_len: int, batch_size: int, max_batches: int | None = None) -> list[torch.Tensor]:
    """The byte-id batches [batch_size, seq_len] of ``text`` (:class:`ByteTokenizer`), at most ``max_batches``."""
    batches = lm_batches(ByteTokenizer().encode(text), seq_len, batch_size)
    return batches if max_batches is None else batches[: check_positive_int("max_batches", max_batches)]


def lm_checkpoints(
    paths: list[str],
    batches: list[torch.Tensor],
    *,
    runs: int,
    seed: int = 0,
    sigma: float | None = None,
    baseline: str | None = None,
    device=None,
) -> dict:
    """Every exported causal LM of ``paths`` (:func:`nft_cuda.io.save_model`, e.g. a model factory's) on
    chips 0 .. runs−1 of ``seed`` over ``batches`` (:func:`lm_chips`), at its own device model or at
    severity ``sigma``. ``baseline``, one of ``paths``: every other model's per-chip NLL paired against
    its own on the same chips (:func:`nft_cuda.eval.paired.paired_difference`; negative is better).
    Returns {"models": [{"path", "device_model", "sigma", **lm_chips report}], "baseline", "paired"}."""
    paths = [resolve_model_path(p) for p in paths]
    if baseline is not None:
        baseline = resolve_model_path(baseline)
        if baseline not in paths:
            raise ValueError(f"baseline {baseline} is not one of the checkpoints {paths}")
    models = []
    for path in paths:
        model, payload = load_model(path, device=device or "cpu")
        layers = [layer for _, layer in noisy_layers(model)]
        if not layers:
            raise ValueError(f"{path} has no noisy layer: there are no chips to evaluate")
        if sigma is not None:
            for layer in layers:
                layer.variation = layer.variation.with_sigma(sigma)
        report = lm_chips(model, batches, runs, seed=seed, output=payload["model"].get("output", "logits"))
        models.append(
            {"path": path, "device_model": layers[0].variation.name, "sigma": layers[0].variation.sigma, **report}
        )
    paired = None
    if baseline is not None:
        base = next(m for m in models if m["path"] == baseline)
        paired = {
            m["path"]: paired_difference(m["per_instance_nll"], base["per_instance_nll"], words=("worse", "better"))
            for m in models
            if m["path"] != baseline
        }
    return {"models": models, "baseline": baseline, "paired": paired, "runs": runs, "seed": seed}
