"""Training-time augmentation on whole batches: random crop with zero padding and horizontal flip.

This is the CIFAR augmentation of the NeFT reference (paper-facts §6: ``RandomCrop(32, padding=4)`` +
``RandomHorizontalFlip``), applied to normalised tensors: the padding is filled with each channel's
normalised black, (0 − mean)/std, so a padded border looks exactly as torchvision's zero-padded PIL
crop does after ``Normalize``. The random choices come from a caller-supplied CPU ``torch.Generator``
(one draw of crop offsets and one of flip bits per batch), so a run is reproducible and resumable
at epoch boundaries whatever device the batch is on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["CropFlip"]


class CropFlip:
    """Random crop (after padding by ``pad`` on each side) back to the input size, then a horizontal
    flip with probability ½, independently per image.

    Args:
        pad: padding on each side, ≥ 0 (4 for CIFAR, as the reference).
        fill: the per-channel value of the padded border (``(0 − mean)/std`` for normalised black).
        flip: whether to flip horizontally at random.
    """

    def __init__(self, pad: int = 4, fill: Sequence[float] = (0.0,), flip: bool = True):
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"pad must be an int >= 0, got {pad!r}")
        self.pad = pad
        self.fill = tuple(float(f) for f in fill)
        if not self.fill:
            raise ValueError("fill must hold one value per channel")
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"CropFlip(pad={self.pad}, fill={self.fill}, flip={self.flip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x [B, C, H, W] → augmented copy of the same shape, dtype and device."""
        if x.dim() != 4:
            raise ValueError(f"CropFlip expects a batch [B, C, H, W], got shape {list(x.shape)}")
        b, c, h, w = x.shape
        if len(self.fill) not in (1, c):
            raise ValueError(f"fill has {len(self.fill)} values but the batch has {c} channels")
        p = self.pad
        # Draw on the CPU generator whatever the device: the same choices on CPU and CUDA.
        offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
        flips = torch.randint(0, 2, (b,), generator=generator).bool() if self.flip else None
        out = x
        if p > 0:
            fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            padded = fill.expand(b, -1, h + 2 * p, w + 2 * p).repeat(1, c // fill.shape[1], 1, 1)
            padded[:, :, p : p + h, p : p + w] = x
            oy, ox = offsets[0].to(x.device), offsets[1].to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
            bidx = torch.arange(b, device=x.device)[:, None, None, None]
            cidx = torch.arange(c, device=x.device)[None, :, None, None]
            out = padded[bidx, cidx, rows, cols]
        if flips is not None:
            out = torch.where(flips.to(x.device)[:, None, None, None], out.flip(-1), out)
        return out
