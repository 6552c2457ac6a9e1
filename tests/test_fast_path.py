"""Noise must reach the output whatever path a module takes: PyTorch's transformer fast paths read the
submodules' weights directly in eval mode without gradients, so convert guards the modules that hold
noisy layers (nft_cuda.conversion.guard_fast_paths)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import assert_chips_differ

import nft_cuda
from nft_cuda.eval import instance_logits, monte_carlo
from nft_cuda.models import MODELS, build_model

VAR = nft_cuda.Variation(0.3)


class _EncoderClassifier(nn.Module):
    """TransformerEncoderLayer(batch_first) + a Linear head: the case that bypassed the noise."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.enc(x if self.batch_first else x.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.dec(x, x)


class _EncoderStack(nn.Module):
    """nn.TransformerEncoder with a padding mask: its own fast path turns the input into a nested tensor."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)

    def forward(self, x):
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, -1] = True
        return self.enc(x, src_key_padding_mask=mask)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_shipped_model_reaches_the_noise(name):
    model = build_model(name, in_channels=1, num_classes=10, input_size=32, width=0.25)
    nft_cuda.convert(model, VAR)
    assert_chips_differ(model, torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize(
    "make",
    [lambda: _EncoderClassifier(True), lambda: _EncoderClassifier(False), _Decoder, _EncoderStack],
    ids=["encoder-batch-first", "encoder-seq-first", "decoder", "encoder-stack-masked"],
)
def test_transformer_layers_reach_the_noise(make):
    torch.manual_seed(0)
    model = nft_cuda.convert(make(), VAR)
    assert_chips_differ(model, torch.randn(4, 5, 16))


def test_guard_is_needed_without_it_the_fast_path_hides_the_noise():
    """The test above can fail: with the guard taken off, the encoder layer's fast path gives chip 0 ==
    chip 1 (if torch ever drops the fast path, this documents that the guard became unnecessary)."""
    torch.manual_seed(0)
    model = nft_cuda.convert(_EncoderClassifier(True), VAR)
    for module in model.modules():  # every guard: the encoder layer's and its attention's
        for handle in nft_cuda.conversion._guards.pop(module, ()):
            handle.remove()
    with pytest.raises(AssertionError, match="identical"):
        assert_chips_differ(model, torch.randn(4, 5, 16))


def test_monte_carlo_on_a_transformer_sees_distinct_chips():
    """Only the encoder layer noisy (the head digital): before the guard, EKL 0 and identical chips."""
    torch.manual_seed(0)
    model = nft_cuda.convert(_EncoderClassifier(True), VAR, exclude=["head"]).eval()
    x, y = torch.randn(32, 5, 16), torch.randint(0, 3, (32,))
    with torch.no_grad():
        logits = instance_logits(model, x, seed=0, instances=range(2))
    assert not torch.equal(logits[0], logits[1])
    (res,) = monte_carlo(model, [(x, y)], VAR, runs=8, seed=0, progress=False)
    assert res["ekl"] > 0
    assert len(set(res["per_instance_accuracy"])) > 1 or res["accuracy_std"] > 0


def test_guard_only_on_converted_modules_and_removed_by_strip():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    )
    nft_cuda.convert(model, VAR, exclude=["1"])
    assert nft_cuda.conversion.guard_fast_paths(model) == ["0", "0.self_attn"]
    assert len(model[0]._forward_pre_hooks) == 1 and not model[1]._forward_pre_hooks
    twin = copy.deepcopy(model)  # the copy's guard works too
    assert_chips_differ(twin, torch.randn(2, 5, 16))
    nft_cuda.strip(model)
    assert not model[0]._forward_pre_hooks and not model[0]._forward_hooks


def test_fast_path_flag_restored_after_forward_and_after_an_error():
    model = nft_cuda.convert(_EncoderClassifier(True), VAR).eval()
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        model(torch.randn(2, 5, 16))
        assert torch.backends.mha.get_fastpath_enabled()
        with pytest.raises((RuntimeError, AssertionError)):
            model(torch.randn(2, 5, 7))  # wrong feature size
    assert torch.backends.mha.get_fastpath_enabled()
