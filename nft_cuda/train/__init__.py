"""NeFT training: the loss, the methods (clean, noise injection, OVF, IRS), weight clipping, the HWA presets
and the trainer.

``nft_cuda.train.trainer.train(nft_cuda.train.TrainConfig(...))`` runs a whole training; the trainer's
modules (``trainer``, ``config``, ``checkpoint``, ``distributed``) load on first use.
"""

from nft_cuda.train.irs import IRSHead, IRSModel
from nft_cuda.train.loss import feedback_logits, nft_loss
from nft_cuda.train.methods import IRS, METHODS, OVF, Clean, Method, NoiseInjection, build_method, default_beta
from nft_cuda.train.weight_clip import CLIP_KINDS, WeightClip, clip_bound, clip_weights

__all__ = [
    "CLIP_KINDS",
    "IRS",
    "IRSHead",
    "IRSModel",
    "METHODS",
    "OVF",
    "Clean",
    "Method",
    "NoiseInjection",
    "WeightClip",
    "build_method",
    "clip_bound",
    "clip_weights",
    "default_beta",
    "feedback_logits",
    "nft_loss",
]

#: Submodules and names loaded on first use (PEP 562): the trainer pulls in data loading and checkpoints.
_LAZY_SUBMODULES = frozenset({"checkpoint", "config", "distributed", "presets", "trainer"})
_LAZY_NAMES = {"TrainConfig": "config"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES | set(_LAZY_NAMES))
