"""What the summary and the model-wide helpers say is what the model is (issue 30 items 3, 4, 5, 8):
summaries built from the model's current state, tied weights counted once, mode "off" exactness,
deep copies, set_time, hints for container tokens, and the meta device."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda.devices import PCM

V, V2 = nft_cuda.Variation(0.1), nft_cuda.Variation(0.2, "RRAM4")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _unique_weight_matrix_elements(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if nft_cuda.nn.summary.is_weight_matrix(n, p))


# --------------------------------------------------------------------------------------------------
# Item 3: the summary is the model as it is
# --------------------------------------------------------------------------------------------------


def test_second_convert_with_exclude_reports_the_still_noisy_layer_and_warns():
    model = nft_cuda.convert(_mlp(), V)
    with pytest.warns(UserWarning, match=r"\['0'\] named by exclude= are already noisy and stay noisy"):
        nft_cuda.convert(model, V2, exclude=["0"])
    s = nft_cuda.conversion_summary(model)
    assert [(c.name, c.variation, c.mode) for c in s.converted] == [("0", V, "train"), ("2", V2, "train")]
    assert not s.digital and s.noisy_params == 4 * 6 + 6 * 3
    assert [k.name for k in s.kept] == ["0"] and "already noisy" in s.kept[0].reason
    assert "RRAM1(σ_d=0.1), mode train" in str(s)


def test_second_convert_with_include_is_silent_and_reports_every_noisy_layer():
    model = nft_cuda.convert(_mlp(), V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nft_cuda.convert(model, V2, include=["2"])
    s = nft_cuda.conversion_summary(model)
    assert [(c.name, c.original_type, c.variation) for c in s.converted] == [("0", "Linear", V), ("2", "Linear", V2)]
    assert not s.digital and [k.name for k in s.kept] == ["0"]


def test_second_convert_in_mode_off_says_which_layers_kept_their_mode():
    model = nft_cuda.convert(_mlp(), V)
    with pytest.warns(UserWarning, match=r"\['0', '2'\] were already noisy and keep their noise mode, not 'off'"):
        nft_cuda.convert(model, V2, mode="off")
    s = nft_cuda.conversion_summary(model)
    assert [c.mode for c in s.converted] == ["train", "train"] and [k.name for k in s.kept] == ["0", "2"]
    nft_cuda.set_noise_mode(model, "off")  # the summary follows the model, not the last convert
    assert [c.mode for c in nft_cuda.conversion_summary(model).converted] == ["off", "off"]


def test_summary_of_a_deep_copy_and_of_a_model_built_noisy():
    model = nft_cuda.convert(_mlp(), V, exclude=["2"])
    clone = copy.deepcopy(model)
    assert nft_cuda.conversion_summary(clone) == nft_cuda.conversion_summary(model)
    assert nft_cuda.conversion_summary(clone).digital[0].reason == "excluded by the user (exclude=)"
    built = nn.Sequential(nft_cuda.NoisyLinear(3, 3, variation=V), nn.Linear(3, 2))  # never converted
    s = nft_cuda.conversion_summary(built)
    assert [c.name for c in s.converted] == ["0"] and s.digital[0].name == "1.weight" and not s.digital[0].chosen


# --------------------------------------------------------------------------------------------------
# Item 4: tied weights
# --------------------------------------------------------------------------------------------------


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, tokens):
        return self.head(self.mid(self.emb(tokens)))


def test_a_tied_embedding_and_head_is_counted_once():
    model = nft_cuda.convert(_TiedLM(), V)
    s = nft_cuda.conversion_summary(model)
    assert s.noisy_params + s.digital_params == _unique_weight_matrix_elements(model) == 40 + 16
    assert s.noisy_params == 56 and not s.digital  # the tie is noisy where the head reads it
    assert [(t.names, t.noisy) for t in s.tied] == [(("emb.weight", "head.weight"), True)]
    assert "read digitally by emb" in s.tied[0].reason and "100.0%" in str(s)
    both = nft_cuda.conversion_summary(nft_cuda.convert(_TiedLM(), V, embeddings=True))
    assert both.noisy_params == 56 and "noisy in emb, head" in both.tied[0].reason


def test_gpt2_tied_wte_and_lm_head_counted_once():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    nft_cuda.convert(model, V)
    s = nft_cuda.conversion_summary(model)
    assert s.noisy_params + s.digital_params == _unique_weight_matrix_elements(model)
    # lm_head (and whatever else is noisy) once; the tied wte is not counted again as digital
    assert s.noisy_params == sum(c.params for c in s.converted) and "lm_head" in [c.name for c in s.converted]
    assert [t.names for t in s.tied] == [("transformer.wte.weight", "lm_head.weight")]
    assert "transformer.wte.weight" not in {w.name for w in s.digital}


# --------------------------------------------------------------------------------------------------
# Item 5: mode "off" — the layer bit for bit, guarded transformers within 1e-6, strip exact
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Linear(8, 5), (4, 8)),
        (lambda: nn.Conv2d(2, 3, 3), (4, 2, 6, 6)),
        (lambda: nn.Conv1d(2, 3, 3), (4, 2, 8)),
    ],
    ids=["linear", "conv2d", "conv1d"],
)
def test_mode_off_layer_is_its_digital_twin_bit_for_bit(make, shape):
    torch.manual_seed(0)
    plain, x = make(), torch.randn(shape)
    clean = plain(x)
    noisy = nft_cuda.convert(plain, V, mode="off")
    assert type(noisy) is not type(plain) and torch.equal(noisy(x), clean)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(160, 3))


def test_mode_off_guarded_transformer_within_1e_6_and_strip_exact(one_thread):
    model = _encoder().eval()
    x = torch.randn(8, 5, 32)
    with torch.no_grad():
        fast = model(x)  # eval + no_grad: PyTorch's fused fast path
    with_grad = model(x).detach()  # the module-calling path
    nft_cuda.convert(model, V, mode="off")
    with torch.no_grad():
        off = model(x)  # guarded: the module-calling path, so rounding differs from the fast path
    assert (off - fast).abs().max() <= 1e-6
    assert torch.equal(model(x).detach(), with_grad)  # the same path: bit for bit
    nft_cuda.strip(model)
    with torch.no_grad():
        assert torch.equal(model(x), fast)


def test_docs_say_what_mode_off_keeps_exactly():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "conversion.md").read_text(encoding="utf-8")
    assert "bit for bit" in text and "within 1e-6" in text and "test_mode_off_guarded_transformer" in text


# --------------------------------------------------------------------------------------------------
# Item 8: set_time, container tokens, the meta device
# --------------------------------------------------------------------------------------------------


def test_set_time_replaces_the_device_model_of_every_timed_layer():
    pcm = PCM(1.0)
    model = nft_cuda.convert(_mlp(), pcm, per_layer={"2": V})
    assert nft_cuda.set_time(model, 3600.0) is model
    assert model[0].variation == pcm.at_time(3600.0) and model[0].variation.time == 3600.0
    assert model[2].variation == V  # time-independent: left as it is
    with pytest.raises(ValueError, match="time t"):
        nft_cuda.set_time(model, -1.0)
    with pytest.raises(ValueError, match=r"no noisy layer .* time-dependent device model.*\['Variation'\]"):
        nft_cuda.set_time(nft_cuda.convert(_mlp(), V), 10.0)


class _TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed)


def test_container_tokens_get_an_exclude_hint():
    with pytest.raises(ValueError) as err:
        nft_cuda.convert(_TinyViT(), V, strict=True)
    msg = str(err.value)
    assert "cls_token [1, 1, 8]: a parameter of _TinyViT itself" in msg and "class or position token" in msg
    assert "exclude=['cls_token', 'pos_embed']" in msg and "register it with" not in msg
    model = nft_cuda.convert(_TinyViT(), V, strict=True, exclude=["cls_token", "pos_embed"])
    assert all(w.chosen for w in nft_cuda.conversion_summary(model).digital)


def test_noisy_layer_on_the_meta_device_says_to_materialise():
    layer = nft_cuda.convert(nn.Linear(4, 3, device="meta"), V)
    with pytest.raises(RuntimeError, match=r"meta device .*to_empty"):
        layer(torch.randn(2, 4, device="meta"))
    nft_cuda.set_noise_mode(layer, "off")
    assert layer(torch.randn(2, 4, device="meta")).shape == (2, 3)  # shapes only: works
