"""The nn tier of nft_cuda: noisy layers (:mod:`.layers`), whole-model conversion and noise modes
(:mod:`.conversion`), the sample axis of OVF and batched Monte-Carlo (:mod:`.sample_axis`) and the
output adapter of models that do not return a logits tensor (:mod:`.custom`).

It builds on the ops tier (:mod:`nft_cuda.ops`, :mod:`nft_cuda._autograd`) and is used by the
train and eval tiers; see docs/architecture.md.
"""

from nft_cuda.nn.attention import NoisyMultiheadAttention
from nft_cuda.nn.conversion import (
    FAST_PATH_MODULES,
    conversion_summary,
    convert,
    guard_fast_paths,
    kept_noise_state,
    noise_mode,
    noisy_layers,
    set_instance,
    set_noise_mode,
    set_time,
    strip,
)
from nft_cuda.nn.custom import resolve_output
from nft_cuda.nn.generic import NoisyEmbedding, register_noisy, unregister_noisy
from nft_cuda.nn.layers import (
    MODES,
    NoiseState,
    NoisyConv1d,
    NoisyConv2d,
    NoisyLinear,
    NoisyModule,
    SamplePlan,
    instance_offset,
)
from nft_cuda.nn.recurrent import NoisyGRU, NoisyLSTM, NoisyRNN
from nft_cuda.nn.sample_axis import batch_blockers, instance_plans, sample_plan, unbatchable_modules
from nft_cuda.nn.summary import ConversionSummary, ConvertedLayer, DigitalWeight, KeptLayer, TiedWeight

__all__ = [
    "FAST_PATH_MODULES",
    "MODES",
    "ConversionSummary",
    "ConvertedLayer",
    "DigitalWeight",
    "KeptLayer",
    "NoiseState",
    "NoisyConv1d",
    "NoisyConv2d",
    "NoisyEmbedding",
    "NoisyGRU",
    "NoisyLSTM",
    "NoisyLinear",
    "NoisyModule",
    "NoisyMultiheadAttention",
    "NoisyRNN",
    "SamplePlan",
    "TiedWeight",
    "batch_blockers",
    "conversion_summary",
    "convert",
    "guard_fast_paths",
    "instance_offset",
    "instance_plans",
    "kept_noise_state",
    "noise_mode",
    "noisy_layers",
    "register_noisy",
    "resolve_output",
    "sample_plan",
    "set_instance",
    "set_noise_mode",
    "set_time",
    "strip",
    "unbatchable_modules",
    "unregister_noisy",
]

# The old module names (nft_cuda.layers, nft_cuda.conversion, nft_cuda.sample_axis) keep working: they are
# the very same module objects, so attribute reads and monkeypatching act on the real modules.
import sys as _sys

for _name in ("layers", "conversion", "sample_axis"):
    _module = _sys.modules[f"{__name__}.{_name}"]
    _sys.modules[f"nft_cuda.{_name}"] = _module
    setattr(_sys.modules["nft_cuda"], _name, _module)
del _sys, _name, _module
