"""nft_cuda: Negative Feedback Training and robustness evaluation for NVCIM DNN accelerators.

Device variation (DESIGN §2) is simulated with one counter-based random stream (DESIGN §3) that is
the same on CPU, CUDA and the pure-PyTorch fallback, generated on the fly and never stored.
"""

from nft_cuda import _ext
from nft_cuda._ext import backend_info

if _ext.HAS_C:
    from nft_cuda import _registrations  # noqa: F401

from nft_cuda import devices, ops, reference, rng
from nft_cuda.nn import (
    ConversionSummary,
    NoisyConv1d,
    NoisyConv2d,
    NoisyGRU,
    NoisyLinear,
    NoisyLSTM,
    NoisyModule,
    NoisyMultiheadAttention,
    NoisyRNN,
    conversion_summary,
    convert,
    noise_mode,
    noisy_layers,
    register_noisy,
    set_instance,
    set_noise_mode,
    set_time,
    strip,
)
from nft_cuda.variation import PRESETS, Variation

__version__ = "0.1.0"

#: Subpackages loaded on first use, so ``nft_cuda.eval.monte_carlo`` works after a bare ``import nft_cuda``
#: without making that import pay for training, evaluation, data and CLI code (PEP 562).
_LAZY_SUBMODULES = frozenset({"cli", "data", "demo", "distributed", "eval", "io", "models", "train"})


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")  # also binds it as an attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_SUBMODULES)


__all__ = [
    "PRESETS",
    "Variation",
    "backend_info",
    "devices",
    "ops",
    "reference",
    "rng",
    "__version__",
    "NoisyLinear",
    "NoisyConv1d",
    "NoisyConv2d",
    "NoisyModule",
    "convert",
    "strip",
    "noisy_layers",
    "set_noise_mode",
    "set_instance",
    "set_time",
    "noise_mode",
    "register_noisy",
    "NoisyMultiheadAttention",
    "NoisyRNN",
    "NoisyLSTM",
    "NoisyGRU",
    "ConversionSummary",
    "conversion_summary",
]
