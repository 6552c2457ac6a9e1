"""Model factories for third-party models in nft_cuda's tools (docs/custom-models.md).

Each function returns a plain ``nn.Module`` built from its keyword arguments, with random weights (no
download), sized for the 1-channel 32×32 images of nft_cuda's datasets::

    PYTHONPATH=. nft train --model-factory examples.custom_models:timm_vit --method ovf --out runs/vit
    PYTHONPATH=. nft train --model-factory examples.custom_models:hf_bert --output logits --out runs/bert
    PYTHONPATH=. nft eval runs/vit runs/bert --sigma 0.1 --runs 10

``timm_vit`` returns logits; ``hf_bert`` returns a Hugging Face ``ModelOutput``, hence ``--output logits``.
The tests train and evaluate both (tests/test_custom_models.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ImageBert", "hf_bert", "timm_vit"]


def timm_vit(
    num_classes: int = 10,
    in_chans: int = 1,
    img_size: int = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    depth: int = 1,
    num_heads: int = 2,
) -> nn.Module:
    """A small timm ``VisionTransformer`` (class token, learned position embedding), random weights."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=2.0,
    )


class ImageBert(nn.Module):
    """A Hugging Face ``BertForSequenceClassification`` reading an image as a token sequence: each
    ``patch``×``patch`` patch's mean brightness, quantised to ``vocab`` levels, is one token id.

    ``forward`` returns the model's ``SequenceClassifierOutput`` unchanged, so nft_cuda's tools need
    ``output="logits"``."""

    def __init__(self, bert: nn.Module, vocab: int, patch: int, low: float = -1.0, high: float = 2.5):
        super().__init__()
        self.bert, self.patch = bert, patch
        # vocab - 1 fixed edges between low and high: the same image always gives the same tokens.
        self.register_buffer("edges", torch.linspace(low, high, vocab - 1), persistent=False)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids [B, (H/patch)·(W/patch)] of images [B, C, H, W] (channels averaged)."""
        means = F.avg_pool2d(images.mean(dim=1, keepdim=True), self.patch).flatten(1)
        return torch.bucketize(means.contiguous(), self.edges)

    def forward(self, images: torch.Tensor):
        return self.bert(input_ids=self.tokens(images))


def hf_bert(
    num_classes: int = 10,
    img_size: int = 32,
    patch: int = 4,
    vocab: int = 16,
    hidden: int = 32,
    layers: int = 1,
    heads: int = 2,
) -> nn.Module:
    """A tiny Hugging Face BERT classifier (random weights, no dropout) on images as token sequences."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=(img_size // patch) ** 2,
        num_labels=num_classes,
        hidden_dropout_prob=0.0,  # dropout in training would keep OVF from batching its forwards
        attention_probs_dropout_prob=0.0,
    )
    return ImageBert(BertForSequenceClassification(config), vocab, patch)
