"""perturb on a 4M-element weight (S = 1, 4) vs a plain copy of the same bytes, the reference way and
torch.compile of its composite.

DESIGN §8 targets (CPU, 2 cores): perturb ≤ 4× a copy of the same bytes, ≥ 5× faster than the
reference way, ≥ 1.0× torch.compile of the composite. GPU (H200): ≤ 1.25× copy (≥ 80% of copy
bandwidth), ≥ 50× / ≥ 1.5×. For S = 4 the copy baseline writes the same 4 copies
(``expand(4, ...).contiguous()``) and the reference/compiled ratios are per sample (they draw one
sample per call, as the reference does).

Checked before timing: the kernel equals the pure-PyTorch oracle on the same stream (DESIGN §3), and
(W_noisy − W)/σ_w has unit std for the kernel, the reference way and the compiled composite.

    python -m benchmarks.bench_perturb [--device cpu|cuda] [--numel N] [--quick] [--no-compile] [--json PATH]
"""

from __future__ import annotations

import torch  # noqa: E402

import nft_cuda  # noqa: E402
from benchmarks import baselines, checks, config, results, runner  # benchmarks sets NFT_CUDA_STRICT=1 first
from benchmarks.reference_loop import reference_perturb_  # noqa: E402
from nft_cuda import reference  # noqa: E402

DESIGN_NUMEL = 4 * 2**20


def perturb_case(cfg: config.Config, ceilings: dict | None = None) -> list[results.Row]:
    dev, v, numel = cfg.dev, config.VARIATION, cfg.numel
    g = torch.Generator().manual_seed(0)
    w = torch.randn(numel // 1024, 1024, generator=g).to(dev)
    rng = torch.tensor([12345, 0], dtype=torch.int64, device=dev)
    case_name = f"perturb {numel / 2**20:g}M fp32"
    exact = numel == DESIGN_NUMEL
    c = results.Case(cfg, ceilings)

    # Correctness before timing. The pure-PyTorch oracle takes seconds per million elements on a CPU,
    # so quick runs compare on the first 256 rows (a weight of its own) and check the timed tensor's
    # noise statistics only.
    wc = w if not cfg.quick else w[:256].clone()
    for samples in (1, 4):
        sig = torch.full((samples,), v.sigma, device=dev)
        got = nft_cuda.ops.perturb(wc, v, rng=rng, samples=samples)
        want = reference.perturb(wc, rng, sig, v.scale, v.state_factor)
        checks.check_close(
            got,
            want,
            f"perturb S={samples} vs the pure-PyTorch oracle",
            rtol=0,
            atol=1e-5 * v.sigma_w(wc).max().item() + 1e-6,
        )
        got = got if wc is w else nft_cuda.ops.perturb(w, v, rng=rng, samples=samples)
        checks.check_noise_std(got[samples - 1], w, v, f"perturb S={samples}")
    checks.check_noise_std(baselines.reference_weight(w, v), w, v, "reference way")
    same = w.clone()
    reference_perturb_(same, v, torch.Generator().manual_seed(3))
    checks.check_close(
        w + baselines.reference_noise(w, v, generator=torch.Generator().manual_seed(3)),
        same,
        "reference way vs benchmarks.reference_loop",
        rtol=0,
        atol=0,
    )
    compiled = None
    if cfg.compile:
        compiled = baselines.compile_fresh(baselines.composite_weight)
        checks.check_noise_std(compiled(w, v.sigma, v.scale, v.state_factor), w, v, "compiled composite")

    nbytes = numel * w.element_size()
    fns = {f"perturb S={s}": (lambda s=s: nft_cuda.ops.perturb(w, v, rng=rng, samples=s)) for s in (1, 4)}
    fns["copy"] = lambda: w.clone()
    fns["copy ×4"] = lambda: w.unsqueeze(0).expand(4, *w.shape).contiguous()
    fns["reference"] = lambda: baselines.reference_weight(w, v)
    if compiled is not None:
        fns["compiled"] = lambda: compiled(w, v.sigma, v.scale, v.state_factor)
    # bytes read + written: W once, plus S outputs
    work = {
        "perturb S=1": 2 * nbytes,
        "perturb S=4": 5 * nbytes,
        "copy": 2 * nbytes,
        "copy ×4": 5 * nbytes,
        "reference": 2 * nbytes,
        "compiled": 2 * nbytes,
    }
    r = c.time(case_name, fns, work=work, unit="GB/s", ceiling="copy", notes={"perturb S=4": "ratios per sample"})
    for samples, copy in ((1, r["copy"]), (4, r["copy ×4"])):
        row = r[f"perturb S={samples}"]
        c.compare(row, copy, "time", "perturb_vs_copy", exact=exact)
        c.compare(row, r["reference"], "speedup", "perturb_vs_reference", per=samples, exact=exact)
        if "compiled" in r:
            c.compare(row, r["compiled"], "speedup", "perturb_vs_compiled", per=samples, exact=exact)
    return c.rows


CASES = {"perturb": perturb_case}


def main(argv=None) -> None:
    runner.cli_main(__doc__, CASES, argv)


if __name__ == "__main__":
    main()
