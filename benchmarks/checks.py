"""Correctness checks, run before timing: a variant that fails one raises :class:`CheckError` and is not
timed."""

from __future__ import annotations

import torch

import nft_cuda
from benchmarks.config import Config


class CheckError(AssertionError):
    """A variant failed its correctness check; it is not timed."""


def check_noise_std(noisy: torch.Tensor, w: torch.Tensor, variation: nft_cuda.Variation, name: str,
                    tol: float = 0.03) -> None:
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
        raise CheckError(f"{case}: relative deviation from the clean output differs between variants: "
                         + ", ".join(f"{k} {v:.3e}" for k, v in dev.items()))


def check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise CheckError(f"{name}: non-finite values")



def gemm_tol(cfg: Config) -> float:
    """Relative tolerance between two float32 GEMMs/convolutions of the same operands: tight on CPU;
    on CUDA cuDNN may use TF32 (torch's default for convolutions) and other algorithms."""
    return 5e-3 if cfg.cuda else 1e-4

