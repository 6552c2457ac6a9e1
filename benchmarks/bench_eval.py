"""Monte-Carlo evaluation (R = 100 chip instances) of a trained small model on the embedded test slice,
vs R clean passes over the same images and vs the reference loop.

Variants, timed round by round (interleaved):
  clean passes      R passes of the clean model over the images (argmax + accuracy): the floor
  monte_carlo S=…   nft_cuda.eval.monte_carlo with S instances per pass (8, the default; --passes for more)
  … folded          the S instances folded into the batch axis (the CUDA default), with the default calls
                    (nft_cuda.nn.stacked "auto": batched GEMMs, grouped convolutions on CUDA only)
  … all stacked     the same with every layer's S chips as one batched GEMM / grouped convolution
  … a call per chip the same with one GEMM/conv call per chip (NFT_CUDA_SAMPLE_AXIS=loop)
  reference loop    the reference's way (benchmarks/reference_loop.py): per instance re-create the model,
                    reload the checkpoint from disk, host-side noise per layer, evaluate

The model: the small CNN trained with noise injection for 300 SGD steps (30 in quick runs) on the
embedded Fashion-MNIST training slice; the images: the first 512 of the embedded test slice on CPU (64
in quick runs; all 1000 on GPU). Quick runs on CPU evaluate R = 24 instances (each instance costs a
forward per batch, and on a busy 2-core machine per-op overheads dominate the small model): ratios per
instance, not the DESIGN configuration (marked "(yes)"/"(no)"). DESIGN §8 targets: MC ≤ 1.2× the
clean passes on CPU (≤ 1.1× GPU); ≥ 10× faster than the reference loop on GPU (on CPU no target: the
clean passes themselves are only ≈ 1.2× faster than the reference loop, see RESULTS.md).

No peer variant: aihwkit-lightning cannot evaluate fixed chips (benchmarks/peer.py says why); the
table has its row, skipped, with the reason.

Checked before timing: at σ_d = 0 the Monte-Carlo and the reference-loop accuracies equal the clean
accuracy, and S instances per pass give the same per-instance accuracies and EKL as one at a time.
After timing: the timed Monte-Carlo and reference-loop accuracies agree within 5 standard errors (+1%)
(different noise streams, same law).

Case "chip": the cost of one chip of a converted small transformer (the library's ViT: patch Conv2d,
attention, MLP and head noisy), per chip and side by side in one run: the clean forward, instance mode
drawing the chip's noisy weights on every forward (as before the cache), instance mode with the cached chip
weights (``NoisyModule.set_instance``), and ``monte_carlo`` (its noisy weights drawn once per pass of S
chips). 256 test images in batches of 32 on CPU, 16 chips (quick: 64 images in batches of 16, 4 chips).
Checked before timing: the cached chip gives instance mode's logits bit for bit, and monte_carlo's
per-chip accuracies equal instance mode's.

    python -m benchmarks.bench_eval [--device cpu|cuda] [--runs 100] [--images N] [--batch B]
                                    [--passes 8,1] [--quick] [--json PATH] [--only eval|chip]
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_cuda  # noqa: E402
from benchmarks import checks, config, peer, results, runner  # benchmarks sets NFT_CUDA_STRICT=1 first
from benchmarks.reference_loop import reference_monte_carlo  # noqa: E402
from nft_cuda.eval import TensorBatches, monte_carlo  # noqa: E402
from nft_cuda.io import save_model  # noqa: E402
from nft_cuda.models import build_model  # noqa: E402
from nft_cuda.nn import sample_axis_calls  # noqa: E402

SPEC = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 1.0}


def _data(split: str):
    try:
        from nft_cuda.data import load_dataset

        x, y = load_dataset("embedded", split=split)
        return x, y, "embedded"
    except Exception as exc:  # the embedded slice may be missing from a broken install
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        n = 6000 if split == "train" else 1000
        return (
            torch.randn(n, 1, 32, 32, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            f"random images (embedded {split} split unavailable: {type(exc).__name__})",
        )


def trained_small_model(device: torch.device, variation: nft_cuda.Variation, steps: int, batch: int = 64):
    """The small model trained with noise injection for ``steps`` SGD steps on the embedded train slice."""
    torch.manual_seed(0)
    model = nft_cuda.convert(build_model("small", in_channels=1, num_classes=10), variation).to(device)
    x, y, _ = _data("train")
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g).to(device)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def eval_case(
    cfg: config.Config,
    ceilings: dict | None = None,
    *,
    runs: int | None = None,
    images: int | None = None,
    batch: int | None = None,
    passes: tuple[int, ...] | None = None,
) -> list[results.Row]:
    dev, v = cfg.dev, config.VARIATION
    runs = runs or (24 if cfg.quick and not cfg.cuda else 100)
    images = images or (1000 if cfg.cuda else (64 if cfg.quick else 512))
    batch = batch or (500 if cfg.cuda else (64 if cfg.quick else 128))
    passes = passes or (8,)
    model = trained_small_model(dev, v, steps=30 if cfg.quick else 300)
    x, y, source = _data("test")
    x, y = x[:images].to(dev), y[:images].to(dev)
    loader = TensorBatches(x, y, batch)
    name = f"Monte-Carlo eval small model R={runs} {images} img ({source} test)"
    exact = runs == 100 and source == "embedded" and images >= 256
    last: dict[str, dict] = {}

    def mc(s):
        last[f"S={s}"] = monte_carlo(model, loader, v, runs, seed=0, instances_per_pass=s, progress=False)[0]

    def mc_folded(s, calls):  # the S chips folded into the batch: one GEMM/conv call per layer, or S
        with sample_axis_calls(calls):
            last[f"S={s} {calls}"] = monte_carlo(
                model, loader, v, runs, seed=0, instances_per_pass=s, fold=True, progress=False
            )[0]

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "small.pt")
        save_model(path, model, spec=SPEC, variation=v, meta={"dataset": "embedded"})

        def ref():
            last["reference"] = reference_monte_carlo(path, loader, v, runs, seed=0, device=dev)

        acc0 = _clean_accuracy(model, loader)
        _check_monte_carlo(name, cfg, model, loader, path, acc0)  # correctness before timing
        fns = {f"{runs} clean passes": functools.partial(_clean_passes, model, loader, runs)}
        fns.update({f"monte_carlo S={s}": functools.partial(mc, s) for s in passes})
        for s in (x for x in passes if x > 1):
            fns[f"monte_carlo S={s} folded"] = functools.partial(mc_folded, s, "auto")
            fns[f"monte_carlo S={s} folded, all stacked"] = functools.partial(mc_folded, s, "stacked")
            fns[f"monte_carlo S={s} folded, a call per chip"] = functools.partial(mc_folded, s, "loop")
        fns["reference loop"] = ref
        c = results.Case(cfg, ceilings)
        rows = c.time(name, fns, work=float(runs * images), unit="img/s", slow=True, warmup=0)  # the checks warmed up

    clean_row = rows[f"{runs} clean passes"]
    clean_row.note = f"clean accuracy {acc0:.3f}"
    for s in passes:
        row = rows[f"monte_carlo S={s}"]
        res = last[f"S={s}"]
        row.note = f"accuracy {res['accuracy_mean']:.3f} ± {res['ci95']:.3f}, EKL {res['ekl']:.3g}"
        c.compare(row, clean_row, "time", "mc_vs_clean", exact=exact)
        c.compare(row, rows["reference loop"], "speedup", "mc_vs_reference", exact=exact)
    for s in (x for x in passes if x > 1):
        _compare_folded(c, rows, last, s, clean_row)
    res = last["reference"]
    rows["reference loop"].note = f"accuracy {res['accuracy_mean']:.3f} ± {res['ci95']:.3f}"
    c.compare(rows["reference loop"], clean_row, "time")
    c.add(peer.skipped_row(name, peer.NO_MONTE_CARLO))
    _check_agreement(name, last[f"S={passes[0]}"], res, runs)
    return c.rows


#: The folded variants: sample-axis mode → (row suffix, note).
_FOLDED = {
    "auto": ("", "the default calls: stacked GEMMs, stacked convolutions on CUDA only"),
    "stacked": (", all stacked", "one GEMM/conv call per layer per batch"),
    "loop": (", a call per chip", "S calls per layer per batch"),
}


def _compare_folded(c: results.Case, rows: dict, last: dict, s: int, clean_row: results.Row) -> None:
    """The folded variants of S chips (:data:`_FOLDED`) against a call per chip and against the clean passes;
    notes count the chips whose accuracy differs from the per-chip calls (the same chips: rounding only)."""
    loop_row = rows[f"monte_carlo S={s} folded, a call per chip"]
    loop_acc = last[f"S={s} loop"]["per_instance_accuracy"]
    for mode, (suffix, note) in _FOLDED.items():
        row, res = rows[f"monte_carlo S={s} folded{suffix}"], last[f"S={s} {mode}"]
        differ = sum(x != y for x, y in zip(res["per_instance_accuracy"], loop_acc))
        row.note = f"{note}; accuracy {res['accuracy_mean']:.3f}" + (
            f", {differ} chips differ" if mode != "loop" else ""
        )
        if mode != "loop":
            c.compare(row, loop_row, "speedup")
        c.compare(row, clean_row, "time")


def _clean_accuracy(model, loader) -> float:
    """The clean model's accuracy on ``loader``."""
    with torch.no_grad(), nft_cuda.noise_mode(model, "off"):
        correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in loader)
    return correct / sum(yb.shape[0] for _, yb in loader)


def _clean_passes(model, loader, runs: int) -> None:
    """``runs`` clean passes over ``loader``: the cost Monte-Carlo is timed against."""
    with torch.no_grad(), nft_cuda.noise_mode(model, "off"):
        for _ in range(runs):
            for xb, yb in loader:
                (model(xb).argmax(-1) == yb).sum()


def _check_monte_carlo(name: str, cfg: config.Config, model, loader, path: str, acc0: float) -> None:
    """Before timing: at σ=0 monte_carlo and the reference loop give the clean accuracy ``acc0``, and
    4 instances per pass give the results of one at a time."""
    v = config.VARIATION
    images = sum(yb.shape[0] for _, yb in loader)
    v0 = v.with_sigma(0.0)
    m0 = monte_carlo(model, loader, v0, 2, seed=0, progress=False)[0]
    r0 = reference_monte_carlo(path, loader, v0, 2, seed=0, device=cfg.dev)
    # Exact on CPU. On CUDA the folded forward (S·B rows) may take other cuDNN/TF32 algorithms than B
    # rows, so a near-tie may flip (DESIGN §6: predictions equal except top-2 margins below 1e-4).
    acc_tol, ekl_tol = (2.0 / images, 1e-3) if cfg.cuda else (1e-12, 1e-9)
    for label, got in (
        ("monte_carlo", m0["accuracy_mean"]),
        ("monte_carlo clean_accuracy", m0["clean_accuracy"]),
        ("reference loop", r0["accuracy_mean"]),
    ):
        if abs(got - acc0) > acc_tol:
            raise checks.CheckError(f"{name}: {label} at σ=0 gives accuracy {got}, the clean passes {acc0}")
    a = monte_carlo(model, loader, v, 4, seed=0, instances_per_pass=4, progress=False)[0]
    b = monte_carlo(model, loader, v, 4, seed=0, instances_per_pass=1, progress=False)[0]
    if max(abs(p - q) for p, q in zip(a["per_instance_accuracy"], b["per_instance_accuracy"])) > acc_tol or abs(
        a["ekl"] - b["ekl"]
    ) > ekl_tol * abs(b["ekl"]):
        raise checks.CheckError(
            f"{name}: 4 instances per pass differ from one at a time: "
            f"{a['per_instance_accuracy']} / {b['per_instance_accuracy']}, "
            f"EKL {a['ekl']} / {b['ekl']}"
        )


def _check_agreement(name: str, mc_res: dict, res: dict, runs: int) -> None:
    """Statistical agreement of Monte-Carlo and the reference loop (different noise streams, same law)."""
    se = (mc_res["accuracy_std"] ** 2 / runs + res["accuracy_std"] ** 2 / runs) ** 0.5
    if abs(mc_res["accuracy_mean"] - res["accuracy_mean"]) > 5 * se + 0.01:
        raise checks.CheckError(
            f"{name}: Monte-Carlo accuracy {mc_res['accuracy_mean']:.4f} and the reference loop's "
            f"{res['accuracy_mean']:.4f} disagree beyond 5 standard errors"
        )


def _chip_passes(model, loader, chips: int, cache: bool | None) -> None:
    """``chips`` passes of ``model`` over ``loader`` without gradients: clean (``cache`` None) or chip r in
    instance mode (``nft_cuda.set_instance``) with or without the cached chip weights."""
    with torch.no_grad(), contextlib.ExitStack() as stack:
        if cache is None:
            stack.enter_context(nft_cuda.noise_mode(model, "off"))
        for r in range(chips):
            if cache is not None:
                nft_cuda.set_instance(model, 0, r, cache=cache)
            for xb, yb in loader:
                (model(xb).argmax(-1) == yb).sum()


def chip_case(cfg: config.Config, ceilings: dict | None = None, *, chips: int | None = None) -> list[results.Row]:
    """The cost of one chip of a converted small transformer (nft_cuda.models ViT), per chip, side by side:
    the clean forward, instance mode drawing the chip's noisy weights on every forward, instance mode with
    the cached chip weights (NoisyModule.set_instance) and monte_carlo."""
    dev, v = cfg.dev, config.VARIATION
    chips = chips or (4 if cfg.quick else 16)
    images, batch = (64, 16) if cfg.quick and not cfg.cuda else ((256, 32) if not cfg.cuda else (1000, 250))
    torch.manual_seed(0)
    model = nft_cuda.convert(build_model("vit", in_channels=1, num_classes=10), v).to(dev).eval()
    x, y, source = _data("test")
    loader = TensorBatches(x[:images].to(dev), y[:images].to(dev), batch)
    name = f"chip cost ViT {images} img batch {batch}, {chips} chips ({source} test)"
    # Correctness before timing: the cache gives instance mode's logits bit for bit, monte_carlo its chips.
    with torch.no_grad():
        xb = loader.images[:batch]
        nft_cuda.set_instance(model, 0, 1, cache=False)
        drawn = model(xb)
        nft_cuda.set_instance(model, 0, 1, cache=True)
        if not (torch.equal(model(xb), drawn) and torch.equal(model(xb), drawn)):
            raise checks.CheckError(f"{name}: the cached chip weights change instance mode's logits")
        acc = []
        for r in range(2):
            nft_cuda.set_instance(model, 0, r)
            acc.append(sum(int((model(a).argmax(-1) == b).sum()) for a, b in loader) / images)
    got = monte_carlo(model, loader, v, 2, seed=0, progress=False)[0]["per_instance_accuracy"]
    if got != acc:
        raise checks.CheckError(f"{name}: monte_carlo's chips {got} differ from instance mode's {acc}")

    fns = {
        "clean forward": functools.partial(_chip_passes, model, loader, chips, None),
        "instance, drawn per forward": functools.partial(_chip_passes, model, loader, chips, False),
        "instance, cached chip": functools.partial(_chip_passes, model, loader, chips, True),
        "monte_carlo": lambda: monte_carlo(model, loader, v, chips, seed=0, progress=False),
    }
    c = results.Case(cfg, ceilings)
    rows = c.time(name, fns, work=float(chips * images), unit="img/s", slow=True)
    rows["monte_carlo"].note = f"S = 8 per pass; its one clean pass adds {1 / chips:.0%} of a clean forward per chip"
    for variant in ("instance, drawn per forward", "instance, cached chip"):
        c.compare(rows[variant], rows["clean forward"], "time")
    c.compare(rows["monte_carlo"], rows["clean forward"], "time", "mc_vs_clean", exact=False)
    c.compare(rows["instance, cached chip"], rows["instance, drawn per forward"], "speedup")
    return c.rows


CASES = {"eval": eval_case, "chip": chip_case}


def _cases(a):
    passes = tuple(int(s) for s in a.passes.split(",")) if a.passes else None
    return {
        "eval": functools.partial(eval_case, runs=a.runs, images=a.images, batch=a.batch, passes=passes),
        "chip": chip_case,
    }


def _extra(p):
    p.add_argument("--runs", type=int, help="chip instances R (default 100; 24 with --quick on CPU)")
    p.add_argument("--images", type=int, help="test images (CPU: 512, 64 with --quick; GPU: 1000)")
    p.add_argument("--batch", type=int, help="evaluation batch (CPU: 128, 64 with --quick; GPU: 500)")
    p.add_argument("--passes", help="instances_per_pass values, comma-separated (default 8)")


def main(argv=None) -> None:
    runner.cli_main(__doc__, _cases, argv, extra_args=_extra)


if __name__ == "__main__":
    main()
