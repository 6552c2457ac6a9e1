"""The fidelity options of issue 24 (docs/fidelity-study.md): the authors' initialisation, their MNIST
preprocessing, ResNet-18's OVF scope switch, the ablation arms (noise injection with a logit temperature,
OVF with BatchNorm statistics from the main forward only, OVF/IRS with β = 0), each loss checked against
a hand-written formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from nft_cuda import Variation, cli, convert, noisy_layers
from nft_cuda.data import check_preprocess, load_dataset, normalization
from nft_cuda.data.datasets import to_tensor_paper
from nft_cuda.models import OVF_PAPER_SCOPE, VGG8, ResNet18, build_model
from nft_cuda.nn.sample_axis import sample_plan
from nft_cuda.train import OVF, build_method
from nft_cuda.train.trainer import TrainConfig, train


def _peak_to_rms(weight: torch.Tensor) -> float:
    w = weight.detach()
    return float(w.abs().max() / w.pow(2).mean().sqrt())


# --------------------------------------------------------------------------------------------------
# init="paper"
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [VGG8, ResNet18])
def test_paper_init_has_gaussian_peaks_in_every_conv(one_thread, model_class):
    torch.manual_seed(0)
    model = model_class(in_channels=1, init="paper")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    ratios = [_peak_to_rms(m.weight) for m in convs]
    assert len(convs) >= 6 and min(ratios) >= 2.5, ratios
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
            # Kaiming-normal fan_out (ReLU gain): std = sqrt(2 / out_features).
            assert m.weight.detach().std().item() == pytest.approx(math.sqrt(2 / m.out_features), rel=0.1)


@pytest.mark.parametrize("model_class", [VGG8, ResNet18])
def test_default_init_stays_pytorch_uniform(one_thread, model_class):
    torch.manual_seed(0)
    model = model_class(in_channels=1)
    ratios = [_peak_to_rms(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # A uniform tensor: max|W| / rms(W) = sqrt(3) ≈ 1.73 (slightly less in the smallest layers).
    assert all(1.6 < r < 1.75 for r in ratios), ratios


def test_init_is_checked_and_reaches_build_model():
    torch.manual_seed(0)
    model = build_model("vgg8", in_channels=1, num_classes=10, width=0.25, init="paper")
    assert min(_peak_to_rms(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)) > 2.0
    with pytest.raises(ValueError, match="init"):
        build_model("small", in_channels=1, num_classes=10, init="paper")
    with pytest.raises(ValueError, match="init"):
        VGG8(init="kaiming")
    with pytest.raises(ValueError, match="init 'paper' applies"):
        TrainConfig(model="small", init="paper")


# --------------------------------------------------------------------------------------------------
# preprocess="paper"
# --------------------------------------------------------------------------------------------------


def _bilinear_by_hand(image: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centred bilinear resize of one 2-D image, written out pixel by pixel."""
    h, w = image.shape
    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            sy = min(max((i + 0.5) * h / size - 0.5, 0.0), h - 1)
            sx = min(max((j + 0.5) * w / size - 0.5, 0.0), w - 1)
            y0, x0 = int(math.floor(sy)), int(math.floor(sx))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def test_paper_preprocessing_matches_the_hand_formula():
    rng = np.random.default_rng(0)
    images = np.zeros((2, 1, 28, 28), dtype=np.uint8)
    images[:, :, 6:22, 8:20] = rng.integers(0, 256, size=(2, 1, 16, 12), dtype=np.uint8)
    x = to_tensor_paper(images)
    assert x.shape == (2, 1, 32, 32) and x.dtype == torch.float32
    for n in range(2):
        expected = np.round(_bilinear_by_hand(images[n, 0].astype(np.float64), 32)) / 255 * 2 - 1
        np.testing.assert_allclose(x[n, 0].numpy(), expected, atol=1e-6)
    assert x[0, 0, 0, 0].item() == -1.0  # background: -1 (the standard preprocessing: -mean/std)
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0


def test_paper_preprocessing_of_a_dataset_and_where_it_applies():
    paper = load_dataset("embedded", split="test", preprocess="paper").images
    standard = load_dataset("embedded", split="test").images
    assert paper.shape == standard.shape == (1000, 1, 32, 32)
    assert paper[:, :, 0, 0].eq(-1.0).all()
    assert normalization("mnist", "paper") == ((0.5,), (0.5,))
    assert normalization("mnist") == ((0.1307,), (0.3081,))
    with pytest.raises(ValueError, match="MNIST family"):
        check_preprocess("cifar10", "paper")
    with pytest.raises(ValueError, match="preprocess"):
        TrainConfig(dataset="cifar10", preprocess="paper")
    with pytest.raises(ValueError, match="normalize"):
        load_dataset("embedded", split="test", preprocess="paper", normalize=False)


def test_init_and_preprocessing_are_recorded_and_used_by_eval(tmp_path, one_thread):
    from nft_cuda.eval.run import _load_with_test_set, load_test_set

    config = TrainConfig(
        model="vgg8",
        width=0.0625,
        init="paper",
        preprocess="paper",
        epochs=1,
        limit_train=64,
        limit_eval=32,
        batch_size=32,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    train(config, progress=False, log=None)
    payload = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert payload["model"]["init"] == "paper"
    assert payload["meta"]["preprocess"] == "paper"
    assert payload["meta"]["normalization"] == {"mean": [0.5], "std": [0.5]}
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["init"] == "paper" and ckpt["config"]["preprocess"] == "paper"
    test_sets: dict = {}
    _, _, dataset, (x, _) = _load_with_test_set(str(tmp_path / "run" / "model.pt"), "cpu", None, test_sets)
    assert torch.equal(x, load_test_set(dataset, None, "paper")[0])


def test_cli_fidelity_options():
    parser = cli.build_parser()
    argv = ["train", "--model", "vgg8", "--dataset", "mnist", "--init", "paper", "--preprocess", "paper"]
    config = cli.train_config_from_args(parser.parse_args(argv + ["--method", "noise", "--temperature", "4"]))
    assert (config.init, config.preprocess, config.temperature) == ("paper", "paper", 4.0)
    config = cli.train_config_from_args(
        parser.parse_args(argv + ["--method", "ovf", "--ovf-bn-stats", "main", "--ovf-scope", "paper", "--beta", "0"])
    )
    assert (config.ovf_bn_stats, config.ovf_scope, config.beta) == ("main", "paper", 0.0)
    default = cli.train_config_from_args(parser.parse_args(["train"]))
    assert (default.init, default.preprocess, default.temperature, default.ovf_scope, default.ovf_bn_stats) == (
        "torch",
        "standard",
        1.0,
        "all",
        "all",
    )


def test_ablation_options_apply_only_where_they_mean_something():
    with pytest.raises(ValueError, match="temperature"):
        TrainConfig(method="ovf", temperature=4.0)
    with pytest.raises(ValueError, match="temperature"):
        TrainConfig(method="noise", temperature=0.0)
    with pytest.raises(ValueError, match="ovf_bn_stats"):
        TrainConfig(method="noise", ovf_bn_stats="main")
    with pytest.raises(ValueError, match="ovf_scope"):
        TrainConfig(method="irs", ovf_scope="paper")
    with pytest.raises(ValueError, match="ovf_scope 'paper'"):
        TrainConfig(method="ovf", model="small", ovf_scope="paper")
    assert TrainConfig(method="ovf", beta=0.0).beta == 0.0
    assert TrainConfig(method="irs", beta=0.0).beta == 0.0


# --------------------------------------------------------------------------------------------------
# Losses of the ablation arms, by hand
# --------------------------------------------------------------------------------------------------


def _ce_by_hand(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        z = [v / temperature for v in row]
        m = max(z)
        total += -(z[label] - m - math.log(sum(math.exp(v - m) for v in z)))
    return total / len(labels)


def _small_cnn():
    torch.manual_seed(0)
    return build_model("small", in_channels=1, num_classes=10, width=0.5)


def test_noise_injection_with_temperature_is_ce_of_scaled_logits(one_thread):
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 10
    method = build_method("noise", Variation(0.2), temperature=4.0)
    model = method.prepare(_small_cnn())
    loss, logits = method.loss(model, x, y)
    assert loss.item() == pytest.approx(_ce_by_hand(logits, y, 4.0), rel=1e-5)
    assert method.describe()["temperature"] == 4.0
    plain = build_method("noise", Variation(0.2))
    loss1, logits1 = plain.loss(model, x, y)
    assert loss1.item() == pytest.approx(_ce_by_hand(logits1, y, 1.0), rel=1e-5)
    assert "temperature" not in plain.describe()


@pytest.mark.parametrize("name", ["ovf", "irs"])
def test_beta_zero_leaves_only_the_temperature(one_thread, name):
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 10
    method = build_method(name, Variation(0.2), model_name="small", beta=0.0)
    model = method.prepare(_small_cnn(), x[:2], num_classes=10)
    loss, logits = method.loss(model, x, y)
    n_aux = len(method.deltas) if name == "ovf" else len(method.taps)
    # β = 0: CE((o_0 − 0·Σ) / (N+1)) = CE(o_0 / (N+1)).
    assert loss.item() == pytest.approx(_ce_by_hand(logits, y, n_aux + 1), rel=1e-5)


def test_running_stats_policies_of_a_sample_plan_by_hand():
    torch.manual_seed(0)
    samples, rows = 3, 5
    x = torch.randn(samples * rows, 2) * torch.tensor([1.0, 3.0]) + torch.tensor([0.5, -2.0])
    chunks = x.chunk(samples)
    for policy in ("all", "first", "none"):
        bn = nn.BatchNorm1d(2, momentum=0.1)
        model = nn.Sequential(bn).train()
        with sample_plan(model, {}, samples, running_stats=policy):
            out = model(x)
        for t, chunk in enumerate(chunks):  # each chunk: its own batch statistics
            mu, var = chunk.mean(0), chunk.var(0, unbiased=False)
            torch.testing.assert_close(out.chunk(samples)[t], (chunk - mu) / torch.sqrt(var + bn.eps))
        mean, var, updates = torch.zeros(2), torch.ones(2), 0
        for t, chunk in enumerate(chunks):
            if policy == "all" or (policy == "first" and t == 0):
                mean = 0.9 * mean + 0.1 * chunk.mean(0)
                var = 0.9 * var + 0.1 * chunk.var(0, unbiased=True)
                updates += 1
        torch.testing.assert_close(bn.running_mean, mean)
        torch.testing.assert_close(bn.running_var, var)
        assert int(bn.num_batches_tracked) == updates
    with pytest.raises(ValueError, match="running_stats"):
        with sample_plan(nn.Sequential(nn.BatchNorm1d(2)), {}, 2, running_stats="some"):
            pass


def test_ovf_bn_main_only_updates_running_stats_once_per_step(one_thread):
    x, y = torch.randn(8, 1, 32, 32), torch.arange(8) % 10
    results = {}
    for bn_stats in ("all", "main"):
        for batched in (True, False):
            method = OVF(Variation(0.2), 1e-3, batched=batched, bn_stats=bn_stats)
            model = method.prepare(_small_cnn())
            torch.manual_seed(1)
            method.loss(model, x, y)
            bn = model.block1[1]
            results[bn_stats, batched] = (int(bn.num_batches_tracked), bn.running_mean.clone())
    assert results["all", True][0] == 4 and results["main", True][0] == 1
    for bn_stats in ("all", "main"):  # batched and sequential agree
        assert results[bn_stats, True][0] == results[bn_stats, False][0]
        torch.testing.assert_close(results[bn_stats, True][1], results[bn_stats, False][1])
    assert not torch.equal(results["all", True][1], results["main", True][1])


# --------------------------------------------------------------------------------------------------
# ResNet-18 OVF scope
# --------------------------------------------------------------------------------------------------


def _oriented_sigmas(method: OVF, model: nn.Module, x: torch.Tensor) -> dict[str, list[float]]:
    """The σ of each forward, per noisy layer, that one OVF step asks for."""
    seen = {}
    for name, layer in noisy_layers(model):
        original = layer.set_sample_plan

        def spy(rng, sigmas=None, *args, _name=name, _original=original, **kwargs):
            if sigmas is not None:
                seen.setdefault(_name, []).extend(round(s, 6) for s in sigmas.tolist())
            return _original(rng, sigmas, *args, **kwargs)

        layer.set_sample_plan = spy
    y = torch.zeros(x.shape[0], dtype=torch.long)
    method.loss(model, x, y)  # the first step also runs the one-off batch-safety probe (its plans too)
    seen.clear()
    method.loss(model, x, y)
    return seen


@pytest.mark.filterwarnings("ignore:OVF. running the 4 forwards sequentially")
@pytest.mark.parametrize("scope", ["all", "paper"])
def test_resnet18_ovf_scope(one_thread, scope):
    torch.manual_seed(0)
    model = convert(ResNet18(in_channels=1, width=0.0625), Variation(0.2))
    layer_scope = OVF_PAPER_SCOPE["resnet18"] if scope == "paper" else None
    method = OVF(Variation(0.2), 1e-4, scope=layer_scope)
    sigmas = _oriented_sigmas(method, model, torch.randn(4, 1, 32, 32))
    assert len(sigmas) == 21  # every noisy layer gets a plan
    raised = [0.2, 0.35, 0.3, 0.25]
    oriented = sorted(name for name, s in sigmas.items() if s == raised)
    flat = sorted(name for name, s in sigmas.items() if s == [0.2] * 4)
    if scope == "paper":
        assert oriented == ["fc", "stem.0"] and len(flat) == 19
    else:
        assert len(oriented) == 21 and not flat
    with pytest.raises(ValueError, match="not noisy layers"):
        OVF(Variation(0.2), scope=("nope",)).loss(model, torch.randn(2, 1, 32, 32), torch.zeros(2, dtype=torch.long))


def test_ovf_scope_reaches_the_trainer():
    config = TrainConfig(model="resnet18", method="ovf", ovf_scope="paper")
    assert config.ovf_layer_scope() == ("stem.0", "fc")
    assert TrainConfig(model="vgg8", method="ovf", ovf_scope="paper").ovf_layer_scope() is None
    assert TrainConfig(model="resnet18", method="ovf").ovf_layer_scope() is None
