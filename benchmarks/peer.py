"""The peer library: IBM's aihwkit-lightning, set to inject the same noise as nft_cuda's RRAM1.

An optional benchmark dependency: ``pip install --no-deps aihwkit-lightning==2.1.0`` (its metadata pins
an older torch; its code is pure Python and runs on torch 2.14). When it is missing, the peer variants are
reported as skipped rows (:func:`skipped_row`) with the reason, and everything else runs.

Configuration (:func:`rpu_config`, as a new user would write it): ``TorchInferenceRPUConfig`` with
``modifier.noise_type = ADD_NORMAL`` and ``modifier.std_dev = σ_d · √4369/85`` (the RRAM1 scale of
8-bit weights on 2-bit devices), which adds ``std_dev · max|W| · N(0, 1)`` to every weight on every
training forward — nft_cuda's RRAM1 noise law. Every other non-ideality is off (its defaults: no input
range, input or output quantisation, output noise or bound, weight clipping or quantisation), and one tile
(``mapping.max_input_size = -1``), so max|W| is the whole layer's. It has no state-dependent noise, so
the peer cases use :data:`benchmarks.config.LAYER_VARIATION` (RRAM1).

Noise modes differ: the peer injects noise only while ``module.training`` (``model.eval()`` turns it off),
whereas nft_cuda's noise mode is explicit (``nft_cuda.set_noise_mode`` / ``noise_mode``;
``model.eval()`` leaves it on). :func:`benchmarks.checks.check_same_job` verifies both before timing.

Monte-Carlo inference has no peer variant: aihwkit-lightning has no inference-time noise that stays fixed
for a chip — in eval mode it adds no weight noise, and in train mode it redraws the noise on every forward
(every batch) and BatchNorm switches to batch statistics — so it cannot evaluate R fixed chip instances.

On CUDA with Triton and a Volta-or-newer GPU, the peer has its own kernels (``AIHWKIT_USE_TRITON=1``,
read on every forward): :func:`triton_available` and :func:`use_triton` give that variant too, checked
on a copy of its own; a Triton variant that fails its check is skipped with the error (2.1.0's conv path
raises a TypeError, its linear path writes the noise into the weights).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import nft_cuda
from benchmarks.environment import dist_version
from benchmarks.results import Row
from benchmarks.timing import Timing

NAME = "aihwkit-lightning"
INSTALL = "pip install --no-deps aihwkit-lightning==2.1.0"


#: Why the Monte-Carlo case has no peer variant (the row it leaves says so).
NO_MONTE_CARLO = (
    f"{NAME} cannot evaluate fixed chips: no weight noise in eval mode, and in train mode a new "
    "draw on every forward (every batch) with BatchNorm on batch statistics"
)


def _quiet_import():
    """Import aihwkit_lightning (its import prints a line when Triton cannot be used)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import aihwkit_lightning
        import aihwkit_lightning.nn  # noqa: F401  (the layers: where the Triton probe runs)
    return aihwkit_lightning


def missing() -> str:
    """Why the peer cannot run here ("" when it can)."""
    try:
        _quiet_import()
    except ImportError as exc:
        return f"{NAME} is not installed ({INSTALL}): {exc}"
    return ""


def version() -> str | None:
    return dist_version(NAME)


def noise_std(variation: nft_cuda.Variation) -> float:
    """The peer's ``modifier.std_dev`` for ``variation``: σ_d · scale (relative to max|W|)."""
    if variation.state_factor != 1.0:
        raise ValueError(f"{NAME} has no state-dependent noise: it can only match RRAM1, not {variation}")
    return variation.sigma * variation.scale


def rpu_config(variation: nft_cuda.Variation):
    """The ``TorchInferenceRPUConfig`` that injects ``variation``'s (RRAM1) noise and nothing else."""
    std = noise_std(variation)
    _quiet_import()
    from aihwkit_lightning.simulator.configs import (
        TorchInferenceRPUConfig,
        WeightClipType,
        WeightNoiseInjectionType,
        WeightQuantizationType,
    )

    cfg = TorchInferenceRPUConfig()
    cfg.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL
    cfg.modifier.std_dev = std
    cfg.modifier.quantization_type = WeightQuantizationType.NONE
    cfg.clip.type = WeightClipType.NONE
    cfg.forward.inp_res = -1  # no input quantisation
    cfg.forward.out_res = -1  # no output quantisation
    cfg.forward.out_noise = 0.0
    cfg.forward.out_bound = 0.0
    cfg.pre_post.input_range.enable = False
    cfg.mapping.max_input_size = -1  # one tile: max|W| over the whole layer
    return cfg


def describe(variation: nft_cuda.Variation) -> str:
    """The peer's configuration, as the table states it."""
    return (
        f"{NAME} {version() or '?'}: TorchInferenceRPUConfig, modifier ADD_NORMAL std_dev "
        f"{noise_std(variation):.5g} (= σ_d·√4369/85, of max|W|), no quantisation, clipping, input range "
        "or output noise, one tile"
    )


def convert(module: nn.Module, variation: nft_cuda.Variation) -> nn.Module:
    """``module`` (a copy) with every Linear/Conv converted to the peer's analog layers
    (``convert_to_analog``), noise set by :func:`rpu_config`."""
    _quiet_import()
    from aihwkit_lightning.nn.conversion import convert_to_analog

    with contextlib.redirect_stdout(io.StringIO()):
        return convert_to_analog(copy.deepcopy(module), rpu_config(variation))


def optimizer(model: nn.Module, **sgd):
    """The peer's optimizer for ``model``: ``AnalogOptimizer`` wrapping SGD (it clips weights after each
    step when a clip type is set; none is here)."""
    from aihwkit_lightning.optim import AnalogOptimizer

    return AnalogOptimizer(torch.optim.SGD, model.analog_layers, model.parameters(), **sgd)


def triton_available() -> bool:
    """The peer's Triton kernels can run here (Triton installed, a Volta-or-newer CUDA GPU)."""
    if missing() or not torch.cuda.is_available():
        return False
    from aihwkit_lightning.nn.modules import linear

    return bool(linear.TRITON_AVAIL)


@contextlib.contextmanager
def use_triton(enabled: bool = True):
    """The peer's layers on their Triton kernels inside the block (``AIHWKIT_USE_TRITON``, read on every
    forward; any non-empty value enables it)."""
    old = os.environ.pop("AIHWKIT_USE_TRITON", None)
    if enabled:
        os.environ["AIHWKIT_USE_TRITON"] = "1"
    try:
        yield
    finally:
        os.environ.pop("AIHWKIT_USE_TRITON", None)
        if old is not None:
            os.environ["AIHWKIT_USE_TRITON"] = old


def skipped_row(case: str, reason: str, variant: str = NAME) -> Row:
    """The row a peer variant leaves when it cannot run: no timing, the reason in its note."""
    return Row(case, variant, Timing(variant, math.nan, math.nan, math.nan, 0), note=f"skipped: {reason}", skipped=True)


def triton_variant() -> str:
    return f"{NAME} Triton"


@dataclass
class Variants:
    """The peer's variants of one case, after their same-job checks."""

    items: dict = field(default_factory=dict)  # variant → the function to time (layer) or the model (step)
    notes: dict = field(default_factory=dict)  # variant → its same-job check's note
    skipped: dict = field(default_factory=dict)  # variant → why it is not timed


def _triton_check(out: Variants, check) -> bool:
    """Run ``check()`` (a same-job check on the Triton path) and record its note, or why the Triton variant
    is skipped: the peer's Triton kernels are experimental (2.1.0: its conv path raises a TypeError, its
    linear path writes the noise into the weights), so their failure is reported, not fatal."""
    try:
        with use_triton():
            out.notes[triton_variant()] = check()
    except Exception as exc:  # noqa: BLE001 — any failure of the peer's own kernels
        out.skipped[triton_variant()] = f"its Triton path fails the same-job check: {type(exc).__name__}: {exc}"
        return False
    return True


def layer_variants(
    cfg, case: str, nft_layer: nn.Module, clean_layer: nn.Module, variation: nft_cuda.Variation, timed
) -> Variants:
    """The peer's variants of a layer case: its layer converted from ``clean_layer`` (same weights), checked
    to do the same job as ``nft_layer`` (:func:`~benchmarks.checks.check_same_job`), and ``timed(layer)``
    (the function to time for a layer) — on its Triton kernels too where they can run (a layer of its own).
    When the peer is missing, every variant is skipped with the reason."""
    from benchmarks import checks

    reason = missing()
    if reason:
        return Variants(skipped={NAME: reason})
    layer = convert(clean_layer, variation)
    out = Variants({NAME: timed(layer)}, {NAME: checks.check_same_job(nft_layer, layer, variation, case, NAME)})
    if cfg.cuda and triton_available():
        tlayer = convert(clean_layer, variation)
        if _triton_check(out, lambda: checks.check_same_job(nft_layer, tlayer, variation, case, triton_variant())):
            fn = timed(tlayer)

            def on_triton():
                with use_triton():
                    return fn()

            out.items[triton_variant()] = on_triton
    return out


def model_variants(cfg, case: str, nft_model: nn.Module, base: nn.Module, variation: nft_cuda.Variation) -> Variants:
    """The peer's variants of a model case: ``base`` converted (``convert_to_analog``), once per variant (each
    trains its own copy; the Triton one where it can run: time its steps inside :func:`use_triton`), checked
    layer by layer against ``nft_model``'s noisy layers of the same names (:func:`check_model`)."""
    reason = missing()
    if reason:
        return Variants(skipped={NAME: reason})
    model = convert(base, variation)
    out = Variants({NAME: model}, {NAME: check_model(nft_model, model, variation, f"{case} {NAME}")})
    if cfg.cuda and triton_available():
        tmodel = convert(base, variation)
        if _triton_check(out, lambda: check_model(nft_model, tmodel, variation, f"{case} {triton_variant()}")):
            out.items[triton_variant()] = tmodel
    return out


def check_model(nft_model: nn.Module, peer_model: nn.Module, variation: nft_cuda.Variation, case: str) -> str:
    """:func:`~benchmarks.checks.check_same_job` on each pair of same-named layers with ≥ 4096 weights (at
    most 16 draws pool a std within 0.3%; smaller layers are the conv case's block1) that are cheap to
    probe (fan-in ≤ 4608: the identity input of the first FC layer is not); at least one. Returns the
    note of the largest pair, naming it."""
    from aihwkit_lightning.nn import AnalogLayerBase

    from benchmarks import checks

    peer_layers = dict(peer_model.named_modules())
    note, largest = "", 0
    for name, layer in nft_cuda.noisy_layers(nft_model):
        w = layer.weight
        if w.numel() < 4096 or w[0].numel() > 4608:
            continue
        if not isinstance(peer_layers.get(name), AnalogLayerBase):
            raise checks.CheckError(f"{case}: {NAME} has no analog layer '{name}' to compare with nft_cuda's")
        text = checks.check_same_job(layer, peer_layers[name], variation, f"{case} layer {name}", NAME)
        if w.numel() > largest:
            note, largest = f"{text} (layer {name})", w.numel()
    if not note:
        raise checks.CheckError(f"{case}: no layer large enough to compare the noise of nft_cuda and {NAME}")
    return note


def finish(
    case_rows, rows: dict, case: str, nft_variant: str, peer: Variants, target: str | None = None, *, exact: bool = True
) -> None:
    """The peer's part of a case's results: each timed peer row gets its same-job note, nft_cuda's row its
    speed-up against it (the DESIGN §8 ``target`` against the row to beat: the Triton path where it ran,
    else the PyTorch one), the peer row its ratio to clean; each skipped variant leaves a row saying why."""
    ran = [k for k in (NAME, triton_variant()) if k in rows]
    for k in ran:
        rows[k].note = peer.notes.get(k, "")
        case_rows.compare(rows[nft_variant], rows[k], "speedup", target if k == ran[-1] else None, exact=exact)
    if "clean" in rows:
        for k in ran:
            case_rows.compare(rows[k], rows["clean"], "time")
    for k, reason in peer.skipped.items():
        case_rows.add(skipped_row(case, reason, k))
