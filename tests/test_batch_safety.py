"""Batch safety of the sample axis (nft_cuda.nn.sample_axis.batch_blockers): modules that act across the
batch axis are found by their arguments or by the runtime probe, and OVF / Monte-Carlo then run
sequentially, giving exactly the sequential result (issue 30 item 1)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import nft_cuda
from nft_cuda.eval import monte_carlo
from nft_cuda.nn.sample_axis import batch_blockers, modules_to_probe, unbatchable_modules
from nft_cuda.train.methods import OVF

V = nft_cuda.Variation(0.1)


class _Centre(nn.Module):
    """A container whose own forward centres over the batch axis."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        h = self.fc(x)
        return h - h.mean(0)


class _PerRow(nn.Module):
    """A container whose own forward acts on each row: a residual connection."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


def _net(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nft_cuda.convert(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), middle, nn.Linear(6, 3)), V)


def _ovf_loss(model, batched: bool, x, y):
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loss, _ = OVF(V, batched=batched).loss(model, x, y)
    return loss


@pytest.mark.parametrize(
    ("module", "verdict"),
    [
        (nn.Softmax(dim=0), "block"),
        (nn.LogSoftmax(dim=0), "block"),
        (nn.Softmin(dim=0), "block"),
        (nn.Softmax(dim=None), "block"),  # the legacy implicit dim is 0 for 1-D and 3-D inputs
        (nn.Flatten(0), "block"),
        (nn.Unflatten(0, (2, 1)), "block"),
        (nn.Softmax(dim=-1), "probe"),  # dim 0 of a 1-D input
        (nn.Softmax2d(), "probe"),
        (nn.Softmax(dim=1), "safe"),
        (nn.Flatten(), "safe"),
    ],
)
def test_dim_arguments_decide(module, verdict):
    model = nn.Sequential(nn.Linear(2, 2), module)
    assert (unbatchable_modules(model) == ["1"]) is (verdict == "block")
    assert ("1" in modules_to_probe(model)) is (verdict == "probe")


def test_ovf_with_softmax_over_dim_0_equals_sequential(one_thread):
    model = _net(nn.Softmax(dim=0))
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    # The values first (on main the batched loss differs), then the one warning saying why.
    torch.testing.assert_close(_ovf_loss(model, True, x, y), _ovf_loss(model, False, x, y), rtol=0, atol=0)
    with pytest.warns(RuntimeWarning, match=r"'2': Softmax\(dim=0\) acts across the batch axis"):
        OVF(V).loss(model, x, y)


def test_a_container_centring_over_the_batch_is_caught_by_the_probe(one_thread):
    model = _net(_Centre())
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(_ovf_loss(model, True, x, y), _ovf_loss(model, False, x, y), rtol=0, atol=0)
    assert unbatchable_modules(model) == [] and "2" in modules_to_probe(model)
    method = OVF(V)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            method.loss(model, x, y)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "'2' (_Centre has its own forward)" in msgs[0] and "mixes the rows" in msgs[0]


def test_the_probe_passes_per_row_containers_restores_state_and_is_cached(one_thread):
    torch.manual_seed(0)
    model = nft_cuda.convert(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), _PerRow(), nn.Linear(6, 3)), V)
    x = torch.randn(4, 5)
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    plans = nft_cuda.nn.instance_plans(layers, seed=1, first=0, samples=3)
    bn = model[1]
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    rng_before = torch.get_rng_state()
    assert batch_blockers(model, x, plans, 3) == []
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert torch.equal(torch.get_rng_state(), rng_before)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    assert batch_blockers(model, x, plans, 3) == [] and not calls  # cached: no second probe

    class _Declared(_Centre):
        nft_acts_per_row = False

    assert unbatchable_modules(nn.Sequential(_Declared())) == ["0"]
    trusted = _Centre()
    trusted.nft_acts_per_row = True  # the user vouches for it (wrongly here): no probe
    assert modules_to_probe(nn.Sequential(trusted)) == []


def test_the_probe_catches_a_sequence_first_model(one_thread):
    """A seq-first attention fed [T, B, E] would get its samples on the time axis: not batch-safe."""
    torch.manual_seed(0)
    model = nft_cuda.convert(nn.Sequential(nn.MultiheadAttention(4, 2)), V)

    class _SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = model[0]

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    net = _SelfAttention()
    x = torch.randn(3, 4, 4)  # [T, B, E]
    plans = nft_cuda.nn.instance_plans([l for _, l in nft_cuda.noisy_layers(net)], seed=1, first=0, samples=2)
    assert batch_blockers(net, x, plans, 2)


def test_monte_carlo_fold_with_softmax_over_dim_0_equals_unfolded(one_thread):
    torch.manual_seed(0)
    model = _net(nn.Softmax(dim=0))
    x = torch.randn(12, 5)
    loader = [(x[:6], torch.arange(6) % 3), (x[6:], torch.arange(6) % 3)]
    kw = dict(seed=3, instances_per_pass=4, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = monte_carlo(model, loader, V, 8, fold=True, **kw)
    unfolded = monte_carlo(model, loader, V, 8, fold=False, **kw)
    assert folded[0]["per_instance_accuracy"] == unfolded[0]["per_instance_accuracy"]
    assert folded == unfolded  # EKL and confidence too
    assert any(
        "one instance at a time" in str(w.message) and "one instance at a time" in str(w.message) for w in caught
    )


def test_monte_carlo_fold_with_a_centring_container_equals_unfolded(one_thread):
    model = _net(_Centre())
    x = torch.randn(12, 5)
    loader = [(x[:6], torch.arange(6) % 3), (x[6:], torch.arange(6) % 3)]
    kw = dict(seed=3, instances_per_pass=4, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = monte_carlo(model, loader, V, 8, fold=True, **kw)
    unfolded = monte_carlo(model, loader, V, 8, fold=False, **kw)
    assert folded[0]["per_instance_accuracy"] == unfolded[0]["per_instance_accuracy"]
    assert folded == unfolded  # EKL and confidence too
    assert any("one instance at a time" in str(w.message) and "mixes the rows" in str(w.message) for w in caught)


def test_monte_carlo_folds_a_per_row_container_silently(one_thread):
    model = _net(_PerRow())
    x = torch.randn(12, 5)
    loader = [(x[:6], torch.arange(6) % 3), (x[6:], torch.arange(6) % 3)]
    kw = dict(seed=3, instances_per_pass=4, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = monte_carlo(model, loader, V, 8, fold=True, **kw)
    unfolded = monte_carlo(model, loader, V, 8, fold=False, **kw)
    assert folded[0]["per_instance_accuracy"] == unfolded[0]["per_instance_accuracy"]


def test_instance_logits_of_a_row_mixing_model_equal_set_instance(one_thread):
    model = _net(_Centre()).eval()
    x = torch.randn(6, 5)
    with pytest.warns(UserWarning, match="one instance at a time"):
        both = nft_cuda.eval.instance_logits(model, x, seed=3, instances=range(2, 4))
    with torch.no_grad():
        for t in range(2):
            nft_cuda.set_instance(model, seed=3, instance=2 + t)
            torch.testing.assert_close(both[t], model(x), rtol=1e-5, atol=1e-6)
