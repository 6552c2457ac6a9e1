"""One VGG-8 training step (forward, backward, SGD update) per method, against the clean step and the
reference way, on CIFAR-shaped inputs (3×32×32, 10 classes; batch 32 on CPU, 128 on GPU).

Variants (all start from the same weights; SGD lr 0.01, momentum 0.9):
  clean          the plain model, no noise (the floor)
  noise          noise-injection training (NoisyConv2d/NoisyLinear, a fresh draw per layer per forward)
  reference      the same step the reference way: every layer, every forward, max|W| read to the host,
                 mask, torch.normal on the host copied to the device, added, then F.conv2d/F.linear
  OVF            OVF with N = 3 (σ_d + 0.15, 0.10, 0.05), the N + 1 forwards batched along a sample axis
  reference OVF  the reference's OVF: N + 1 = 4 sequential forwards with reference-way noise at σ_d + δ_n
  IRS            IRS with VGG-8's default taps (block1, block2, block4; pools 6, 4, 3)
  aihwkit-lightning  the peer's step (benchmarks/peer.py): convert_to_analog with the same noise, its
                 AnalogOptimizer around the same SGD (with Triton on CUDA: a "… Triton" variant too);
                 skipped, with the reason, when it is not installed

The noise is RRAM1 at σ_d = 0.1 (config.LAYER_VARIATION: the law the peer can match).

DESIGN §8 targets: noise step ≤ 1.10× clean; OVF ≤ 4.2× clean and ≥ 1.0× faster than the reference OVF
on CPU (≥ 20× on GPU); the noise step ≥ 1.5× faster than the peer's (on GPU: than its Triton path).
The steps are timed round by round, interleaved, so load changes hit all alike.
Quick runs on CPU use VGG-8 at width 0.25 (1/16 of the FLOPs and of the weights: the noise's share is
about the same, the per-layer overheads weigh more; not the DESIGN configuration: marked "(yes)"/"(no)").

Checked before timing, at σ_d = 0 and δ = 0 (where every noisy variant must equal its clean twin): the
noise step's and the reference step's loss equal the clean loss, and OVF's loss equals the reference
OVF's (batched vs sequential, BatchNorm per forward); then the first (warm-up) step of every variant has
a finite loss and finite gradients; the peer's layers inject the same noise as nft_cuda's (same-named
layers, checks.check_same_job).

    python -m benchmarks.bench_train [--device cpu|cuda] [--quick] [--json PATH]
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import baselines, checks, config, peer, results, runner  # benchmarks sets NFT_CUDA_STRICT=1 first
from nft_cuda.conversion import noisy_layers  # noqa: E402
from nft_cuda.models import build_model  # noqa: E402
from nft_cuda.train import OVF, build_method, nft_loss  # noqa: E402

DELTAS = (0.15, 0.10, 0.05)


def set_sigma(model, sigma: float) -> None:
    """Every noisy layer of ``model`` at σ_d = ``sigma`` (same device model otherwise)."""
    for _, layer in noisy_layers(model):
        layer.variation = layer.variation.with_sigma(sigma)


def reference_ovf_loss(model, x, y, variation, beta: float, deltas=DELTAS):
    """The reference's OVF: forward t = 0 at σ_d, t = n at σ_d + δ_n, each with reference-way noise."""
    outs = []
    for delta in (0.0, *deltas):
        for layer in baselines.reference_layers(model):
            layer.sigma = variation.sigma + delta
        outs.append(model(x))
    return nft_loss(outs[0], outs[1:], y, beta)


def train_step(model, loss_fn, x, y, name: str, opt=None, context=contextlib.nullcontext):
    """One training step of ``model`` (SGD lr 0.01, momentum 0.9 unless ``opt``) inside ``context()``."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    checked = []

    def step():
        with context():
            _one_step()

    def _one_step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, x, y)
        loss.backward()
        if not checked:  # the first call is the warm-up: check it
            checks.check_finite(loss.detach(), f"{name}: loss")
            for pname, p in model.named_parameters():
                if p.requires_grad and p.grad is not None:
                    checks.check_finite(p.grad, f"{name}: gradient of {pname}")
            checked.append(True)
        opt.step()

    return step


def _check_at_zero(name: str, cfg: config.Config, models: dict, losses: dict, x, y, beta: float) -> None:
    """Correctness at σ_d = 0, δ = 0, before timing (forward only; the models are in train mode, as in
    the steps): the noise step and the reference conversion give the clean loss, OVF the reference OVF's.
    On CUDA, cuDNN's TF32 convolutions pick different algorithms for the batched OVF forward: looser there."""
    v = config.LAYER_VARIATION
    rtol = 1e-3 if cfg.cuda else 1e-5
    with torch.no_grad():
        clean_loss = losses["clean"](models["clean"], x, y)
        set_sigma(models["noise"], 0.0)
        checks.check_close(
            losses["noise"](models["noise"], x, y), clean_loss, f"{name}: noise step at σ=0 vs clean", rtol=rtol
        )
        set_sigma(models["noise"], v.sigma)
        for layer in baselines.reference_layers(models["reference"]):
            layer.sigma = 0.0
        checks.check_close(
            losses["reference"](models["reference"], x, y),
            clean_loss,
            f"{name}: reference step at σ=0 vs clean",
            rtol=rtol,
        )
        for layer in baselines.reference_layers(models["reference"]):
            layer.sigma = v.sigma
        set_sigma(models["OVF"], 0.0)
        ovf0 = OVF(v.with_sigma(0.0), beta, deltas=(0.0,) * len(DELTAS)).loss(models["OVF"], x, y)[0]
        ref0 = reference_ovf_loss(models["reference OVF"], x, y, v.with_sigma(0.0), beta, deltas=(0.0,) * len(DELTAS))
        checks.check_close(ovf0, ref0, f"{name}: OVF vs reference OVF at σ=0, δ=0", rtol=max(rtol, 1e-4))
        set_sigma(models["OVF"], v.sigma)


def train_case(cfg: config.Config, ceilings: dict | None = None) -> list[results.Row]:
    dev, v = cfg.dev, config.LAYER_VARIATION
    batch = 128 if cfg.cuda else 32
    width = 0.25 if (cfg.quick and not cfg.cuda) else 1.0
    exact = width == 1.0
    name = f"VGG-8 train step batch {batch}" + ("" if exact else f" (width {width:g})")
    torch.manual_seed(0)
    base = build_model("vgg8", in_channels=3, num_classes=10, width=width).to(dev)
    x = torch.randn(batch, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    noise_m = build_method("noise", v)
    ovf_m = build_method("ovf", v, model_name="vgg8", dataset="cifar10", deltas=DELTAS)
    irs_m = build_method("irs", v, model_name="vgg8", dataset="cifar10")
    models = {
        "clean": copy.deepcopy(base),
        "noise": noise_m.prepare(copy.deepcopy(base)),
        "reference": baselines.reference_convert(copy.deepcopy(base), v),
        "OVF": ovf_m.prepare(copy.deepcopy(base)),
        "reference OVF": baselines.reference_convert(copy.deepcopy(base), v),
        "IRS": irs_m.prepare(copy.deepcopy(base), x, num_classes=10),
    }
    beta = ovf_m.beta

    def ce(model, xb, yb):
        return F.cross_entropy(model(xb), yb)

    def ref_ovf(model, xb, yb):
        return reference_ovf_loss(model, xb, yb, v, beta)

    losses = {
        "clean": ce,
        "noise": lambda m, xb, yb: noise_m.loss(m, xb, yb)[0],
        "reference": ce,
        "OVF": lambda m, xb, yb: ovf_m.loss(m, xb, yb)[0],
        "reference OVF": ref_ovf,
        "IRS": lambda m, xb, yb: irs_m.loss(m, xb, yb)[0],
    }

    _check_at_zero(name, cfg, models, losses, x, y, beta)

    peers = peer.model_variants(cfg, name, models["noise"], base, v)
    steps = {k: train_step(models[k], losses[k], x, y, f"{name} {k}") for k in models}
    for k, model in peers.items.items():
        steps[k] = train_step(
            model,
            ce,
            x,
            y,
            f"{name} {k}",
            opt=peer.optimizer(model, lr=0.01, momentum=0.9),
            context=functools.partial(peer.use_triton, k == peer.triton_variant()),
        )
    rows = results.Case(cfg, ceilings)
    r = rows.time(name, steps, work=float(batch), unit="img/s", slow=True)
    rows.compare(r["noise"], r["clean"], "time", "noise_step_vs_clean", exact=exact)
    rows.compare(r["noise"], r["reference"], "speedup")
    rows.compare(r["reference"], r["clean"], "time")
    rows.compare(r["OVF"], r["clean"], "time", "ovf_vs_clean", exact=exact)
    rows.compare(r["OVF"], r["reference OVF"], "speedup", "ovf_vs_reference", exact=exact)
    rows.compare(r["reference OVF"], r["clean"], "time")
    rows.compare(r["IRS"], r["clean"], "time")
    peer.finish(rows, r, name, "noise", peers, "train_vs_peer", exact=exact)
    return rows.rows


CASES = {"train": train_case}


def main(argv=None) -> None:
    runner.cli_main(__doc__, CASES, argv)


if __name__ == "__main__":
    main()
