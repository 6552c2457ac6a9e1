"""The noise of every noisy layer: :class:`NoisyModule`, its noise modes, sample plans and noise state
(DESIGN §2, §3, §4.4, §5). The layer families build on it (``linear.py``, ``conv.py``, ``generic.py``,
``attention.py``, ``recurrent.py``, ``embedding.py``).

Each noisy layer subclasses its ``torch.nn`` counterpart (same constructor arguments, ``device=``/``dtype=``
included, same parameters and ``state_dict`` keys) and adds:

* ``variation``: the device model of the layer (a plain attribute, not a parameter): a
  :class:`~nft_cuda.Variation` or any :class:`nft_cuda.devices.DeviceModel` (PCM, LogNormal, StuckAt;
  the name stays ``variation`` for compatibility);
* ``mode``: the noise mode (DESIGN §2 "When noise is drawn"):

  - ``"train"``: a fresh draw on every forward call. The layer draws its rng tensor int64[2] =
    (seed, offset) with ``torch.randint`` on the weight's device from torch's default generator, or from
    ``generator`` when one is set, so ``torch.manual_seed`` reproduces a run, nothing synchronises with
    the host and a captured CUDA graph draws fresh noise on every replay;
  - ``"instance"``: one fixed draw per chip instance: layer ℓ (``layer_index``, the layer's key: in
    noise stream version 2, :data:`nft_cuda.nn.keys.NOISE_STREAM_VERSION`, 31 bits of the SHA-256 of its qualified name,
    :func:`nft_cuda.nn.keys.name_key`; in version 1 its position among the noisy layers) of instance r uses
    (seed = the evaluation seed, offset = (ℓ << 32) | r), the same on every forward. Without
    gradients the layer computes that noisy weight once per chip and keeps it (see
    :meth:`NoisyModule.set_instance`, "Cached chip weights");
  - ``"off"``: the clean weight (plain ``F.linear`` / ``F.conv``).

  The noise mode is independent of ``module.training``: **``model.eval()`` does not switch the noise
  off** (unlike aihwkit's layers, whose noise follows ``training``); it only sets BatchNorm/Dropout to
  inference, and robustness evaluation runs noisy layers in ``eval()`` mode. Switch the noise
  explicitly: ``model.eval(); nft_cuda.set_noise_mode(model, "off")`` for clean weights, or
  ``with nft_cuda.noise_mode(model, "off"): ...`` for one block.
* ``generator``: an optional ``torch.Generator`` (on the weight's device) for the train-mode draws.

The noise of a forward is exactly ``nft_cuda.ops.perturb(weight, variation, rng=rng)[0]`` for that
forward's rng. The noisy weight is a temporary of the forward: backward saves only the inputs, the
(clean) weight parameter and the rng tensor, and regenerates the noisy weight from the rng (DESIGN §3).
The weight gradient is straight-through (DESIGN §2): dL/dW = dL/dW_noisy, e.g. gᵀx for a linear layer.
Double backward raises a RuntimeError. Under ``torch.autocast`` the weight is perturbed in its own dtype
and the matmul/convolution runs in the autocast dtype, as ``F.linear``/``F.conv2d`` would.

A layer constructed without a variation has mode ``"off"`` (a plain layer); asking for ``"train"`` or
``"instance"`` without a variation raises ValueError.

Every mode traces under ``torch.compile(fullgraph=True)`` without graph breaks (autocast included); the
compiled graph, too, saves only the rng and regenerates the noise in backward. (On CPU with torch 2.14
the compiled and eager draws are the same for one ``torch.manual_seed``; inductor does not promise that
for random ops in general, only reproducibility of each.)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from nft_cuda import _args, ops
from nft_cuda.devices import DeviceModel
from nft_cuda.nn import mvm as _mvm

__all__ = [
    "MODES",
    "NoiseState",
    "NoisyModule",
    "RetypedNoisy",
    "SamplePlan",
    "check_sample_batch",
    "instance_offset",
    "noisy_subclass",
    "per_sample",
    "perturbed_weights",
    "retyped_copy",
    "split_samples",
]

#: Noise modes of a noisy layer.
MODES = ("train", "instance", "off")


# --------------------------------------------------------------------------------------------------
# Noise: exactly nft_cuda.ops.perturb (traced by torch.compile without a graph break).
# --------------------------------------------------------------------------------------------------


def _programmed(weight: torch.Tensor, variation: DeviceModel) -> torch.Tensor:
    """The weight as programmed (detached; model 4's weight levels, :func:`nft_cuda.nn.mvm.programmed`)."""
    return _mvm.programmed(weight.detach(), variation)


def _noisy_weight(weight: torch.Tensor, rng: torch.Tensor, variation: DeviceModel) -> torch.Tensor:
    """W_noisy [*weight.shape] = ``ops.perturb(weight, variation, rng=rng, samples=1)[0]`` (detached)."""
    return ops.perturb(_programmed(weight, variation), variation, rng=rng)[0]


def perturbed_weights(
    weight: torch.Tensor, rng: torch.Tensor, variation: DeviceModel, sigmas: torch.Tensor | None
) -> torch.Tensor:
    """[S, *weight.shape]: the S noisy weights of a sample-axis forward (S = 1 without ``sigmas``)."""
    programmed = _programmed(weight, variation)
    if sigmas is None:
        return ops.perturb(programmed, variation, rng=rng)
    return ops.perturb(programmed, variation, rng=rng, samples=sigmas.shape[0], sigmas=sigmas)


def check_sample_batch(t: torch.Tensor, samples: int) -> None:
    """Raise unless the batch axis of ``t`` holds ``samples`` chunks of equal size ([S·B, ...])."""
    if samples > 1 and (t.dim() == 0 or t.shape[0] % samples):
        raise ValueError(
            f"a sample-axis forward with {samples} samples needs a batch that is a multiple of "
            f"{samples}, got {t.shape[0] if t.dim() else 0}"
        )


def split_samples(t: torch.Tensor, samples: int) -> list[torch.Tensor]:
    """The S chunks of a tensor whose batch axis holds S samples of B rows each ([S·B, ...])."""
    if samples == 1:
        return [t]
    check_sample_batch(t, samples)
    return list(t.chunk(samples, dim=0))


def per_sample(fn, weights: torch.Tensor, *batched: torch.Tensor) -> torch.Tensor:
    """``fn(weights[t], chunk t of each tensor in batched)`` for the S = len(weights) samples, concatenated
    along the batch axis (the per-sample loop of every sample-axis forward and backward). Each chunk goes
    through the same operations on the same shapes as a one-sample call, so results do not depend on S."""
    samples = weights.shape[0]
    parts = [split_samples(t, samples) for t in batched]
    outs = []  # a plain loop: a comprehension would make the caller's weights a cell dynamo cannot `del`
    for t in range(samples):
        outs.append(fn(weights[t], *[p[t] for p in parts]))
    return outs[0] if samples == 1 else torch.cat(outs, dim=0)


# --------------------------------------------------------------------------------------------------
# The noise state of a layer
# --------------------------------------------------------------------------------------------------


def instance_offset(layer_index: int, instance: int) -> int:
    """The stream offset of chip instance r of noisy layer ℓ: (ℓ << 32) | r (DESIGN §2). The one place
    this formula is written: instance mode, :func:`nft_cuda.set_instance` and Monte-Carlo plans use it."""
    layer_index = _args.check_uint("layer_index", layer_index, 31)
    instance = _args.check_uint("instance", instance, 32)
    return (layer_index << 32) | instance


def _check_mode(mode) -> str:
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, one of {', '.join(MODES)}; got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown noise mode '{mode}'; choose one of {', '.join(MODES)}")
    return mode


class SamplePlan(NamedTuple):
    """The noise of a layer's following forwards, set by :meth:`NoisyModule.set_sample_plan`.

    The batch axis holds S = len(sigmas) chunks; chunk t uses stream t of ``rng`` (offset + t) at
    σ_d = ``sigmas[t]``. ``weights`` [S, *weight.shape], when given, are those S noisy weights drawn in
    advance (:meth:`NoisyModule.noisy_weights`), so a Monte-Carlo pass draws them once for a whole test
    set instead of once per batch; the forward then uses them as they are (no weight gradient).
    """

    rng: torch.Tensor
    sigmas: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def samples(self) -> int:
        return self.sigmas.shape[0]

    def select(self, t: int) -> SamplePlan:
        """The one-sample plan of sample t (stream offset + t)."""
        rng = torch.stack((self.rng[0], self.rng[1] + t))
        weights = None if self.weights is None else self.weights[t : t + 1]
        return SamplePlan(rng, self.sigmas[t : t + 1], weights)


@dataclasses.dataclass(frozen=True)
class NoiseState:
    """A snapshot of a layer's noise settings (:meth:`NoisyModule.noise_state`), restored by
    :meth:`NoisyModule.restore_noise_state`. The instance rng buffer is kept as the same tensor object
    (a captured graph may hold it) together with a copy of its values."""

    variation: DeviceModel | None
    mode: str
    layer_index: int
    instance_seed: int | None
    instance: int | None
    instance_rng: torch.Tensor | None
    instance_rng_values: torch.Tensor | None
    sample_plan: SamplePlan | None
    layer_name: str | None = None
    stream_version: int | None = None


class NoisyModule(nn.Module):
    """Noise state shared by the noisy layers (a mixin; see the module docstring).

    Attributes:
        variation: the device model (:class:`~nft_cuda.Variation` or another
            :class:`nft_cuda.devices.DeviceModel`) or None (then the mode is ``"off"``).
        mode: ``"train"``, ``"instance"`` or ``"off"``.
        generator: ``torch.Generator`` or None (torch's default) for train-mode draws.
        layer_index: ℓ, the layer's key in its model's noise stream (DESIGN §2; set by
            :func:`nft_cuda.convert` / :func:`nft_cuda.set_instance`, see
            :func:`nft_cuda.nn.keys.assign_layer_keys`; 0 for a lone layer).
        layer_name: the qualified name ℓ was made from (version 2), or the layer's name when it was
            numbered (version 1); None before a model-level call gave it a key.
        stream_version: the noise stream version ℓ belongs to (:data:`NOISE_STREAM_VERSION` or 1), or
            None (not yet keyed by a model-level call).
        instance_seed, instance: the (seed, r) of the last :meth:`set_instance`, or None.
        sample_plan: the :class:`SamplePlan` overriding the noise of the next forwards, or None.
        cache_instance_weights: whether instance mode keeps the chip's noisy weight (default True; see
            :meth:`set_instance`).

    The noise state (all of the above but ``generator``) is read with :meth:`noise_state`, put back
    with :meth:`restore_noise_state`, and kept over a block with ``with layer.kept_noise_state(): ...``.
    """

    #: The attributes (and the buffer ``_instance_rng``) :meth:`_init_noise` adds to the plain module.
    NOISE_ATTRIBUTES = (
        "_variation",
        "_mode",
        "generator",
        "layer_index",
        "layer_name",
        "stream_version",
        "instance_seed",
        "instance",
        "_sample_plan",
        "_mvm_ranges",
        "cache_instance_weights",
        "_instance_generation",
        "_instance_cache",
    )
    #: The non-persistent buffers of the noise state: the instance rng and the MVM forward counter.
    NOISE_BUFFERS = ("_instance_rng", "_mvm_counter")
    #: The state a device model adds to a layer (learned input ranges, devices.InputRange): a parameter
    #: and a persistent buffer, dropped again by strip.
    NOISE_PARAMETERS = ("input_range",)
    NOISE_STATE_BUFFERS = ("input_range_updates",)

    def _init_noise(self, variation, mode, generator) -> None:
        self._variation = None
        self._mode = "off"
        self.variation = variation
        self.mode = ("train" if variation is not None else "off") if mode is None else mode
        self.generator = generator
        self.layer_index = 0
        self.layer_name: str | None = None
        self.stream_version: int | None = None
        self.instance_seed: int | None = None
        self.instance: int | None = None
        self.register_buffer("_instance_rng", None, persistent=False)
        self.register_buffer("_mvm_counter", None, persistent=False)
        self._sample_plan: SamplePlan | None = None
        self._mvm_ranges: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        self.cache_instance_weights = True
        self._instance_generation = 0  # bumped whenever the instance rng may change (the cache's key)
        self._instance_cache: tuple[tuple, torch.Tensor] | None = None

    # -- attributes ---------------------------------------------------------------------------------

    @property
    def variation(self) -> DeviceModel | None:
        return self._variation

    @variation.setter
    def variation(self, value) -> None:
        if value is not None and not isinstance(value, DeviceModel):
            raise TypeError(
                "variation must be an nft_cuda.Variation, another nft_cuda.devices device model, or None, "
                f"got {type(value).__name__}"
            )
        if value is None and getattr(self, "_mode", "off") != "off":
            raise ValueError(
                f"cannot remove the variation of a layer in noise mode '{self._mode}'; set mode='off' first"
            )
        self._variation = value
        self._sync_learned_ranges()

    def _sync_learned_ranges(self) -> None:
        """Give the layer its trainable DAC ranges (one per input tile, parameter ``input_range``, and the
        count of data initialisations, buffer ``input_range_updates``) when its device model learns them
        (``mvm.learned_input_range``) and it runs its own MVM (NoisyLinear, NoisyConv); kept otherwise."""
        mvm = getattr(self._variation, "mvm", None)
        learned = getattr(mvm, "learned_input_range", None)
        if learned is None or not hasattr(self, "tile_inputs"):
            return
        tiles = self._variation.tiles if self._variation.tiled else None
        count = tiles.count(tuple(self.weight.shape))[1] if tiles is not None else 1
        current = self._parameters.get("input_range")
        if current is not None and current.shape == (count,):
            return
        device = self.weight.device
        self.input_range = nn.Parameter(torch.full((count,), learned.init_value, dtype=torch.float32, device=device))
        self.register_buffer("input_range_updates", torch.zeros(count, dtype=torch.int64, device=device))

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value) -> None:
        value = _check_mode(value)
        if value != "off" and self._variation is None:
            raise ValueError(
                f"noise mode '{value}' needs a variation; pass variation=nft_cuda.Variation(...) or use mode='off'"
            )
        if value == "instance" and self._buffers.get("_instance_rng") is None:
            raise ValueError(
                "noise mode 'instance' needs a chip instance: call set_instance(seed, instance) "
                "(or nft_cuda.set_instance(model, seed, instance))"
            )
        if value != "instance":
            self._instance_cache = None  # leaving instance mode frees the chip's cached weight
        self._mode = value

    @property
    def sample_plan(self) -> SamplePlan | None:
        return self._sample_plan

    def set_instance(self, seed: int, instance: int, layer_index: int | None = None) -> None:
        """Switch to mode ``"instance"``: rng = (seed, instance_offset(layer_index, instance)) (DESIGN §2).

        Args:
            seed: the evaluation seed, in [0, 2^63).
            instance: the chip instance r, in [0, 2^32).
            layer_index: ℓ in [0, 2^31); default: the layer's current ``layer_index``.

        The rng is a non-persistent int64[2] buffer on the weight's device (it follows ``.to()``);
        an existing one is updated in place without a host synchronisation, so a CUDA graph or a
        compiled graph captured in instance mode sees the new instance.

        Cached chip weights. A forward without gradients (``torch.no_grad()``, ``inference_mode``) in
        instance mode computes the chip's noisy weight once and keeps it for the following forwards
        (exactly the weight it would draw: the results are bit-identical; memory: one noisy copy of the
        layer's crossbar weight). The copy is recomputed when :meth:`set_instance` or
        :meth:`restore_noise_state` runs, the variation changes, or a crossbar weight parameter is
        changed in place or replaced (its ``_version`` or storage moves, e.g. an optimizer step,
        ``load_state_dict`` or ``.to()``); it is dropped when the layer leaves instance mode. The check
        reads only Python-side state (no host synchronisation). Forwards with gradients, inside
        ``torch.compile`` tracing or CUDA graph capture always draw the weight (they keep the
        documented graph behaviour). Change the instance only through :meth:`set_instance`; set
        ``cache_instance_weights = False`` (or ``nft_cuda.set_instance(model, ..., cache=False)``) to
        trade the memory for a draw per forward.
        """
        if self._variation is None:
            raise ValueError("set_instance needs a variation; set layer.variation first")
        seed = _args.check_seed_int("seed", seed)
        instance = _args.check_uint("instance", instance, 32)
        if layer_index is None:
            layer_index = self.layer_index
        layer_index = _args.check_uint("layer_index", layer_index, 31)
        offset = instance_offset(layer_index, instance)
        device = self.weight.device
        buf = self._buffers.get("_instance_rng")
        if buf is None or buf.device != device:
            self._instance_rng = _args.make_rng(seed, offset, device)
        else:
            buf[0].fill_(seed)
            buf[1].fill_(offset)
        self.layer_index = layer_index
        self.instance_seed, self.instance = seed, instance
        self._mode = "instance"
        self._instance_generation += 1
        self._instance_cache = None
        self._reset_mvm_counter()

    # -- noise state --------------------------------------------------------------------------------

    def noise_state(self) -> NoiseState:
        """A snapshot of the noise settings (variation, mode, instance, sample plan)."""
        buf = self._buffers.get("_instance_rng")
        return NoiseState(
            self._variation,
            self._mode,
            self.layer_index,
            self.instance_seed,
            self.instance,
            buf,
            None if buf is None else buf.clone(),
            self._sample_plan,
            self.layer_name,
            self.stream_version,
        )

    def restore_noise_state(self, state: NoiseState) -> None:
        """Put back a snapshot of :meth:`noise_state` exactly (the instance rng buffer in place)."""
        if not isinstance(state, NoiseState):
            raise TypeError(f"state must be a NoiseState from noise_state(), got {type(state).__name__}")
        if state.instance_rng is not None:
            state.instance_rng.copy_(state.instance_rng_values)
        self._buffers["_instance_rng"] = state.instance_rng
        self._variation = state.variation
        self._mode = state.mode
        self.layer_index, self.instance_seed, self.instance = state.layer_index, state.instance_seed, state.instance
        self.layer_name, self.stream_version = state.layer_name, state.stream_version
        self._sample_plan = state.sample_plan
        self._instance_generation += 1  # the rng values were put back: the cached chip may be another
        self._instance_cache = None

    @contextlib.contextmanager
    def kept_noise_state(self) -> Iterator[NoisyModule]:
        """Context manager: whatever the block changes, the noise state is restored on exit."""
        state = self.noise_state()
        try:
            yield self
        finally:
            self.restore_noise_state(state)

    # -- noise ------------------------------------------------------------------------------------

    def set_sample_plan(
        self, rng: torch.Tensor | None, sigmas: torch.Tensor | None = None, *, weights: torch.Tensor | None = None
    ) -> None:
        """Override the noise of the following forwards (used by OVF, IRS and batched Monte-Carlo; see
        :class:`SamplePlan` and :mod:`nft_cuda.nn.sample_axis`): stream t of ``rng`` (offset + t) at
        σ_d = ``sigmas[t]`` for the t-th chunk of the batch axis, S = len(sigmas) (default: one sample at
        the layer's σ_d). ``weights`` [S, *weight.shape]: those noisy weights, drawn in advance with
        :meth:`noisy_weights`. ``rng=None`` restores the layer's own mode."""
        self._reset_mvm_counter()
        if rng is None:
            self._sample_plan = None
            return
        if self._variation is None:
            raise ValueError("a sample plan needs a variation; set layer.variation first")
        if sigmas is None:
            sigmas = torch.full((1,), self._variation.sigma, dtype=torch.float32, device=rng.device)
        if weights is not None and weights.shape != (sigmas.shape[0], *self.weight.shape):
            raise ValueError(
                f"plan weights must have shape [{sigmas.shape[0]}, *weight.shape] = "
                f"{[sigmas.shape[0], *self.weight.shape]}, got {list(weights.shape)}"
            )
        self._sample_plan = SamplePlan(rng, sigmas, weights)

    def set_chip_weight(self, weight: torch.Tensor, rng: torch.Tensor | None = None) -> None:
        """The following forwards use ``weight`` [*weight.shape] as this layer's noisy weight: a one-sample
        :class:`SamplePlan` carrying it (for a chip changed by hand: write-verified, censored, searched).
        ``rng``: the stream the plan names (the per-MVM read noise draws from it; default zeros).
        ``set_sample_plan(None)`` restores the layer's own mode."""
        if weight.shape != self.weight.shape:
            raise ValueError(
                f"a chip weight must have the weight's shape {list(self.weight.shape)}, got {list(weight.shape)}"
            )
        if self._variation is None:
            raise ValueError("a chip weight needs a variation; set layer.variation first")
        if rng is None:
            rng = torch.zeros(2, dtype=torch.int64, device=weight.device)
        sigmas = torch.full((1,), self._variation.sigma, dtype=torch.float32, device=weight.device)
        self.set_sample_plan(rng, sigmas, weights=weight.unsqueeze(0))

    def _check_input(self, input) -> None:
        """A clear error for an input that is not a tensor or is on another device than the weight (the
        same exception types as the plain layer, but naming both devices); checked before any draw."""
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(input).__name__}")
        if input.device != self.weight.device:
            raise RuntimeError(
                f"{type(self).__name__}: input is on {input.device} but the weight is on "
                f"{self.weight.device}; move one of them (e.g. layer.to(input.device))"
            )

    def forward_noise(self) -> SamplePlan | None:
        """The noise of the next forward: the sample plan if one is set, else a one-sample plan with the
        rng of the layer's own mode (sigmas None: the layer's σ_d; a fresh draw in mode train), or None
        for a clean forward (mode off)."""
        plan = self._sample_plan
        if plan is None:
            rng = self._forward_rng()
            if rng is None:
                return None
            plan = SamplePlan(rng, None)
        if self.weight.device.type == "meta":
            raise RuntimeError(
                f"{type(self).__name__}: its weight is on the meta device (a shape without values), so there "
                "is nothing to perturb; materialise the model first (model.to_empty(device=...) then "
                "load_state_dict(...)), or use noise mode 'off' for shape-only runs"
            )
        if self._sample_plan is None and self._mode == "instance" and self._may_cache(plan.rng):
            return self._cached_instance_plan(plan.rng)
        return plan

    # -- cached chip weights (instance mode, see set_instance) ----------------------------------------

    def _may_cache(self, rng: torch.Tensor) -> bool:
        """Whether this instance-mode forward may use (and fill) the cached chip weight: no gradients,
        not traced by torch.compile, not captured into a CUDA graph (a replay must redraw)."""
        if not self.cache_instance_weights or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        return not (rng.is_cuda and torch.cuda.is_current_stream_capturing())

    def _weight_stamp(self) -> tuple | None:
        """What the cached chip weight was computed from, read on the host only: the instance generation,
        the variation, and each crossbar parameter's storage, version counter, dtype and device (None when
        a parameter has no version counter, e.g. an inference tensor: then nothing is cached)."""
        stamp = [self._instance_generation, self._variation]
        for p in self.crossbar_parameters():
            try:
                stamp.append((p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)))
            except RuntimeError:
                return None
        return tuple(stamp)

    def _cached_instance_plan(self, rng: torch.Tensor) -> SamplePlan:
        """The one-sample plan of this chip with its noisy weight [1, *weight.shape], drawn on the first
        forward after a change of the stamp and kept."""
        stamp = self._weight_stamp()
        if stamp is None:
            return SamplePlan(rng, None)
        cache = self._instance_cache
        if cache is None or cache[0] != stamp:
            with torch.no_grad():
                cache = (stamp, perturbed_weights(self.weight, rng, self._variation, None))
            self._instance_cache = cache
        return SamplePlan(rng, None, cache[1])

    def _forward_rng(self) -> torch.Tensor | None:
        """The rng tensor of this forward in the layer's own mode, or None in mode off."""
        mode = self._mode
        if mode == "off":
            return None
        if self._variation is None:
            raise RuntimeError(f"{type(self).__name__} in noise mode '{mode}' has no variation")
        if mode == "instance":
            rng = self._instance_rng
            if rng.device != self.weight.device:
                raise RuntimeError(
                    f"the instance rng is on {rng.device} but the weight is on {self.weight.device}; "
                    "call set_instance again after moving the weight"
                )
            return rng
        gen = self.generator
        if gen is not None and gen.device != self.weight.device:
            raise ValueError(f"generator is on {gen.device} but the weight is on {self.weight.device}")
        return _args.random_rng(self.weight.device, gen)

    def noisy_weight(self, rng: torch.Tensor | None = None) -> torch.Tensor:
        """The noisy weight W_noisy [*weight.shape] (detached) for ``rng`` (int64[2] on the weight's
        device), or for the rng the layer's next forward would use (a fresh draw in mode train).
        Equal to ``nft_cuda.ops.perturb(weight, variation, rng=rng)[0]``; the clean weight in mode off
        when no rng is given."""
        if rng is None:
            rng = self._forward_rng()
            if rng is None:
                return self.weight.detach().clone()
        elif self._variation is None:
            raise ValueError("noisy_weight needs a variation")
        with torch.no_grad():
            return _noisy_weight(self.weight, rng, self._variation)

    def noisy_weights(self, rng: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The S = len(sigmas) noisy weights [S, *weight.shape] (detached) a sample plan (rng, sigmas)
        gives: exactly what the layer's sample-plan forward draws, ready for ``set_sample_plan(weights=)``."""
        if self._variation is None:
            raise ValueError("noisy_weights needs a variation")
        with torch.no_grad():
            return perturbed_weights(self.weight, rng, self._variation, sigmas)

    # -- per-MVM effects (models 4 and 5, nft_cuda.nn.mvm) ------------------------------------------

    @property
    def mvm_ranges(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(r_in, r_out): the DAC and ADC ranges of this layer (0-d float32 tensors on the weight's
        device, set by :func:`nft_cuda.nn.calibration.calibrate_mvm`), None where uncalibrated."""
        return self._mvm_ranges

    def set_mvm_ranges(self, input_range, output_range) -> None:
        """Set the converter ranges r_in, r_out (floats or 0-d tensors >= 0, or None for the per-chunk max).
        A tiled layer (``variation.tiles``) has one r_in per input tile [T_in] and one r_out per input tile
        and output tile [T_in, T_out]; a number is used for every tile."""
        shapes = ((), ())
        if self._variation is not None and self._variation.tiled:
            t_out, t_in = self._variation.tiles.count(tuple(self.weight.shape))
            shapes = ((t_in,), (t_in, t_out))
        ranges = []
        for name, r, shape in (("input_range", input_range, shapes[0]), ("output_range", output_range, shapes[1])):
            if r is not None:
                r = torch.as_tensor(r, dtype=torch.float32).detach().to(self.weight.device)
                if r.dim() == 0:
                    r = r.expand(shape).clone()
                if tuple(r.shape) != shape or not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
                    want = "a finite number >= 0" + (
                        f" or a tensor of shape {list(shape)} (one per tile)" if shape else ""
                    )
                    raise ValueError(f"{name} must be {want} or None, got {r}")
            ranges.append(r)
        self._mvm_ranges = (ranges[0], ranges[1])

    def mvm_counter(self) -> torch.Tensor:
        """The layer's MVM forward counter c (int64 0-d, on the weight's device): the read noise of a
        forward is drawn at c (nft_cuda.mvm_ops.read_noise_normals); 0 after set_instance/set_sample_plan.
        It counts the forwards of a fixed stream (instance mode, sample plans); in mode train every forward
        has a fresh rng already, so c stays 0 there and torch's generator alone decides the draws."""
        buf = self._buffers.get("_mvm_counter")
        if buf is None or buf.device != self.weight.device:
            buf = torch.zeros((), dtype=torch.int64, device=self.weight.device)
            self._mvm_counter = buf
        return buf

    def advance_mvm_counter(self) -> None:
        """c += 1 in place (no host synchronisation) after a forward of a fixed stream."""
        if self._sample_plan is not None or self._mode == "instance":
            with torch.no_grad():
                self.mvm_counter().add_(1)

    def _reset_mvm_counter(self) -> None:
        buf = self._buffers.get("_mvm_counter")
        if buf is not None:
            with torch.no_grad():
                buf.zero_()

    def _mvm_forward(self, input: torch.Tensor, noise: SamplePlan):
        """The forward under the model's MVM effects, or None when none acts around the GEMM."""
        mvm = _mvm.active_mvm(self._variation)
        if mvm is None:
            return None
        return _mvm.mvm_forward(self, input, noise, mvm)

    def plan_weight(self, plan: SamplePlan) -> torch.Tensor:
        """The noisy weight of a one-sample plan, materialised (straight-through gradient): the per-tile
        MVM forward multiplies it tile by tile."""
        if plan.weights is not None:
            return plan.weights[0]
        noisy = perturbed_weights(self.weight, plan.rng, self._variation, plan.sigmas)[0]
        if self.weight.requires_grad and torch.is_grad_enabled():
            noisy = noisy + (self.weight - self.weight.detach())  # dL/dW = dL/dW_noisy
        return noisy

    def _noise_repr(self) -> str:
        return f"variation={self._variation}, mode={self._mode}"

    def crossbar_weight_names(self) -> tuple[str, ...]:
        """Names of the parameters this layer perturbs (``weight`` is their crossbar tensor)."""
        return ("weight",)

    def crossbar_parameters(self) -> list[torch.Tensor]:
        """The tensors the crossbar weight is made from: each crossbar weight, or, for a weight under a
        torch parametrization (``torch.nn.utils.parametrize``), the parameters of that parametrization
        (its ``original`` and those of its modules; the noise then acts on the parametrized weight)."""
        out = []
        for name in self.crossbar_weight_names():
            if parametrize.is_parametrized(self, name):
                out.extend(self.parametrizations[name].parameters())
            else:
                out.append(getattr(self, name))
        return out

    @torch.no_grad()
    def load_crossbar_(self, value: torch.Tensor) -> None:
        """Copy ``value`` [*weight.shape] into the parameter(s) behind ``weight``, in place (through the
        parametrization's ``right_inverse`` for a parametrized weight)."""
        if parametrize.is_parametrized(self, "weight"):
            self.weight = value
        else:
            self.weight.copy_(value)


# --------------------------------------------------------------------------------------------------
# Plain module <-> noisy layer: the same object state under another class
# --------------------------------------------------------------------------------------------------

#: The hook tables of an ``nn.Module``: shared, not copied, by :func:`retyped_copy`, so a handle a user
#: holds from ``register_forward_hook`` & co. still removes the hook from the converted layer.
_STATE_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def retyped_copy(module: nn.Module, cls: type) -> nn.Module:
    """``module``'s state under class ``cls``: every attribute (a subclass's own attributes included), the
    same Parameter, buffer and submodule objects in containers of its own, and the very hook tables
    (forward, pre-forward, backward, state-dict hooks: they keep firing, and their handles keep working).
    ``cls`` is a noisy class standing for ``type(module)`` or, for a noisy layer, the plain class to
    return to (then the noise state is left behind). Nothing is allocated: meta-device modules retype too."""
    state = dict(vars(module))
    for key in _STATE_CONTAINERS:
        state[key] = type(state[key])(state[key])
    if not issubclass(cls, NoisyModule):
        for name in NoisyModule.NOISE_ATTRIBUTES:
            state.pop(name, None)
        for name in NoisyModule.NOISE_BUFFERS + NoisyModule.NOISE_STATE_BUFFERS:
            state["_buffers"].pop(name, None)
            state["_non_persistent_buffers_set"].discard(name)
        for name in NoisyModule.NOISE_PARAMETERS:
            state["_parameters"].pop(name, None)
    new = cls.__new__(cls)
    vars(new).update(state)
    return new


#: (noisy class, the plain subclass it was asked to convert) → the noisy class made for that subclass
_SUBCLASS_TYPES: dict[tuple[type, type], type] = {}


def noisy_subclass(noisy_cls: type, plain_subclass: type) -> type:
    """The noisy class of a subclass of ``noisy_cls._plain`` (e.g. a user's ``nn.Linear`` subclass with
    extra attributes, or torch's parametrized ``ParametrizedLinear``): ``Noisy<Name>``, a subclass of both
    ``noisy_cls`` and ``plain_subclass``, so the converted layer is still an instance of the user's class
    and strips back to it. Made once per pair."""
    if noisy_cls._subclass is plain_subclass:
        return noisy_cls
    key = (noisy_cls, plain_subclass)
    if key not in _SUBCLASS_TYPES:
        body = {
            "_subclass": plain_subclass,
            "__module__": noisy_cls.__module__,
            "__doc__": f"{noisy_cls.__name__} for {plain_subclass.__qualname__} (made by nft_cuda.convert).",
        }
        _SUBCLASS_TYPES[key] = type(f"Noisy{plain_subclass.__name__}", (noisy_cls, plain_subclass), body)
    return _SUBCLASS_TYPES[key]


def _class_phrase(cls: type) -> str:
    """'an nn.Linear', 'a MyLayer': how an error names the class a method expects."""
    name = f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__name__
    return f"{'an' if name.startswith('nn.') or name[0] in 'AEIOUaeiou' else 'a'} {name}"


class RetypedNoisy(NoisyModule):
    """A noisy class standing for the plain class ``_plain``, made from a plain module by retyping it
    (:func:`retyped_copy`): conversion loses nothing of the module (a subclass's attributes, extra
    buffers and parameters, hooks, the train/eval flag) and :meth:`plain_copy` gives it back as it was,
    its class included. A subclass of ``_plain`` gets a noisy class of its own (:func:`noisy_subclass`)."""

    _plain: type
    #: the subclass of ``_plain`` this class was made for (:func:`noisy_subclass`), or None
    _subclass: type | None = None

    @classmethod
    def from_module(cls, module: nn.Module, variation=None, *, mode: str | None = None, generator=None):
        """The noisy version of ``module`` (the same Parameter, buffer, submodule and hook objects)."""
        if not isinstance(module, cls._plain):
            raise TypeError(
                f"{cls.__name__}.from_module expects {_class_phrase(cls._plain)}, got {type(module).__name__}"
            )
        target = cls if type(module) in (cls._plain, cls._subclass) else noisy_subclass(cls, type(module))
        new = retyped_copy(module, target)
        new.init_noise(variation, mode, generator)
        return new

    def init_noise(self, variation, mode, generator) -> None:
        """Start the noise state of a retyped copy."""
        self._init_noise(variation, mode, generator)

    def plain_copy(self) -> nn.Module:
        """The plain module with the same state and class it had (what :func:`nft_cuda.strip` puts back)."""
        return retyped_copy(self, self._subclass or self._plain)

    def extra_repr(self) -> str:
        return f"{self._plain.extra_repr(self)}, {self._noise_repr()}"
