"""The sample axis in one call (nft_cuda.nn.stacked): S chips of a layer run as one batched GEMM or one
grouped convolution, give the loop's values and gradients (DESIGN §6 tolerances), and a Monte-Carlo pass
costs one GEMM/conv call per layer per batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import nft_cuda
from nft_cuda.eval import TensorBatches, monte_carlo
from nft_cuda.nn import instance_plans, sample_plan, stacked

V = nft_cuda.Variation(0.3, "RRAM1")
TOL = dict(rtol=1e-5, atol=1e-6)
GEMM_CONV = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}


class _CountCalls(TorchDispatchMode):
    """Counts the aten GEMM / convolution calls made inside the block, by op name."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in GEMM_CONV:
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _both_modes(fn):
    """fn() under "loop" and under "stacked" (every layer stacked, conv too): (loop, stacked) results."""
    out = {}
    for mode in ("loop", "stacked"):
        with stacked.sample_axis_calls(mode):
            out[mode] = fn()
    return out["loop"], out["stacked"]


def _plan_forward_backward(layer, x, samples, draw):
    """Output and input gradient of a sample-plan pass of S = ``samples`` chips of ``layer``."""
    layer.zero_grad(set_to_none=True)
    xs = x.repeat(samples, *([1] * (x.dim() - 1))).requires_grad_()
    plans = instance_plans([layer], seed=5, first=2, samples=samples, draw=draw)
    with sample_plan(layer, plans, samples):
        out = layer(xs)
    out.square().sum().backward()
    grad_w = None if layer.weight.grad is None else layer.weight.grad.clone()
    return out.detach(), xs.grad, grad_w


def _check_same(layer, x, samples=4, draw=False):
    (lo, lgx, lgw), (so, sgx, sgw) = _both_modes(lambda: _plan_forward_backward(layer, x, samples, draw))
    torch.testing.assert_close(so, lo, **TOL)
    torch.testing.assert_close(sgx, lgx, **TOL)
    if lgw is not None:
        # the weight gradient sums g·x over every row: rounding relative to its scale (thread counts vary)
        torch.testing.assert_close(sgw, lgw, rtol=1e-5, atol=1e-5 * float(lgw.abs().max()) + 1e-6)
    chunks = so.chunk(samples)
    assert not torch.equal(chunks[0], chunks[1])  # the chips differ: chunk t really used weight t


@pytest.mark.parametrize("draw", [False, True], ids=["plan-rng", "plan-weights"])
@pytest.mark.parametrize("shape", [(6, 20), (3, 5, 20)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_stacked_equals_loop(draw, shape, bias, device):
    torch.manual_seed(0)
    layer = nft_cuda.convert(nn.Linear(20, 7, bias=bias), V).to(device)
    _check_same(layer, torch.randn(*shape, device=device), draw=draw)


CONVS = {
    "conv2d": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "conv2d-groups-stride-dilation": lambda: nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2),
    "conv2d-reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "conv2d-same-nobias": lambda: nn.Conv2d(4, 6, (3, 1), padding="same", bias=False),
    "conv1d-circular": lambda: nn.Conv1d(4, 6, 5, padding=2, padding_mode="circular"),
}


@pytest.mark.parametrize("draw", [False, True], ids=["plan-rng", "plan-weights"])
@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_stacked_equals_loop(kind, draw, device):
    torch.manual_seed(0)
    layer = nft_cuda.convert(CONVS[kind](), V).to(device)
    spatial = (9,) if kind.startswith("conv1d") else (9, 8)
    _check_same(layer, torch.randn(3, 4, *spatial, device=device), draw=draw)


def test_bf16_autocast_stacked_equals_loop():
    torch.manual_seed(0)
    model = nft_cuda.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 5)), V)
    x = torch.randn(2, 3, 8, 8).repeat(4, 1, 1, 1)
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with sample_plan(model, instance_plans(layers, seed=1, first=0, samples=4, draw=True), 4):
                return model(x)

    loop, stack = _both_modes(run)
    assert stack.dtype == loop.dtype == torch.bfloat16
    torch.testing.assert_close(stack.float(), loop.float(), rtol=2e-2, atol=2e-2)


def _small_model():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)
    )
    return nft_cuda.convert(m, V)


def test_one_call_per_layer_for_s_chips():
    model = _small_model()
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    x = torch.randn(3, 1, 8, 8).repeat(8, 1, 1, 1)
    counts = {}
    for mode in ("loop", "stacked"):
        plans = instance_plans(layers, seed=0, first=0, samples=8, draw=True)
        with stacked.sample_axis_calls(mode), torch.no_grad(), sample_plan(model, plans, 8), _CountCalls() as c:
            model(x)
        counts[mode] = c
    assert counts["stacked"].total == len(layers) == 3
    assert counts["loop"].total == 8 * len(layers)
    assert counts["stacked"].calls == {"convolution": 2, "baddbmm": 1}


def test_auto_stacks_gemms_everywhere_and_convolutions_on_cuda(device):
    model = _small_model().to(device)
    layers = [layer for _, layer in nft_cuda.noisy_layers(model)]
    x = torch.randn(3, 1, 8, 8, device=device).repeat(8, 1, 1, 1)
    plans = instance_plans(layers, seed=0, first=0, samples=8, draw=True)
    with stacked.sample_axis_calls("auto"), torch.no_grad(), sample_plan(model, plans, 8), _CountCalls() as c:
        model(x)
    convs = 2 if device == "cuda" else 2 * 8
    assert c.calls == {"convolution": convs, "baddbmm": 1}


def test_training_step_with_s_samples_is_three_calls_per_linear():
    """Forward (one batched GEMM), input gradient (one batched GEMM), weight gradient (one GEMM)."""
    layer = nft_cuda.convert(nn.Linear(10, 4), V)
    xs = torch.randn(4 * 3, 10, requires_grad=True)
    with sample_plan(layer, {layer: (torch.tensor([1, 0]), torch.full((4,), 0.3))}, 4), _CountCalls() as c:
        layer(xs).sum().backward()
    assert c.calls == {"baddbmm": 1, "bmm": 1, "mm": 1}


def _gemm_calls(model, loader, runs, mode):
    with stacked.sample_axis_calls(mode), _CountCalls() as c:
        res = monte_carlo(model, loader, V, runs, seed=0, instances_per_pass=8, fold=True, progress=False)[0]
    return c.total, res


def test_monte_carlo_pass_is_one_call_per_layer_per_batch():
    model = _small_model()
    gen = torch.Generator().manual_seed(0)
    loader = TensorBatches(torch.randn(20, 1, 8, 8, generator=gen), torch.randint(0, 5, (20,), generator=gen), 7)
    batches, layers = 3, 3
    calls = {}
    for mode in ("loop", "stacked"):
        one_pass, res8 = _gemm_calls(model, loader, 8, mode)
        two_passes, res16 = _gemm_calls(model, loader, 16, mode)
        calls[mode] = two_passes - one_pass  # the cost of one more pass of 8 chips (clean pass, probe cancel)
        assert res16["per_instance_accuracy"][:8] == res8["per_instance_accuracy"]
    assert calls["stacked"] == batches * layers
    assert calls["loop"] == 8 * batches * layers
    loop_res, stack_res = _both_modes(
        lambda: monte_carlo(model, loader, V, 16, seed=0, instances_per_pass=8, fold=True, progress=False)[0]
    )
    assert stack_res["per_instance_accuracy"] == loop_res["per_instance_accuracy"]
    for key in ("ekl", "confidence", "accuracy_mean"):
        assert stack_res[key] == pytest.approx(loop_res[key], rel=1e-5, abs=1e-6), key


def test_a_batch_that_is_not_s_chunks_is_refused():
    layer = nft_cuda.convert(nn.Linear(6, 3), V)
    weights = layer.noisy_weights(torch.tensor([1, 0]), torch.full((4,), 0.3))
    with pytest.raises(ValueError, match="multiple of 4"):
        stacked.linear(torch.randn(6, 6), weights, None)
    conv = nft_cuda.convert(nn.Conv2d(2, 3, 3), V)
    weights = conv.noisy_weights(torch.tensor([1, 0]), torch.full((4,), 0.3))
    with pytest.raises(ValueError, match="multiple of 4"):
        stacked.conv(torch.randn(6, 2, 5, 5), weights, None, (1, 1), (0, 0), (1, 1), 1)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="auto, stacked, loop"), stacked.sample_axis_calls("batched"):
        pass
    proc = subprocess.run(
        [sys.executable, "-c", "import nft_cuda"],
        env={"NFT_CUDA_SAMPLE_AXIS": "fast", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "NFT_CUDA_SAMPLE_AXIS must be one of auto, stacked, loop" in proc.stderr
    default = subprocess.run(
        [sys.executable, "-c", "from nft_cuda.nn import stacked; print(stacked._mode)"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert default.stdout.strip() == "auto"
