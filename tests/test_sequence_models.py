"""Sequence models (issue 15): the ViT and LSTM of nft_cuda.models, IRS taps on token sequences, and
NoisyLinear on [..., features] inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_cuda
from nft_cuda import Variation, noise_mode
from nft_cuda.models import IRS_TAPS, LSTMClassifier, ViT, build_model
from nft_cuda.nn import linear
from nft_cuda.train import IRSModel, build_method
from nft_cuda.train.irs import IRSHead, snapshot

V = Variation(0.2)

pytestmark = pytest.mark.usefixtures("one_thread")  # fast on a shared 2-core machine


# --------------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "lstm"])
def test_models_classify_padded_mnist_images_and_refuse_other_shapes(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, num_classes=10, input_size=32)
    assert model(torch.randn(3, 1, 32, 32)).shape == (3, 10)
    for bad in (torch.randn(3, 3, 32, 32), torch.randn(3, 1, 28, 28), torch.randn(3, 32, 32)):
        with pytest.raises(ValueError, match=r"takes images \[B, 1, 32, 32\]"):
            model(bad)


def test_model_constructor_errors():
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        ViT(input_size=30)
    with pytest.raises(ValueError, match="reads 28×28 images"):
        LSTMClassifier(input_size=24)


def test_lstm_reads_the_central_28x28_image_row_by_row():
    torch.manual_seed(0)
    model = LSTMClassifier()
    x = torch.randn(2, 1, 32, 32)
    seen = []
    model.lstm.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(x)
    assert torch.equal(seen[0], x[:, 0, 2:30, 2:30])  # step i = row i of the unpadded image
    moved = x.clone()
    moved[:, :, :2] = 7.0  # the padding is not read
    assert torch.equal(model(moved), model(x))


def test_vit_converts_every_weight_matrix_but_the_position_embedding():
    model = nft_cuda.convert(ViT(), V)
    s = nft_cuda.conversion_summary(model)
    assert [w.name for w in s.digital] == ["pos_embed"]
    # patch embedding + 4 blocks × (in_proj, out_proj, two MLP Linears) + head
    assert len(s.converted) == 18
    lstm = nft_cuda.convert(LSTMClassifier(), V, strict=True)
    assert not nft_cuda.conversion_summary(lstm).digital


@pytest.mark.parametrize("name", ["vit", "lstm"])
def test_models_run_a_sample_axis_like_sequential_forwards(name):
    """OVF batches its forwards and Monte-Carlo folds chips: both models act on each row alone."""
    torch.manual_seed(0)
    model = nft_cuda.convert(build_model(name, in_channels=1, num_classes=10), V).eval()
    assert nft_cuda.nn.unbatchable_modules(model) == []
    x = torch.randn(4, 1, 32, 32)
    noisy = [layer for _, layer in nft_cuda.noisy_layers(model)]
    plans = nft_cuda.nn.instance_plans(noisy, seed=3, first=5, samples=2)
    with torch.no_grad():
        with nft_cuda.nn.sample_plan(model, plans, 2):
            both = model(torch.cat([x, x]))
        for t in range(2):
            nft_cuda.set_instance(model, seed=3, instance=5 + t)
            torch.testing.assert_close(both[4 * t : 4 * t + 4], model(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# IRS on token sequences
# --------------------------------------------------------------------------------------------------


def test_snapshot_of_a_token_sequence_pools_over_tokens():
    act = torch.randn(2, 10, 6)  # [B, T, C]
    assert torch.allclose(snapshot(act, 1), act.mean(dim=1), atol=1e-6)  # p = 1: the token mean
    pooled = snapshot(act, 3)
    assert pooled.shape == (2, 6 * 3)
    # C-major as for feature maps: index c·p + i holds channel c's i-th window (tokens ⌊10i/3⌋ … ⌈10(i+1)/3⌉)
    windows = [(0, 4), (3, 7), (6, 10)]
    want = torch.stack([act[:, a:b].mean(dim=1) for a, b in windows], dim=2).flatten(1)
    torch.testing.assert_close(pooled, want)
    maps = torch.randn(2, 3, 8, 8)
    assert torch.equal(snapshot(maps, 2), torch.flatten(F.adaptive_avg_pool2d(maps, 2), 1))


def test_irs_head_on_tokens_is_pool_then_the_noisy_layers():
    torch.manual_seed(0)
    head = IRSHead(channels=6, pool=2, num_classes=4, variation=V, hidden=16, spatial_dims=1)
    assert head.fc1.in_features == 12
    act = torch.randn(3, 5, 6)
    torch.manual_seed(1)
    out = head(act)
    torch.manual_seed(1)  # the two draws head(act) made: fc1's, then fc2's
    rngs = [head.fc1.forward_noise().rng, head.fc2.forward_noise().rng]
    hidden = F.linear(snapshot(act, 2), head.fc1.noisy_weight(rngs[0]), head.fc1.bias)
    want = F.linear(F.relu(hidden), head.fc2.noisy_weight(rngs[1]), head.fc2.bias)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="spatial_dims must be 1"):
        IRSHead(6, 2, 4, V, spatial_dims=3)


@pytest.mark.parametrize("name", ["vit", "lstm"])
def test_irs_model_taps_token_sequences_and_tuple_outputs(name):
    torch.manual_seed(0)
    x = torch.randn(3, 1, 32, 32)
    method = build_method("irs", V, model_name=name, dataset="embedded")
    model = method.prepare(build_model(name, in_channels=1, num_classes=10), x, num_classes=10)
    assert isinstance(model, IRSModel) and model.order == list(IRS_TAPS[name])
    modules = dict(model.backbone.named_modules())
    seen = {}
    for tap in IRS_TAPS[name]:
        modules[tap].register_forward_hook(lambda m, i, o, tap=tap: seen.__setitem__(tap, o))
        head = model.heads[tap.replace(".", "__")]
        width = model.backbone.head.in_features
        assert head.fc1.in_features == width * IRS_TAPS[name][tap]
    model.eval()
    with noise_mode(model, "off"):
        logits, heads = model(x)
        assert torch.equal(logits, model.backbone(x))
        for tap, out in zip(IRS_TAPS[name], heads):
            seq = seen[tap][0] if isinstance(seen[tap], tuple) else seen[tap]
            assert seq.dim() == 3 and seq.shape[0] == 3
            assert torch.equal(out, model.heads[tap.replace(".", "__")](seq))
    model.train()
    loss, _ = method.loss(model, x, torch.tensor([1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())


def test_irs_tap_of_the_wrong_shape_is_a_clear_error():
    model = build_model("vit", in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match=r"IRS tap 'head' outputs shape \[1, 10\] .* \[B, T, C\]"):
        IRSModel(model, {"head": 1}, 10, V, torch.randn(2, 1, 32, 32))
    lstm = nn.LSTM(32, 8)  # batch_first=False: outputs [T, B, H], not a batch-first sequence

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            return self.lstm(x[:, 0].transpose(0, 1))[0][-1]

    with pytest.raises(ValueError, match=r"outputs shape \[32, 1, 8\] for one input image"):
        IRSModel(SeqFirst(), {"lstm": 2}, 10, V, torch.randn(2, 1, 32, 32))


# --------------------------------------------------------------------------------------------------
# NoisyLinear on [..., features]
# --------------------------------------------------------------------------------------------------


def _saved_shapes(fn, params) -> list[tuple[int, ...]]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    out.sum().backward()
    ptrs = {p.data_ptr() for p in params}
    return [tuple(t.shape) for t in saved if t.data_ptr() not in ptrs]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-op", "layer-function"])
@pytest.mark.parametrize("samples", [1, 2])
def test_noisy_linear_on_token_sequences_equals_the_2d_call(fused, samples, monkeypatch):
    """[B, T, C] in → one GEMM with M = B·T rows: exactly the reshape-to-2-D result, in both NoisyLinear
    paths (the fused ops.noisy_linear path, forced here on CPU, and the autograd Function), with the
    noise regenerated in backward (no weight-sized tensor saved)."""
    if fused:
        monkeypatch.setattr(linear, "_fused_linear_ok", lambda *a: True)
    torch.manual_seed(0)
    layer = nft_cuda.NoisyLinear(24, 40, variation=V)
    x = torch.randn(2 * samples, 7, 24, requires_grad=True)
    rng = torch.tensor([5, 9])
    sigmas = torch.tensor([0.2, 0.3][:samples])

    def run(inp):
        layer.set_sample_plan(rng, sigmas)
        try:
            return layer(inp)
        finally:
            layer.set_sample_plan(None)

    out = run(x)
    flat = run(x.reshape(-1, 24)).reshape(2 * samples, 7, 40)
    assert torch.equal(out, flat)
    g = torch.randn_like(out)
    (gx3,) = torch.autograd.grad(out, x, g)
    (gx2,) = torch.autograd.grad(flat, x, g)
    assert torch.equal(gx3, gx2)
    w = nft_cuda.ops.perturb(layer.weight, V, rng=rng, samples=samples, sigmas=sigmas)
    want = torch.cat([F.linear(c, wt, layer.bias) for c, wt in zip(x.detach().chunk(samples), w)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    shapes = _saved_shapes(lambda: run(x), [layer.weight])
    assert all(math.prod(s) < layer.weight.numel() for s in shapes), shapes


def test_fused_linear_rows_count_every_leading_dim(monkeypatch):
    """The fused path's row limit (FUSED_LINEAR_MAX_ROWS per sample) counts M = all leading dims."""
    if not torch.cuda.is_available():
        pytest.skip("the fused NoisyLinear path is CUDA-only")
    monkeypatch.setattr(linear, "FUSED_LINEAR_ENABLED", True)
    w = torch.randn(8, 16, device="cuda")
    limit = linear.FUSED_LINEAR_MAX_ROWS
    assert linear._fused_linear_ok(torch.randn(limit // 8, 8, 16, device="cuda"), w, 1, torch.bfloat16, V)
    assert not linear._fused_linear_ok(torch.randn(limit // 8 + 1, 8, 16, device="cuda"), w, 1, torch.bfloat16, V)
