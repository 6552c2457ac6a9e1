"""The per-MVM effects (models 4 and 5) inside the noisy layers, and their per-layer ranges.

When a noisy layer's device model carries an active :class:`~nft_cuda.devices.mvm.MVM`, each forward
runs, per sample chunk of the batch (docs/device-models.md, "Converter precision" and "Read noise"):

1. DAC: ``x_q = quantize(x, input_bits, r_in)``;
2. the noisy matmul without bias (the per-chip weight noise of the layer's own mode or sample plan; the
   weight on its bit-sliced grid first when ``weight_levels``);
3. read noise: ``+ σ_r·max|W|·‖x_q‖₂·z`` with z from draw 8 of the chunk's stream at the layer's forward
   counter (fresh on every forward, the same for one seed: the counter restarts at every
   ``set_instance`` / ``set_sample_plan``);
4. ADC: ``quantize(y, output_bits, r_out)``, then the bias is added digitally.

Gradients are straight-through (the quantisers pass dL/dout unchanged, the read noise is a constant).

Ranges: ``calibrate_mvm(model, batches)`` (:mod:`nft_cuda.nn.calibration`) records r_in = max|x| and r_out = max|x·Wᵀ| (clean weights,
no bias) of each layer over a few batches, as a chip's converters are set up once; a layer without a
calibrated range uses the current chunk's max|x| (resp. max|y|), so nothing clips but the outputs of one
input then depend on the other inputs of its batch.
"""

from __future__ import annotations

import math

import torch

from nft_cuda import mvm_ops, ops
from nft_cuda.devices.tiles import tile_maxima, tiled

__all__ = ["active_mvm", "mvm_forward", "programmed", "refuse_mvm_around_gemm", "tile_ranges", "tile_table"]


def active_mvm(model):
    """The model's MVM if it acts around the GEMM (DAC, read noise or ADC), else None."""
    mvm = getattr(model, "mvm", None)
    return mvm if mvm is not None and mvm.around_gemm else None


def programmed(weight: torch.Tensor, model) -> torch.Tensor:
    """The weight as programmed: on its bit-sliced grid when the model's MVM has ``weight_levels``
    (weight_bits of the model, 8 for a model without one; straight-through gradient), else ``weight``."""
    mvm = getattr(model, "mvm", None)
    if mvm is None or not mvm.weight_levels:
        return weight
    bits = getattr(model, "weight_bits", 8)
    if getattr(model, "tiled", False):  # each tile's grid spans its own ±max|W|
        return tiled(lambda w: mvm_ops.quantize_weight(w, bits).unsqueeze(0), weight, model.tiles)[0]
    return mvm_ops.quantize_weight(weight, bits)


def refuse_mvm_around_gemm(layer) -> None:
    """NotImplementedError for a layer that perturbs its weights but runs its products itself (attention,
    recurrent cells, ``register_noisy`` layers) when its model asks for DAC, ADC or read noise: those are
    modelled by NoisyLinear and NoisyConv1d/2d only, and silently ignoring them would mislead."""
    if active_mvm(layer.variation) is not None:
        raise NotImplementedError(
            f"{type(layer).__name__} cannot apply the MVM effects {layer.variation.mvm} (DAC, ADC, read noise "
            "are modelled by NoisyLinear and NoisyConv1d/2d); use weight_levels only, or MVM() on this layer"
        )


def _analog_output(y, mvm, *, sq_norm, weight_max, input_range, tiles, stream, counter) -> torch.Tensor:
    """Steps 3-3b on the analog output ``y`` of one MVM (or of T input tiles, stacked on dim 0): read noise
    σ_r·max|W|·‖x‖₂·z, output noise σ_out·max|W|·r_in/√T·z', then the bound ±β·max|W|·r_in. ``sq_norm``
    is a callable giving ‖x‖₂² broadcast to y; ``weight_max`` and ``input_range`` broadcast to y."""
    if mvm.read_noise > 0:
        y = y + mvm_ops.read_noise(sq_norm(), weight_max, mvm.read_noise, stream, counter).to(y.dtype)
    if mvm.output_noise == 0 and mvm.output_bound is None:
        return y
    full = weight_max * input_range
    if mvm.output_noise > 0:
        scale = (mvm.output_noise / math.sqrt(tiles)) * full
        y = y + mvm_ops.output_noise(scale.expand(y.shape), tuple(y.shape), stream, counter).to(y.dtype)
    if mvm.output_bound is not None:
        bound = (mvm.output_bound * full).to(y.dtype)
        y = torch.maximum(torch.minimum(y, bound), -bound)  # saturation: no gradient beyond the bound
    return y


class _InputRangeClip(torch.autograd.Function):
    """x clipped to ±r per input tile (x: [T, ...], r: [T]) with aihwkit-lightning's input-range gradients:
    none to a clipped input; to r, r·(Σ min(g, 0) over x ≥ r − Σ max(g, 0) over x ≤ −r) + decay·r while the
    unclipped fraction exceeds ``min_unclipped`` (devices.InputRange)."""

    @staticmethod
    def forward(ctx, x, r, decay, min_unclipped):
        rv = r.detach().to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        upper, lower = x >= rv, x <= -rv
        ctx.save_for_backward(upper, lower, r)
        ctx.settings = (decay, min_unclipped)
        return torch.minimum(torch.maximum(x, -rv), rv)

    @staticmethod
    def backward(ctx, g):
        upper, lower, r = ctx.saved_tensors
        decay, min_unclipped = ctx.settings
        clipped = upper | lower
        gx = g.masked_fill(clipped, 0)
        gf = g.float()
        gr = (gf.clamp(max=0) * upper).flatten(1).sum(1) - (gf.clamp(min=0) * lower).flatten(1).sum(1)
        gr = gr * r.detach()
        if decay > 0:
            unclipped = 1.0 - clipped.flatten(1).float().mean(1)
            gr = gr + decay * r.detach() * (unclipped > min_unclipped)
        return gx, gr.to(r.dtype), None, None


def _learned_clip(layer, xb: torch.Tensor, learned) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of the T tiles [T, ...] clipped to the layer's learned ranges, and those ranges [T]; in
    training (grad enabled), the first ``init_batches`` forwards first set r from the data."""
    r = layer.input_range
    if layer.training and torch.is_grad_enabled() and learned.init_batches > 0:
        with torch.no_grad():
            seen = layer.input_range_updates
            std = xb.detach().float().flatten(1).std(1)
            update = (seen < learned.init_batches) & (std > 0)
            n = seen.to(r.dtype)
            r.copy_(torch.where(update, (r * n + learned.init_std_alpha * std) / (n + 1), r).abs())
            seen.add_(update.to(seen.dtype))
    return _InputRangeClip.apply(xb, r, learned.decay, learned.min_unclipped), r.detach()


def _compensating(model) -> bool:
    """Whether ``model``'s drift compensation acts (``PCM.compensating``; other models never compensate)."""
    return bool(getattr(model, "compensating", False))


def _drifted_plan(layer, plan):
    """(``plan`` carrying the chip's drifted weight without compensation, α: 0-d, or [T_out, T_in] tiled):
    with converters on, α multiplies the digital output after the ADC and output noise, as aihwkit's
    ``post_forward`` does, instead of the weights before the GEMM (ops.drift_split)."""
    var = layer.variation
    weight = programmed(layer.weight.detach(), var)
    drifted, alpha = ops.drift_split(weight, var, rng=plan.rng, sigmas=plan.sigmas)
    drifted = drifted.to(layer.weight.dtype)
    if layer.weight.requires_grad and torch.is_grad_enabled():
        drifted = drifted + (layer.weight - layer.weight.detach())  # straight-through
    return type(plan)(plan.rng, plan.sigmas, drifted), alpha[0].float()  # the SamplePlan, with weights


def _input_range(x: torch.Tensor, r_in):
    """The DAC range r_in: the calibrated one, else this chunk's max|x| (0-d, float32)."""
    return r_in if r_in is not None else x.detach().abs().amax().float()


def _one_chunk(layer, x: torch.Tensor, plan, mvm) -> torch.Tensor:
    """Steps 1-4 for one sample chunk with one-sample ``plan``."""
    alpha = None
    if _compensating(layer.variation):
        plan, alpha = _drifted_plan(layer, plan)
    if layer.variation.tiled:
        return _one_chunk_tiled(layer, x, plan, mvm, alpha)
    r_in, r_out = layer.mvm_ranges
    if mvm.learned_input_range is not None:
        x, r = _learned_clip(layer, x.unsqueeze(0), mvm.learned_input_range)
        x, r_in = x.squeeze(0), r[0]
    if mvm.input_bits is not None:
        x = mvm_ops.quantize(x, mvm.input_bits, r_in)
    y = layer.noisy_matmul(x, plan)
    w_max = layer.weight.detach().abs().amax()
    full = mvm.output_noise > 0 or mvm.output_bound is not None
    y = _analog_output(
        y,
        mvm,
        sq_norm=lambda: layer.input_sq_norm(x).expand(y.shape),
        weight_max=w_max,
        input_range=_input_range(x, r_in) if full else None,
        tiles=1,
        stream=torch.stack((plan.rng[0], plan.rng[1])),
        counter=layer.mvm_counter(),
    )
    if mvm.output_bits is not None:
        if mvm.adc_range == "bound":
            r_out = mvm.output_bound * w_max.float() * _input_range(x, r_in)
        y = mvm_ops.quantize(y, mvm.output_bits, r_out)
    if alpha is not None:
        y = y * alpha.to(y.dtype)  # the drift compensation, digital
    return layer.add_bias(y)


def tile_table(layer):
    """(max|W| of each (input tile, output column) [T_in, O] float32, the layer's TileLayout) of a tiled layer."""
    tiles = layer.variation.tiles
    shape = tuple(layer.weight.shape)
    layout = tiles.layout(shape, layer.weight.device)
    per_tile = tile_maxima(layer.weight.detach().float(), tiles)  # [T_out, T_in]
    return per_tile[layout.row_tile].t().contiguous(), layout


def _column_view(t: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
    """[T, O] (or [T]) viewed to broadcast against the stacked tile outputs y [T, ...] (O at ``dim``)."""
    view = [t.shape[0]] + [1] * (y.dim() - 1)
    if t.dim() == 2:
        view[dim] = t.shape[1]
    return t.view(view)


def tile_ranges(layer, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input tile max|x_k| [T_in] and per (input tile, output tile) max|y_k| [T_in, T_out] of one input,
    ``y`` the stacked tile outputs (default: the clean weight's, for calibration)."""
    _, layout = tile_table(layer)
    xb = layer.tile_inputs(x.detach(), layout)
    r_in = xb.abs().flatten(1).amax(1).float()
    if y is None:
        y = layer.tile_matmul(xb, layer.weight.detach(), layout)
    dim = layer.tile_output_dim
    n_in, outputs = y.shape[0], y.shape[dim]
    per_col = y.detach().abs().movedim(dim, -1).reshape(n_in, -1, outputs).amax(1).float()  # [T_in, O]
    n_out = int(layout.out_index.shape[0])
    per_tile = per_col.new_zeros(n_in, n_out)
    return r_in, per_tile.scatter_reduce(1, layout.row_tile.expand(n_in, outputs), per_col, "amax")


def _one_chunk_tiled(layer, x: torch.Tensor, plan, mvm, alpha=None) -> torch.Tensor:
    """Steps 1-4 tile by tile: the DAC of each input tile at its own r_in, the T_in partial sums in one
    batched GEMM / grouped convolution, read and output noise, bound and ADC per tile (r_out per input tile
    and output tile), each tile's drift compensation α [T_out, T_in] when given, the tiles' digital
    outputs summed, then the bias."""
    w_max, layout = tile_table(layer)
    n_in = int(layout.in_index.shape[0])
    r_in, r_out = layer.mvm_ranges
    xb = layer.tile_inputs(x, layout)
    if mvm.learned_input_range is not None:
        xb, r_in = _learned_clip(layer, xb, mvm.learned_input_range)
    elif r_in is None:
        r_in = xb.detach().abs().flatten(1).amax(1).float()
    if mvm.input_bits is not None:
        xb = mvm_ops.quantize(xb, mvm.input_bits, _column_view(r_in, xb, 0))
    y = layer.tile_matmul(xb, layer.plan_weight(plan), layout)
    dim = layer.tile_output_dim
    y = _analog_output(
        y,
        mvm,
        sq_norm=lambda: layer.tile_sq_norm(xb).expand(y.shape),
        weight_max=_column_view(w_max, y, dim),
        input_range=_column_view(r_in, y, dim),
        tiles=n_in,
        stream=torch.stack((plan.rng[0], plan.rng[1])),
        counter=layer.mvm_counter(),
    )
    if mvm.output_bits is not None:
        if mvm.adc_range == "bound":  # the ADC spans each tile's (each column's) output bound
            per_col = mvm.output_bound * w_max * r_in.view(-1, 1)
        else:
            if r_out is None:
                r_out = tile_ranges(layer, x, y)[1]
            per_col = r_out[:, layout.row_tile]
        y = mvm_ops.quantize(y, mvm.output_bits, _column_view(per_col, y, dim))
    if alpha is not None:
        y = y * _column_view(alpha.t()[:, layout.row_tile], y, dim).to(y.dtype)
    return layer.add_bias(y.sum(0))


def mvm_forward(layer, x: torch.Tensor, noise, mvm) -> torch.Tensor:
    """The layer's output under ``mvm`` for the forward noise ``noise`` (a SamplePlan; its S chunks run one
    by one, each exactly as a one-sample forward of stream offset + t). Advances the forward counter."""
    samples = 1 if noise.sigmas is None else noise.sigmas.shape[0]
    if samples == 1:
        out = _one_chunk(layer, x, noise, mvm)
    else:
        if x.shape[0] % samples:
            raise ValueError(
                f"a sample-axis forward with {samples} samples needs a batch that is a multiple of "
                f"{samples}, got {x.shape[0]}"
            )
        chunks = x.chunk(samples, dim=0)
        out = torch.cat([_one_chunk(layer, chunks[t], noise.select(t), mvm) for t in range(samples)], dim=0)
    layer.advance_mvm_counter()
    return out
