"""The device-variation model of DESIGN §2: ``Variation``, the paper's bit-sliced Gaussian.

The class lives in :mod:`nft_cuda.devices.bitsliced` with the other device models (so the package
imports without a cycle); this module keeps the historical import path ``nft_cuda.variation``.
"""

from __future__ import annotations

from nft_cuda.devices.bitsliced import PRESETS, Variation

__all__ = ["PRESETS", "Variation"]
