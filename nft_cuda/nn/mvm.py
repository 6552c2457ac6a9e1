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

import torch

from nft_cuda import mvm_ops
from nft_cuda.devices.tiles import tiled

__all__ = ["active_mvm", "mvm_forward", "programmed", "refuse_mvm_around_gemm"]


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


def _one_chunk(layer, x: torch.Tensor, plan, mvm) -> torch.Tensor:
    """Steps 1-4 for one sample chunk with one-sample ``plan``."""
    r_in, r_out = layer.mvm_ranges
    if mvm.input_bits is not None:
        x = mvm_ops.quantize(x, mvm.input_bits, r_in)
    y = layer.noisy_matmul(x, plan)
    if mvm.read_noise > 0:
        sq = layer.input_sq_norm(x).expand(y.shape)
        stream = torch.stack((plan.rng[0], plan.rng[1]))
        m = layer.weight.detach().abs().amax()
        y = y + mvm_ops.read_noise(sq, m, mvm.read_noise, stream, layer.mvm_counter()).to(y.dtype)
    if mvm.output_bits is not None:
        y = mvm_ops.quantize(y, mvm.output_bits, r_out)
    return layer.add_bias(y)


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
