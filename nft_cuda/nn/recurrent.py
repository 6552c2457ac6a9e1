"""Drop-in noisy ``nn.RNN``, ``nn.LSTM`` and ``nn.GRU`` (DESIGN §2, §3, §5).

Each subclasses its ``torch.nn`` class (same constructor, parameters and ``state_dict`` keys). Every
weight matrix of every layer and direction (``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}[_reverse]``
and the LSTM projection ``weight_hr_l{k}[_reverse]``) is noisy; the module is one noisy layer whose
crossbar tensor ``layer.weight`` is their flattened concatenation in ``_flat_weights_names`` order, so
one rng draws all of them (and one max|W| scales their noise). Biases stay digital.

Mode off is the plain module's forward (bit-identical). In modes train/instance and under sample plans
the forward draws the noisy weights with ``nft_cuda.ops.perturb`` for the layer's rng and runs the plain
forward with them in place of the parameters; the call is checkpointed, so backward redraws them (no
noisy weight stored) and the weight gradient is straight-through. With a sample axis of S samples the
batch axis (dim 0 with ``batch_first=True``, else dim 1; dim 1 of ``hx``) holds S chunks; packed
sequences take one sample only. On CUDA the noisy weights are not one contiguous cuDNN buffer, so
cuDNN may warn once and copy them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from nft_cuda.nn.base import NoisyModule, RetypedNoisy

# The same import list as nn/attention.py: both are several-weight crossbar layers built on the one
# machinery of nn/generic.py (not a copy to merge).
from nft_cuda.nn.generic import (
    SeveralWeightCrossbar,
    recomputed,
    sample_chunks,
    straight_through_samples,
)
from nft_cuda.nn.registry import register_class
from nft_cuda.variation import Variation

__all__ = ["NoisyGRU", "NoisyLSTM", "NoisyRNN"]


#: The cell types nn.RNNBase keeps in its own ``mode`` attribute.
_CELL_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


class _NoisyRNNBase(SeveralWeightCrossbar, RetypedNoisy):
    """The shared body of NoisyRNN/LSTM/GRU (``_plain`` is the torch class).

    ``nn.RNNBase`` names its cell type ``mode`` ("LSTM", "RNN_TANH", ...), as the noisy layers name their
    noise mode. Here ``mode`` is the noise mode; the cell type is kept in ``cell_mode`` and shown to
    torch's own code (its forward, ``flatten_parameters``) while that code runs."""

    _torch_reads_mode = False

    def __init__(
        self,
        *args,
        variation: Variation | None = None,
        mode: str | None = None,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> None:
        self._plain.__init__(self, *args, **kwargs)
        self._init_noise(variation, mode, generator)

    def init_noise(self, variation, mode, generator) -> None:
        self.cell_mode = vars(self).pop("mode")  # the plain module's cell type, shadowed by the property
        super().init_noise(variation, mode, generator)
        self._flat_weights = list(self._flat_weights)  # not the plain module's list: nn.RNNBase edits it in place

    @property
    def mode(self) -> str:
        return self.cell_mode if self._torch_reads_mode else NoisyModule.mode.fget(self)

    @mode.setter
    def mode(self, value) -> None:
        if isinstance(value, str) and value in _CELL_MODES:  # nn.RNNBase.__init__ / __setstate__
            self.cell_mode = value
        else:
            NoisyModule.mode.fset(self, value)

    @contextlib.contextmanager
    def _cell_mode_for_torch(self):
        self._torch_reads_mode = True
        try:
            yield
        finally:
            self._torch_reads_mode = False

    def flatten_parameters(self) -> None:
        with self._cell_mode_for_torch():
            self._plain.flatten_parameters(self)

    def plain_copy(self) -> nn.Module:
        plain = super().plain_copy()
        vars(plain).pop("cell_mode", None)
        vars(plain).pop("_torch_reads_mode", None)
        plain.mode = self.cell_mode
        return plain

    def crossbar_weight_names(self) -> tuple[str, ...]:
        return tuple(n for n in self._flat_weights_names if n.startswith("weight_"))

    def _check_input(self, input) -> None:
        return None  # nn.RNNBase checks its input (tensor or PackedSequence) itself

    def forward(self, input, hx=None):
        noise = self.forward_noise()
        if noise is None:
            with self._cell_mode_for_torch():
                return self._plain.forward(self, input, hx)

        def run(input, hx):
            weights = straight_through_samples(self, noise)
            samples = weights.shape[0]
            if samples == 1:
                return self._forward_with(weights[0], input, hx)
            if not isinstance(input, torch.Tensor) or input.dim() != 3:
                raise ValueError(f"a sample-axis forward with {samples} samples needs a batched (3-D) tensor input")
            xs = sample_chunks(input, samples, 0 if self.batch_first else 1)
            hs = _hidden_chunks(hx, samples)
            outs = [self._forward_with(weights[t], xs[t], hs[t]) for t in range(samples)]
            output = torch.cat([o[0] for o in outs], dim=0 if self.batch_first else 1)
            return output, _cat_hidden([o[1] for o in outs])

        return recomputed(run, input, hx)

    def _forward_with(self, crossbar: torch.Tensor, input, hx):
        """The plain forward with the weight matrices of crossbar tensor ``crossbar``."""
        parts = self.crossbar_parts(crossbar)
        plain = self._flat_weights
        self._flat_weights = [parts.get(name, w) for name, w in zip(self._flat_weights_names, plain)]
        try:
            with self._cell_mode_for_torch():
                return self._plain.forward(self, input, hx)
        finally:
            self._flat_weights = plain

    def extra_repr(self) -> str:
        return f"{self._plain.extra_repr(self)}, {self._noise_repr()}"


def _hidden_chunks(hx, samples: int) -> list:
    if isinstance(hx, tuple):  # LSTM (h, c)
        return list(zip(*[sample_chunks(h, samples, 1) for h in hx]))
    return sample_chunks(hx, samples, 1)


def _cat_hidden(hiddens: list):
    if isinstance(hiddens[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*hiddens))
    return torch.cat(hiddens, dim=1)


class NoisyRNN(_NoisyRNNBase, nn.RNN):
    """Drop-in ``nn.RNN`` with noisy weight matrices. Args: as ``nn.RNN``, plus ``variation``, ``mode`` and
    ``generator`` as :class:`~nft_cuda.NoisyLinear`."""

    _plain = nn.RNN


class NoisyLSTM(_NoisyRNNBase, nn.LSTM):
    """Drop-in ``nn.LSTM`` (``proj_size`` included) with noisy weight matrices. Args: as ``nn.LSTM``, plus
    ``variation``, ``mode`` and ``generator`` as :class:`~nft_cuda.NoisyLinear`."""

    _plain = nn.LSTM


class NoisyGRU(_NoisyRNNBase, nn.GRU):
    """Drop-in ``nn.GRU`` with noisy weight matrices. Args: as ``nn.GRU``, plus ``variation``, ``mode`` and
    ``generator`` as :class:`~nft_cuda.NoisyLinear`."""

    _plain = nn.GRU


for _noisy in (NoisyRNN, NoisyLSTM, NoisyGRU):
    register_class(_noisy._plain, _noisy)
del _noisy
