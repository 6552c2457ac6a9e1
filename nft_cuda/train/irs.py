"""Intermediate Representation Snapshot heads (DESIGN §4.3, §5).

A head is snapshot → noisy Linear(C·p^d, hidden) → ReLU → noisy Linear(hidden, classes), where the
snapshot is the tapped activation adaptive-average-pooled and flattened (C-major): a feature map
[B, C, H, W] to p×p (d = 2), a token sequence [B, T, C] (batch first: transformer blocks, an LSTM's
output) over its tokens to p positions (d = 1; p = 1 is the mean over tokens). A tap whose output is a
tuple (an LSTM returns ``(output, (h, c))``) snapshots its first element. Snapshots are taken
by forward hooks during the single backbone forward, so IRS costs one backbone pass plus the heads.
The heads are side branches: they never change the backbone's output, and they are dropped at
inference (:meth:`IRSModel.backbone` is the exported model).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda import ops
from nft_cuda._args import check_positive_int
from nft_cuda.devices import DeviceModel
from nft_cuda.nn import NoisyLinear, noise_mode
from nft_cuda.nn.custom import resolve_output

__all__ = ["IRSHead", "IRSModel", "snapshot"]


def snapshot(activation: torch.Tensor, pool: int) -> torch.Tensor:
    """The snapshot [B, C·p^d] of a tapped activation: [B, C, H, W] pooled to p×p, or a token sequence
    [B, T, C] pooled over its tokens to p positions (each channel's p means, C-major as for maps)."""
    if activation.dim() == 3:
        return torch.flatten(F.adaptive_avg_pool1d(activation.transpose(1, 2), pool), 1)
    return torch.flatten(F.adaptive_avg_pool2d(activation, pool), 1)


class IRSHead(nn.Module):
    """snapshot (pool to p×p, or to p tokens, + flatten) → noisy FC → ReLU → noisy FC.

    ``spatial_dims``: 2 for a feature-map tap [B, C, H, W], 1 for a token-sequence tap [B, T, C]."""

    def __init__(
        self,
        channels: int,
        pool: int,
        num_classes: int,
        variation: DeviceModel,
        hidden: int = 512,
        spatial_dims: int = 2,
    ):
        super().__init__()
        if spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims must be 1 (token sequence) or 2 (feature map), got {spatial_dims!r}")
        self.pool = pool
        self.fc1 = NoisyLinear(channels * pool**spatial_dims, hidden, variation=variation)
        self.fc2 = NoisyLinear(hidden, num_classes, variation=variation)
        for fc in (self.fc1, self.fc2):  # as the reference heads
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(fc.bias)

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        noise = self.fc1.forward_noise()  # the draw fc1's own forward would make
        own = noise is not None and noise.sigmas is None  # not a sample plan set by the caller
        if own and self._snapshot_op_ok(activation):
            # The snapshot op (DESIGN §4.3): pooling and the noisy matmul in one op; the snapshot is
            # not kept for backward, which spreads its gradient over the pooling windows.
            hidden = ops.snapshot_linear(
                activation, self.pool, self.fc1.weight, self.fc1.bias, self.fc1.variation, rng=noise.rng
            )[0]
        else:
            flat = snapshot(activation, self.pool)
            if own:
                # A token sequence, autocast or mixed dtypes: the layer's own path, with the rng already drawn above.
                self.fc1.set_sample_plan(noise.rng)
                try:
                    hidden = self.fc1(flat)
                finally:
                    self.fc1.set_sample_plan(None)  # there was none (own noise)
            else:
                hidden = self.fc1(flat)  # clean, or a sample plan set by the caller
        return self.fc2(F.relu(hidden))

    def _snapshot_op_ok(self, activation: torch.Tensor) -> bool:
        return (
            activation.dim() == 4
            and activation.dtype == self.fc1.weight.dtype
            and not torch.is_autocast_enabled(activation.device.type)
        )


def _check_tap_shape(name: str, shape: torch.Size) -> None:
    """The tapped activation of the one-image example forward must be [1, C, H, W] or [1, T, C]."""
    if len(shape) not in (3, 4) or shape[0] != 1:
        raise ValueError(
            f"IRS tap '{name}' outputs shape {list(shape)} for one input image; a feature map [B, C, H, W] or "
            "a batch-first token sequence [B, T, C] is needed"
        )


class IRSModel(nn.Module):
    """A backbone with IRS heads at tap modules.

    Args:
        backbone: any model; the taps name its modules (``named_modules()`` paths).
        taps: tap module path → pool size p.
        num_classes: classes of the heads' outputs.
        variation: the heads' variation (DESIGN §5 default: σ_d of training with RRAM1).
        example_input: one input batch (any size ≥ 1) to find the tapped activations' channels.
        hidden: width of the heads' hidden layer (512 in the paper).
        output: where the logits are in the backbone's output (the output adapter,
            :func:`nft_cuda.nn.custom.resolve_output`; None: the output is the logits tensor).

    ``forward(x)`` returns ``(logits, [head outputs])`` with the heads in execution order
    (shallow → deep), as :func:`nft_cuda.train.nft_loss` expects.
    """

    def __init__(
        self,
        backbone: nn.Module,
        taps: Mapping[str, int],
        num_classes: int,
        variation: DeviceModel,
        example_input: torch.Tensor,
        hidden: int = 512,
        *,
        output=None,
    ):
        super().__init__()
        self.logits_of = resolve_output(output)
        modules = dict(backbone.named_modules())
        unknown = [name for name in taps if name not in modules or name == ""]
        if unknown:
            raise ValueError(
                f"IRS taps {unknown} are not modules of the backbone; available: {', '.join(n for n in modules if n)}"
            )
        for name, pool in taps.items():
            check_positive_int(f"IRS tap '{name}': pool size", pool)
        self.backbone = backbone
        self._snapshots: dict[str, torch.Tensor] = {}
        self._capturing = False
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in taps]

        # One clean forward in eval mode (no running-statistics update) finds shapes and order.
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad(), noise_mode(backbone, "off"):
                self._capturing = True
                backbone(example_input[:1])
        finally:
            self._capturing = False
            backbone.train(was_training)
        order = list(self._snapshots)  # insertion order = execution order
        missing = [name for name in taps if name not in self._snapshots]
        if missing:
            raise ValueError(f"IRS taps {missing} were not called during the backbone's forward")
        shapes = {name: self._snapshots[name].shape for name in order}
        self._snapshots.clear()
        for name in order:
            _check_tap_shape(name, shapes[name])
        self.order = order
        self.heads = nn.ModuleDict(
            {
                self._key(name): IRSHead(
                    shapes[name][1] if len(shapes[name]) == 4 else shapes[name][2],
                    taps[name],
                    num_classes,
                    variation,
                    hidden,
                    spatial_dims=len(shapes[name]) - 2,
                )
                for name in order
            }
        )
        device = next(backbone.parameters()).device
        self.heads.to(device)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._capturing:
                # An RNN returns (output, h_n) (an LSTM (output, (h_n, c_n))): snapshot the output sequence.
                self._snapshots[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._snapshots.clear()
        self._capturing = True
        try:
            logits = self.logits_of(self.backbone(x))
        finally:
            self._capturing = False
        snapshots, self._snapshots = self._snapshots, {}
        return logits, [self.heads[self._key(name)](snapshots[name]) for name in self.order]

    def remove_hooks(self) -> nn.Module:
        """Detach from the backbone (removes the hooks) and return it: the exported model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.backbone
