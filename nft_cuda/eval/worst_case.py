"""The worst chip within the device model's bounds: a projected-gradient search over the standard normals.

A chip is a set of standard-normal draws z, one (or, for PCM, six: DESIGN §3.1) per weight element of
every noisy layer; the device model turns them into the programmed weights. Monte-Carlo samples chips at
random; this module searches for a bad one. The bound is a box on the draws, ‖z‖∞ ≤ κ: every draw of
the found chip is one a real chip could draw (P(|z| > 3) = 0.27 % per element), so κ says how
unlucky a chip is allowed to be. Accuracy against κ is the robustness curve of the worst case.

The search (projected gradient ascent on the cross-entropy, the L∞ form of PGD):

1. start from a real chip, (seed, instance) of :func:`nft_cuda.set_instance`, its draws clipped into the
   box [−κ, κ];
2. ``steps`` times: the cross-entropy of the first ``attack_batches`` batches of the loader, its gradient
   with respect to every draw, z ← clip(z + α·sign(∂L/∂z), −κ, κ) with α = ``step_size`` (default
   2.5·κ / steps, so the search can cross the box);
3. the accuracy of the draws with the highest attack loss seen, on the whole loader.

The weights of a chip come from :func:`nft_cuda.reference.perturb_with_normals` (the device model's
formulas, differentiable in z) and reach the layers through their sample plans (``set_sample_plan(weights=)``),
so every noisy layer type that takes plan weights works, on CPU and CUDA alike. For the chip's own draws
the weights equal the reference path's (``reference.perturb`` / ``perturb_device``), so ``chip_accuracy``
is the Monte-Carlo accuracy of that chip (up to an ulp of the compiled normals, DESIGN §3). The model runs
in ``eval()`` mode (BatchNorm with its running statistics); its state is restored afterwards.

Models: the bit-sliced Gaussian presets, log-normal and PCM (every draw of it: programming, drift and read
noise). Stuck-at cells read uniforms, not normals: refused. Layers with active converters or weight
levels (:class:`nft_cuda.devices.MVM`) are refused too (their noise is not only the draws).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda import reference
from nft_cuda.nn import kept_noise_state, noisy_layers, set_instance
from nft_cuda.nn.custom import resolve_output
from nft_cuda.nn.mvm import active_mvm

__all__ = ["worst_case", "worst_case_curve"]


def _check(model: nn.Module, kappa: float, steps: int) -> None:
    if not isinstance(kappa, (int, float)) or isinstance(kappa, bool) or not kappa > 0 or not math.isfinite(kappa):
        raise ValueError(f"kappa must be a finite number > 0 (the bound on every |z|), got {kappa!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    layers = noisy_layers(model)
    if not layers:
        raise ValueError("the model has no noisy layer: convert it first (nft_cuda.convert)")
    for name, layer in layers:
        v = layer.variation
        if v is None:
            raise ValueError(f"layer '{name}' has no device model")
        if v.KERNEL_ID not in reference.NORMAL_DRAWS:
            raise ValueError(f"layer '{name}': the worst-case search needs normal draws; {v} has none")
        if active_mvm(v) is not None:
            raise ValueError(f"layer '{name}': the worst-case search does not model converters or weight levels")


def _chip_draws(layers: list) -> list[torch.Tensor]:
    """The standard normals [D, *weight.shape] of each layer's current chip instance (its instance rng,
    set by :func:`nft_cuda.set_instance`, so the chip is the one Monte-Carlo calls by that number)."""
    draws = []
    for layer in layers:
        rng = layer.noise_state().instance_rng
        w = layer.weight
        d = reference.NORMAL_DRAWS[layer.variation.KERNEL_ID]
        draws.append(torch.stack([reference.draw_normal(rng, w.numel(), 1, k)[0].view(w.shape) for k in range(d)]))
    return draws


def _set_weights(layers: list, draws: list[torch.Tensor]) -> None:
    """Every layer's next forwards use the weights of ``draws`` (one sample, through its sample plan)."""
    for layer, z in zip(layers, draws):
        layer.set_chip_weight(reference.perturb_with_normals(layer.weight, layer.variation, z))


@dataclasses.dataclass(frozen=True)
class _Target:
    """What the search runs on: the model, its noisy layers, where it runs and its output adapter."""

    model: nn.Module
    layers: list
    device: torch.device
    adapt: Callable

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(self.model(x.to(self.device)))


def _accuracy(target: _Target, draws: list, loader: Iterable) -> float:
    correct = total = 0
    with torch.no_grad():
        _set_weights(target.layers, draws)
        for x, y in loader:
            pred = target.logits(x).argmax(-1)
            correct += int((pred.cpu() == y).sum())
            total += y.numel()
    return correct / max(total, 1)


def _attack_loss(target: _Target, draws: list, batches: list) -> torch.Tensor:
    _set_weights(target.layers, draws)
    loss = torch.zeros((), device=target.device)
    for x, y in batches:
        loss = loss + F.cross_entropy(target.logits(x).float(), y.to(target.device), reduction="sum")
    return loss


def _search(target: _Target, start: list, batches: list, kappa: float, steps: int, step_size: float) -> list:
    """PGD in the box: the draws with the highest attack loss seen (the start included)."""
    z = [s.clamp(-kappa, kappa).requires_grad_(True) for s in start]
    best, best_loss = [t.detach().clone() for t in z], -math.inf
    for step in range(steps + 1):
        with torch.enable_grad():
            loss = _attack_loss(target, z, batches)
            grads = torch.autograd.grad(loss, z) if step < steps else None
        if float(loss.detach()) > best_loss:
            best, best_loss = [t.detach().clone() for t in z], float(loss.detach())
        if grads is None:
            break
        with torch.no_grad():
            z = [(t + step_size * g.sign()).clamp(-kappa, kappa).requires_grad_(True) for t, g in zip(z, grads)]
    return best


def worst_case(
    model: nn.Module,
    loader: Iterable,
    *,
    kappa: float,
    seed: int = 0,
    instance: int = 0,
    steps: int = 20,
    step_size: float | None = None,
    attack_batches: int = 2,
    device=None,
    output=None,
) -> dict:
    """The worst chip within ‖z‖∞ ≤ ``kappa`` found from chip (``seed``, ``instance``), see the module
    docstring. Returns {"kappa", "steps", "step_size", "accuracy" (of the found chip, whole loader),
    "chip_accuracy" (the starting chip, unclipped), "max_abs_z" (≤ kappa), "seed", "instance"}. ``output``: the
    output adapter (:func:`nft_cuda.nn.custom.resolve_output`, e.g. "logits" for a Hugging Face model)."""
    adapt = resolve_output(output)
    _check(model, kappa, steps)
    step_size = 2.5 * kappa / max(steps, 1) if step_size is None else float(step_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    batches = []
    for x, y in loader:
        if len(batches) >= attack_batches:
            break
        batches.append((x, y))
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with kept_noise_state(model) as layers:
            set_instance(model, seed, instance)
            target = _Target(model, layers, device, adapt)
            start = _chip_draws(layers)
            chip = _accuracy(target, start, loader)
            found = _search(target, start, batches, float(kappa), steps, step_size)
            acc = _accuracy(target, found, loader)
    finally:
        for m, flag in training:
            m.training = flag
    return {
        "kappa": float(kappa),
        "steps": steps,
        "step_size": step_size,
        "accuracy": acc,
        "chip_accuracy": chip,
        "max_abs_z": max(float(z.abs().max()) for z in found),
        "seed": seed,
        "instance": instance,
    }


def worst_case_curve(model: nn.Module, loader: Iterable, kappas: Sequence[float], **kwargs) -> list[dict]:
    """:func:`worst_case` for each κ in ``kappas`` (the same starting chip): worst-case accuracy vs κ."""
    return [worst_case(model, loader, kappa=k, **kwargs) for k in kappas]
