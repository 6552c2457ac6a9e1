"""NoisyMultiheadAttention (nft_cuda.nn.attention): mode off, noise = ops.perturb for each layer's rng,
straight-through gradients vs float64, noise regenerated in backward, the sample axis, conversion."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_cuda
from nft_cuda import ops
from nft_cuda.nn import NoisyLinear, NoisyMultiheadAttention, instance_plans, sample_plan, stacked

V = nft_cuda.Variation(0.3)
E, H = 8, 2

CASES = {
    "packed-batch-first": dict(batch_first=True),
    "packed-seq-first": dict(batch_first=False),
    "separate-kv-dims": dict(batch_first=True, kdim=6, vdim=5),
    "bias-kv-zero-attn": dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
}


def _inputs(kw, batch=3, length=4, self_attention=True, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    shape = (batch, length) if kw.get("batch_first") else (length, batch)
    q = torch.randn(*shape, E, generator=gen, dtype=dtype)
    if self_attention and "kdim" not in kw:
        return q, q, q
    k = torch.randn(*shape, kw.get("kdim", E), generator=gen, dtype=dtype)
    v = torch.randn(*shape, kw.get("vdim", E), generator=gen, dtype=dtype)
    return q, k, v


def _mha(kw):
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, H, **kw)


def _noisy_in_proj(layer, rng):
    """The in-projection keyword arguments of F.multi_head_attention_forward, from ops.perturb itself."""
    if layer._qkv_same_embed_dim:
        return {"in_proj_weight": ops.perturb(layer.in_proj_weight, V, rng=rng)[0]}
    flat = torch.cat([layer.q_proj_weight.flatten(), layer.k_proj_weight.flatten(), layer.v_proj_weight.flatten()])
    q, k, v = ops.perturb(flat, V, rng=rng)[0].split([E * E, E * layer.kdim, E * layer.vdim])
    return {
        "in_proj_weight": None,
        "use_separate_proj_weight": True,
        "q_proj_weight": q.view(E, E),
        "k_proj_weight": k.view(E, layer.kdim),
        "v_proj_weight": v.view(E, layer.vdim),
    }


def _oracle(layer, q, k, v, w_in: dict, w_out, **kw):
    """nn.MultiheadAttention's general path with explicit weights."""
    if layer.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out, weights = F.multi_head_attention_forward(
        q,
        k,
        v,
        E,
        H,
        bias_k=layer.bias_k,
        bias_v=layer.bias_v,
        in_proj_bias=layer.in_proj_bias,
        add_zero_attn=layer.add_zero_attn,
        dropout_p=0.0,
        out_proj_weight=w_out,
        out_proj_bias=layer.out_proj.bias,
        training=False,
        **w_in,
        **kw,
    )
    return (out.transpose(0, 1) if layer.batch_first else out), weights


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_mode_off_is_the_digital_module_bit_for_bit(kw):
    plain = _mha(kw)
    keys = list(plain.state_dict())
    q, k, v = _inputs(kw, self_attention=False)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, -1] = True
    expected = plain(q, k, v, key_padding_mask=mask)
    model = nft_cuda.convert(nn.ModuleDict({"attn": plain}), V, mode="off")
    layer = model["attn"]
    assert isinstance(layer, NoisyMultiheadAttention) and isinstance(layer.out_proj, NoisyLinear)
    assert list(layer.state_dict()) == keys and layer.out_proj.weight is plain.out_proj.weight
    got = layer(q, k, v, key_padding_mask=mask)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with torch.no_grad():
        layer.eval()
        plain.eval()
        assert torch.equal(layer(q, k, v)[0], plain(q, k, v)[0])


@pytest.mark.parametrize("kw", CASES.values(), ids=CASES.keys())
def test_instance_noise_is_ops_perturb_of_each_layer(kw):
    model = nft_cuda.convert(nn.ModuleDict({"attn": _mha(kw)}), V)
    layer = model["attn"]
    nft_cuda.set_instance(model, seed=7, instance=5)
    q, k, v = _inputs(kw, self_attention=False)
    # each layer's key comes from its name (noise stream 2; before it, the positions 0 and 1)
    rng_in = torch.tensor([7, (nft_cuda.nn.name_key("attn") << 32) | 5])
    rng_out = torch.tensor([7, (nft_cuda.nn.name_key("attn.out_proj") << 32) | 5])
    with torch.no_grad():
        got = layer(q, k, v)
        w_out = ops.perturb(layer.out_proj.weight, V, rng=rng_out)[0]
        expected = _oracle(layer, q, k, v, _noisy_in_proj(layer, rng_in), w_out)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert torch.equal(layer.noisy_weight(), ops.perturb(layer.weight, V, rng=rng_in)[0])
        assert not torch.equal(got[0], _oracle(layer, q, k, v, _noisy_in_proj(layer, rng_in + 1), w_out)[0])


def test_instance_mode_is_the_same_chip_on_the_kernel_and_the_pure_pytorch_path(monkeypatch):
    kw = dict(batch_first=True)
    model = nft_cuda.convert(nn.ModuleDict({"attn": _mha(kw)}), V)
    nft_cuda.set_instance(model, seed=1, instance=2)
    q, k, v = _inputs(kw)
    with torch.no_grad():
        kernel = model["attn"](q, k, v)[0]
        monkeypatch.setattr(nft_cuda._ext, "use_kernel", lambda op, device: False)
        pure = model["attn"](q, k, v)[0]
        nft_cuda.set_instance(model, seed=1, instance=3)
        other_chip = model["attn"](q, k, v)[0]
    # the kernel and its pure-PyTorch twin round σ_w·z differently in the last bit (test_properties)
    torch.testing.assert_close(kernel, pure, rtol=1e-5, atol=1e-6)
    assert (kernel - other_chip).abs().max() > 100 * (kernel - pure).abs().max()


@pytest.mark.parametrize("kw", [CASES["packed-batch-first"], CASES["separate-kv-dims"]], ids=["packed", "separate"])
def test_gradients_are_straight_through_against_float64(kw):
    model = nft_cuda.convert(nn.ModuleDict({"attn": _mha(kw)}), V)
    layer = model["attn"]
    rng_in, rng_out = torch.tensor([4, 0]), torch.tensor([4, 1 << 32])
    layer.set_sample_plan(rng_in)
    layer.out_proj.set_sample_plan(rng_out)
    q, k, v = (t.requires_grad_() for t in _inputs(kw, self_attention=False))
    g = torch.randn(3, 4, E, generator=torch.Generator().manual_seed(2))
    layer(q, k, v)[0].backward(g)

    with torch.no_grad():
        w_in = {
            n: (t.double().requires_grad_() if t is not None else None)
            if isinstance(t, torch.Tensor) or t is None
            else t
            for n, t in _noisy_in_proj(layer, rng_in).items()
        }
        w_out = ops.perturb(layer.out_proj.weight, V, rng=rng_out)[0].double().requires_grad_()
    ref64 = nn.MultiheadAttention(E, H, batch_first=True, kdim=kw.get("kdim"), vdim=kw.get("vdim"), dtype=torch.float64)
    ref64.load_state_dict(layer.state_dict())
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _oracle(ref64, q64, k64, v64, w_in, w_out)[0].backward(g.double())
    for ours, theirs in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(ours.grad, theirs.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.out_proj.weight.grad, w_out.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.out_proj.bias.grad, ref64.out_proj.bias.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.in_proj_bias.grad, ref64.in_proj_bias.grad.float(), rtol=1e-4, atol=1e-5)
    for name in layer.crossbar_weight_names():
        torch.testing.assert_close(getattr(layer, name).grad, w_in[name].grad.float(), rtol=1e-4, atol=1e-5)


def test_backward_redraws_the_noise_instead_of_storing_it():
    layer = NoisyMultiheadAttention(E, H, batch_first=True, variation=V)
    rng = torch.tensor([8, 8])
    layer.set_sample_plan(rng)
    layer.out_proj.set_sample_plan(rng + 1)
    w_in = layer.noisy_weight(rng)
    w_out = layer.out_proj.noisy_weight(rng + 1)
    saved = []
    q = torch.randn(2, 3, E, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(q, q, q)[0]
    assert not any(t.shape == w.shape and torch.equal(t, w) for t in saved for w in (w_in, w_out))
    out.sum().backward()
    assert q.grad is not None and layer.in_proj_weight.grad is not None


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("calls", stacked.SAMPLE_AXIS_MODES)
@pytest.mark.parametrize("draw", [False, True], ids=["plan-rng", "plan-weights"])
def test_sample_axis_chunk_t_is_chip_first_plus_t(draw, calls):
    """Chunk t of a folded pass is chip first + t: bit for bit with one call per sample ("loop"), to the
    DESIGN §6 tolerances with the head's stacked GEMM (another CPU GEMM kernel for these tiny shapes)."""
    torch.manual_seed(0)
    model = nft_cuda.convert(_Encoder(), V).eval()
    x = torch.randn(2, 4, E)
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    with torch.no_grad():
        with stacked.sample_axis_calls(calls):
            with sample_plan(model, instance_plans(layers, seed=3, first=10, samples=3, draw=draw), 3):
                folded = model(x.repeat(3, 1, 1))
        for t in range(3):
            nft_cuda.set_instance(model, seed=3, instance=10 + t)
            if calls == "loop":
                assert torch.equal(folded[2 * t : 2 * t + 2], model(x)), t
            else:
                torch.testing.assert_close(folded[2 * t : 2 * t + 2], model(x), rtol=1e-5, atol=1e-6, msg=str(t))


def test_transformer_layer_converts_completely_and_chips_differ():
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True))
    nft_cuda.convert(model, V, strict=True)
    s = nft_cuda.conversion_summary(model)
    assert not s.digital and s.noisy_params == 3 * E * E + E * E + 2 * E * 16
    x = torch.randn(2, 4, E)
    outs = []
    for chip in (0, 1):
        nft_cuda.set_instance(model, seed=0, instance=chip)
        outs.append(model(x))  # grad enabled: the encoder layer's fast path is not taken
    with nft_cuda.noise_mode(model, "off"):
        clean = model(x)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], clean)
    nft_cuda.strip(model)
    # strip gives back the very classes convert found (out_proj is torch's nn.Linear subclass)
    assert type(model[0].self_attn) is nn.MultiheadAttention
    assert type(model[0].self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_out_proj_alone_stays_digital_with_the_reason():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H), "fc": nn.Linear(E, 2)})
    nft_cuda.convert(model, V, exclude=["attn"])
    assert [n for n, _ in nft_cuda.noisy_layers(model)] == ["fc"]
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H), "fc": nn.Linear(E, 2)})
    nft_cuda.convert(model, V, include=["attn.out_proj"])
    assert not nft_cuda.noisy_layers(model)
    reason = {w.name: w.reason for w in nft_cuda.conversion_summary(model).digital}["attn.out_proj.weight"]
    assert "read directly by 'attn'" in reason


def test_constructor_with_variation_makes_both_projections_noisy():
    layer = NoisyMultiheadAttention(E, H, batch_first=True, variation=V)
    assert isinstance(layer.out_proj, NoisyLinear) and layer.out_proj.layer_index == 1
    assert [n for n, _ in nft_cuda.noisy_layers(layer)] == ["", "out_proj"]
    plain = NoisyMultiheadAttention(E, H)
    assert plain.mode == "off" and type(plain.out_proj) is not NoisyLinear
    with pytest.raises(TypeError, match="expects an nn.MultiheadAttention"):
        NoisyMultiheadAttention.from_module(nn.Linear(2, 2))
    x = torch.randn(2, 3, E)
    layer.set_sample_plan(torch.tensor([0, 0]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="multiple of 2"):
        layer(x[:1], x[:1], x[:1])


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = NoisyMultiheadAttention(E, H, batch_first=True, variation=V)
    nft_cuda.set_instance(layer, seed=1, instance=2)
    compiled = torch.compile(lambda q: layer(q, q, q)[0], fullgraph=True)
    x = torch.randn(2, 3, E, requires_grad=True)
    compiled(x).sum().backward()
    grads = (x.grad.clone(), layer.in_proj_weight.grad.clone(), layer.out_proj.weight.grad.clone())
    x.grad = None
    layer.zero_grad()
    eager = layer(x, x, x)[0]
    eager.sum().backward()
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, (x.grad, layer.in_proj_weight.grad, layer.out_proj.weight.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_load_crossbar_writes_the_separate_projection_weights():
    layer = NoisyMultiheadAttention(E, H, kdim=6, vdim=5, variation=V)
    value = torch.randn_like(layer.weight)
    layer.load_crossbar_(value)
    assert torch.equal(layer.weight, value)
    assert torch.equal(layer.k_proj_weight.flatten(), value[E * E : E * E + E * 6])
