"""Deployment-side mitigations evaluated on common chips: write-verify of a weight budget and per-chip
BatchNorm recalibration.

What practitioners do after programming a chip is part of its accuracy, and it is only comparable when the
same chips are used with and without it. :func:`mitigated_chips` evaluates R chip instances — chip r is
the one :func:`nft_cuda.set_instance` and :func:`nft_cuda.eval.monte_carlo.monte_carlo` call r, the same
draws — with either mitigation applied, so its per-chip accuracies pair with a plain Monte-Carlo run of the
same seed (:func:`nft_cuda.eval.paired.paired_difference`).

Write-verify. A budget p (a fraction of every noisy weight of the model, chosen globally) is programmed and
verified until close to its target: its perturbation is scaled by ``residual`` (default 0.1: a tenth of the
device error left), W_v = W + residual·(W_chip − W), which holds for every device model. The weights are
chosen once, before the chips, by

* ``"magnitude"``: the largest |w| (the cheapest rule);
* ``"gradient"``: the largest |∂L/∂w| of the clean loss on ``score_batches`` batches;
* ``"saliency"``: the largest expected loss increase from the device noise at that weight,
  ½·F·σ_w² with F = (∂L/∂w)² the diagonal Fisher approximation of the Hessian (the second-order
  criterion of SWIM, Yan et al., DAC 2022, in its Fisher form);
* ``"random"``: uniformly, with a fixed generator.

Ties at the budget's edge are broken by position, so the count is exactly ⌊p·N⌋.

BatchNorm recalibration. Before a chip is evaluated, every BatchNorm's running statistics are recomputed
from ``recalibrate`` batches of ``calibration_loader`` (training data) passed through that chip (a
cumulative average, the layer's affine parameters unchanged), then restored after the chip. A chip's
shifted activations are what its BatchNorm statistics no longer match; this removes that part of the
error at the cost of a few forward passes per chip.

Chips run one after another (the weights of each drawn once, carried by the layers' sample plans), in
``eval()`` mode under ``torch.no_grad()``; the model's state is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda._args import check_positive_int
from nft_cuda.eval.metrics import accuracy_stats
from nft_cuda.nn import kept_noise_state, noise_mode, noisy_layers, set_instance
from nft_cuda.nn.custom import resolve_output

__all__ = ["VERIFY_RULES", "mitigated_chips", "verify_masks"]

VERIFY_RULES = ("magnitude", "gradient", "saliency", "random")
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _scores(model: nn.Module, layers: list, rule: str, batches: list, adapt) -> list[torch.Tensor]:
    """Per noisy layer, the score of each weight element under ``rule`` (higher = verified first)."""
    if rule == "magnitude":
        return [layer.weight.detach().abs().float() for layer in layers]
    if rule == "random":
        g = torch.Generator().manual_seed(0)
        return [torch.rand(layer.weight.shape, generator=g).to(layer.weight.device) for layer in layers]
    weights = [layer.weight for layer in layers]
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    fisher = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    with noise_mode(model, "off"), torch.enable_grad():
        for x, y in batches:
            loss = F.cross_entropy(adapt(model(x)).float(), y.to(x.device))
            gs = torch.autograd.grad(loss, weights)
            for acc, sq, gr in zip(grads, fisher, gs):
                acc += gr.float()
                sq += gr.float() ** 2
    if rule == "gradient":
        return [g.abs() for g in grads]
    return [0.5 * f * _noise_variance(layer) for f, layer in zip(fisher, layers)]


def _noise_variance(layer, samples: int = 8) -> torch.Tensor:
    """E[(W_chip − W)²] per element, estimated from ``samples`` chips of a fixed stream: one rule for
    every device model (σ_w² for the Gaussian presets, w²σ² to first order for log-normal, ...)."""
    w = layer.weight.detach()
    rng = torch.tensor([12345, 0], dtype=torch.int64, device=w.device)
    sigmas = torch.full((samples,), layer.variation.sigma, dtype=torch.float32, device=w.device)
    return ((layer.noisy_weights(rng, sigmas).float() - w.float()) ** 2).mean(0)


def verify_masks(
    model: nn.Module, fraction: float, rule: str = "magnitude", batches: Iterable = (), *, output=None
) -> list:
    """Per noisy layer (``noisy_layers`` order), the boolean mask of its verified weights: the top
    ⌊fraction·N⌋ scores of the model's N noisy weights under ``rule`` (see the module docstring)."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
        raise ValueError(f"the write-verify fraction must be in [0, 1], got {fraction!r}")
    if rule not in VERIFY_RULES:
        raise ValueError(f"unknown write-verify rule {rule!r}; choose one of {', '.join(VERIFY_RULES)}")
    layers = [layer for _, layer in noisy_layers(model)]
    if rule in ("gradient", "saliency") and fraction > 0 and not list(batches):
        raise ValueError(f"the {rule!r} rule needs batches of data to score the weights (score_batches)")
    scores = _scores(model, layers, rule, list(batches), resolve_output(output)) if fraction > 0 else None
    total = sum(layer.weight.numel() for layer in layers)
    budget = math.floor(fraction * total)
    if budget == 0:
        return [torch.zeros(layer.weight.shape, dtype=torch.bool, device=layer.weight.device) for layer in layers]
    flat = torch.cat([s.reshape(-1).cpu() for s in scores])
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.argsort(flat, descending=True, stable=True)[:budget]] = True
    masks, start = [], 0
    for layer in layers:
        n = layer.weight.numel()
        masks.append(chosen[start : start + n].view(layer.weight.shape).to(layer.weight.device))
        start += n
    return masks


def _chip_weights(layers: list, masks: list | None, residual: float) -> None:
    """Each layer's next forwards use its current chip's weights (write-verified where ``masks``)."""
    for i, layer in enumerate(layers):
        rng = layer.noise_state().instance_rng
        w_chip = layer.noisy_weight(rng)
        if masks is not None:
            w = layer.weight.detach()
            w_chip = torch.where(masks[i], w + residual * (w_chip - w), w_chip)
        layer.set_chip_weight(w_chip, rng)


def _recalibrate(model: nn.Module, batches: list) -> None:
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the recalibration batches
        m.train()
    for x, _ in batches:
        model(x)
    for m in norms:
        m.eval()


def _accuracy(model: nn.Module, loader: Iterable, adapt) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((adapt(model(x)).argmax(-1).cpu() == y.cpu()).sum())
        total += y.numel()
    return correct / max(total, 1)


def _check_runs(runs, recalibrate, calibration_loader, residual) -> None:
    check_positive_int("runs", runs)
    if isinstance(recalibrate, bool) or not isinstance(recalibrate, int) or recalibrate < 0:
        raise ValueError(f"recalibrate must be an int >= 0 (batches per chip), got {recalibrate!r}")
    if recalibrate and calibration_loader is None:
        raise ValueError("BatchNorm recalibration needs calibration_loader (training batches)")
    if not isinstance(residual, (int, float)) or not 0 <= residual <= 1:
        raise ValueError(
            f"residual must be in [0, 1] (the share of the device error a verified weight keeps), got {residual!r}"
        )


def mitigated_chips(
    model: nn.Module,
    loader: Iterable,
    runs: int,
    *,
    seed: int,
    verify_fraction: float = 0.0,
    verify_rule: str = "magnitude",
    residual: float = 0.1,
    score_batches: Iterable = (),
    recalibrate: int = 0,
    calibration_loader: Iterable | None = None,
    output=None,
) -> dict:
    """Chips 0 .. runs−1 of ``seed`` with write-verify and/or BatchNorm recalibration (module docstring).
    Returns :func:`~nft_cuda.eval.metrics.accuracy_stats` plus ``per_instance_accuracy`` and the settings.
    ``output``: the output adapter (:func:`nft_cuda.nn.custom.resolve_output`)."""
    adapt = resolve_output(output)
    _check_runs(runs, recalibrate, calibration_loader, residual)
    calib = []
    if recalibrate:
        for batch in calibration_loader:
            if len(calib) >= recalibrate:
                break
            calib.append(batch)
    training = [(m, m.training) for m in model.modules()]
    bn_state = {
        n: {k: v.clone() for k, v in m.state_dict().items()}
        for n, m in model.named_modules()
        if isinstance(m, _BATCH_NORMS)
    }
    momenta = {n: m.momentum for n, m in model.named_modules() if isinstance(m, _BATCH_NORMS)}
    accs = []
    try:
        model.eval()
        masks = (
            verify_masks(model, verify_fraction, verify_rule, score_batches, output=output)
            if verify_fraction > 0
            else None
        )
        with kept_noise_state(model) as layers, torch.no_grad():
            for r in range(runs):
                set_instance(model, seed, r)
                _chip_weights(layers, masks, residual)
                if calib:
                    _recalibrate(model, calib)
                accs.append(_accuracy(model, loader, adapt))
                _restore_norms(model, bn_state, momenta)
    finally:
        _restore_norms(model, bn_state, momenta)
        for m, flag in training:
            m.training = flag
    settings = dict(
        verify_fraction=verify_fraction, verify_rule=verify_rule, residual=residual, recalibrate=recalibrate
    )
    return {**settings, "runs": runs, "seed": seed, **accuracy_stats(accs), "per_instance_accuracy": accs}


def _restore_norms(model: nn.Module, states: dict, momenta: dict) -> None:
    for name, m in model.named_modules():
        if name in states:
            m.load_state_dict(states[name])
            m.momentum = momenta[name]
