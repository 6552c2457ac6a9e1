"""Converter ranges of a chip: :func:`calibrate_mvm` sets each noisy layer's DAC and ADC ranges (r_in,
r_out) from a few batches of data, as a chip's converters are set up once after programming (the per-MVM
effects themselves are :mod:`nft_cuda.nn.mvm`; docs/device-models.md, "Converter precision").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from nft_cuda.nn.custom import resolve_output
from nft_cuda.nn.modes import noise_mode, noisy_layers
from nft_cuda.nn.mvm import tile_ranges

__all__ = ["calibrate_mvm"]


@torch.no_grad()
def calibrate_mvm(model: torch.nn.Module, batches: Iterable, *, output=None) -> dict[str, tuple[float, float]]:
    """Record each noisy layer's converter ranges over ``batches`` (tensors, or (input, ...) tuples fed as
    ``model(input)``, or mappings fed as keyword arguments ``model(**batch)``, as a Hugging Face
    tokenizer's): r_in = max|x|, r_out = max|x·Wᵀ| (clean weights, no bias, no converters), the max
    over all batches. Sets every noisy layer's ``mvm_ranges`` and returns {layer name: (r_in, r_out)}. A
    tiled layer (``variation.tiles``) gets one r_in per input tile and one r_out per input tile and
    output tile (:func:`nft_cuda.nn.mvm.tile_ranges`), returned as lists ([T_in], [T_in][T_out]).
    The model's noise modes, sample plans and train/eval flag are restored afterwards. ``output``: the
    output adapter (:func:`nft_cuda.nn.custom.resolve_output`), applied to every forward's output so a
    model whose output it does not fit is refused here rather than at evaluation."""
    adapt = resolve_output(output)

    layers = dict(noisy_layers(model))
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name):
        def record(layer, args, output):
            x = args[0].detach()
            if layer.variation is not None and layer.variation.tiled:  # one range per tile
                r = tile_ranges(layer, x)
            else:
                y = layer.clean_matmul(x)
                r = (x.abs().amax().float(), y.abs().amax().float())
            seen[name] = r if name not in seen else tuple(torch.maximum(a, b) for a, b in zip(seen[name], r))

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
    for name, (r_in, r_out) in seen.items():
        layers[name].set_mvm_ranges(r_in, r_out)
        ranges[name] = (r_in.tolist(), r_out.tolist()) if r_in.dim() else (float(r_in), float(r_out))
    return ranges
