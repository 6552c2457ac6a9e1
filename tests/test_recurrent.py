"""NoisyRNN / NoisyLSTM / NoisyGRU (nft_cuda.nn.recurrent): every weight matrix of every layer and
direction noisy; mode off, noise = ops.perturb for the layer's rng, straight-through gradients vs float64,
noise regenerated in backward, the sample axis, and the issue's mixed model converted completely."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import nft_cuda
from nft_cuda import ops
from nft_cuda.nn import NoisyGRU, NoisyLSTM, NoisyRNN, instance_plans, sample_plan, stacked

V = nft_cuda.Variation(0.3)

CASES = {
    "lstm-2-layers-bidirectional": lambda: nn.LSTM(5, 6, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-proj-seq-first": lambda: nn.LSTM(5, 6, proj_size=3),
    "gru-bidirectional": lambda: nn.GRU(5, 6, bidirectional=True, batch_first=True),
    "rnn-relu-2-layers": lambda: nn.RNN(5, 6, num_layers=2, nonlinearity="relu", batch_first=True),
    "rnn-tanh-no-bias": lambda: nn.RNN(5, 6, bias=False),
}
NOISY = {nn.LSTM: NoisyLSTM, nn.GRU: NoisyGRU, nn.RNN: NoisyRNN}


def _make(case):
    torch.manual_seed(0)
    return CASES[case]()


def _input(module, batch=3, steps=4, dtype=torch.float32):
    shape = (batch, steps, 5) if module.batch_first else (steps, batch, 5)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _oracle(layer, crossbar, x, hx=None):
    plain = nft_cuda.strip(copy.deepcopy(layer))
    return torch.func.functional_call(plain, layer.crossbar_parts(crossbar), (x, hx))


@pytest.mark.parametrize("case", CASES)
def test_mode_off_is_the_digital_module_and_every_matrix_is_a_crossbar(case):
    plain = _make(case)
    keys = list(plain.state_dict())
    x = _input(plain)
    expected = plain(x)
    layer = nft_cuda.convert(plain, V, mode="off", strict=True)
    assert type(layer) is NOISY[type(plain)] and isinstance(layer, type(plain))
    assert list(layer.state_dict()) == keys and layer.weight_ih_l0 is plain.weight_ih_l0
    names = [n for n, p in plain.named_parameters() if p.dim() == 2]
    assert set(layer.crossbar_weight_names()) == set(names)
    summary = nft_cuda.conversion_summary(layer)
    assert not summary.digital and summary.noisy_params == sum(getattr(plain, n).numel() for n in names)
    got = layer(x)
    assert torch.equal(got[0], expected[0])
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.utils._pytree.tree_leaves(got[1]), torch.utils._pytree.tree_leaves(expected[1]))
    )
    stripped = nft_cuda.strip(layer)
    assert type(stripped) is type(plain) and torch.equal(stripped(x)[0], expected[0])


@pytest.mark.parametrize("case", CASES)
def test_instance_noise_is_ops_perturb_of_the_crossbar(case):
    layer = nft_cuda.convert(_make(case), V)
    nft_cuda.set_instance(layer, seed=4, instance=6)
    x = _input(layer)
    rng = torch.tensor([4, 6])
    with torch.no_grad():
        crossbar = ops.perturb(layer.weight, V, rng=rng)[0]
        assert torch.equal(layer.noisy_weight(), crossbar)
        got = layer(x)
        want = _oracle(layer, crossbar, x)
        assert torch.equal(got[0], want[0])
        assert not torch.equal(got[0], _oracle(layer, ops.perturb(layer.weight, V, rng=rng + 1)[0], x)[0])


def test_the_crossbar_is_every_matrix_flattened_in_flat_weights_order():
    layer = NoisyLSTM(5, 6, num_layers=2, bidirectional=True, proj_size=2, variation=V)
    names = layer.crossbar_weight_names()
    assert names == tuple(n for n in layer._flat_weights_names if n.startswith("weight"))
    assert len(names) == 12  # ih, hh, hr × 2 layers × 2 directions
    assert torch.equal(layer.weight, torch.cat([getattr(layer, n).flatten() for n in names]))
    value = torch.randn_like(layer.weight)
    layer.load_crossbar_(value)
    assert torch.equal(layer.weight, value)


@pytest.mark.parametrize("case", ["lstm-2-layers-bidirectional", "gru-bidirectional", "rnn-tanh-no-bias"])
def test_gradients_are_straight_through_against_float64(case):
    layer = nft_cuda.convert(_make(case), V)
    rng = torch.tensor([2, 3])
    layer.set_sample_plan(rng)
    x = _input(layer).requires_grad_()
    out = layer(x)[0]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    out.backward(g)
    with torch.no_grad():
        crossbar64 = ops.perturb(layer.weight, V, rng=rng)[0].double().requires_grad_()
    plain64 = nft_cuda.strip(copy.deepcopy(layer)).double()
    x64 = x.detach().double().requires_grad_()
    params = dict(plain64.named_parameters())
    params.update({n: p for n, p in plain64.named_parameters() if p.dim() == 1})
    parts = layer.crossbar_parts(crossbar64)
    torch.func.functional_call(plain64, {**params, **parts}, (x64,))[0].backward(g.double())
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-4, atol=1e-5)
    grads = layer.crossbar_parts(crossbar64.grad)
    for name in layer.crossbar_weight_names():
        torch.testing.assert_close(getattr(layer, name).grad, grads[name].float(), rtol=1e-4, atol=1e-5)
    for name, p in plain64.named_parameters():
        if p.dim() == 1:
            torch.testing.assert_close(getattr(layer, name).grad, p.grad.float(), rtol=1e-4, atol=1e-5)


def test_backward_redraws_the_noise_instead_of_storing_it():
    layer = NoisyGRU(5, 6, batch_first=True, variation=V)
    rng = torch.tensor([1, 1])
    layer.set_sample_plan(rng)
    noisy = layer.crossbar_parts(layer.noisy_weight(rng))
    saved = []
    x = torch.randn(2, 3, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)[0]
    assert not any(t.shape == w.shape and torch.equal(t, w) for t in saved for w in noisy.values())
    out.sum().backward()
    assert layer.weight_hh_l0.grad is not None and x.grad is not None


class _RowReader(nn.Module):
    """An LSTM classifier reading 8×8 images row by row (the batch axis first)."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = nn.LSTM(8, 6, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        seq = x if self.batch_first else x.transpose(0, 1)
        h0 = torch.zeros(2, x.shape[0], 6)
        out, _ = self.rnn(seq, (h0, h0))
        return self.head(out[:, -1] if self.batch_first else out[-1])


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("draw", [False, True], ids=["plan-rng", "plan-weights"])
def test_sample_axis_chunk_t_is_chip_first_plus_t(batch_first, draw):
    torch.manual_seed(0)
    model = nft_cuda.convert(_RowReader(batch_first), V).eval()
    x = torch.randn(2, 8, 8)
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    with torch.no_grad():
        with sample_plan(model, instance_plans(layers, seed=3, first=10, samples=3, draw=draw), 3):
            folded = model(x.repeat(3, 1, 1))
        for t in range(3):
            nft_cuda.set_instance(model, seed=3, instance=10 + t)
            assert torch.equal(folded[2 * t : 2 * t + 2], model(x)), t


def test_packed_sequences_run_noisy_with_one_sample():
    layer = nft_cuda.convert(nn.LSTM(5, 6, batch_first=True), V)
    nft_cuda.set_instance(layer, seed=0, instance=0)
    x = torch.randn(3, 4, 5)
    packed = pack_padded_sequence(x, torch.tensor([4, 3, 2]), batch_first=True)
    with torch.no_grad():
        out, (h, _) = layer(packed)
        crossbar = layer.noisy_weight()
        _, (h_ref, _) = _oracle(layer, crossbar, packed)
    assert torch.equal(h, h_ref)
    layer.set_sample_plan(torch.tensor([0, 0]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="batched \\(3-D\\) tensor"):
        layer(packed)


def test_instance_mode_is_the_same_chip_on_the_kernel_and_the_pure_pytorch_path(monkeypatch):
    layer = nft_cuda.convert(_make("lstm-2-layers-bidirectional"), V)
    x = _input(layer)
    with torch.no_grad():
        nft_cuda.set_instance(layer, seed=1, instance=2)
        kernel = layer(x)[0]
        monkeypatch.setattr(nft_cuda._ext, "use_kernel", lambda op, device: False)
        pure = layer(x)[0]
        nft_cuda.set_instance(layer, seed=1, instance=3)
        other_chip = layer(x)[0]
    torch.testing.assert_close(kernel, pure, rtol=1e-5, atol=1e-6)
    assert (kernel - other_chip).abs().max() > 100 * (kernel - pure).abs().max()


def test_cell_mode_and_noise_mode_live_side_by_side():
    layer = NoisyRNN(5, 6, nonlinearity="relu", variation=V)
    assert layer.mode == "train" and layer.cell_mode == "RNN_RELU"
    layer.mode = "off"
    assert layer.mode == "off" and layer.cell_mode == "RNN_RELU"
    copied = copy.deepcopy(layer)
    assert copied.mode == "off" and copied.cell_mode == "RNN_RELU"
    assert nft_cuda.strip(layer).mode == "RNN_RELU"
    with pytest.raises(ValueError, match="unknown noise mode"):
        layer.mode = "sometimes"


class _IssueModel(nn.Module):
    """The model of issue 15: Embedding, TransformerEncoderLayer, LSTM, Linear head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        out, _ = self.lstm(self.enc(self.emb(tokens)))
        return self.head(out[:, -1])


def test_the_issue_model_converts_every_weight_matrix_but_the_embedding():
    torch.manual_seed(0)
    model = _IssueModel()
    matrices = {n for n, p in model.named_parameters() if p.dim() >= 2}
    nft_cuda.convert(model, V, strict=True)
    s = nft_cuda.conversion_summary(model)
    assert [w.name for w in s.digital] == ["emb.weight"] and s.digital[0].chosen
    assert {w for layer in s.converted for w in layer.weights} == matrices - {"emb.weight"}
    tokens = torch.randint(0, 20, (2, 5))
    outs = []
    for chip in (0, 1):
        nft_cuda.set_instance(model, seed=0, instance=chip)
        outs.append(model(tokens))
    assert not torch.equal(outs[0], outs[1])


def test_torch_compile_runs_it_eagerly_like_plain_rnns():
    """Dynamo does not trace nn.RNN/LSTM/GRU at all ("Attempted to wrap RNN, GRU, or LSTM", plain modules
    too), so fullgraph=True is impossible; without it the layer runs as a graph break, same results."""
    torch.manual_seed(0)
    layer = NoisyLSTM(5, 6, batch_first=True, variation=V)
    nft_cuda.set_instance(layer, seed=1, instance=2)
    x = torch.randn(2, 3, 5, requires_grad=True)
    compiled = torch.compile(lambda q: layer(q)[0])(x)
    compiled.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    eager = layer(x)[0]
    eager.sum().backward()
    assert torch.equal(compiled, eager) and torch.equal(grad, x.grad)


class _AttentionThenLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        out, _ = self.lstm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(out[:, -1])


@pytest.mark.parametrize("calls", stacked.SAMPLE_AXIS_MODES)
def test_monte_carlo_evaluates_attention_and_recurrent_layers_folded_as_unfolded(calls):
    """Folded equals unfolded: bit for bit with one call per sample ("loop"); with the head's stacked GEMM
    (another CPU GEMM kernel for these tiny shapes) the same predictions and statistics to DESIGN §6."""
    from nft_cuda.eval import monte_carlo

    torch.manual_seed(0)
    model = nft_cuda.convert(_AttentionThenLSTM(), V, strict=True)
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 20, (6, 5), generator=gen), torch.randint(0, 3, (6,), generator=gen)) for _ in range(2)]
    with stacked.sample_axis_calls(calls):
        folded = monte_carlo(model, data, nft_cuda.Variation(0.5), runs=4, seed=0, progress=False, fold=True)[0]
        unfolded = monte_carlo(model, data, nft_cuda.Variation(0.5), runs=4, seed=0, progress=False, fold=False)[0]
    assert folded["ekl"] > 0
    if calls == "loop":
        assert folded == unfolded
        return
    assert folded["per_instance_accuracy"] == unfolded["per_instance_accuracy"]
    for key in ("ekl", "confidence", "accuracy_mean", "accuracy_std"):
        assert folded[key] == pytest.approx(unfolded[key], rel=1e-5, abs=1e-6), key
