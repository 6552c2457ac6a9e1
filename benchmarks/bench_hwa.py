"""The cost of crossbar tiles and of each hardware-aware-training knob (issue 26): one training step
(forward, backward, SGD update, weight clipping where on) of a small MLP, the knobs switched on one after
the other, each against the clean step, against the step before it and against aihwkit-lightning doing
the same (benchmarks/peer.py).

Model: an MLP 1024 → 1024 → 1024 → 10 (ReLU), batch 128, random inputs and labels; every layer has 1024
inputs, so 512-input tiles cut it into 2 input tiles. Quick: 1024 → 256 → 10 at batch 32 (the first layer
still 2 tiles; not the full configuration: marked "(yes)"/"(no)").

Variants (cumulative: each adds one knob to the one before; the knobs' values are those of the
``lightning-hwa`` preset, nft_cuda/train/presets.py, so the last variant *is* that preset, checked):
  clean               the MLP as built
  noise               RRAM1 weight noise of std 0.05·max|W| (the preset's), one crossbar per layer
  + tiles 512         ``Tiles(max_input_size=512)``: each input tile its own max|W|
  + per channel       ``Tiles(per_channel=True)``: each output row of a tile its own max|W|
  + DAC/ADC 8 b       ``MVM(input_bits=8, output_bits=8, output_bound=12, adc_range="bound")``: the ADC
                      spans the output bound (lightning's ADC needs it), input ranges fixed
                      (``calibrate_mvm`` on the batch, the same values given to the peer)
  + output noise      ``MVM(output_noise=0.01)`` per channel
  + learned ranges    ``MVM(learned_input_range=InputRange(...))``: trainable DAC ranges, data init
                      over the first 100 training forwards (all the timed ones)
  + clip = lightning-hwa   ``WeightClip("gaussian-per-channel", sigma=2.5)`` after every optimizer step
                      (a step post-hook on the SGD, as lightning's AnalogOptimizer does)
  aihwkit-lightning …  the same variant in the peer (``TorchInferenceRPUConfig``, its PyTorch path):
                      ``modifier.noise_type`` ADD_NORMAL (→ ADD_NORMAL_PER_CHANNEL), std_dev 0.05;
                      ``mapping.max_input_size`` 512; ``forward.inp_res = out_res = 254`` (2^8 − 2 steps:
                      255 levels, nft_cuda's 8 bits) with ``out_bound`` 12 and a fixed input range; then
                      ``out_noise`` 0.01 per channel; ``pre_post.input_range`` learned (init 3, 100
                      batches, 3·std, decay 0.001, 95 %); ``clip.type`` LAYER_GAUSSIAN_PER_CHANNEL 2.5
                      through its AnalogOptimizer. One documented difference in the mapping: until
                      clipping is per channel, lightning's ADC and bound use the tile's max|W| while
                      nft_cuda's per-channel tiles use each column's (same cost, other step sizes).

Checked before timing: the last variant's device model and clip equal the preset's; for the weight-noise
variants (noise, tiles, per channel) the noise each library injects, read back through a basis input,
has std σ·m(e) (m(e) the max|W| of the element's tile, row-wise per channel) within 2 % in both, weights
unchanged; for every variant both libraries' training forward moves the clean MLP's output by the same
relative amount (within 25 %), the first step's loss and gradients are finite, the learned input ranges
receive a gradient, and after a clipped step no weight lies beyond 2.5 std of its row.

Timing: one step of each variant per round, interleaved, medians ("slow" policy of results.Case.time).
Where the time goes: ``python -m benchmarks.profile_ops --only hwa``.

    python -m benchmarks.bench_hwa [--device cpu|cuda] [--quick] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import contextlib
import copy
import io

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nft_cuda  # noqa: E402
from benchmarks import checks, config, peer, results, runner  # benchmarks sets NFT_CUDA_STRICT=1 first
from benchmarks.bench_train import train_step  # noqa: E402
from nft_cuda.devices import make_device_model  # noqa: E402
from nft_cuda.devices.tiles import Tiles, tile_max  # noqa: E402
from nft_cuda.nn import calibrate_mvm  # noqa: E402
from nft_cuda.train import clip_weights  # noqa: E402
from nft_cuda.train.presets import preset  # noqa: E402

PRESET = preset("lightning-hwa")
#: The knobs in the order they are switched on; variant k has the first k of them.
KNOBS = ("+ tiles 512", "+ per channel", "+ DAC/ADC 8 b", "+ output noise", "+ learned ranges", "+ clip")
VARIANTS = ("noise", *KNOBS[:-1], "+ clip = lightning-hwa")
WEIGHT_NOISE_ONLY = 3  # variants 0..2 inject weight noise only: their noise is checked element by element


def mlp(quick: bool) -> tuple[nn.Module, int]:
    """(the MLP, its batch size)."""
    widths = (1024, 256, 10) if quick else (1024, 1024, 1024, 10)
    layers: list[nn.Module] = []
    for k in range(len(widths) - 1):
        layers += [nn.Linear(widths[k], widths[k + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1]), 32 if quick else 128


def nft_setup(k: int):
    """(device model, weight clip or None) of variant ``k``: the preset's values for its first k knobs."""
    tiles, mvm = PRESET.device_options["tiles"], PRESET.device_options["mvm"]
    options: dict = {}
    if k >= 1:
        options["tiles"] = {"max_input_size": tiles["max_input_size"], "per_channel": k >= 2 and tiles["per_channel"]}
    m: dict = {}
    if k >= 3:
        m.update({key: mvm[key] for key in ("input_bits", "output_bits", "output_bound", "adc_range")})
    if k >= 4:
        m["output_noise"] = mvm["output_noise"]
    if k >= 5:
        m["learned_input_range"] = mvm["learned_input_range"]
    if m:
        options["mvm"] = m
    return make_device_model(PRESET.device_model, PRESET.sigma, **options), PRESET.weight_clip if k >= 6 else None


def peer_config(k: int):
    """The peer's ``TorchInferenceRPUConfig`` of variant ``k`` (the module docstring's mapping)."""
    from aihwkit_lightning.simulator.configs import WeightClipType, WeightNoiseInjectionType

    variation, clip = nft_setup(k)
    cfg = peer.rpu_config(variation)  # ADD_NORMAL std_dev σ·scale, everything else off, one tile
    mvm = variation.mvm
    if variation.tiles is not None:
        cfg.mapping.max_input_size = variation.tiles.max_input_size
        if variation.tiles.per_channel:
            cfg.modifier.noise_type = WeightNoiseInjectionType.ADD_NORMAL_PER_CHANNEL
    if mvm is not None:
        cfg.forward.inp_res = 2**mvm.input_bits - 2
        cfg.forward.out_res = 2**mvm.output_bits - 2
        cfg.forward.out_bound = mvm.output_bound
        ir = cfg.pre_post.input_range
        ir.enable, ir.learn_input_range, ir.init_from_data = True, False, 0  # fixed: set from nft_cuda's
        if mvm.output_noise > 0:
            cfg.forward.out_noise, cfg.forward.out_noise_per_channel = mvm.output_noise, True
        learned = mvm.learned_input_range
        if learned is not None:
            ir.learn_input_range, ir.init_value, ir.init_from_data = True, learned.init_value, learned.init_batches
            ir.init_std_alpha, ir.decay, ir.input_min_percentage = (
                learned.init_std_alpha,
                learned.decay,
                learned.min_unclipped,
            )
    if clip is not None:
        cfg.clip.type, cfg.clip.sigma = WeightClipType.LAYER_GAUSSIAN_PER_CHANNEL, clip.sigma
    return cfg


def check_last_is_preset() -> None:
    """The last variant is the ``lightning-hwa`` preset itself (its device model and clip, field by field)."""
    variation, clip = nft_setup(len(VARIANTS) - 1)
    if variation != PRESET.device() or clip != PRESET.weight_clip:
        raise checks.CheckError(f"the last variant ({variation}, {clip}) is not the lightning-hwa preset")


def build(k: int, base: nn.Module, x: torch.Tensor, with_peer: bool):
    """(nft_cuda's model, the peer's model or None) of variant ``k`` from ``base``'s weights; fixed input
    ranges (variants with converters, before learned ranges) calibrated on ``x`` and copied to the peer."""
    variation, _ = nft_setup(k)
    model = nft_cuda.convert(copy.deepcopy(base), variation).train()
    ranges = {}
    mvm = variation.mvm
    if mvm is not None and mvm.learned_input_range is None:
        ranges = calibrate_mvm(model, [x])
    if not with_peer:
        return model, None
    from aihwkit_lightning.nn.conversion import convert_to_analog

    with contextlib.redirect_stdout(io.StringIO()):
        other = convert_to_analog(copy.deepcopy(base), peer_config(k)).train()
    modules = dict(other.named_modules())
    with torch.no_grad():
        for name, (r_in, _) in ranges.items():
            modules[name].input_range.copy_(torch.as_tensor(r_in, dtype=torch.float32))
    return model, other


def _tile_noise_std(layer, variation) -> float:
    """std of (weight used − W) / m(e) over one draw: m(e) the max|W| of element e's tile."""
    w = layer.weight.detach().clone()
    noise = checks.effective_weight(layer) - w
    if not torch.equal(layer.weight.detach(), w):
        raise checks.CheckError(f"{type(layer).__name__} changed its weight parameter in a forward")
    return (noise / tile_max(w, variation.tiles or Tiles())).std().item()


def _deviation(model, clean, x) -> float:
    """|model(x) − clean(x)| / |clean(x)| of one training forward. With grad on: nft_cuda initialises a
    learned input range from data only in forwards that train (lightning in any training-mode forward), so
    both libraries see this batch as their first of ``init_batches``."""
    with torch.no_grad():
        y0 = clean(x)
    return ((model(x).detach() - y0).norm() / y0.norm()).item()


def check_variant(name: str, k: int, models: dict, clean: nn.Module, x) -> str:
    """The same-job checks of variant ``k`` before timing (module docstring); returns the peer row's note."""
    variation, _ = nft_setup(k)
    want = variation.sigma * variation.scale
    note = []
    if k < WEIGHT_NOISE_ONLY and len(models) > 1:
        first = {lib: next(m for m in model.modules() if hasattr(m, "weight")) for lib, model in models.items()}
        got = {lib: _tile_noise_std(layer, variation) for lib, layer in first.items()}
        for lib, value in got.items():
            if not abs(value / want - 1) <= 0.02:
                raise checks.CheckError(f"{name}: {lib} weight noise std {value:.5f}·m(e), expected {want:.5f} ± 2%")
        note.append(f"noise std / tile max|W| {got[peer.NAME]:.4f} vs nft_cuda {got['nft_cuda']:.4f} ({want:.4f})")
    dev = {lib: _deviation(model, clean, x) for lib, model in models.items()}
    lo, hi = min(dev.values()), max(dev.values())
    if not (lo > 0 and hi <= 1.25 * lo):
        raise checks.CheckError(f"{name}: relative output deviations differ: {dev}")
    if len(dev) > 1:
        note.append(f"output moved {dev[peer.NAME]:.4f} vs nft_cuda {dev['nft_cuda']:.4f} (relative)")
    return "; ".join(note)


def check_after_step(name: str, k: int, model: nn.Module) -> None:
    """After one step: learned input ranges got a gradient; clipped weights lie within 2.5 std of their row."""
    variation, clip = nft_setup(k)
    if variation.mvm is not None and variation.mvm.learned_input_range is not None:
        ranges = [(n, p) for n, p in model.named_parameters() if n.endswith("input_range")]
        if not ranges or any(p.grad is None or not bool(p.grad.abs().sum() > 0) for _, p in ranges):
            raise checks.CheckError(f"{name}: a learned input range got no gradient ({[n for n, _ in ranges]})")
    if clip is not None:
        for m in model.modules():
            if isinstance(m, nn.Linear) or hasattr(m, "in_sizes"):
                w = m.weight.detach()
                if bool((w.abs() > clip.sigma * w.std(1, keepdim=True) * (1 + 1e-6)).any()):
                    raise checks.CheckError(f"{name}: a weight beyond {clip.sigma} std of its row after the step")


def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


def _steps(name: str, base: nn.Module, x, y, with_peer: bool) -> tuple[dict, dict]:
    """The step functions of every variant, checked (before and after the first, warm-up, step), and the
    peer rows' notes."""
    check_last_is_preset()
    clean = copy.deepcopy(base).train()
    steps = {"clean": train_step(clean, _loss, x, y, f"{name} clean")}
    notes = {}
    for k, label in enumerate(VARIANTS):
        model, other = build(k, base, x, with_peer)
        models = {"nft_cuda": model} | ({peer.NAME: other} if other is not None else {})
        notes[f"{peer.NAME} {label}"] = check_variant(f"{name} {label}", k, models, clean, x)
        _, clip = nft_setup(k)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if clip is not None:
            opt.register_step_post_hook(lambda *_, model=model, clip=clip: clip_weights(model, clip))
        keyed = {label: (model, opt)}
        if other is not None:
            keyed[f"{peer.NAME} {label}"] = (other, peer.optimizer(other, lr=0.01, momentum=0.9))
        for key, (m, o) in keyed.items():
            steps[key] = train_step(m, _loss, x, y, f"{name} {key}", opt=o)
            steps[key]()  # the checked warm-up step
            check_after_step(f"{name} {key}", k, m)
    steps["clean"]()
    return steps, notes


def hwa_case(cfg: config.Config, ceilings: dict | None = None) -> list[results.Row]:
    """The clean step, then each knob added (and the peer's same variant), timed side by side."""
    dev = cfg.dev
    torch.manual_seed(0)
    base, batch = mlp(cfg.quick)
    base = base.to(dev)
    x = torch.randn(batch, base[0].in_features, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    widths = "-".join(str(m.in_features) for m in base if isinstance(m, nn.Linear)) + "-10"
    name = f"MLP {widths} HWA train step batch {batch}"
    reason = peer.missing()
    steps, notes = _steps(name, base, x, y, with_peer=not reason)
    rows = results.Case(cfg, ceilings)
    r = rows.time(name, steps, work=float(batch), unit="img/s", slow=True, notes=notes, warmup=0)
    exact = not cfg.quick
    previous = "noise"
    for label in VARIANTS:
        rows.compare(r[label], r["clean"], "time", exact=exact)
        if label != "noise":
            rows.compare(r[label], r[previous], "time", exact=exact)
        previous = label
        key = f"{peer.NAME} {label}"
        if key in r:
            rows.compare(r[label], r[key], "speedup", exact=exact)
            rows.compare(r[key], r["clean"], "time", exact=exact)
        else:
            rows.add(peer.skipped_row(name, reason, key))
    return rows.rows


CASES = {"hwa": hwa_case}


def main(argv=None) -> None:
    runner.cli_main(__doc__, CASES, argv)


if __name__ == "__main__":
    main()
