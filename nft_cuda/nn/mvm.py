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

Ranges: ``calibrate_mvm(model, batches)`` records r_in = max|x| and r_out = max|x·Wᵀ| (clean weights,
no bias) of each layer over a few batches, as a chip's converters are set up once; a layer without a
calibrated range uses the current chunk's max|x| (resp. max|y|), so nothing clips but the outputs of one
input then depend on the other inputs of its batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from nft_cuda import mvm_ops

__all__ = ["active_mvm", "calibrate_mvm", "mvm_forward", "programmed", "refuse_mvm_around_gemm"]


def active_mvm(model):
    """The model's MVM if it acts around the GEMM (DAC, read noise or ADC), else None."""
    mvm = getattr(model, "mvm", None)
    return mvm if mvm is not None and mvm.around_gemm else None


def programmed(weight: torch.Tensor, model) -> torch.Tensor:
    """The weight as programmed: on its bit-sliced grid when the model's MVM has ``weight_levels``
    (weight_bits of the model, 8 for a model without one; straight-through gradient), else ``weight``."""
    mvm = getattr(model, "mvm", None)
    if mvm is not None and mvm.weight_levels:
        return mvm_ops.quantize_weight(weight, getattr(model, "weight_bits", 8))
    return weight


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


@torch.no_grad()
def calibrate_mvm(model: torch.nn.Module, batches: Iterable, *, output=None) -> dict[str, tuple[float, float]]:
    """Record each noisy layer's converter ranges over ``batches`` (tensors, or (input, ...) tuples fed as
    ``model(input)``, or mappings fed as keyword arguments ``model(**batch)``, as a Hugging Face
    tokenizer's): r_in = max|x|, r_out = max|x·Wᵀ| (clean weights, no bias, no converters), the max
    over all batches. Sets every noisy layer's ``mvm_ranges`` and returns {layer name: (r_in, r_out)}.
    The model's noise modes, sample plans and train/eval flag are restored afterwards. ``output``: the
    output adapter (:func:`nft_cuda.nn.custom.resolve_output`), applied to every forward's output so a
    model whose output it does not fit is refused here rather than at evaluation."""
    from nft_cuda.nn.conversion import noise_mode, noisy_layers
    from nft_cuda.nn.custom import resolve_output

    adapt = resolve_output(output)

    layers = dict(noisy_layers(model))
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(layer, args, output):
            x = args[0].detach()
            y = layer.clean_matmul(x)
            r = torch.stack((x.abs().amax().float(), y.abs().amax().float()))
            seen[name] = [r] if name not in seen else [torch.maximum(seen[name][0], r)]

        return record

    handles = [
        layer.register_forward_hook(hook(name)) for name, layer in layers.items() if hasattr(layer, "clean_matmul")
    ]
    was_training = model.training
    try:
        model.eval()
        count = 0
        with noise_mode(model, "off"):
            for batch in batches:
                if isinstance(batch, Mapping):
                    adapt(model(**batch))
                else:
                    adapt(model(batch[0] if isinstance(batch, (tuple, list)) else batch))
                count += 1
        if count == 0:
            raise ValueError("calibrate_mvm needs at least one batch")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ranges = {}
    for name, (r,) in seen.items():
        layers[name].set_mvm_ranges(r[0], r[1])
        ranges[name] = (float(r[0]), float(r[1]))
    return ranges
