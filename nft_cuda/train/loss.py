"""The Negative Feedback Training loss (DESIGN §5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["nft_loss", "feedback_logits"]


def feedback_logits(main_logits: torch.Tensor, aux_logits: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """z = (main − β·Σ_n 10^-(n-1)·aux_n) / (N+1), n = 1..N in list order."""
    if not aux_logits:
        return main_logits
    feedback = aux_logits[0]
    for n, aux in enumerate(aux_logits[1:], start=1):
        if aux.shape != main_logits.shape:
            raise ValueError(f"aux_logits[{n}] has shape {list(aux.shape)}, expected {list(main_logits.shape)}")
        feedback = feedback + aux * (10.0**-n)
    if aux_logits[0].shape != main_logits.shape:
        raise ValueError(f"aux_logits[0] has shape {list(aux_logits[0].shape)}, expected {list(main_logits.shape)}")
    return (main_logits - beta * feedback) / (len(aux_logits) + 1)


def nft_loss(
    main_logits: torch.Tensor, aux_logits: Sequence[torch.Tensor], target: torch.Tensor, beta: float
) -> torch.Tensor:
    """Negative-feedback cross-entropy.

    Args:
        main_logits: [B, C] backbone output o_0 (at the training σ_d).
        aux_logits: list of N outputs [B, C]: OVF oriented forwards, noisiest first; IRS heads,
            shallow → deep. Output n gets the weight 10^-(n-1).
        target: [B] class indices.
        beta: feedback gain β.

    Returns:
        CE((main − β·Σ_n 10^-(n-1)·aux_n) / (N+1), target); gradients flow into every output (the
        auxiliary outputs get the opposite sign, scaled by β·10^-(n-1)). With an empty list: plain CE.
    """
    return F.cross_entropy(feedback_logits(main_logits, list(aux_logits), beta), target)
