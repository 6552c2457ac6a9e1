"""The chip noise stream's layer keys (DESIGN §2 instance mode, noise stream version 2) and the cached chip
weights of instance mode.

Version 2 keys a noisy layer by its qualified name, so chip r of a layer is the same whichever other
layers are converted, excluded or registered, whatever wraps the model, and after an export and reload.
Version 1 (keys by position, every result made before version 2) stays selectable and is what files and
reports without a version mean.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda import Variation
from nft_cuda.eval import TensorBatches, monte_carlo
from nft_cuda.io import load_model, save_model
from nft_cuda.models import build_model
from nft_cuda.nn import NOISE_STREAM_VERSION, assign_layer_keys, name_key

pytestmark = pytest.mark.usefixtures("one_thread")

V = Variation(0.2, "FeFET2")
SEED = 31
#: Two module names whose name keys collide (found by a birthday search over "l0", "l1", ...).
COLLIDING = ("l1098", "l63979")


class _Net(nn.Module):
    """One layer of each kind the brief names: Linear (first), Conv2d, MultiheadAttention, LSTM, Linear."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.conv = nn.Conv2d(1, 2, 3)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.lstm = nn.LSTM(6, 4, batch_first=True)
        self.head = nn.Linear(4, 3)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return _Net()


def _layer_outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each layer's output on fixed inputs (the model in instance mode)."""
    g = torch.Generator().manual_seed(1)
    seq = torch.randn(2, 5, 6, generator=g)
    return {
        "conv": model.conv(torch.randn(2, 1, 5, 5, generator=g)),
        "attn": model.attn(seq, seq, seq)[0],
        "lstm": model.lstm(seq)[0],
        "head": model.head(torch.randn(2, 4, generator=g)),
    }


def _chip(model: nn.Module, r: int, *, grad: bool) -> tuple[dict, dict]:
    """(noisy weight of every noisy layer, output of every layer but the first) of chip r."""
    nft_cuda.set_instance(model, SEED, r)
    weights = {name: layer.noisy_weight() for name, layer in nft_cuda.noisy_layers(model)}
    with torch.set_grad_enabled(grad):
        outputs = {k: v.detach() for k, v in _layer_outputs(model).items()}
    return weights, outputs


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad-cached", "grad-drawn"])
def test_excluding_a_layer_leaves_every_other_layers_chip_bit_identical(grad):
    full = nft_cuda.convert(_net(), V)
    ablated = nft_cuda.convert(_net(), V, exclude=["first"])
    assert [n for n, _ in nft_cuda.noisy_layers(ablated)] == ["conv", "attn", "attn.out_proj", "lstm", "head"]
    for r in (0, 5):
        w_full, out_full = _chip(full, r, grad=grad)
        w_abl, out_abl = _chip(ablated, r, grad=grad)
        for name, w in w_abl.items():
            assert torch.equal(w, w_full[name]), (name, r)
        for name, out in out_abl.items():
            assert torch.equal(out, out_full[name]), (name, r)
    # the chips are chips: another instance is another noise
    assert not torch.equal(_chip(full, 1, grad=grad)[0]["head"], _chip(full, 0, grad=grad)[0]["head"])


def test_in_version_1_excluding_a_layer_moves_every_later_layers_chip():
    """What version 2 fixes (issue 30 item 2): by position, the ablation is not on the same chips."""
    full = nft_cuda.convert(_net(), V, stream_version=1)
    ablated = nft_cuda.convert(_net(), V, exclude=["first"], stream_version=1)
    w_full, _ = _chip(full, 5, grad=False)
    w_abl, _ = _chip(ablated, 5, grad=False)
    assert all(not torch.equal(w, w_full[name]) for name, w in w_abl.items())


def test_include_and_a_second_convert_keep_the_chip():
    model = nft_cuda.convert(_net(), V, include=["head"])
    head = _chip(model, 3, grad=False)[0]["head"]
    nft_cuda.convert(model, V)  # now every layer, the head included again
    assert torch.equal(_chip(model, 3, grad=False)[0]["head"], head)
    assert model.head.layer_index == name_key("head") and model.head.layer_name == "head"


def test_keys_are_names_through_wrappers_and_survive_wrapping_and_deepcopy():
    plain = nft_cuda.convert(_net(), V)
    keys = {n: layer.layer_index for n, layer in nft_cuda.noisy_layers(plain)}
    assert keys == {n: name_key(n) for n in keys}
    wrapped = nft_cuda.convert(nn.DataParallel(_net()), V)  # DataParallel/DDP add "module."
    assert {n.removeprefix("module."): m.layer_index for n, m in nft_cuda.noisy_layers(wrapped)} == keys
    compiled = torch.compile(_net())  # torch.compile adds "_orig_mod." (nothing is compiled here)
    nft_cuda.convert(compiled, V)
    assert {n.removeprefix("_orig_mod."): m.layer_index for n, m in nft_cuda.noisy_layers(compiled)} == keys
    # a converted model wrapped later (as IRS wraps its backbone) keeps its keys; a new layer gets its own
    outer = nn.ModuleDict({"backbone": plain, "extra": nft_cuda.NoisyLinear(3, 2, variation=V)})
    nft_cuda.set_instance(outer, SEED, 2)
    assert {n: plain.get_submodule(n).layer_index for n in keys} == keys
    assert outer["extra"].layer_index == name_key("extra")
    clone = copy.deepcopy(plain)
    assert {n: m.layer_index for n, m in nft_cuda.noisy_layers(clone)} == keys
    nft_cuda.set_instance(clone, SEED, 2)
    assert torch.equal(clone.head.noisy_weight(), plain.head.noisy_weight())


def test_irs_training_model_and_its_export_have_the_same_chips(tmp_path):
    from nft_cuda.train import build_method

    torch.manual_seed(0)
    method = build_method("irs", Variation(0.1), model_name="small", dataset="embedded")
    irs = method.prepare(build_model("small", in_channels=1, num_classes=10), torch.randn(2, 1, 32, 32), num_classes=10)
    spec = {"name": "small", "in_channels": 1, "num_classes": 10}
    path = str(tmp_path / "m.pt")
    save_model(path, method.export(irs), spec=spec, variation=Variation(0.1), meta={})
    loaded, payload = load_model(path)
    assert payload["noise_stream"] == NOISE_STREAM_VERSION == 2
    nft_cuda.set_instance(irs, SEED, 4)  # the training model: backbone + noisy heads
    nft_cuda.set_instance(loaded, SEED, 4)
    trained = dict(nft_cuda.noisy_layers(irs))
    for name, layer in nft_cuda.noisy_layers(loaded):
        assert torch.equal(layer.noisy_weight(), trained[f"backbone.{name}"].noisy_weight()), name


def test_export_and_reload_give_the_same_chips_and_results(tmp_path):
    torch.manual_seed(0)
    model = nft_cuda.convert(build_model("small", in_channels=1, num_classes=10), V, exclude=["block1.0"]).eval()
    path = str(tmp_path / "m.pt")
    save_model(path, model, spec={"name": "small", "in_channels": 1, "num_classes": 10}, variation=V, meta={})
    loaded, payload = load_model(path)
    names = [n for n, _ in nft_cuda.noisy_layers(model)]
    assert payload["noisy"] == names and payload["layer_keys"] == [name_key(n) for n in names]
    assert payload["noise_stream"] == 2
    loader = TensorBatches(torch.randn(12, 1, 32, 32), torch.randint(0, 10, (12,)), 6)
    a = monte_carlo(model, loader, V, 3, seed=SEED, progress=False)
    b = monte_carlo(loaded.eval(), loader, V, 3, seed=SEED, progress=False)
    assert a == b and a[0]["noise_stream"] == 2


def test_a_file_without_a_version_is_version_1(tmp_path):
    torch.manual_seed(0)
    model = nft_cuda.convert(build_model("small", in_channels=1, num_classes=10), V)
    path = str(tmp_path / "old.pt")
    save_model(path, model, spec={"name": "small", "in_channels": 1, "num_classes": 10}, variation=V, meta={})
    payload = torch.load(path, weights_only=True)
    del payload["noise_stream"], payload["layer_keys"]  # a file written before version 2
    torch.save(payload, path)
    loaded, _ = load_model(path)
    assert [m.layer_index for _, m in nft_cuda.noisy_layers(loaded)] == list(range(len(payload["noisy"])))
    assert nft_cuda.nn.stream_version(loaded) == 1
    loader = TensorBatches(torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,)), 8)
    old = monte_carlo(loaded, loader, V, 2, seed=SEED, progress=False)[0]
    again = monte_carlo(model.eval(), loader, V, 2, seed=SEED, progress=False, stream_version=1)[0]
    assert old == again and old["noise_stream"] == 1
    assert monte_carlo(model, loader, V, 2, seed=SEED, progress=False)[0]["noise_stream"] == 2
    # monte_carlo puts the model's own keys back after evaluating another version
    assert [m.layer_index for _, m in nft_cuda.noisy_layers(model)] == [name_key(n) for n in payload["noisy"]]


def test_colliding_names_get_distinct_keys_deterministically_with_a_warning():
    a, b = COLLIDING
    assert name_key(a) == name_key(b)  # a genuine 31-bit collision of SHA-256

    def model():
        torch.manual_seed(0)
        return nn.ModuleDict({a: nn.Linear(4, 4), b: nn.Linear(4, 4), "c": nn.Linear(4, 4)})

    with pytest.warns(UserWarning, match=rf"'{b}' \(its key is held by '{a}'\)"):
        first = nft_cuda.convert(model(), V)
    assert first[a].layer_index == name_key(a) and first[b].layer_index == name_key(f"{b}#1")
    with pytest.warns(UserWarning):
        second = nft_cuda.convert(model(), V)
    assert [m.layer_index for _, m in nft_cuda.noisy_layers(second)] == [
        m.layer_index for _, m in nft_cuda.noisy_layers(first)
    ]
    nft_cuda.set_instance(first, SEED, 0)
    assert not torch.equal(first[a].noisy_weight() - first[a].weight, first[b].noisy_weight() - first[b].weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no collision, no warning
        nft_cuda.convert(model(), V, exclude=[b])


def test_separately_converted_parts_never_share_a_stream():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(3, 3)), "b": nn.Sequential(nn.Linear(3, 3))})
    nft_cuda.convert(model["a"], V)
    nft_cuda.convert(model["b"], V)  # both layers keyed by the name "0"
    assert model["a"][0].layer_index == model["b"][0].layer_index
    layers = assign_layer_keys(model)
    assert len({layer.layer_index for layer in layers}) == 2
    assert model["a"][0].layer_index == name_key("0") and model["b"][0].layer_index == name_key("b.0")


def test_stream_version_arguments_are_checked():
    model = nft_cuda.convert(_net(), V)
    for bad in (0, 3):
        with pytest.raises(ValueError, match="stream_version must be in"):
            nft_cuda.convert(_net(), V, stream_version=bad)
        with pytest.raises(ValueError, match="stream_version must be in"):
            nft_cuda.set_instance(model, SEED, 0, stream_version=bad)
    with pytest.raises(TypeError, match="stream_version must be an int"):
        nft_cuda.convert(_net(), V, stream_version="2")
    nft_cuda.convert(model.head, V, stream_version=1)  # the head alone, renumbered in version 1
    with pytest.raises(ValueError, match="noise stream versions"):
        nft_cuda.set_instance(model, SEED, 0)


# --------------------------------------------------------------------------------------------------
# Cached chip weights (instance mode)
# --------------------------------------------------------------------------------------------------


class _CountingPerturb:
    def __init__(self, monkeypatch):
        self.calls, self.real = 0, nft_cuda.ops.perturb
        monkeypatch.setattr(nft_cuda.ops, "perturb", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


def test_the_cache_is_bit_identical_to_drawing_on_every_forward():
    cached = nft_cuda.convert(_net(), V)
    drawn = nft_cuda.convert(_net(), V)
    for r in (0, 7):
        nft_cuda.set_instance(cached, SEED, r)
        nft_cuda.set_instance(drawn, SEED, r, cache=False)
        with torch.no_grad():
            a, b = _layer_outputs(cached), _layer_outputs(drawn)
            again = _layer_outputs(cached)  # from the cache
        for name in a:
            assert torch.equal(a[name], b[name]) and torch.equal(again[name], b[name]), name
        called = [m for n, m in nft_cuda.noisy_layers(cached) if n != "first"]  # _layer_outputs skips "first"
        assert called and all(m._instance_cache is not None for m in called)
        assert all(m._instance_cache is None for _, m in nft_cuda.noisy_layers(drawn))


def test_the_cache_draws_once_per_chip_and_not_with_gradients(monkeypatch):
    layer = nft_cuda.NoisyLinear(5, 4, variation=V)
    layer.set_instance(SEED, 1)
    x = torch.randn(3, 5)
    counting = _CountingPerturb(monkeypatch)
    with torch.no_grad():
        y = layer(x)
        assert torch.equal(layer(x), y) and counting.calls == 1
    with torch.inference_mode():
        assert torch.equal(layer(x), y) and counting.calls == 1
    out = layer(x)  # with gradients: drawn (and straight-through to the weight)
    out.sum().backward()
    assert counting.calls >= 2 and torch.equal(out.detach(), y)
    assert torch.equal(layer.weight.grad, torch.ones(3, 4).t() @ x)


@pytest.mark.parametrize(
    "change",
    ["set_instance", "in_place", "load_state_dict", "variation", "dtype", "restore_noise_state", "mode_off"],
)
def test_the_cache_follows_every_change_of_the_chip(change, monkeypatch):
    torch.manual_seed(0)
    layer = nft_cuda.NoisyLinear(5, 4, variation=V)
    layer.set_instance(SEED, 1)
    state = layer.noise_state()
    x = torch.randn(3, 5)
    with torch.no_grad():
        before = layer(x)
        if change == "set_instance":
            layer.set_instance(SEED, 2)
        elif change == "in_place":
            layer.weight.mul_(2.0)
        elif change == "load_state_dict":
            layer.load_state_dict({"weight": torch.randn(4, 5), "bias": layer.bias.clone()})
        elif change == "variation":
            layer.variation = V.with_sigma(0.4)
        elif change == "dtype":
            layer.double()
            layer.set_instance(SEED, 1)  # the rng buffer stays int64; the weight is new storage
            x = x.double()
        elif change == "restore_noise_state":
            layer.set_instance(SEED, 2)
            layer(x)
            layer.restore_noise_state(state)
        elif change == "mode_off":
            layer.mode = "off"
            assert layer._instance_cache is None
            layer.mode = "instance"
        got = layer(x)
        layer.cache_instance_weights = False
        want = layer(x)  # drawn now from the current state
    assert torch.equal(got, want)
    if change in ("restore_noise_state", "mode_off"):
        assert torch.equal(got, before)
    elif change == "dtype":
        assert got.dtype == torch.float64 and layer._instance_cache[1].dtype == torch.float64
    else:
        assert not torch.allclose(got.float(), before.float())
