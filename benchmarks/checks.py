"""Correctness checks, run before timing: a variant that fails one raises :class:`CheckError` and is not
timed."""

from __future__ import annotations

import torch
import torch.nn as nn

import nft_cuda
from benchmarks.config import Config


class CheckError(AssertionError):
    """A variant failed its correctness check; it is not timed."""


def check_noise_std(
    noisy: torch.Tensor, w: torch.Tensor, variation: nft_cuda.Variation, name: str, tol: float = 0.03
) -> None:
    """(W_noisy − W)/σ_w has unit standard deviation (DESIGN §2 noise model)."""
    ratio = ((noisy.float() - w.float()) / variation.sigma_w(w.float())).std().item()
    if not abs(ratio - 1.0) <= tol:
        raise CheckError(f"{name}: std of (W_noisy - W)/sigma_w is {ratio:.4f}, expected 1 ± {tol}")


def check_close(got: torch.Tensor, want: torch.Tensor, name: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise CheckError(f"{name}: {exc}") from None


def check_rel_err(got: torch.Tensor, want: torch.Tensor, name: str, tol: float) -> float:
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
    if not err <= tol:
        raise CheckError(f"{name}: relative error {err:.2e} > {tol:.0e}")
    return err


def check_deviation(outs: dict[str, torch.Tensor], clean: torch.Tensor, case: str, tol: float = 0.25) -> None:
    """Every noisy variant moves the clean output by the same relative amount (same noise law): the
    relative deviations ‖y − y_clean‖/‖y_clean‖ agree within ``tol`` (relative) and are non-zero."""
    dev = {k: ((v.float() - clean.float()).norm() / clean.float().norm()).item() for k, v in outs.items()}
    lo, hi = min(dev.values()), max(dev.values())
    if not (lo > 0 and hi <= lo * (1 + tol)):
        raise CheckError(
            f"{case}: relative deviation from the clean output differs between variants: "
            + ", ".join(f"{k} {v:.3e}" for k, v in dev.items())
        )


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CheckError(f"{name}: non-finite values")


def gemm_tol(cfg: Config) -> float:
    """Relative tolerance between two float32 GEMMs/convolutions of the same operands: tight on CPU;
    on CUDA cuDNN may use TF32 (torch's default for convolutions) and other algorithms."""
    return 5e-3 if cfg.cuda else 1e-4


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight one forward of ``layer`` used, noise included, read through its output (bias removed).

    The input is a basis: the identity for a Linear; for a Conv (no dilation, one group; stride 1 or no
    padding, e.g. a ViT's patch embedding) every one-hot kh×kw patch, whose output pixel at (padding,
    padding) sees the whole patch. One forward is one noise draw, so it gives every weight of that draw —
    for any library's layer, whatever its kernels.
    """
    w = layer.weight
    with torch.no_grad():
        if hasattr(layer, "kernel_size"):
            strided = tuple(layer.stride) != (1, 1)
            padded = isinstance(layer.padding, str) or any(layer.padding)
            if (strided and padded) or tuple(layer.dilation) != (1, 1) or layer.groups != 1:
                raise ValueError("effective_weight: only undilated, single-group convolutions, strided ones unpadded")
            cout, cin, kh, kw = w.shape
            fan_in = cin * kh * kw
            x = torch.eye(fan_in, device=w.device, dtype=w.dtype).view(fan_in, cin, kh, kw)
            y = layer(x)[:, :, 0, 0] if strided else layer(x)[:, :, layer.padding[0], layer.padding[1]]
        else:
            y = layer(torch.eye(w.shape[1], device=w.device, dtype=w.dtype))
        if layer.bias is not None:
            y = y - layer.bias
        return y.t().reshape(w.shape)


#: Noise samples a std is measured from: 2^16 give a standard error of 0.28%, a seventh of the 2% bound.
NOISE_SAMPLES = 2**16


def _noise_rel_std(layer: nn.Module, samples: int = 1) -> float:
    """std of (weight used − weight) / max|W| over forwards of ``layer``: as many draws as pool ``samples``
    noise values (one draw of a large layer; at most 64)."""
    w = layer.weight.detach().clone()
    draws = min(64, -(-samples // w.numel()))
    noise = torch.stack([effective_weight(layer) - w for _ in range(draws)])
    if not torch.equal(layer.weight.detach(), w):  # aihwkit-lightning 2.1.0's Triton path does this
        raise CheckError(
            f"{type(layer).__name__} changed its weight parameter in a forward: the noise is written "
            "into the weights and accumulates"
        )
    return (noise.std() / w.abs().max()).item()


def check_same_job(
    nft_layer: nn.Module,
    peer_layer: nn.Module,
    variation: nft_cuda.Variation,
    name: str,
    peer_name: str = "peer",
    tol: float = 0.02,
) -> str:
    """Before timing a peer variant: both layers inject the same noise, where each library says.

    In train mode the measured noise std relative to max|W| of each (pooled over draws for a small layer)
    is within ``tol`` (relative) of σ_d·scale (hence of each other), and no forward changes the weight
    parameter; after ``.eval()`` (one draw each) the peer adds no noise, nft_cuda still does (its noise
    mode is explicit), and nft_cuda's ``noise_mode(layer, "off")`` adds none. Both layers are left in train
    mode.
    Returns a note stating the measured figures."""
    want = variation.sigma * variation.scale
    nft_layer.train()
    peer_layer.train()
    got = {"nft_cuda": _noise_rel_std(nft_layer, NOISE_SAMPLES), peer_name: _noise_rel_std(peer_layer, NOISE_SAMPLES)}
    for label, value in got.items():
        if not abs(value / want - 1.0) <= tol:
            raise CheckError(
                f"{name}: {label} injects noise of std {value:.5g}·max|W| in training, "
                f"expected σ_d·scale = {want:.5g} (± {tol:.0%})"
            )
    try:
        nft_layer.eval()
        peer_layer.eval()
        off = {f"{peer_name} after eval()": _noise_rel_std(peer_layer)}
        with nft_cuda.noise_mode(nft_layer, "off"):
            off["nft_cuda in noise mode off"] = _noise_rel_std(nft_layer)
        nft_eval = _noise_rel_std(nft_layer)
    finally:
        nft_layer.train()
        peer_layer.train()
    for label, value in off.items():
        if value > want / 10:
            raise CheckError(f"{name}: {label} still injects noise (std {value:.3g}·max|W|)")
    if not nft_eval > want / 2:
        raise CheckError(
            f"{name}: nft_cuda after eval() injects noise of std {nft_eval:.5g}·max|W|; its noise "
            f"mode is explicit, so eval() must leave it on ({want:.5g})"
        )
    return (
        f"same noise: std / max abs W {got[peer_name]:.5f} vs nft_cuda {got['nft_cuda']:.5f} (σ_d·scale "
        f"{want:.5f}); eval() turns its noise off, not nft_cuda's"
    )
