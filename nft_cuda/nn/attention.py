"""Drop-in noisy ``nn.MultiheadAttention`` (DESIGN §2, §3, §5).

:class:`NoisyMultiheadAttention` subclasses ``nn.MultiheadAttention`` (same constructor, parameters and
``state_dict`` keys). Its crossbar weights are two noisy layers:

* the in-projection, this layer: ``in_proj_weight`` [3E, E], or, with ``kdim``/``vdim`` ≠ E, the
  separate ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` taken as one crossbar tensor, their
  flattened concatenation in that order (``layer.weight``; like ``in_proj_weight``, which is q/k/v
  stacked, one max|W| scales the noise of all three);
* the out-projection ``out_proj``, a :class:`~nft_cuda.NoisyLinear` of its own (the next layer index),
  which attention reads directly instead of calling it.

In modes train/instance and under sample plans the forward draws both noisy weights with
``nft_cuda.ops.perturb`` for each layer's rng (exactly ``layer.noisy_weight(rng)``) and runs
``F.multi_head_attention_forward`` with them; the call is checkpointed, so backward redraws them and no
noisy weight is stored; the weight gradients are straight-through. With both layers in mode off the
forward is ``nn.MultiheadAttention.forward`` itself (bit-identical on the same path; inside a converted
model the fast-path guard keeps it off PyTorch's fused eval kernel, which rounds differently, within
1e-6: docs/conversion.md "Mode off"). With a sample
axis of S samples, the batch axis (dim 0 with ``batch_first=True``, else dim 1) of query/key/value and
dim 0 of ``key_padding_mask`` and of a 3-D ``attn_mask`` hold S chunks; chunk t uses sample t's weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda.nn.base import NoisyModule, RetypedNoisy

# The same import list as nn/recurrent.py: both are several-weight crossbar layers built on the one
# machinery of nn/generic.py (not a copy to merge).
from nft_cuda.nn.generic import (
    SeveralWeightCrossbar,
    recomputed,
    sample_chunks,
    straight_through_samples,
)
from nft_cuda.nn.linear import NoisyLinear
from nft_cuda.nn.registry import register_class
from nft_cuda.variation import Variation

__all__ = ["NoisyMultiheadAttention"]


class NoisyMultiheadAttention(SeveralWeightCrossbar, RetypedNoisy, nn.MultiheadAttention):
    """Drop-in ``nn.MultiheadAttention`` whose projections are perturbed by device variation.

    Args: as ``nn.MultiheadAttention``, plus ``variation``, ``mode`` and ``generator`` as
    :class:`~nft_cuda.NoisyLinear`. With a variation, ``out_proj`` is made a NoisyLinear too (layer
    index 1 of this lone layer; :func:`nft_cuda.convert` / :func:`nft_cuda.set_instance` renumber).
    ``from_module`` shares the module's parameters and submodules: ``out_proj`` stays what it is
    (:func:`nft_cuda.convert` converts it as a layer of its own).
    """

    _plain = nn.MultiheadAttention

    # Constructor twin of NoisyLinear's (nn/layers.py, see the note there): nn.MultiheadAttention's
    # signature spelled out on purpose, then the same keyword-only noise settings.
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim=None,
        vdim=None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        variation: Variation | None = None,
        mode: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        nn.MultiheadAttention.__init__(
            self,
            embed_dim,
            num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
            device=device,
            dtype=dtype,
        )
        self._init_noise(variation, mode, generator)
        if variation is not None:
            self.out_proj = NoisyLinear.from_module(self.out_proj, variation, mode=mode, generator=generator)
            self.out_proj.layer_index = 1

    # -- the crossbar tensor of the in-projection -----------------------------------------------------

    def crossbar_weight_names(self) -> tuple[str, ...]:
        if self._qkv_same_embed_dim:
            return ("in_proj_weight",)
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight")

    def _in_projection(self, w: torch.Tensor) -> dict:
        """The keyword arguments of F.multi_head_attention_forward for crossbar tensor ``w``."""
        parts = self.crossbar_parts(w)
        if self._qkv_same_embed_dim:
            return parts
        return {"in_proj_weight": None, "use_separate_proj_weight": True, **parts}

    def _check_input(self, input) -> None:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: query must be a torch.Tensor, got {type(input).__name__}")
        device = self.out_proj.weight.device
        if input.device != device:
            raise RuntimeError(
                f"{type(self).__name__}: query is on {input.device} but the weights are on {device}; "
                "move one of them (e.g. layer.to(query.device))"
            )

    # -- forward --------------------------------------------------------------------------------------

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights: bool = True,
        attn_mask=None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        noise = self.forward_noise()
        out_noise = self.out_proj.forward_noise() if isinstance(self.out_proj, NoisyModule) else None
        if noise is None and out_noise is None:
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        self._check_input(query)
        options = {"need_weights": need_weights, "average_attn_weights": average_attn_weights, "is_causal": is_causal}

        same_qk, same_kv = key is query, value is key  # checkpoint's recompute gets fresh tensor objects

        def attend(query, key, value, key_padding_mask, attn_mask):
            key = query if same_qk else key
            value = key if same_kv else value
            w_in = straight_through_samples(self, noise)
            w_out = straight_through_samples(self.out_proj, out_noise)
            samples = _common_samples(w_in.shape[0], w_out.shape[0])
            if samples > 1 and query.dim() != 3:
                raise ValueError(f"a sample-axis forward with {samples} samples needs batched (3-D) inputs")
            dim = 0 if self.batch_first else 1
            qs, ks, vs = _chunks_keeping_identity(query, key, value, samples, dim)
            masks = sample_chunks(key_padding_mask, samples)
            attn = (
                sample_chunks(attn_mask, samples)
                if attn_mask is not None and attn_mask.dim() == 3
                else [attn_mask] * samples
            )
            outs = [
                self._attend(
                    w_in[min(t, w_in.shape[0] - 1)],
                    w_out[min(t, w_out.shape[0] - 1)],
                    qs[t],
                    ks[t],
                    vs[t],
                    masks[t],
                    attn[t],
                    **options,
                )
                for t in range(samples)
            ]
            if samples == 1:
                return outs[0]
            weights = None if outs[0][1] is None else torch.cat([o[1] for o in outs], dim=0)
            return torch.cat([o[0] for o in outs], dim=dim), weights

        return recomputed(attend, query, key, value, key_padding_mask, attn_mask)

    def _attend(self, w_in, w_out, query, key, value, key_padding_mask, attn_mask, **options):
        """``nn.MultiheadAttention.forward``'s general path with the given in/out projection weights."""
        batched = query.dim() == 3
        if self.batch_first and batched:  # transposed as nn.MultiheadAttention does, keeping `is` relations
            query, key, value = _transposed_keeping_identity(query, key, value)
        out, weights = F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            bias_k=self.bias_k,
            bias_v=self.bias_v,
            in_proj_bias=self.in_proj_bias,
            add_zero_attn=self.add_zero_attn,
            dropout_p=self.dropout,
            out_proj_weight=w_out,
            out_proj_bias=self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            **self._in_projection(w_in),
            **options,
        )
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {self._noise_repr()}"


def _common_samples(a: int, b: int) -> int:
    if a != b and min(a, b) != 1:
        raise ValueError(f"the in- and out-projection of an attention layer have sample plans of {a} and {b} samples")
    return max(a, b)


def _transposed_keeping_identity(query, key, value):
    if key is value:
        if query is key:
            query = key = value = query.transpose(1, 0)
        else:
            query, key = (x.transpose(1, 0) for x in (query, key))
            value = key
        return query, key, value
    return tuple(x.transpose(1, 0) for x in (query, key, value))


def _chunks_keeping_identity(query, key, value, samples: int, dim: int):
    """The S chunks of query/key/value along the batch axis; self-attention inputs stay one object."""
    qs = sample_chunks(query, samples, dim)
    ks = qs if key is query else sample_chunks(key, samples, dim)
    vs = ks if value is key else sample_chunks(value, samples, dim)
    return qs, ks, vs


register_class(nn.MultiheadAttention, NoisyMultiheadAttention)
