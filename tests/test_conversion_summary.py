"""convert reports what it did (nft_cuda.conversion_summary), strict mode, embeddings and subclasses."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda.nn import NoisyEmbedding, NoisyLinear

V = nft_cuda.Variation(0.1)


class _Transposed(nn.Module):
    """A linear layer storing its weight transposed: unknown to the library."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_in, n_out))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.w + self.b


class _OwnForwardLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.custom = _Transposed(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.custom(self.norm(self.emb(tokens))).mean(1))


def test_summary_lists_converted_layers_and_digital_weights_with_reasons():
    model = nft_cuda.convert(_Model(), V)
    s = nft_cuda.conversion_summary(model)
    assert isinstance(s, nft_cuda.ConversionSummary)
    assert [(c.name, c.original_type, c.noisy_type, c.weights, c.params) for c in s.converted] == [
        ("head", "Linear", "NoisyLinear", ("head.weight",), 24)
    ]
    digital = {w.name: w for w in s.digital}
    assert set(digital) == {"emb.weight", "custom.w"}
    assert "embeddings stay digital by default" in digital["emb.weight"].reason and digital["emb.weight"].chosen
    assert "unsupported type _Transposed" in digital["custom.w"].reason and not digital["custom.w"].chosen
    assert s.noisy_params == 24 and s.digital_params == 80 + 64
    assert s.other_params == 8 + 8 + 8 + 3  # LayerNorm weight+bias, custom.b, head.bias
    text = str(s)
    assert "1 noisy layer," in text and "head.weight (24)" in text and "custom.w [8, 8] (64)" in text
    assert [w.name for w in s.unexpected] == ["custom.w"]


def test_strict_raises_listing_every_gap_and_changes_nothing():
    model = _Model()
    with pytest.raises(ValueError, match=r"(?s)would stay digital.*custom\.w \[8, 8\]: unsupported type") as err:
        nft_cuda.convert(model, V, strict=True)
    assert "emb.weight" not in str(err.value)  # a documented default, not a gap
    assert type(model.head) is nn.Linear  # nothing converted
    nft_cuda.convert(model, V, strict=True, exclude=["custom"])  # excluding it is a choice
    s = nft_cuda.conversion_summary(model)
    assert [(w.name, w.reason, w.chosen) for w in s.digital if w.name == "custom.w"] == [
        ("custom.w", "excluded by the user (exclude=)", True)
    ]


def test_exclude_may_name_a_weight_and_unknown_patterns_still_raise():
    model = _Model()
    nft_cuda.convert(model, V, strict=True, exclude=["custom.w"])
    assert {w.name: w.chosen for w in nft_cuda.conversion_summary(model).digital}["custom.w"]
    with pytest.raises(ValueError, match="exclude 'nope' match no convertible layer"):
        nft_cuda.convert(_Model(), V, exclude=["nope"])


def test_embeddings_option_makes_them_noisy():
    torch.manual_seed(0)
    model = _Model()
    tokens = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        clean = model(tokens)
    nft_cuda.convert(model, V, embeddings=True, exclude=["custom"])
    assert isinstance(model.emb, NoisyEmbedding) and isinstance(model.emb, nn.Embedding)
    assert [c.name for c in nft_cuda.conversion_summary(model).converted] == ["emb", "head"]
    with torch.no_grad(), nft_cuda.noise_mode(model, "off"):
        assert torch.equal(model(tokens), clean)
    nft_cuda.set_instance(model, seed=3, instance=1)
    with torch.no_grad():
        ell = nft_cuda.nn.name_key("emb")  # its key from its name (noise stream 2; was position 0)
        rng = torch.tensor([3, (ell << 32) | 1], dtype=torch.int64)  # instance 1
        expected = nn.functional.embedding(tokens, nft_cuda.ops.perturb(model.emb.weight, V, rng=rng)[0])
        assert torch.equal(model.emb(tokens), expected)
    nft_cuda.strip(model)
    assert type(model.emb) is nn.Embedding and not hasattr(model.emb, "_variation")
    with pytest.raises(LookupError, match="convert"):
        nft_cuda.conversion_summary(model)


def test_linear_subclasses_convert_when_they_keep_linear_forward():
    mha = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict({"proj": mha.out_proj, "own": _OwnForwardLinear(4, 4)})
    assert type(model["proj"]) is not nn.Linear
    nft_cuda.convert(model, V)
    assert isinstance(model["proj"], NoisyLinear) and model["proj"].weight is mha.out_proj.weight
    digital = {w.name: w for w in nft_cuda.conversion_summary(model).digital}
    assert (
        "own.weight" in digital
        and "_OwnForwardLinear subclasses nn.Linear with its own forward" in digital["own.weight"].reason
        and not digital["own.weight"].chosen
    )


def test_convert_flags_are_checked():
    with pytest.raises(TypeError, match="strict must be a bool"):
        nft_cuda.convert(_Model(), V, strict=1)
    with pytest.raises(TypeError, match="embeddings must be a bool"):
        nft_cuda.convert(_Model(), V, embeddings="yes")
