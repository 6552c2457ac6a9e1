"""One training step (forward, backward, SGD update) of three small random-weight transformers, clean and
with noise injection, side by side (issue 27: the small-transformer noisy step ≤ 1.3× clean on CPU).

Models (built from their libraries' configs with random weights; nothing is downloaded):
  BERT   transformers ``BertForSequenceClassification``, the BERT-tiny shape (2 layers, hidden 128,
         2 heads, intermediate 512, vocabulary 30522), 2 labels, batch 8 × 64 tokens
  GPT-2  transformers ``GPT2LMHeadModel``, 2 layers, n_embd 128, 2 heads, vocabulary 1000 (the LM head is
         tied to the token embedding), next-token loss on batch 8 × 64 tokens
  ViT    timm ``VisionTransformer`` on 32×32 RGB images: 4×4 patches, 4 blocks, width 192, 3 heads,
         10 classes, batch 32
Quick runs use smaller shapes (one layer, width 64, shorter inputs; not the issue's configuration:
marked "(yes)"/"(no)").

Variants (both start from the same weights, in train mode with each library's default dropout; SGD lr
0.01, momentum 0.9, as the VGG-8 train case):
  clean              the model as built (the floor)
  noise              the same model after ``nft_cuda.convert(model, Variation(0.1, "RRAM1"))``: every
                     Linear, Conv2d and transformers Conv1D noisy (a fresh draw per layer per forward),
                     the embeddings digital
  aihwkit-lightning  the peer's step (benchmarks/peer.py) for BERT and ViT; skipped with the reason when it
                     is not installed, and always for GPT-2: its ``convert_to_analog`` replaces the exact
                     torch classes Linear/Conv1d/Conv2d only, so GPT-2's attention and MLP (transformers'
                     Conv1D) would stay digital: not the same job

Checked before timing (in eval mode, where dropout is off and nft_cuda's noise mode still applies): every
Linear, Conv2d and Conv1D of the model was converted; at σ_d = 0 the converted model's loss equals the
clean loss; at σ_d = 0.1 it differs; the first (warm-up) step of each variant has a finite loss and finite
gradients; the peer's layers inject the same noise as nft_cuda's (checks.check_same_job).

Timing: one step of each variant per round, interleaved, medians (the "slow" policy of results.Case.time).
Where the rest of the noisy step goes: ``python -m benchmarks.profile_ops --only bert,gpt2,vit``.

    python -m benchmarks.bench_transformer [--device cpu|cuda] [--quick] [--json PATH]
"""

from __future__ import annotations

import copy
import functools
import sys
from dataclasses import dataclass

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_cuda  # noqa: E402
from benchmarks import checks, config, peer, results, runner  # benchmarks sets NFT_CUDA_STRICT=1 first
from benchmarks.bench_train import set_sigma, train_step  # noqa: E402

MODELS = ("BERT", "GPT-2", "ViT")

#: Why the GPT-2 peer variant is never timed (aihwkit-lightning 2.1.0's nn/conversion.py).
PEER_NO_CONV1D = (
    f"{peer.NAME}'s convert_to_analog replaces the exact torch classes Linear/Conv1d/Conv2d only: "
    "GPT-2's attention and MLP weights (transformers' Conv1D) would stay digital, so it is not the same job"
)


@dataclass
class Workload:
    """A model with its inputs, labels and loss (``loss(model, x, y)``), and what one step processes."""

    label: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss: object
    items: int  # sequences or images per step
    unit: str


def _hf_loss(model, x, y):
    return model(input_ids=x, labels=y).loss


def _ce_loss(model, x, y):
    return F.cross_entropy(model(x), y)


def bert(quick: bool, dev) -> Workload:
    import transformers

    size = (1, 64, 2, 256, 1000, 4, 32) if quick else (2, 128, 2, 512, 30522, 8, 64)
    layers, hidden, heads, inter, vocab, batch, seq = size
    cfg = transformers.BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=max(128, seq),
        num_labels=2,
    )
    model = transformers.BertForSequenceClassification(cfg).to(dev)
    x = torch.randint(0, vocab, (batch, seq), device=dev)
    y = torch.randint(0, 2, (batch,), device=dev)
    label = f"BERT L{layers} H{hidden} train step batch {batch}×{seq}"
    return Workload(label, model, x, y, _hf_loss, batch, "seq/s")


def gpt2(quick: bool, dev) -> Workload:
    import transformers

    layers, hidden, heads, vocab, batch, seq = (1, 64, 2, 256, 4, 32) if quick else (2, 128, 2, 1000, 8, 64)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=max(128, seq),
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    model = transformers.GPT2LMHeadModel(cfg).to(dev)
    x = torch.randint(0, vocab, (batch, seq), device=dev)
    label = f"GPT-2 L{layers} H{hidden} train step batch {batch}×{seq}"
    return Workload(label, model, x, x, _hf_loss, batch, "seq/s")


def vit(quick: bool, dev) -> Workload:
    from timm.models.vision_transformer import VisionTransformer

    depth, width, heads, patch, batch = (1, 64, 2, 8, 8) if quick else (4, 192, 3, 4, 32)
    model = VisionTransformer(
        img_size=32, patch_size=patch, in_chans=3, num_classes=10, embed_dim=width, depth=depth, num_heads=heads
    ).to(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    label = f"ViT depth {depth} width {width} patch {patch} train step batch {batch}"
    return Workload(label, model, x, y, _ce_loss, batch, "img/s")


BUILDERS = {"BERT": bert, "GPT-2": gpt2, "ViT": vit}


def crossbar_layers(model: nn.Module) -> list[str]:
    """The names of the layers a converted model must hold as noisy: Linear, Conv2d, transformers' Conv1D."""
    kinds = [nn.Linear, nn.Conv2d]
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is not None:
        kinds.append(conv1d)
    return [name for name, m in model.named_modules() if isinstance(m, tuple(kinds))]


def check_workload(name: str, cfg: config.Config, w: Workload, clean: nn.Module, noisy: nn.Module) -> str:
    """The checks before timing (eval mode: no dropout; nft_cuda's noise mode still on). Returns the noisy
    row's note: how much of the model is noisy."""
    v = config.LAYER_VARIATION
    layers = dict(nft_cuda.noisy_layers(noisy))
    missing = [n for n in crossbar_layers(clean) if n not in layers]
    if missing:
        raise checks.CheckError(f"{name}: convert left these layers digital: {', '.join(missing)}")
    rtol = 1e-3 if cfg.cuda else 1e-5
    clean.eval(), noisy.eval()
    try:
        with torch.no_grad():
            ref = w.loss(clean, w.x, w.y)
            set_sigma(noisy, 0.0)
            checks.check_close(w.loss(noisy, w.x, w.y), ref, f"{name}: noise at σ=0 vs clean", rtol=rtol)
            set_sigma(noisy, v.sigma)
            if torch.equal(w.loss(noisy, w.x, w.y), ref):
                raise checks.CheckError(f"{name}: the converted model's loss at σ_d = {v.sigma} equals the clean loss")
    finally:
        clean.train(), noisy.train()
    crossbar = {id(layer.weight): layer.weight.numel() for layer in layers.values()}  # a tied weight once
    total = sum(p.numel() for p in noisy.parameters())
    return f"{len(layers)} noisy layers, {sum(crossbar.values()) / 1e6:.2f}M of {total / 1e6:.2f}M parameters"


def _peers(cfg: config.Config, key: str, name: str, noisy, base) -> peer.Variants:
    if key == "GPT-2":
        reason = peer.missing() or PEER_NO_CONV1D
        return peer.Variants(skipped={peer.NAME: reason})
    return peer.model_variants(cfg, name, noisy, base, config.LAYER_VARIATION)


def model_rows(cfg: config.Config, key: str, rows: results.Case) -> None:
    """Build, check and time one model's clean, noise (and peer) steps into ``rows``."""
    v = config.LAYER_VARIATION
    exact = not cfg.quick
    torch.manual_seed(0)
    try:
        w = BUILDERS[key](cfg.quick, cfg.dev)
    except ImportError as exc:  # transformers or timm missing: say so, time the other models
        rows.add(peer.skipped_row(f"{key} train step", f"its library is not installed: {exc}", "clean, noise"))
        return
    base = w.model.train()
    models = {"clean": copy.deepcopy(base), "noise": nft_cuda.convert(copy.deepcopy(base), v)}
    note = check_workload(w.label, cfg, w, models["clean"], models["noise"])
    peers = _peers(cfg, key, w.label, models["noise"], base)
    steps = {k: train_step(m, w.loss, w.x, w.y, f"{w.label} {k}") for k, m in models.items()}
    for k, model in peers.items.items():
        steps[k] = train_step(
            model,
            w.loss,
            w.x,
            w.y,
            f"{w.label} {k}",
            opt=peer.optimizer(model, lr=0.01, momentum=0.9),
            context=functools.partial(peer.use_triton, k == peer.triton_variant()),
        )
    r = rows.time(w.label, steps, work=float(w.items), unit=w.unit, slow=True, notes={"noise": note})
    rows.compare(r["noise"], r["clean"], "time", "transformer_step_vs_clean", exact=exact)
    peer.finish(rows, r, w.label, "noise", peers, exact=exact)


def transformer_case(cfg: config.Config, ceilings: dict | None = None, *, models=MODELS) -> list[results.Row]:
    """BERT, GPT-2 and ViT (``models``: a subset), each: the clean step vs the noise step (and the peer's)."""
    rows = results.Case(cfg, ceilings)
    for key in models:
        model_rows(cfg, key, rows)
    return rows.rows


CASES = {"transformer": transformer_case}


def main(argv=None) -> None:
    runner.cli_main(__doc__, CASES, argv)


if __name__ == "__main__":
    main()
