"""The error contract of docs/errors.md, the rows no other test file covers (DESIGN §9).

Every row of the tables in docs/errors.md names the test that pins it; the rows already pinned by
test_errors.py, test_variation.py, test_perturb.py, test_noisy_linear.py, test_layers.py,
test_convert.py, test_data.py, test_train.py, test_cli.py and test_eval_cli.py are not repeated here.
Device-parametrised tests run on CPU and, when a GPU is present (benchmarks/gpu_check.sh), on CUDA.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FLOAT_DTYPES, one_error_line

import nft_cuda
from nft_cuda import NoisyConv2d, NoisyLinear, Variation, _ext, cli, ops, reference
from nft_cuda.data import datasets as D
from nft_cuda.data.errors import ChecksumError, DatasetFormatError
from nft_cuda.data.idx import write_idx
from nft_cuda.io import MODEL_FORMAT, load_model, save_model
from nft_cuda.models import build_model

V = Variation(0.1, "FeFET2")
SPEC = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 0.25}


def _rng(seed, offset, device):
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def _other_device(device: str) -> str:
    """A device other than ``device`` that tensors can live on without a second GPU ("meta" on CPU)."""
    return "meta" if device == "cpu" else "cpu"


# ==================================================================================================
# ops / rng
# ==================================================================================================


def test_noisy_linear_bias_dtype():
    with pytest.raises(TypeError, match="bias must be float32, float64, float16 or bfloat16"):
        ops.noisy_linear(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), V, seed=1)


def test_noisy_linear_inputs_on_another_device(device):
    other = _other_device(device)
    w = torch.randn(3, 4, device=device)
    with pytest.raises(ValueError, match=f"x is on {other} but weight is on {device}"):
        ops.noisy_linear(torch.randn(2, 4, device=other), w, None, V, seed=1)
    with pytest.raises(ValueError, match=f"bias is on {other} but weight is on {device}"):
        ops.noisy_linear(torch.randn(2, 4, device=device), w, torch.zeros(3, device=other), V, seed=1)
    with pytest.raises(ValueError, match=f"sigmas is on {other} but weight is on {device}"):
        ops.noisy_linear(torch.randn(2, 4, device=device), w, None, V, seed=1, sigmas=torch.ones(1, device=other))


def test_empty_inputs_work(device):
    assert nft_cuda.rng.normal(0, 1, 2, streams=3, device=device).shape == (3, 0)
    key = torch.tensor([1, 2], dtype=torch.int64, device=device)
    assert nft_cuda.rng.philox4x32(torch.zeros(0, 4, dtype=torch.int64, device=device), key).shape == (0, 4)
    assert ops.perturb(torch.empty(0, 3, device=device), V, seed=1, samples=2).shape == (2, 0, 3)
    out = ops.noisy_linear(
        torch.randn(0, 4, device=device), torch.randn(3, 4, device=device), None, V, seed=1, samples=2
    )
    assert out.shape == (2, 0, 3)
    out = ops.snapshot_linear(
        torch.randn(0, 2, 5, 5, device=device), 2, torch.randn(3, 8, device=device), None, V, seed=1
    )
    assert out.shape == (1, 0, 3)


@pytest.mark.parametrize("seed,offset", [(0, 0), (2**63 - 1, 2**63 - 1)])
def test_seed_extremes_accepted_everywhere(seed, offset, device):
    """Both ends of [0, 2^63) are valid for every API taking a seed (offset + t may pass 2^63: it wraps mod 2^64)."""
    assert nft_cuda.rng.normal(5, seed, offset, streams=3, device=device).isfinite().all()
    w = torch.randn(4, 5, device=device)
    out = ops.perturb(w, V, seed=seed, offset=offset, samples=3)
    assert torch.equal(out, ops.perturb(w, V, rng=_rng(seed, offset, device), samples=3))
    assert ops.noisy_linear(torch.randn(2, 5, device=device), w, None, V, seed=seed, offset=offset).isfinite().all()
    layer = NoisyLinear(5, 4, variation=V, device=device)
    layer.set_instance(seed, 2**32 - 1)
    assert layer(torch.randn(2, 5, device=device)).isfinite().all()


# -- non-finite weights (README "Non-finite weights") ------------------------------------------------


def _sig(sigma, samples, device):
    return torch.full((samples,), sigma, dtype=torch.float32, device=device)


@pytest.mark.parametrize("sigma", [0.0, 0.2])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_weight_poisons_every_sample(dtype, sigma, device):
    """One NaN weight makes max|W| NaN, so every element of every sample is NaN (σ_d = 0 included):
    loud, never hidden. The same on the kernel, the pure-PyTorch twin and the fused matmul."""
    w = torch.randn(6, 7, dtype=torch.float64).to(dtype=dtype, device=device)
    w[2, 3] = float("nan")
    v = Variation(sigma, "FeFET2")
    r = _rng(3, 4, device)
    assert ops.perturb(w, v, rng=r, samples=3).isnan().all()
    assert reference.perturb(w, r, _sig(sigma, 3, device), v.scale, v.state_factor).isnan().all()
    x = (torch.rand(5, 7, device=device) + 0.5).to(dtype)  # no zero inputs
    assert ops.noisy_linear(x, w, None, v, rng=r, samples=2).isnan().all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("sigma", [0.0, 0.2])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_inf_weight_gives_no_finite_element(dtype, sigma, sign, device):
    """±inf makes max|W| = inf: σ_base = σ_d·inf, so no element stays finite; with σ_d = 0 the product
    0·inf is NaN and every element is NaN."""
    w = torch.randn(6, 7, dtype=torch.float64).to(dtype=dtype, device=device)
    w[1, 1] = sign * float("inf")
    v = Variation(sigma, "RRAM4")
    r = _rng(5, 6, device)
    for out in (
        ops.perturb(w, v, rng=r, samples=3),
        reference.perturb(w, r, _sig(sigma, 3, device), v.scale, v.state_factor),
    ):
        assert not out.isfinite().any()
        if sigma == 0.0:
            assert out.isnan().all()


def test_nan_weight_in_a_layer(device):
    """A noisy layer with a NaN weight gives an all-NaN output in modes train and instance; in mode off
    it is the plain layer (NaN only where the weight is used)."""
    layer = NoisyLinear(4, 3, variation=V, device=device)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    x = torch.rand(2, 4, device=device) + 0.5
    assert layer(x).isnan().all()
    layer.set_instance(0, 1)
    assert layer(x).isnan().all()
    layer.mode = "off"
    y = layer(x)
    assert y[:, 0].isnan().all() and y[:, 1:].isfinite().all()


def test_negative_sigma_in_unchecked_tensor_gives_nan():
    """σ_d < 0 reaching the kernel through a tensor that is not checked (a device tensor, or a direct
    torch.ops call) poisons that sample with NaN instead of flipping the noise; the checked paths raise."""
    w = torch.randn(5, 7)
    sig = torch.tensor([-0.1, 0.1])
    r = _rng(1, 2, "cpu")
    outs = [reference.perturb(w, r, sig, V.scale, V.state_factor)]
    if _ext.HAS_C:
        outs.append(torch.ops.nft_cuda.perturb(w, r, sig, V.scale, V.state_factor))
    for out in outs:
        assert out[0].isnan().all() and out[1].isfinite().all()
    with pytest.raises(ValueError, match="sigmas must be finite and >= 0"):
        ops.perturb(w, V, rng=r, samples=2, sigmas=sig)


# -- double backward ---------------------------------------------------------------------------------


def test_perturb_double_backward_is_exact(device):
    """perturb's straight-through gradient is linear (dL/dW = Σ_t dL/dout[t]), so differentiating twice is
    well defined and exact: d/dW Σ(∂/∂W Σ out²) = 2·S per element."""
    w = torch.randn(3, 4, device=device, requires_grad=True)
    out = ops.perturb(w, V, seed=1, samples=2)
    (g,) = torch.autograd.grad(out.square().sum(), w, create_graph=True)
    torch.testing.assert_close(g, 2 * out.detach().sum(0))
    g.sum().backward()
    torch.testing.assert_close(w.grad, torch.full_like(w, 4.0))


@pytest.mark.skipif(not _ext.HAS_C, reason="the pure-PyTorch fallback differentiates twice (autograd)")
def test_noisy_linear_double_backward_raises(device):
    x = torch.randn(2, 4, device=device, requires_grad=True)
    w = torch.randn(3, 4, device=device, requires_grad=True)
    out = ops.noisy_linear(x, w, None, V, seed=1, samples=2)
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w), create_graph=True)
    with pytest.raises(RuntimeError, match="noisy_linear does not support double backward"):
        gx.sum().backward()
    with pytest.raises(RuntimeError, match="double backward"):
        gw.sum().backward()
    # first-order gradients taken with create_graph=True are unaffected
    (ref,) = torch.autograd.grad(ops.noisy_linear(x, w, None, V, seed=1, samples=2).square().sum(), x)
    torch.testing.assert_close(gx.detach(), ref)


def test_unknown_preset_hint():
    with pytest.raises(ValueError, match=r"unknown device_model 'FeFET-2' \(did you mean 'FeFET2'\?\); choose one of"):
        Variation(0.1, "FeFET-2")


# ==================================================================================================
# layers
# ==================================================================================================


def _linear_and_conv(device):
    torch.manual_seed(0)
    return [
        (NoisyLinear(6, 4, variation=V, device=device), torch.randn(3, 6, device=device)),
        (NoisyConv2d(3, 4, 3, padding=1, variation=V, device=device), torch.randn(2, 3, 6, 6, device=device)),
    ]


def test_layer_input_not_a_tensor():
    for layer, x in _linear_and_conv("cpu"):
        with pytest.raises(TypeError, match=f"{type(layer).__name__}: input must be a torch.Tensor, got list"):
            layer(x.tolist())


@pytest.mark.parametrize("mode", ["train", "instance", "off"])
def test_layer_input_on_another_device(mode, device):
    other = _other_device(device)
    for layer, x in _linear_and_conv(device):
        if mode == "instance":
            layer.set_instance(0, 0)
        layer.mode = mode
        state = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
        with pytest.raises(RuntimeError, match=f"input is on {other} but the weight is on {device}"):
            layer(x.to(other))
        after = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
        assert torch.equal(after, state)  # checked before any draw


def test_layer_dtype_and_shape_mismatch_as_torch():
    """Wrong input dtype or feature size: the same RuntimeError (and message) as the plain nn layer."""
    for layer, x in _linear_and_conv("cpu"):
        plain = nft_cuda.strip(layer)  # the plain nn layer with the same parameters
        for bad in (x.double(), x.long()):
            with pytest.raises(RuntimeError) as got:
                layer(bad)
            with pytest.raises(RuntimeError) as want:
                plain(bad)
            assert str(got.value) == str(want.value)
        bad = x[..., :-1] if isinstance(layer, NoisyLinear) else x[:, :-1]
        with pytest.raises(RuntimeError) as got:
            layer(bad)
        with pytest.raises(RuntimeError) as want:
            plain(bad)
        assert str(got.value) == str(want.value)


def test_layer_non_contiguous_and_channels_last_inputs(device):
    """Transposed, sliced and channels_last inputs give the same output as their contiguous copies (up to the
    rounding of another GEMM / convolution algorithm: cuDNN may pick TF32 kernels on CUDA)."""
    tol = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=5e-3, atol=5e-3)
    lin = NoisyLinear(6, 4, variation=V, device=device)
    lin.set_instance(7, 1)
    x = torch.randn(6, 5, device=device).t()  # [5, 6], transposed
    torch.testing.assert_close(lin(x), lin(x.contiguous()), **tol)
    xs = torch.randn(10, 12, device=device)[::2, ::2]  # [5, 6], strided
    torch.testing.assert_close(lin(xs), lin(xs.contiguous()), **tol)
    conv = NoisyConv2d(3, 4, 3, padding=1, variation=V, device=device)
    conv.set_instance(7, 2)
    xc = torch.randn(2, 3, 6, 6, device=device).to(memory_format=torch.channels_last)
    torch.testing.assert_close(conv(xc), conv(xc.contiguous()), **tol)
    conv_cl = NoisyConv2d(3, 4, 3, padding=1, variation=V, device=device).to(memory_format=torch.channels_last)
    conv_cl.load_state_dict(conv.state_dict())
    conv_cl.set_instance(7, 2)
    torch.testing.assert_close(conv_cl(xc), conv(xc.contiguous()), **tol)
    xp = torch.randn(2, 6, 6, 3, device=device).permute(0, 3, 1, 2)  # NHWC storage, NCHW view
    torch.testing.assert_close(conv(xp), conv(xp.contiguous()), **tol)


def test_conv_empty_batch(device):
    conv = NoisyConv2d(3, 4, 3, variation=V, device=device)
    x = torch.randn(0, 3, 6, 6, device=device, requires_grad=True)
    y = conv(x)
    y.sum().backward()
    assert y.shape == (0, 4, 4, 4) and torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))


# ==================================================================================================
# data
# ==================================================================================================


def _write_mnist_like(folder: Path, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,), dtype=np.uint8))


def test_truncated_idx_file_through_load_dataset(tmp_path, monkeypatch):
    """A truncated file fails its SHA-256; with a matching hash (or verify=False) the IDX size check
    still names it: the format is checked whatever the hash says."""
    _write_mnist_like(tmp_path / "mnist")
    p = tmp_path / "mnist" / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        D.load_dataset("mnist", tmp_path, "train")
    with pytest.raises(DatasetFormatError, match=r"truncated IDX data.*100 missing") as err:
        D.load_dataset("mnist", tmp_path, "train", verify=False)
    assert str(p) in str(err.value)
    spec = D.DATASETS["mnist"]
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        monkeypatch.setitem(spec.sha256, name, hashlib.sha256((tmp_path / "mnist" / name).read_bytes()).hexdigest())
    with pytest.raises(DatasetFormatError, match="truncated IDX data"):
        D.load_dataset("mnist", tmp_path, "train")


def test_truncated_gz_idx_file_through_load_dataset(tmp_path):
    folder = tmp_path / "mnist"
    _write_mnist_like(folder)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        raw = (folder / name).read_bytes()
        (folder / name).unlink()
        (folder / f"{name}.gz").write_bytes(
            gzip.compress(raw, mtime=0)[:-20] if "images" in name else gzip.compress(raw, mtime=0)
        )
    with pytest.raises(DatasetFormatError, match="corrupt gzip stream") as err:
        D.load_dataset("mnist", tmp_path, "train")
    assert str(folder / "train-images-idx3-ubyte.gz") in str(err.value)


# ==================================================================================================
# exported models (nft_cuda.io) and their safe loading
# ==================================================================================================


@pytest.fixture
def exported(tmp_path):
    """An exported small model (nft_cuda.io.save_model), without training."""
    torch.manual_seed(0)
    model = build_model(**{k: v for k, v in SPEC.items() if k != "name"}, name="small")
    nft_cuda.convert(model, V)
    path = tmp_path / "model.pt"
    save_model(str(path), model, spec=SPEC, variation=V, meta={"dataset": "embedded", "method": {"method": "noise"}})
    return path


class _Evil:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_model(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(
        {
            "format": MODEL_FORMAT,
            "model": dict(SPEC),
            "variation": _Evil(marker),
            "noisy": [],
            "state_dict": {},
            "meta": {"dataset": "embedded"},
        },
        str(path),
    )
    return path, marker


def test_exported_model_loads_weights_only(exported):
    payload = torch.load(str(exported), weights_only=True)  # plain torch, the safe loader
    assert payload["format"] == MODEL_FORMAT
    model, _ = load_model(str(exported))
    assert [n for n, _ in nft_cuda.noisy_layers(model)] == payload["noisy"]


def test_load_model_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "flipped-header"])
def test_load_model_corrupt_file(exported, damage):
    data = exported.read_bytes()
    bad = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "garbage": b"not a model at all",
        "flipped-header": bytes([data[0] ^ 0xFF]) + data[1:],
    }[damage]
    exported.write_bytes(bad)
    with pytest.raises(ValueError, match=r"is not a readable nft_cuda file \(corrupt, truncated"):
        load_model(str(exported))


def test_load_model_refuses_malicious_pickle(tmp_path):
    path, marker = _evil_model(tmp_path)
    with pytest.raises(ValueError, match="weights-only"):
        load_model(str(path))
    assert not marker.exists()


def test_load_model_wrong_format(tmp_path):
    for i, obj in enumerate([[1, 2], {"a": 1}, {"format": "nft_cuda.checkpoint/1", "model": {}}]):
        path = tmp_path / f"other{i}.pt"
        torch.save(obj, str(path))
        with pytest.raises(ValueError, match="is not an exported nft_cuda model"):
            load_model(str(path))


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda p: p.pop("variation"), "missing entry 'variation'"),
        (lambda p: p["model"].pop("name"), "missing entry 'name'"),
        (lambda p: p["model"].update(name="lenet"), "unknown model 'lenet'"),
        (lambda p: p["model"].update(colour=3), "unexpected keyword argument 'colour'"),
        (lambda p: p["variation"].update(sigma=-1.0), "sigma must be a finite number >= 0"),
        (lambda p: p["variation"].update(device_model="PCM"), "unknown device_model 'PCM'"),
        (lambda p: p.update(noisy=["nope"]), "include 'nope' match no"),
    ],
)
def test_load_model_malformed_payload(exported, change, needle):
    payload = torch.load(str(exported), weights_only=True)
    change(payload)
    torch.save(payload, str(exported))
    with pytest.raises(ValueError, match="malformed exported nft_cuda model") as err:
        load_model(str(exported))
    assert needle in str(err.value) and str(exported) in str(err.value)


def test_load_model_weights_do_not_match(exported):
    payload = torch.load(str(exported), weights_only=True)
    payload["state_dict"].popitem()
    torch.save(payload, str(exported))
    with pytest.raises(ValueError, match="the weights do not match model 'small'"):
        load_model(str(exported))
    payload["state_dict"] = [1, 2]
    torch.save(payload, str(exported))
    with pytest.raises(ValueError, match="the weights do not match model 'small'"):
        load_model(str(exported))


def test_non_finite_training_loss_is_an_error(tmp_path):
    from nft_cuda.train.trainer import TrainConfig, train

    config = TrainConfig(
        method="clean",
        epochs=1,
        lr=1e30,
        limit_train=64,
        limit_eval=32,
        batch_size=32,
        device="cpu",
        out=str(tmp_path / "run"),
    )
    with pytest.raises(RuntimeError, match="the training loss became (nan|inf) in epoch 1; lower the learning rate"):
        train(config, progress=False, log=None)


# ==================================================================================================
# CLI (in-process: cli.main returns the exit status; --debug re-raises)
# ==================================================================================================


def test_cli_eval_malicious_checkpoint(tmp_path, capsys):
    path, marker = _evil_model(tmp_path)
    assert cli.main(["eval", str(path), "--runs", "2", "--sigma", "0.1", "--no-progress", "--device", "cpu"]) == 1
    assert "weights-only" in one_error_line(capsys.readouterr().err)
    assert not marker.exists()
    with pytest.raises(ValueError, match="weights-only"):  # --debug: the exception and its traceback
        cli.main(["eval", str(path), "--runs", "2", "--sigma", "0.1", "--no-progress", "--debug"])
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("truncated", "is not a readable nft_cuda file"),
        ("training-checkpoint", "is not an exported nft_cuda model"),
        ("malformed", "malformed exported nft_cuda model"),
    ],
)
def test_cli_eval_bad_checkpoint(exported, damage, needle, capsys):
    if damage == "truncated":
        exported.write_bytes(exported.read_bytes()[:1000])
    elif damage == "training-checkpoint":
        torch.save({"format": "nft_cuda.checkpoint/1", "epoch": 1}, str(exported))
    else:
        payload = torch.load(str(exported), weights_only=True)
        del payload["variation"]
        torch.save(payload, str(exported))
    assert cli.main(["eval", str(exported), "--runs", "2", "--sigma", "0.1", "--no-progress", "--device", "cpu"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert needle in line and str(exported) in line


def test_cli_eval_missing_dataset(exported, tmp_path, capsys):
    payload = torch.load(str(exported), weights_only=True)
    payload["meta"]["dataset"] = "mnist"
    torch.save(payload, str(exported))
    assert (
        cli.main(
            [
                "eval",
                str(exported),
                "--runs",
                "2",
                "--sigma",
                "0.1",
                "--no-progress",
                "--device",
                "cpu",
                "--data-dir",
                str(tmp_path / "empty"),
            ]
        )
        == 1
    )
    line = one_error_line(capsys.readouterr().err)
    assert "mnist (test split) not found" in line and "nft data fetch mnist" in line


def test_cli_train_missing_and_corrupt_data(tmp_path, capsys):
    args = [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(tmp_path / "data"),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    assert cli.main(args) == 1
    assert "nft data fetch mnist" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # nothing written for a run that cannot start
    _write_mnist_like(tmp_path / "data" / "mnist")  # present, but not the official files
    assert cli.main(args) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "SHA-256 mismatch" in line and "train-images-idx3-ubyte" in line
    with pytest.raises(ChecksumError):
        cli.main([*args, "--overwrite", "--debug"])


def test_cli_seed_out_of_range(capsys):
    assert cli.main(["train", "--seed", str(2**63), "--out", "x"]) == 1  # found by TrainConfig
    assert "seed must be in [0, 9223372036854775807]" in one_error_line(capsys.readouterr().err)
    for seed, needle in ((str(2**63), "must be < 9223372036854775808"), ("-1", "must be >= 0")):
        with pytest.raises(SystemExit) as exc:  # found by argparse
            cli.main(["eval", "m.pt", "--seed", seed])
        assert exc.value.code == 2
        assert needle in one_error_line(capsys.readouterr().err)


def test_cli_unknown_preset_and_negative_sigma(capsys):
    for argv, needle in (
        (["eval", "m.pt", "--device-model", "PCM9"], "unknown device_model 'PCM9' (did you mean 'pcm'?)"),
        (["demo", "--device-model", "fefet3"], "invalid choice: 'fefet3'"),
        (["eval", "m.pt", "--sigma", "0,-0.1"], "σ_d must be finite and >= 0"),
        (["demo", "--sigma", "-0.1"], "σ_d must be finite and >= 0"),
    ):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert needle in one_error_line(capsys.readouterr().err)


def test_cli_keyboard_interrupt(monkeypatch, capsys):
    import nft_cuda.data.fetch as fetch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "fetch", interrupted)
    assert cli.main(["data", "fetch", "mnist"]) == 130
    assert capsys.readouterr().err.strip() == "nft: interrupted"
    with pytest.raises(KeyboardInterrupt):
        cli.main(["data", "fetch", "mnist", "--debug"])


# ==================================================================================================
# the contract document itself
# ==================================================================================================


def test_every_contract_row_points_at_a_test():
    """Each table row of docs/errors.md names at least one test, and every test it names exists."""
    import re

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "errors.md").read_text(encoding="utf-8")
    refs = re.findall(r"(tests/test_\w+\.py)::(\w+)", doc)
    assert len(refs) > 100
    sources: dict[str, str] = {}
    for path, name in refs:
        src = sources.setdefault(path, (repo / path).read_text(encoding="utf-8"))
        assert re.search(rf"^def {name}\(", src, re.M), f"docs/errors.md names {path}::{name}, which does not exist"
    rows = [
        line
        for line in doc.splitlines()
        if line.startswith("| ")
        and not line.startswith("| input ")
        and not line.startswith("| property ")
        and not line.startswith("| what ")
    ]
    for row in rows:
        assert re.search(r"tests/test_\w+\.py::\w+", row), f"row without a test: {row}"
