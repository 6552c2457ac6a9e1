"""Training: the NeFT loss, batched vs sequential OVF, IRS taps and export, the trainer (end to end,
exact resume, checkpoint corruption, unsafe checkpoints)."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nft_cuda import Variation, convert, noise_mode
from nft_cuda.io import load_model, safe_load
from nft_cuda.models import IRS_TAPS, BasicBlock, build_model
from nft_cuda.train import OVF, IRSModel, build_method, nft_loss
from nft_cuda.train.trainer import (
    METRICS_COLUMNS,
    CheckpointError,
    CheckpointWarning,
    TrainConfig,
    export_backbone,
    read_checkpoint,
    train,
)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(limit_train=64, limit_eval=32, batch_size=32)


# --------------------------------------------------------------------------------------------------
# nft_loss
# --------------------------------------------------------------------------------------------------


def _softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def test_nft_loss_matches_hand_computation():
    main = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]], requires_grad=True)
    aux1 = torch.tensor([[1.0, 0.0, -2.0], [0.5, 0.5, 0.5]], requires_grad=True)
    aux2 = torch.tensor([[-1.0, 2.0, 1.0], [3.0, -3.0, 0.0]], requires_grad=True)
    labels = [0, 2]
    y = torch.tensor(labels)
    beta = 0.5
    loss = nft_loss(main, [aux1, aux2], y, beta)

    # By hand: z = (o0 - β·(1·o1 + 0.1·o2)) / 3, CE averaged over the batch.
    m, a1, a2 = main.tolist(), aux1.tolist(), aux2.tolist()
    z = [[(m[b][c] - beta * (a1[b][c] + 0.1 * a2[b][c])) / 3 for c in range(3)] for b in range(2)]
    p = [_softmax(row) for row in z]
    expected = -sum(math.log(p[b][labels[b]]) for b in range(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    loss.backward()
    # dL/do0 = (p - onehot)/(N+1)/B; dL/do_n = -β·10^-(n-1)·dL/do0
    g0 = torch.tensor([[(p[b][c] - (c == labels[b])) / 3 / 2 for c in range(3)] for b in range(2)])
    torch.testing.assert_close(main.grad, g0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(aux1.grad, -beta * g0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(aux2.grad, -beta * 0.1 * g0, rtol=1e-5, atol=1e-7)
    nz = g0 != 0
    assert torch.all(torch.sign(aux1.grad[nz]) == -torch.sign(main.grad[nz]))
    assert torch.all(torch.sign(aux2.grad[nz]) == -torch.sign(main.grad[nz]))


def test_nft_loss_scaling_and_empty_list():
    main = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    # Empty list: plain cross-entropy.
    assert torch.equal(nft_loss(main, [], y, 0.3), F.cross_entropy(main, y))
    # β = 0 with N auxiliary outputs: the main logits divided by N+1.
    aux = [torch.randn(4, 5) for _ in range(3)]
    torch.testing.assert_close(nft_loss(main, aux, y, 0.0), F.cross_entropy(main / 4, y))
    with pytest.raises(ValueError, match="shape"):
        nft_loss(main, [torch.randn(4, 6)], y, 0.1)


# --------------------------------------------------------------------------------------------------
# Batched vs sequential OVF
# --------------------------------------------------------------------------------------------------


class _ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = BasicBlock(4, 8, stride=2)  # with a projection shortcut
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


def _small():
    return build_model("small", in_channels=1, num_classes=10)


def _bn_buffers(model):
    return {n: b for n, b in model.named_buffers() if "running" in n or "num_batches" in n}


@pytest.mark.parametrize("factory", [_small, _ResidualNet], ids=["small", "residual"])
def test_batched_ovf_matches_sequential(factory):
    torch.manual_seed(0)
    base = convert(factory(), Variation(0.1, "FeFET2"))
    base.train()
    models = {True: copy.deepcopy(base), False: copy.deepcopy(base)}
    x = torch.randn(6, 1, 32, 32)
    y = torch.randint(0, 10, (6,))
    results = {}
    for batched, model in models.items():
        method = OVF(Variation(0.1, "FeFET2"), beta=0.1, batched=batched)
        torch.manual_seed(123)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the batched path must not fall back here
            loss, logits = method.loss(model, x, y)
        loss.backward()
        results[batched] = (loss.detach(), logits.detach())
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[True][0], results[False][0], **tol)
    torch.testing.assert_close(results[True][1], results[False][1], **tol)
    pb, ps = dict(models[True].named_parameters()), dict(models[False].named_parameters())
    for name in pb:
        torch.testing.assert_close(pb[name].grad, ps[name].grad, **tol, msg=f"gradient of {name}")
    bb, bs = _bn_buffers(models[True]), _bn_buffers(models[False])
    assert bb, "the model has BatchNorm buffers"
    for name in bb:
        if name.endswith("num_batches_tracked"):
            assert bb[name].item() == bs[name].item() == 4  # advanced by N+1 = 4
        else:
            torch.testing.assert_close(bb[name], bs[name], **tol, msg=f"buffer {name}")


def test_ovf_with_dropout_falls_back_with_one_warning():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(p=0.5), nn.Linear(32, 10))
    model = convert(net, Variation(0.1))
    model.train()
    method = OVF(Variation(0.1), batched=True)
    x, y = torch.randn(8, 1, 4, 4), torch.randint(0, 10, (8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss, _ = method.loss(model, x, y)
            loss.backward()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in caught]
    assert "'3'" in str(runtime[0].message) and "sequentially" in str(runtime[0].message)

    # The fallback is the sequential OVF: same result as batched=False for the same draws.
    ref = copy.deepcopy(model)
    torch.manual_seed(5)
    a, _ = method.loss(model, x, y)
    torch.manual_seed(5)
    b, _ = OVF(Variation(0.1), batched=False).loss(ref, x, y)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# IRS
# --------------------------------------------------------------------------------------------------


def test_irs_hooks_capture_tapped_activations_and_export_drops_heads():
    torch.manual_seed(0)
    x = torch.randn(5, 1, 32, 32)
    method = build_method("irs", Variation(0.1), model_name="small", dataset="embedded")
    model = method.prepare(build_model("small", in_channels=1, num_classes=10), x, num_classes=10)
    assert isinstance(model, IRSModel)
    taps = IRS_TAPS["small"]
    assert model.order == list(taps)  # execution order, shallow -> deep

    mine, head_inputs = {}, {}
    handles = []
    modules = dict(model.backbone.named_modules())
    for name in taps:
        handles.append(
            modules[name].register_forward_hook(lambda m, i, o, name=name: mine.__setitem__(name, o.detach().clone()))
        )
        handles.append(
            model.heads[name].register_forward_pre_hook(lambda m, i, name=name: head_inputs.__setitem__(name, i[0]))
        )
    model.eval()
    with noise_mode(model, "off"):
        logits, heads = model(x)
        plain = model.backbone(x)
    for h in handles:
        h.remove()
    assert list(head_inputs) == list(taps)
    for name in taps:
        assert torch.equal(head_inputs[name], mine[name]), name
    assert len(heads) == len(taps)
    assert torch.equal(logits, plain)  # the heads are side branches
    with noise_mode(model, "off"):
        for out, name in zip(heads, taps):
            assert torch.equal(out, model.heads[name](mine[name]))

    # Export (the trainer's way) leaves the training model intact and drops the heads.
    plain_keys = set(build_model("small", in_channels=1, num_classes=10).state_dict())
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 1.0}
    exported = export_backbone(model, method, spec)
    assert set(exported.state_dict()) == plain_keys
    assert not any("heads" in k for k in exported.state_dict())
    for k, v in exported.state_dict().items():
        assert torch.equal(v, model.backbone.state_dict()[k])
    assert len(model._handles) == len(taps)
    model.train()
    _, heads = model(x)
    assert len(heads) == len(taps)

    # Method.export (the consuming way) also gives the plain backbone's keys.
    backbone = method.export(copy.deepcopy(model))
    assert set(backbone.state_dict()) == plain_keys


# --------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------


def _config(tmp_path, name="run", **kw):
    return TrainConfig(out=str(tmp_path / name), device="cpu", **{**TINY, **kw})


def _final_state(out) -> dict:
    ckpt, path = read_checkpoint(out, warn=False)
    assert path.name == "checkpoint.pt"
    return ckpt


def _assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_readme_lists_the_metrics_columns():
    # The README lists the columns a user plots; test_train_one_epoch_each_method pins the files to
    # METRICS_COLUMNS, this pins the README's list to it.
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [c for c in METRICS_COLUMNS if f"`{c}`" not in readme]
    assert not missing, f"README.md does not list the metrics columns {missing}"


@pytest.mark.parametrize("method", ["clean", "noise", "ovf", "irs", "ortho", "trice"])
def test_train_one_epoch_each_method(tmp_path, method):
    config = _config(tmp_path, method=method, epochs=1)
    result = train(config, progress=False, log=None)
    out = Path(config.out)
    for name in ("checkpoint.pt", "checkpoint.pt.sha256", "model.pt", "metrics.jsonl", "metrics.csv", "summary.json"):
        assert (out / name).is_file(), name
    assert result["epochs"] == 1 and result["best_epoch"] == 1 and not result["stopped"]
    assert result["sizes"] == {"train": 64, "val": 32, "test": 32}
    for key in ("best_val_acc", "test_acc_clean", "test_acc_noisy"):
        assert 0.0 <= result[key] <= 1.0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert len((out / "metrics.csv").read_text().splitlines()) == 2
    assert tuple((out / "metrics.csv").read_text().splitlines()[0].split(",")) == METRICS_COLUMNS
    row = json.loads((out / "metrics.jsonl").read_text())
    assert set(METRICS_COLUMNS) <= set(row) and row["epoch_cpu_s"] > 0 and row["epoch_time_s"] > 0
    model, payload = load_model(str(out / "model.pt"))
    assert set(model.state_dict()) == set(build_model("small", in_channels=1, num_classes=10).state_dict())
    assert payload["meta"]["method"]["method"] == method
    assert payload["variation"]["sigma"] == pytest.approx(0.1)


def test_train_without_validation_split_exports_last_epoch(tmp_path):
    import json

    config = _config(tmp_path, epochs=2, val_fraction=0.0)
    result = train(config, progress=False, log=None)
    assert result["best_epoch"] == 2 and result["sizes"]["val"] == 0
    rows = [json.loads(line) for line in (Path(config.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_acc_noisy"] for r in rows] == [None, None]
    assert json.loads((Path(config.out) / "summary.json").read_text())["best_val_acc"] is None
    assert safe_load(str(Path(config.out) / "model.pt"))["meta"]["epoch"] == 2


def test_train_config_validation():
    with pytest.raises(ValueError, match="sigma"):
        TrainConfig(sigma=-0.1)
    with pytest.raises(ValueError, match="model"):
        TrainConfig(model="lenet")
    with pytest.raises(ValueError, match="dataset"):
        TrainConfig(dataset="imagenet")
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="dropout")
    with pytest.raises(ValueError, match="device_model"):
        TrainConfig(device_model="PCM9")
    with pytest.raises(TypeError, match="epochs"):
        TrainConfig(epochs=1.5)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="beta"):
        TrainConfig(method="noise", beta=0.1)
    with pytest.raises(ValueError, match="deltas"):
        TrainConfig(method="ovf", deltas=())
    with pytest.raises(ValueError, match="head_sigma"):
        TrainConfig(method="ovf", head_sigma=0.1)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(TypeError, match="resume"):
        TrainConfig(resume="yes")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    c = TrainConfig(dataset="Fashion_MNIST", device_model="fefet2", optimizer="SGD", deltas=[0.2, 0.1], method="ovf")
    assert (c.dataset, c.device_model, c.optimizer, c.deltas) == ("fashion-mnist", "FeFET2", "sgd", (0.2, 0.1))
    assert TrainConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("method", ["irs", "ovf"])
def test_resume_is_bit_identical(tmp_path, method):
    full = train(_config(tmp_path, "full", method=method, epochs=2), progress=False, log=None)
    part = train(_config(tmp_path, "part", method=method, epochs=2), progress=False, log=None, stop_after=1)
    assert part["stopped"] and part["epochs"] == 1 and part["test_acc_clean"] is None
    resumed = train(_config(tmp_path, "part", method=method, epochs=2, resume=True), progress=False, log=None)
    assert resumed["resumed_from"] == 1 and resumed["epochs"] == 2
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "part")
    _assert_states_equal(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        _assert_states_equal(a["optimizer"]["state"][k], b["optimizer"]["state"][k])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    _assert_states_equal(
        safe_load(str(tmp_path / "full" / "model.pt"))["state_dict"],
        safe_load(str(tmp_path / "part" / "model.pt"))["state_dict"],
    )
    assert (full["test_acc_clean"], full["test_acc_noisy"]) == (resumed["test_acc_clean"], resumed["test_acc_noisy"])
    assert [r["train_loss"] for r in full["history"]] == [r["train_loss"] for r in resumed["history"]]
    assert len((tmp_path / "part" / "metrics.jsonl").read_text().splitlines()) == 2

    # A finished run resumes to the end at once; a config that differs is refused.
    again = train(_config(tmp_path, "part", method=method, epochs=2, resume=True), progress=False, log=None)
    assert again["test_acc_clean"] == resumed["test_acc_clean"]
    with pytest.raises(CheckpointError, match="lr"):
        train(_config(tmp_path, "part", method=method, epochs=2, lr=0.1, resume=True), progress=False, log=None)


def test_a_resume_reads_its_checkpoint_once_and_exports_the_training_backbone(tmp_path, monkeypatch):
    """One read_checkpoint per resume; model.pt is the training backbone (no IRS heads, no rebuilt copy);
    the IRS heads' device model is the method's choice from the config's head_sigma."""
    from nft_cuda.train import trainer as trainer_module

    cfg = dict(method="irs", epochs=2, head_sigma=0.2, val_fraction=0.0)
    train(_config(tmp_path, **cfg), progress=False, log=None, stop_after=1)
    reads = []

    def counting(*args, **kwargs):
        reads.append(args)
        return read_checkpoint(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "read_checkpoint", counting)
    monkeypatch.setattr(trainer_module, "export_backbone", None)  # the trainer must not rebuild a model
    train(_config(tmp_path, resume=True, **cfg), progress=False, log=None)
    assert len(reads) == 1
    payload = safe_load(str(tmp_path / "run" / "model.pt"))
    assert set(payload["state_dict"]) == set(build_model("small", in_channels=1, num_classes=10).state_dict())
    ckpt = safe_load(str(tmp_path / "run" / "checkpoint.pt"))  # the last epoch: exported (no validation split)
    backbone = {k[len("backbone.") :]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    _assert_states_equal(payload["state_dict"], backbone)
    assert payload["meta"]["method"]["head_sigma"] == 0.2 and payload["meta"]["method"]["head_device_model"] == "RRAM1"


def test_irs_chooses_its_heads_device_model():
    from nft_cuda.devices import PCM

    assert build_method("irs", Variation(0.1), taps={"a": 1}, head_sigma=0.3).head_variation == Variation(0.3, "RRAM1")
    assert build_method("irs", Variation(0.1, "FeFET2"), taps={"a": 1}).head_variation == Variation(0.1, "RRAM1")
    assert build_method("irs", PCM(), taps={"a": 1}, head_sigma=0.5).head_variation == PCM().with_sigma(0.5)
    assert build_method("irs", PCM(), taps={"a": 1}).head_variation == PCM()


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    train(_config(tmp_path, epochs=1), progress=False, log=None)
    with pytest.raises(CheckpointError, match="--resume"):
        train(_config(tmp_path, epochs=1), progress=False, log=None)
    train(_config(tmp_path, epochs=1, overwrite=True), progress=False, log=None)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(_config(tmp_path, "empty", epochs=1, resume=True), progress=False, log=None)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX flock")
def test_concurrent_run_in_same_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CheckpointError, match="another training"):
            train(_config(tmp_path, epochs=1), progress=False, log=None)
    finally:
        os.close(fd)
    assert not (out / "checkpoint.pt").exists()


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    full = train(_config(tmp_path, "full", epochs=3), progress=False, log=None)
    train(_config(tmp_path, "part", epochs=3), progress=False, log=None, stop_after=2)
    out = tmp_path / "part"
    assert safe_load(str(out / "checkpoint.prev.pt"))["epoch"] == 1
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated
    with pytest.warns(CheckpointWarning, match="previous good checkpoint"):
        resumed = train(_config(tmp_path, "part", epochs=3, resume=True), progress=False, log=None)
    assert resumed["resumed_from"] == 1
    _assert_states_equal(_final_state(tmp_path / "full")["model"], _final_state(out)["model"])
    assert full["test_acc_noisy"] == resumed["test_acc_noisy"]


def test_corrupt_checkpoint_without_previous_is_a_clear_error(tmp_path):
    train(_config(tmp_path, epochs=2), progress=False, log=None, stop_after=1)
    out = tmp_path / "run"
    assert not (out / "checkpoint.prev.pt").exists()
    ckpt = out / "checkpoint.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the sidecar can tell
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        train(_config(tmp_path, epochs=2, resume=True), progress=False, log=None)
    ckpt.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="cannot resume"):
        read_checkpoint(out)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "nft_cuda.checkpoint/1", "model": _Evil(marker)}, str(path))
    with pytest.raises(ValueError, match="weights-only"):
        safe_load(str(path))
    assert not marker.exists()

    # Planted as a run's checkpoint (with a matching sidecar): refused, never executed.
    out = tmp_path / "run"
    out.mkdir()
    import hashlib

    (out / "checkpoint.pt").write_bytes(path.read_bytes())
    (out / "checkpoint.pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  checkpoint.pt\n")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(out)
    assert not marker.exists()


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"the training process ended early (rc {proc.returncode}): "
                f"{proc.stderr.read().decode(errors='replace')}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    out = tmp_path / "killed"
    args = [
        "--method",
        "irs",
        "--epochs",
        "3",
        "--limit-train",
        "640",
        "--limit-eval",
        "32",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
    ]
    cmd = [sys.executable, "-m", "nft_cuda", "train", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(out / "checkpoint.pt.sha256", proc)  # written right after the first epoch's checkpoint
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    done = safe_load(str(out / "checkpoint.pt"))["epoch"]
    assert 1 <= done < 3

    resume = subprocess.run(
        [sys.executable, "-m", "nft_cuda", "train", "--out", str(out), "--resume", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resume.returncode == 0, resume.stderr
    assert f"resuming {out} at epoch {done + 1}/3" in resume.stdout

    reference = TrainConfig(
        method="irs",
        epochs=3,
        limit_train=640,
        limit_eval=32,
        batch_size=32,
        device="cpu",
        out=str(tmp_path / "reference"),
    )
    train(reference, progress=False, log=None)
    _assert_states_equal(_final_state(tmp_path / "reference")["model"], _final_state(out)["model"])
