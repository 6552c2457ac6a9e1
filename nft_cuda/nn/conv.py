"""The noisy convolutions: :class:`NoisyConv1d` and :class:`NoisyConv2d`, drop-in ``nn.Conv1d`` /
``nn.Conv2d`` (DESIGN §2, §3, §5): every padding mode, string paddings, groups and dilation.

Their noise, modes and state are those of every noisy layer (:mod:`nft_cuda.nn.base`); the forward runs
the autograd Function of :mod:`nft_cuda.nn.functions` (the input pre-padded where ``nn.ConvNd`` pads
explicitly) or the per-MVM effects of :mod:`nft_cuda.nn.mvm`. ``nn.Conv1d``/``nn.Conv2d`` and their
subclasses that keep the forward are registered here (:mod:`nft_cuda.nn.registry`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda.devices import DeviceModel
from nft_cuda.nn import functions, registry, stacked
from nft_cuda.nn import mvm as _mvm
from nft_cuda.nn.base import RetypedNoisy, SamplePlan

__all__ = ["NoisyConv1d", "NoisyConv2d"]

#: Default ``bias`` of the conv helpers: the layer's own (an MVM forward passes None and adds it digitally).
_OWN_BIAS = object()


class _NoisyConvNd(RetypedNoisy):
    """The shared body of NoisyConv1d/2d: the constructor of ``_plain`` (same signature and state) plus the
    noise settings, and the noisy forward."""

    # Constructor twin of NoisyLinear's (see the note there): nn.ConvNd's signature, spelled out on purpose.
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        variation: DeviceModel | None = None,
        mode: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self._plain.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_noise(variation, mode, generator)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        noise = self.forward_noise()
        if noise is None:
            return self._conv_with_weight(input, self.weight)
        n = self.weight.dim() - 2
        if _mvm.active_mvm(self._variation) is not None and input.dim() == n + 1:
            return self._mvm_forward(input.unsqueeze(0), noise).squeeze(0)  # unbatched, as nn.ConvNd accepts
        out = self._mvm_forward(input, noise)
        if out is not None:
            return out
        if noise.weights is not None:
            return self._conv_with_weights(input, noise.weights)
        if input.dim() == n + 1:  # unbatched input, as nn.ConvNd accepts
            return self._conv_with_rng(input.unsqueeze(0), noise.rng, noise.sigmas).squeeze(0)
        return self._conv_with_rng(input, noise.rng, noise.sigmas)

    def _conv_with_weight(
        self, input: torch.Tensor, weight: torch.Tensor, bias=_OWN_BIAS, groups: int | None = None
    ) -> torch.Tensor:
        """The plain convolution of ``nn.ConvNd`` with another weight (the same calls as its forward);
        ``bias``: the layer's own by default, or a tensor / None; ``groups``: the layer's by default."""
        conv = functions.CONV_FUNCTIONS[weight.dim() - 2]
        bias = self.bias if bias is _OWN_BIAS else bias
        groups = self.groups if groups is None else groups
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(input, weight, bias, self.stride, (0,) * (weight.dim() - 2), self.dilation, groups)
        return conv(input, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _conv_with_weights(self, input: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Chunk t of the batch convolved with ``weights[t]`` ([S, *weight.shape], one call for all S:
        :func:`~nft_cuda.nn.stacked.conv`), padded as :meth:`_conv_with_weight` pads."""
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * (weights.dim() - 3)
        return stacked.conv(input, weights, self.bias, self.stride, padding, self.dilation, self.groups)

    # The four steps of an MVM forward (nft_cuda.nn.mvm), as NoisyLinear's; each output position's input
    # vector is its receptive field (its group's channels), so ‖x‖₂² is a convolution of x² with ones.
    def noisy_matmul(self, input: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
        if plan.weights is not None:
            return self._conv_with_weight(input, plan.weights[0], None)
        return self._conv_with_rng(input, plan.rng, plan.sigmas, None)

    def clean_matmul(self, input: torch.Tensor) -> torch.Tensor:
        return self._conv_with_weight(input, self.weight, None)

    def input_sq_norm(self, input: torch.Tensor) -> torch.Tensor:
        x = input.detach().float()
        ones = torch.ones(self.weight.shape, dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            return self._conv_with_weight(x * x, ones, None)

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return y
        return y + self.bias.to(y.dtype).view(-1, *([1] * (self.weight.dim() - 2)))

    # The per-tile MVM (nft_cuda.nn.mvm, crossbar tiles): an input tile holds whole kernels, so the
    # input splits into T_in channel blocks ([T_in, B, channels, *spatial], smaller ones zero-padded) whose
    # partial outputs come from one convolution with T_in groups ([T_in, B, O, ...]).
    tile_output_dim = 2

    def _tile_channels(self, layout) -> torch.Tensor:
        """[T_in, channels]: the input channels of each tile (C where a smaller tile is padded)."""
        if self.groups != 1:
            raise NotImplementedError(
                f"{type(self).__name__} with groups={self.groups}: converters and output noise on crossbar "
                "tiles are modelled for groups=1 convolutions only"
            )
        kernel = self.weight[0, 0].numel()
        return layout.in_index[:, ::kernel] // kernel

    def _pick_channels(self, t: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """``t`` [N, C, ...] → [N, T·channels, ...] laid out tile by tile (a zero channel for the padding)."""
        return F.pad(t, (0, 0) * (t.dim() - 2) + (0, 1)).index_select(1, channels.flatten())

    def tile_inputs(self, input: torch.Tensor, layout) -> torch.Tensor:
        channels = self._tile_channels(layout)
        x = self._pick_channels(input, channels)
        return x.reshape(x.shape[0], *channels.shape, *x.shape[2:]).transpose(0, 1)

    def tile_matmul(self, xb: torch.Tensor, weight: torch.Tensor, layout) -> torch.Tensor:
        channels = self._tile_channels(layout)
        tiles, per_tile = channels.shape
        batch, spatial, kernel = xb.shape[1], xb.shape[3:], weight.shape[2:]
        x = xb.transpose(0, 1).reshape(batch, tiles * per_tile, *spatial)
        w = self._pick_channels(weight, channels).reshape(weight.shape[0], tiles, per_tile, *kernel)
        w = w.transpose(0, 1).reshape(tiles * weight.shape[0], per_tile, *kernel).to(x.dtype)
        y = self._conv_with_weight(x, w, None, groups=tiles)
        return y.reshape(batch, tiles, weight.shape[0], *y.shape[2:]).transpose(0, 1)

    def tile_sq_norm(self, xb: torch.Tensor) -> torch.Tensor:
        x = xb.detach().float()
        tiles, batch = x.shape[:2]
        x = (x * x).transpose(0, 1).reshape(batch, -1, *x.shape[3:])
        ones = torch.ones((tiles, xb.shape[2], *self.weight.shape[2:]), dtype=torch.float32, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            sq = self._conv_with_weight(x, ones, None, groups=tiles)
        return sq.reshape(batch, tiles, 1, *sq.shape[2:]).transpose(0, 1)

    def _conv_with_rng(
        self, input: torch.Tensor, rng: torch.Tensor, sigmas: torch.Tensor | None, bias=_OWN_BIAS
    ) -> torch.Tensor:
        n = self.weight.dim() - 2
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            # As nn.ConvNd: explicit padding (also resolves 'same'/'valid', possibly asymmetric).
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            if any(self._reversed_padding_repeated_twice):
                input = F.pad(input, self._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * n
        else:
            padding = tuple(self.padding)
        return functions.NoisyConvFn.apply(
            input,
            self.weight,
            self.bias if bias is _OWN_BIAS else bias,
            rng,
            sigmas,
            self._variation,
            functions.autocast_dtype(input),
            tuple(self.stride),
            padding,
            tuple(self.dilation),
            self.groups,
        )


class NoisyConv1d(_NoisyConvNd, nn.Conv1d):
    """Drop-in ``nn.Conv1d`` whose weight is perturbed by device variation on every forward.

    Args: as ``nn.Conv1d``, plus ``variation``, ``mode`` and ``generator`` as :class:`NoisyLinear`.

    Shapes: input [N, C_in, L] (or [C_in, L]) → [N, C_out, L_out]; weight [C_out, C_in/groups, k].

    The noise mode is explicit, as :class:`NoisyLinear`'s: ``.eval()`` does not switch the noise off.
    """

    _plain = nn.Conv1d


class NoisyConv2d(_NoisyConvNd, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose weight is perturbed by device variation on every forward.

    Args: as ``nn.Conv2d`` (all padding modes, string paddings, groups, dilation), plus ``variation``,
    ``mode`` and ``generator`` as :class:`NoisyLinear`.

    Shapes: input [N, C_in, H, W] (or [C_in, H, W]) → [N, C_out, H_out, W_out];
    weight [C_out, C_in/groups, kh, kw].

    The noise mode is explicit, as :class:`NoisyLinear`'s: ``.eval()`` does not switch the noise off.
    """

    _plain = nn.Conv2d


registry.register_class(nn.Conv1d, NoisyConv1d, subclasses=True)
registry.register_class(nn.Conv2d, NoisyConv2d, subclasses=True)
