"""The noisy embedding: :data:`NoisyEmbedding`, ``nn.Embedding`` whose table is a crossbar weight
(DESIGN §2, §3). Converted only when asked, ``nft_cuda.convert(model, ..., embeddings=True)``: a lookup
table is usually kept in digital memory. Built by the forward-function mechanism of
:mod:`nft_cuda.nn.generic` (the lookup runs with the noisy table; mode off is ``nn.Embedding``'s own forward).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda.nn.generic import make_noisy_class
from nft_cuda.nn.registry import NoisySpec

__all__ = ["NoisyEmbedding"]


def _embedding(module: nn.Embedding, weight: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``nn.Embedding``'s forward with ``weight`` in place of its table."""
    return F.embedding(
        input, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
    )


#: The noisy embedding: converted only with ``convert(..., embeddings=True)``.
NoisyEmbedding = make_noisy_class(NoisySpec(nn.Embedding, "weight", _embedding, by_default=False))
