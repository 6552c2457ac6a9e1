"""The competing training baselines of issue 29 (nft_cuda.train.methods): soft-orthogonality regularised
noise injection ("ortho"), right-censored noise injection ("trice") and knowledge distillation under
noise ("kd"), each against a hand formula; kd also through TrainConfig and `nft train`."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_cuda
from nft_cuda import reference
from nft_cuda.train.methods import (
    METHODS,
    CensoredNoise,
    KnowledgeDistillation,
    NoiseInjection,
    OrthogonalNoise,
    build_method,
)

V = nft_cuda.Variation(0.2)


def _model():
    torch.manual_seed(0)
    return nft_cuda.convert(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), V)


def test_ortho_loss_is_noise_injection_plus_the_penalty(one_thread):
    model = _model()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    method = OrthogonalNoise(V, lam=0.01, beta=0.5)
    torch.manual_seed(7)
    ce, _ = NoiseInjection(V).loss(model, x, y)
    torch.manual_seed(7)
    loss, _ = method.loss(model, x, y)
    conv = model[0].weight.reshape(4, -1)  # 4 ≤ 9: the Gram matrix of the rows
    lin = model[3].weight.reshape(3, -1)
    want = ((conv @ conv.t() - 0.5 * torch.eye(4)) ** 2).sum() + ((lin @ lin.t() - 0.5 * torch.eye(3)) ** 2).sum()
    assert loss.item() == pytest.approx(ce.item() + 0.01 * want.item(), rel=1e-6)
    loss.backward()
    assert model[3].weight.grad is not None


def test_ortho_penalty_uses_the_smaller_gram():
    w = torch.randn(6, 2)  # out > fan_in: Wᵀ·W
    layer = nft_cuda.NoisyLinear(2, 6, variation=V)
    with torch.no_grad():
        layer.weight.copy_(w)
    got = OrthogonalNoise(V).penalty(nn.Sequential(layer))
    assert got.item() == pytest.approx(((w.t() @ w - torch.eye(2)) ** 2).sum().item(), rel=1e-6)


def test_trice_weights_are_the_censored_draws(one_thread):
    model = _model()
    layer = model[3]
    rng = torch.tensor([11, 22], dtype=torch.int64)
    method = CensoredNoise(V, cut=0.5)
    got = method.censored_weight(layer, rng)[0]
    z = reference.draw_normal(rng, layer.weight.numel(), 1, 0)[0].view(layer.weight.shape)
    sw = V.sigma_w(layer.weight)
    want = layer.weight.detach() + (sw * z.clamp(-0.5, 0.5))
    assert torch.allclose(got, want, atol=1e-7)
    assert ((got - layer.weight).abs() <= 0.5 * sw + 1e-7).all()  # no deviation beyond the cut
    # A cut above every draw gives the reference noise of that stream exactly.
    free = CensoredNoise(V, cut=1e9).censored_weight(layer, rng)[0]
    assert torch.equal(free, reference.perturb(layer.weight, rng, torch.tensor([0.2]), V.scale, V.state_factor)[0])


def test_trice_loss_trains_straight_through(one_thread):
    model = _model()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    method = CensoredNoise(V, cut=1.0)
    torch.manual_seed(3)
    loss, logits = method.loss(model, x, y)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item())
    loss.backward()
    assert model[0].weight.grad is not None and model[3].weight.grad.abs().sum() > 0
    assert all(layer.sample_plan is None for _, layer in nft_cuda.noisy_layers(model))  # plans removed


def test_registered_and_refusals():
    assert {"ortho", "trice"} <= set(METHODS)
    assert isinstance(build_method("ortho", V), OrthogonalNoise)
    assert isinstance(build_method("trice", V), CensoredNoise)
    with pytest.raises(ValueError, match="cut"):
        CensoredNoise(V, cut=0.0)
    with pytest.raises(ValueError, match="lam"):
        OrthogonalNoise(V, lam=-1.0)
    stuck = nft_cuda.devices.make_device_model("stuck-at", 1.0)
    model = nft_cuda.convert(nn.Sequential(nn.Linear(3, 2)), stuck)
    with pytest.raises(ValueError, match="normal draws"):
        CensoredNoise(stuck).loss(model, torch.randn(2, 3), torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------------
# kd: knowledge distillation under noise
# --------------------------------------------------------------------------------------------------


def _teacher():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _hand_kl(p_log_t: list[list[float]], p_log_s: list[list[float]]) -> float:
    """Σ_b Σ_c p_t·(log p_t − log p_s) / B, in plain Python floats."""
    import math

    total = 0.0
    for lt, ls in zip(p_log_t, p_log_s):
        total += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    return total / len(p_log_t)


def _log_softmax_rows(z: torch.Tensor, t: float) -> list[list[float]]:
    import math

    rows = []
    for row in z.double().tolist():
        scaled = [v / t for v in row]
        m = max(scaled)
        lse = m + math.log(sum(math.exp(v - m) for v in scaled))
        rows.append([v - lse for v in scaled])
    return rows


def test_kd_loss_matches_a_hand_computation(one_thread):
    model, teacher = _model(), _teacher()
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    method = KnowledgeDistillation(V, teacher, alpha=0.3, temperature=2.5)
    torch.manual_seed(7)
    loss, logits = method.loss(model, x, y)
    torch.manual_seed(7)  # the same training draw: the student's logits are noise injection's
    ce, noisy = NoiseInjection(V).loss(model, x, y)
    assert torch.equal(logits, noisy)
    with torch.no_grad():
        t_logits = teacher(x)
    kl = _hand_kl(_log_softmax_rows(t_logits, 2.5), _log_softmax_rows(logits.detach(), 2.5))
    want = 0.7 * ce.item() + 0.3 * 2.5**2 * kl
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert model[3].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())  # frozen, no grad
    assert not teacher.training


def test_kd_alpha_ends_are_ce_and_pure_distillation(one_thread):
    model, teacher = _model(), _teacher()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    torch.manual_seed(5)
    ce, logits = NoiseInjection(V).loss(model, x, y)
    torch.manual_seed(5)
    assert KnowledgeDistillation(V, teacher, alpha=0.0).loss(model, x, y)[0].item() == pytest.approx(ce.item())
    torch.manual_seed(5)
    pure = KnowledgeDistillation(V, teacher, alpha=1.0, temperature=3.0)
    got = pure.loss(model, x, y)[0].item()
    kl = _hand_kl(_log_softmax_rows(teacher(x).detach(), 3.0), _log_softmax_rows(logits.detach(), 3.0))
    assert got == pytest.approx(9.0 * kl, rel=1e-5)
    # A student equal to its teacher has no soft loss.
    assert pure.soft_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_refusals():
    assert "kd" in METHODS
    with pytest.raises(ValueError, match="needs a teacher"):
        KnowledgeDistillation(V)
    with pytest.raises(ValueError, match="needs a teacher"):
        build_method("kd", V)
    with pytest.raises(ValueError, match="kd_alpha"):
        KnowledgeDistillation(V, _teacher(), alpha=1.5)
    with pytest.raises(ValueError, match="kd_temperature"):
        KnowledgeDistillation(V, _teacher(), temperature=0.0)
    with pytest.raises(TypeError, match="teacher"):
        KnowledgeDistillation(V, 3)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))  # 5 classes against the student's 3
    with pytest.raises(ValueError, match="same task"):
        KnowledgeDistillation(V, wrong).loss(_model(), torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))


def test_kd_train_config_checks(tmp_path):
    from nft_cuda.train.methods import KD_DEFAULTS
    from nft_cuda.train.trainer import TrainConfig

    assert (TrainConfig().kd_alpha, TrainConfig().kd_temperature) == (KD_DEFAULTS["alpha"], KD_DEFAULTS["temperature"])
    with pytest.raises(ValueError, match="needs a teacher"):
        TrainConfig(method="kd")
    with pytest.raises(FileNotFoundError, match="no such file"):
        TrainConfig(method="kd", teacher=str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="teacher applies to method 'kd'"):
        TrainConfig(method="noise", teacher=str(tmp_path))
    with pytest.raises(ValueError, match="kd_alpha, kd_temperature apply to method 'kd'"):
        TrainConfig(method="noise", kd_alpha=0.2, kd_temperature=2.0)
    with pytest.raises(ValueError, match="kd_alpha"):
        TrainConfig(method="kd", teacher=str(tmp_path), kd_alpha=-0.1)
    with pytest.raises(ValueError, match="kd_temperature"):
        TrainConfig(method="kd", teacher=str(tmp_path), kd_temperature=-1.0)


def test_kd_through_nft_train_end_to_end(tmp_path, capsys, one_thread):
    import json

    from conftest import one_error_line

    from nft_cuda import cli
    from nft_cuda.io import load_model

    tiny = ["--limit-train", "64", "--limit-eval", "32", "--batch-size", "32", "--device", "cpu", "--no-progress"]
    clean, student = tmp_path / "clean", tmp_path / "kd"
    assert cli.main(["train", "--method", "clean", "--epochs", "1", "--out", str(clean), *tiny]) == 0
    argv = ["train", "--method", "kd", "--teacher", str(clean), "--kd-alpha", "0.7", "--kd-temperature", "2"]
    assert cli.main([*argv, "--epochs", "1", "--out", str(student), *tiny]) == 0
    summary = json.loads((student / "summary.json").read_text())
    assert summary["config"]["teacher"] == str(clean) and summary["config"]["kd_alpha"] == 0.7
    _, payload = load_model(str(student))
    described = payload["meta"]["method"]
    assert (described["method"], described["kd_alpha"], described["kd_temperature"]) == ("kd", 0.7, 2.0)
    # The teacher as kd holds it: the exported clean model, noise off (the same logits every call).
    method = KnowledgeDistillation(V, str(clean))
    x = torch.randn(3, 1, 32, 32)  # the embedded data: zero-padded to 32×32
    exported, _ = load_model(str(clean))
    with nft_cuda.noise_mode(exported, "off"), torch.no_grad():
        want = exported.eval()(x)
    assert torch.equal(method.teacher_logits(x), want) and torch.equal(method.teacher_logits(x), want)
    # An interrupted kd run resumes from its checkpoint alone (the teacher path comes from its config).
    from nft_cuda.train.trainer import TrainConfig, train

    again = tmp_path / "kd2"
    config = TrainConfig(method="kd", teacher=str(clean), epochs=2, out=str(again), device="cpu",
                         limit_train=64, limit_eval=32, batch_size=32)  # fmt: skip
    assert train(config, progress=False, log=None, stop_after=1)["stopped"]
    capsys.readouterr()
    assert cli.main(["train", "--out", str(again), "--resume", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert json.loads((again / "summary.json").read_text())["epochs"] == 2
    capsys.readouterr()
    # Without a teacher: one clear line, nothing created.
    assert cli.main(["train", "--method", "kd", "--out", str(tmp_path / "none"), *tiny]) == 1
    assert "needs a teacher" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        cli.main(["train", "--method", "kd", "--teacher", str(clean), "--kd-temperature", "0"])
    assert "--kd-temperature" in capsys.readouterr().err
