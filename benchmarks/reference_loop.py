"""The reference code's Monte-Carlo loop, in plain PyTorch: a baseline of the benchmarks (DESIGN §8).

This is how the NeFT reference evaluates robustness, and what :func:`nft_cuda.eval.monte_carlo` is
measured against: for every chip instance, re-create the model and reload the checkpoint from disk, then
perturb every noisy layer on the host side — max|W| read back to the host (``.item()``), the state-band
mask, ``torch.normal`` on the CPU, copied to the weight's device and added to the weight — and evaluate
the whole loader with that one instance, keeping every instance's probabilities for the EKL.

Its noise is drawn from torch's CPU generator, not from the DESIGN §3 stream, so its numbers agree with
:func:`~nft_cuda.eval.monte_carlo` statistically, not bit for bit. Do not use it for evaluations.
"""

from __future__ import annotations

import torch

from nft_cuda import Variation, noisy_layers, set_noise_mode
from nft_cuda.eval import accuracy_stats, expected_kl

__all__ = ["reference_monte_carlo", "reference_perturb_"]


def reference_perturb_(weight: torch.Tensor, variation: Variation, generator: torch.Generator) -> None:
    """Add the reference's host-drawn device-variation noise to ``weight`` in place."""
    m = weight.abs().max().item()  # host read: one synchronisation per layer
    base = variation.sigma * m * variation.scale
    aw = weight.abs()
    mask = (aw > 0.25 * m) & (aw < 0.75 * m)
    std = torch.where(mask, base * variation.state_factor, base).cpu()
    noise = torch.normal(torch.zeros_like(std), std, generator=generator)
    weight.add_(noise.to(weight.device))


def reference_monte_carlo(path: str, loader, variation: Variation, runs: int, *, seed: int = 0, device="cpu") -> dict:
    """R instances the reference way (see the module docstring) from the exported model at ``path``.

    Returns the accuracy statistics of :func:`~nft_cuda.eval.metrics.accuracy_stats` plus ``ekl``,
    ``confidence`` and ``per_instance_accuracy``.
    """
    from nft_cuda.io import load_model

    gen = torch.Generator().manual_seed(seed)
    accs, probs_all, conf = [], [], []
    for _ in range(runs):
        model, _payload = load_model(path, device=device)  # re-create and reload, per instance
        set_noise_mode(model, "off")
        model.eval()
        with torch.no_grad():
            for _name, layer in noisy_layers(model):
                weight = layer.weight.detach().clone()  # a crossbar may span several parameters (attention)
                reference_perturb_(weight, variation, gen)
                layer.load_crossbar_(weight)
            correct, n, probs = 0, 0, []
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                out = model(x)
                p = torch.softmax(out.double(), dim=-1)
                correct += int((out.argmax(-1) == y).sum())
                n += y.shape[0]
                probs.append(p.cpu())
        p = torch.cat(probs)
        accs.append(correct / n)
        conf.append(float(p.amax(-1).mean()))
        probs_all.append(p)
    res = accuracy_stats(accs)
    res.update(
        {"confidence": sum(conf) / runs, "ekl": expected_kl(torch.stack(probs_all)), "per_instance_accuracy": accs}
    )
    return res
