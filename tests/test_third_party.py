"""Hugging Face and timm models convert completely by default (nft_cuda.nn.third_party): every weight
matrix becomes noisy except the embeddings, built from configs with random weights (no downloads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda.nn import generic

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")
timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install -e .[test])")
from transformers.pytorch_utils import Conv1D  # noqa: E402

V = nft_cuda.Variation(0.1)
#: Weight-matrix layer types that must not stay digital after a default convert.
PLAIN_MATRIX_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, Conv1D)


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _bert():
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=101
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def _llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=101,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _vit():
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2
    ).eval()


def _digital_matrices(model: nn.Module) -> list[str]:
    """Modules holding a weight matrix that are still of a plain (digital) type."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, PLAIN_MATRIX_TYPES) and not isinstance(m, nft_cuda.nn.NoisyModule)
    ]


@pytest.mark.parametrize("build", [_gpt2, _bert, _llama, _vit], ids=["gpt2", "bert", "llama", "timm-vit"])
def test_default_convert_is_complete(build):
    model = build()
    assert _digital_matrices(model)  # there is something to convert
    nft_cuda.convert(model, V)
    assert _digital_matrices(model) == []
    # What stays digital is the embeddings (and, for the ViT, its tokens and position embedding).
    noisy = {id(layer.weight) for _, layer in nft_cuda.noisy_layers(model)}
    for name, p in model.named_parameters():
        if p.dim() >= 2 and id(p) not in noisy:
            assert any(k in name for k in ("embed", "wte", "wpe", "cls_token", "pos_embed")), name


def test_gpt2_conv1d_is_noisy_and_exact_when_off():
    torch.manual_seed(0)
    model = _gpt2()
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    nft_cuda.convert(model, V)
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    assert sum(isinstance(layer, Conv1D) for layer in layers) == 8  # c_attn, c_proj, c_fc, mlp.c_proj × 2
    with torch.no_grad():
        with nft_cuda.noise_mode(model, "off"):
            assert torch.equal(model(ids).logits, before)  # the same addmm on the same weight
        noisy = model(ids).logits
    assert not torch.allclose(noisy, before)
    nft_cuda.set_instance(model, 0, 1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # one chip, fixed


class _GemmCount(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm")
        return func(*args, **(kwargs or {}))


def test_conv1d_runs_the_linear_function_with_the_generic_paths_chips():
    """The noisy Conv1D: NoisyLinearFn on the [in, out] weight, so a training step is three GEMMs
    (forward, input and weight gradient; the generic checkpointed path re-ran the forward GEMM: four),
    with the same noise, values and gradients as the generic path, a sample axis included."""
    torch.manual_seed(0)
    layer = nft_cuda.convert(nn.Sequential(Conv1D(12, 8)), V)[0]
    x = torch.randn(6, 5, 8)
    rng, sigmas = torch.tensor([3, 9]), torch.tensor([0.1, 0.3, 0.2])

    def step(forward):
        type(layer).forward = forward
        xs = x.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        layer.set_sample_plan(rng, sigmas)
        with _GemmCount() as c:
            out = layer(xs)
            out.square().sum().backward()
        layer.set_sample_plan(None)
        return out.detach(), xs.grad, layer.weight.grad.clone(), layer.bias.grad.clone(), c.count

    own = type(layer).forward
    try:
        generic_run = step(generic._RegisteredNoisy.forward)
        fast_run = step(own)
    finally:
        type(layer).forward = own
    for got, want in zip(fast_run[:4], generic_run[:4]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert fast_run[4] < generic_run[4]
    assert fast_run[4] == 3  # one batched GEMM forward, one batched input gradient, one weight gradient


def test_a_users_registration_wins():
    calls = []

    def mine(module, weight, x):
        calls.append(1)
        return torch.addmm(module.bias, x.reshape(-1, x.size(-1)), weight).view(*x.shape[:-1], module.nf)

    generic.unregister_noisy(Conv1D)
    try:
        nft_cuda.register_noisy(Conv1D, "weight", mine)
        model = nft_cuda.convert(nn.Sequential(Conv1D(4, 3)), V)
        model(torch.randn(2, 3))
        assert calls
    finally:
        generic.unregister_noisy(Conv1D)


class _AllocatedBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every CPU tensor storage an op creates (views excluded) while active."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t._is_view():
                self.bytes += t.untyped_storage().nbytes()
        return out


def test_a_meta_device_llama_converts_and_loads_with_one_copy_of_the_weights():
    """Build on the meta device, convert, then load_state_dict(assign=True): the checkpoint's tensors
    become the weights, so the only copy of the weights is the checkpoint (0 bytes allocated by
    convert + load, measured), and the chips are those of a model converted on the CPU."""
    torch.manual_seed(0)
    cfg = _llama().config
    reference = nft_cuda.convert(transformers.LlamaForCausalLM(cfg).eval(), V)
    checkpoint = reference.state_dict()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    with _AllocatedBytes() as counter:
        nft_cuda.convert(model, V)
        model.load_state_dict(checkpoint, assign=True)
    assert counter.bytes == 0
    assert all(p.data_ptr() == checkpoint[n].data_ptr() for n, p in model.named_parameters())
    # Non-persistent buffers are not in a checkpoint: rebuild them on the device (here, HF's rotary table).
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    for net in (model, reference):
        nft_cuda.set_instance(net, seed=3, instance=1)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_a_bf16_llama_trains_and_its_chip_is_the_fp32_noise_rounded_once():
    """bf16 end to end on CPU: the noise of a bf16 weight is computed in float32 from the weight and
    rounded once to bf16 (docs/conversion.md "Half precision"), so a chip equals the model with its
    weights replaced by perturb(float32 weight).to(bf16); a noise-injection step gives finite bf16
    gradients."""
    torch.manual_seed(0)
    model = nft_cuda.convert(_llama().to(torch.bfloat16), V)
    ids = torch.randint(0, 101, (2, 8))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and grads and all(g.dtype == torch.bfloat16 and g.isfinite().all() for g in grads)
    model.eval()
    nft_cuda.set_instance(model, seed=5, instance=2)
    layers = nft_cuda.noisy_layers(model)
    chip = {name: layer.noisy_weight() for name, layer in layers}
    for name, layer in layers:
        rng = torch.tensor([5, nft_cuda.nn.instance_offset(layer.layer_index, 2)])
        rounded_once = nft_cuda.ops.perturb(layer.weight.detach().float(), V, rng=rng)
        assert torch.equal(chip[name], rounded_once[0].to(torch.bfloat16)), name
    with torch.no_grad():
        noisy = model(ids).logits
        with nft_cuda.noise_mode(model, "off"):
            saved = {name: layer.weight.detach().clone() for name, layer in layers}
            for name, layer in layers:
                layer.weight.copy_(chip[name])
            by_hand = model(ids).logits
            for name, layer in layers:
                layer.weight.copy_(saved[name])
    assert noisy.dtype == torch.bfloat16 and torch.equal(noisy, by_hand)
