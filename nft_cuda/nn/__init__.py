"""The nn tier of nft_cuda: noisy layers, whole-model conversion and noise control (docs/architecture.md).

From the ground up: :mod:`.registry` (the one plain → noisy map), :mod:`.base` (``NoisyModule``: the
noise of every layer), :mod:`.stacked` (the S samples of a sample-axis pass in one GEMM / conv call),
:mod:`.functions` (the autograd Functions), one file per layer family
(:mod:`.linear`, :mod:`.conv`, :mod:`.generic` and the registered types, :mod:`.embedding`,
:mod:`.attention`, :mod:`.recurrent`; each registers itself), then the model-wide helpers:
:mod:`.keys` (layer keys of the chip noise stream), :mod:`.modes` (noise modes, chip instances),
:mod:`.calibration` (converter ranges), :mod:`.conversion` (convert, strip) with :mod:`.summary`,
:mod:`.sample_axis` (OVF and batched Monte-Carlo) and :mod:`.custom` (the output adapter).

It builds on the ops tier (:mod:`nft_cuda.ops`, :mod:`nft_cuda._autograd`) and is used by the
train and eval tiers. Importing the package imports every layer family, so the registry is complete
before any conversion.
"""

from nft_cuda.nn.attention import NoisyMultiheadAttention
from nft_cuda.nn.base import MODES, NoiseState, NoisyModule, SamplePlan, instance_offset
from nft_cuda.nn.calibration import calibrate_mvm
from nft_cuda.nn.conv import NoisyConv1d, NoisyConv2d
from nft_cuda.nn.conversion import FAST_PATH_MODULES, conversion_summary, convert, guard_fast_paths, strip
from nft_cuda.nn.custom import resolve_output
from nft_cuda.nn.embedding import NoisyEmbedding
from nft_cuda.nn.generic import register_noisy, unregister_noisy
from nft_cuda.nn.keys import NOISE_STREAM_VERSION, assign_layer_keys, check_stream_version, name_key, stream_version
from nft_cuda.nn.linear import NoisyLinear
from nft_cuda.nn.modes import kept_noise_state, noise_mode, noisy_layers, set_instance, set_noise_mode, set_time
from nft_cuda.nn.recurrent import NoisyGRU, NoisyLSTM, NoisyRNN
from nft_cuda.nn.sample_axis import batch_blockers, instance_plans, sample_plan, unbatchable_modules
from nft_cuda.nn.stacked import SAMPLE_AXIS_MODES, sample_axis_calls
from nft_cuda.nn.summary import ConversionSummary, ConvertedLayer, DigitalWeight, KeptLayer, TiedWeight

__all__ = [
    "FAST_PATH_MODULES",
    "MODES",
    "NOISE_STREAM_VERSION",
    "SAMPLE_AXIS_MODES",
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
    "assign_layer_keys",
    "batch_blockers",
    "calibrate_mvm",
    "check_stream_version",
    "conversion_summary",
    "convert",
    "guard_fast_paths",
    "instance_offset",
    "instance_plans",
    "kept_noise_state",
    "name_key",
    "noise_mode",
    "noisy_layers",
    "register_noisy",
    "resolve_output",
    "sample_axis_calls",
    "sample_plan",
    "set_instance",
    "set_noise_mode",
    "set_time",
    "stream_version",
    "strip",
    "unbatchable_modules",
    "unregister_noisy",
]

# The old module names keep working: nft_cuda.conversion and nft_cuda.sample_axis are the very same module
# objects (attribute reads and monkeypatching act on the real modules); nft_cuda.layers, whose contents
# now live in base.py, linear.py and conv.py, is this package (every name it had is here).
import sys as _sys

for _name in ("conversion", "sample_axis"):
    _module = _sys.modules[f"{__name__}.{_name}"]
    _sys.modules[f"nft_cuda.{_name}"] = _module
    setattr(_sys.modules["nft_cuda"], _name, _module)
_sys.modules["nft_cuda.layers"] = _sys.modules[__name__]
_sys.modules["nft_cuda"].layers = _sys.modules[__name__]
del _sys, _name, _module
