"""Noisy layers (nft_cuda.layers): drop-in parity, noise = ops.perturb, seeds and noise modes, regenerated
noise in backward (saved tensors), straight-through gradients, double backward, autocast,
torch.compile(fullgraph=True) and, on a GPU, no host sync, CUDA graphs and CPU/CUDA agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nft_cuda
from nft_cuda import NoisyConv1d, NoisyConv2d, NoisyLinear, Variation, ops

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
V = Variation(0.1, "FeFET2")


@pytest.fixture(autouse=True)
def _exact_cuda_float32():
    """float32 convolutions in full precision (no TF32) and deterministic algorithms on CUDA."""
    if not CUDA:
        yield
        return
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False, deterministic=True):
        yield


def _layers(device="cpu", dtype=None, variation=V):
    """One of each noisy layer kind with the input it takes."""
    kw = dict(device=device, dtype=dtype, variation=variation)
    dt = dtype or torch.float32
    return [
        (NoisyLinear(12, 7, **kw), torch.randn(5, 12, device=device, dtype=dt)),
        (NoisyConv2d(4, 6, 3, stride=2, padding=1, groups=2, **kw), torch.randn(2, 4, 9, 9, device=device, dtype=dt)),
        (NoisyConv1d(3, 5, 3, padding=2, dilation=2, **kw), torch.randn(2, 3, 11, device=device, dtype=dt)),
    ]


def _clean_forward(layer, x, weight):
    """The plain layer's forward with ``weight`` in place of layer.weight."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    return type(layer)._plain._conv_forward(layer, x, weight, layer.bias)


# ----------------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plain, noisy, args",
    [
        (nn.Linear, NoisyLinear, (6, 4)),
        (nn.Linear, NoisyLinear, (6, 4, False)),
        (nn.Conv2d, NoisyConv2d, (4, 6, 3, 2, 1, 1, 2, True, "reflect")),
        (nn.Conv2d, NoisyConv2d, (3, 5, (3, 2))),
        (nn.Conv1d, NoisyConv1d, (3, 5, 3, 1, "same", 2, 1, False, "circular")),
    ],
)
def test_drop_in_constructor(plain, noisy, args):
    p = plain(*args, dtype=torch.float64)
    n = noisy(*args, dtype=torch.float64, variation=V)
    assert isinstance(n, plain)
    assert n.state_dict().keys() == p.state_dict().keys()
    for k, t in n.state_dict().items():
        assert t.shape == p.state_dict()[k].shape and t.dtype == torch.float64
    assert [k for k, _ in n.named_parameters()] == [k for k, _ in p.named_parameters()]
    n.load_state_dict(p.state_dict())  # strict: same keys both ways
    p.load_state_dict(n.state_dict())
    assert n.variation == V and n.mode == "train"
    assert "FeFET2" in repr(n) and "mode=train" in repr(n)


def test_constructor_modes_and_errors():
    assert NoisyLinear(3, 2).mode == "off"  # no variation: a plain layer
    assert NoisyLinear(3, 2, variation=V, mode="off").mode == "off"
    with pytest.raises(ValueError, match="needs a variation"):
        NoisyLinear(3, 2, mode="train")
    with pytest.raises(ValueError, match="unknown noise mode"):
        NoisyLinear(3, 2, variation=V, mode="noisy")
    with pytest.raises(TypeError, match="variation"):
        NoisyLinear(3, 2, variation=0.1)
    with pytest.raises(ValueError, match="set_instance"):
        NoisyLinear(3, 2, variation=V, mode="instance")
    layer = NoisyLinear(3, 2, variation=V)
    with pytest.raises(ValueError, match="mode='off' first"):
        layer.variation = None
    layer.mode = "off"
    layer.variation = None
    with pytest.raises(ValueError, match="needs a variation"):
        layer.mode = "train"
    with pytest.raises(ValueError, match="instance"):
        NoisyLinear(3, 2, variation=V).set_instance(0, 2**32)
    with pytest.raises(ValueError, match="seed"):
        NoisyLinear(3, 2, variation=V).set_instance(-1, 0)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        NoisyLinear.from_module(nn.Conv2d(1, 1, 1), V)


def test_from_module_shares_parameters():
    lin = nn.Linear(5, 3)
    n = NoisyLinear.from_module(lin, V)
    assert n.weight is lin.weight and n.bias is lin.bias
    conv = nn.Conv2d(2, 4, 3, padding="same", padding_mode="replicate", bias=False).double()
    c = NoisyConv2d.from_module(conv, V)
    assert c.weight is conv.weight and c.bias is None and c.padding_mode == "replicate"


@needs_cuda
def test_generator_on_wrong_device_raises():
    layer = NoisyLinear(3, 2, variation=V, generator=torch.Generator(device="cuda"))
    with pytest.raises(ValueError, match="generator is on"):
        layer(torch.randn(1, 3))


# ----------------------------------------------------------------------------------------------------------
# Noise: the op's noise, seeds and modes
# ----------------------------------------------------------------------------------------------------------


def test_off_mode_is_plain_layer(device):
    for layer, x in _layers(device):
        layer.mode = "off"
        assert torch.equal(layer(x), _clean_forward(layer, x, layer.weight))


def test_noise_equals_perturb_for_the_forward_rng(device):
    """train mode: the forward's rng is torch.randint on the weight's device, noise = ops.perturb(..)[0]."""
    for layer, x in _layers(device):
        torch.manual_seed(123)
        y = layer(x)
        torch.manual_seed(123)
        rng = nft_cuda._args.random_rng(layer.weight.device)
        w_noisy = ops.perturb(layer.weight.detach(), V, rng=rng)[0]
        assert not torch.equal(w_noisy, layer.weight)
        tol = 0 if device == "cpu" else 1e-6  # same op on the same data; leave cuDNN a little room
        torch.testing.assert_close(y, _clean_forward(layer, x, w_noisy), rtol=tol, atol=tol)
        assert torch.equal(layer.noisy_weight(rng), w_noisy)


def test_manual_seed_reproduces_and_forwards_differ(device):
    for layer, x in _layers(device):
        torch.manual_seed(7)
        a, b = layer(x), layer(x)
        torch.manual_seed(7)
        a2, b2 = layer(x), layer(x)
        assert torch.equal(a, a2) and torch.equal(b, b2)
        assert not torch.allclose(a, b)


def test_explicit_generator():
    layer = NoisyLinear(8, 4, variation=V, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 8)
    a = layer(x)
    layer.generator.manual_seed(5)
    torch.manual_seed(999)  # the default generator plays no part
    assert torch.equal(layer(x), a)


def test_instance_mode(device):
    layer, x = _layers(device)[1]
    layer.set_instance(seed=11, instance=3, layer_index=2)
    assert layer.mode == "instance"
    rng = layer._instance_rng
    assert rng.device == layer.weight.device and rng.tolist() == [11, (2 << 32) | 3]
    expected = ops.perturb(layer.weight.detach(), V, seed=11, offset=(2 << 32) | 3)[0]
    assert torch.equal(layer.noisy_weight(), expected)
    y1 = layer(x)
    torch.manual_seed(0)  # instance noise does not depend on torch's generator
    y2 = layer(x)
    assert torch.equal(y1, y2)
    tol = 0 if device == "cpu" else 1e-6
    torch.testing.assert_close(y1, _clean_forward(layer, x, expected), rtol=tol, atol=tol)
    # the same draw whatever the batch: a sample evaluated alone or inside a bigger batch
    big = torch.cat([x, torch.randn_like(x)])
    torch.testing.assert_close(layer(big)[: len(x)], y1, rtol=1e-5, atol=1e-6)
    # other instance / other layer index -> other noise; back to (3, 2) -> same noise again
    layer.set_instance(11, 4, layer_index=2)
    assert not torch.allclose(layer(x), y1)
    layer.set_instance(11, 3, layer_index=1)
    assert not torch.allclose(layer(x), y1)
    layer.set_instance(12, 3, layer_index=2)
    assert not torch.allclose(layer(x), y1)
    layer.set_instance(11, 3, layer_index=2)
    assert torch.equal(layer(x), y1)
    layer.mode = "train"
    assert not torch.allclose(layer(x), y1)
    layer.mode = "instance"
    assert torch.equal(layer(x), y1)


def test_instance_rng_follows_to_and_is_not_in_state_dict():
    layer = NoisyLinear(4, 3, variation=V)
    layer.set_instance(1, 2)
    assert "_instance_rng" not in layer.state_dict()
    layer.double()
    assert layer._instance_rng.dtype == torch.int64 and layer.weight.dtype == torch.float64
    y = layer(torch.randn(2, 4, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_zero_sigma_is_clean():
    layer = NoisyLinear(6, 3, variation=Variation(0.0))
    x = torch.randn(4, 6)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same", "valid"])
def test_conv_padding_modes(padding_mode, padding):
    """Noisy conv forward and input gradient = plain autograd through F.conv2d(pad(x), W_noisy)."""
    conv = NoisyConv2d(4, 6, (3, 2), padding=padding, dilation=(1, 2), groups=2, padding_mode=padding_mode, variation=V)
    conv.set_instance(5, 0)
    w_noisy = conv.noisy_weight()
    x = torch.randn(2, 4, 7, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = conv(x)
    y_ref = _clean_forward(conv, x_ref, w_noisy)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_unbatched_and_empty_inputs():
    conv = NoisyConv2d(2, 3, 3, padding=1, variation=V)
    conv.set_instance(0, 0)
    x = torch.randn(2, 5, 5)
    torch.testing.assert_close(conv(x), conv(x.unsqueeze(0))[0])
    lin = NoisyLinear(4, 3, variation=V)
    x = torch.randn(0, 4, requires_grad=True)
    y = lin(x)
    y.sum().backward()
    assert y.shape == (0, 3) and torch.equal(lin.weight.grad, torch.zeros(3, 4))
    x = torch.randn(2, 3, 4)  # extra batch dims
    assert lin(x).shape == (2, 3, 3)


# ----------------------------------------------------------------------------------------------------------
# Backward: regenerated noise, straight-through gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_backward_saves_no_noisy_weight(kind):
    """Only the inputs, the parameters and the tiny rng are saved: no tensor of numel(W) or more."""
    layer, _ = _layers(variation=V)[kind]
    if isinstance(layer, nn.Linear):  # big weight, small input, so a saved W_noisy would stand out
        layer = NoisyLinear(64, 48, variation=V)
        x = torch.randn(3, 64, requires_grad=True)
    else:
        x = torch.randn(1, layer.in_channels, *([5] * (layer.weight.dim() - 2)), requires_grad=True)
    assert x.numel() < layer.weight.numel()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    own = {layer.weight.data_ptr(), x.data_ptr(), layer.bias.data_ptr()}
    assert saved, "the layer saved nothing?"
    assert any(t.data_ptr() == layer.weight.data_ptr() for t in saved)
    for t in saved:
        if t.data_ptr() not in own:
            assert t.numel() < layer.weight.numel(), f"saved a tensor of shape {list(t.shape)}"
    assert sum(t.numel() for t in saved if t.data_ptr() not in own) <= 2  # the rng
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_backward_regenerates_same_noise():
    """grad_input uses the noise of the forward, regenerated from the saved rng."""
    layer = NoisyLinear(10, 6, variation=V)
    x = torch.randn(4, 10, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    w_noisy = layer.noisy_weight(nft_cuda._args.random_rng(torch.device("cpu")))
    torch.randn(100)  # moving torch's generator between forward and backward changes nothing
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ w_noisy, rtol=0, atol=0)


def test_straight_through_gradients_vs_float64():
    from conftest import normal64, scale_of, sigma_w64

    torch.manual_seed(0)
    lin = NoisyLinear(16, 8, variation=V)
    conv = NoisyConv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, variation=V)
    seed, r = 77, 5
    for idx, (layer, x) in enumerate(((lin, torch.randn(6, 16)), (conv, torch.randn(2, 4, 8, 8)))):
        layer.set_instance(seed, r, layer_index=idx)
        x.requires_grad_(True)
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
        # float64 oracle: W_noisy = W + σ_w · z (DESIGN §2/§3) evaluated independently of nft_cuda
        w64 = layer.weight.detach().double()
        z = normal64(w64.numel(), seed, (idx << 32) | r).view(w64.shape)
        wn64 = w64 + sigma_w64(layer.weight, [V.sigma], V.state_factor, scale_of(V.state_factor))[0] * z
        x64, g64 = x.detach().double(), g.double()
        if isinstance(layer, nn.Linear):
            gw64 = g64.t() @ x64  # straight-through: dL/dW = dL/dW_noisy
            gx64 = g64 @ wn64
        else:
            args = (layer.stride, layer.padding, layer.dilation, layer.groups)
            gw64 = torch.nn.grad.conv2d_weight(x64, w64.shape, g64, *args)
            gx64 = torch.nn.grad.conv2d_input(x64.shape, wn64, g64, *args)
        torch.testing.assert_close(layer.weight.grad.double(), gw64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), gx64, rtol=1e-5, atol=1e-5)
        gb64 = g64.sum(0) if isinstance(layer, nn.Linear) else g64.sum((0, 2, 3))
        torch.testing.assert_close(layer.bias.grad.double(), gb64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_gradcheck_inputs_and_bias(kind):
    layer, x = _layers(dtype=torch.float64)[kind]
    layer.set_instance(3, 1)
    x = x[:1].detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    weight = layer.weight.detach()

    def f(x, b):
        return torch.func.functional_call(layer, {"weight": weight, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, bias), eps=1e-6, atol=1e-6)


def test_double_backward_raises():
    for layer, x in _layers():
        x.requires_grad_(True)
        y = layer(x)
        gx, gw = torch.autograd.grad(y.square().sum(), (x, layer.weight), create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()
        # first-order gradients under create_graph=True are still right
        y = layer(x)
        (gx1,) = torch.autograd.grad(y.sum(), x)
        assert gx1.shape == x.shape


def test_gradient_only_for_weight_skips_input():
    layer, x = _layers()[1]
    y = layer(x)  # x does not require grad (a first layer)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None


# ----------------------------------------------------------------------------------------------------------
# Autocast
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu(dtype):
    for layer, x in _layers():
        layer.set_instance(9, 2)
        x.requires_grad_(True)
        ref = layer(x)
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
        y.float().sum().backward()
        assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
        assert layer.bias.grad.dtype == torch.float32
        # the weight is perturbed in float32 then cast, as autocast casts the weight of F.linear/F.conv
        with torch.autocast("cpu", dtype=dtype):
            y_ref = _clean_forward(layer, x, layer.noisy_weight())
        torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------


def _small_model():
    return nn.Sequential(
        NoisyConv2d(1, 4, 3, padding=1, padding_mode="reflect", variation=V),
        nn.ReLU(),
        nn.Flatten(),
        NoisyLinear(4 * 6 * 6, 3, variation=V),
    )


def test_compile_fullgraph_training_no_graph_breaks():
    torch.manual_seed(0)
    model = _small_model()
    x, target = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))

    def loss_fn(x, target):
        return F.cross_entropy(model(x), target)

    explanation = torch._dynamo.explain(loss_fn)(x, target)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1

    compiled = torch.compile(loss_fn, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = compiled(x, target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the compiled forward still draws fresh noise per call, reproducibly from torch.manual_seed
    with torch.no_grad():
        torch.manual_seed(1)
        a, b = compiled(x, target), compiled(x, target)
        torch.manual_seed(1)
        a2 = compiled(x, target)
    assert a.item() != b.item() and a.item() == a2.item()


def test_compiled_graph_saves_no_noisy_weight():
    """In the AOT-partitioned compiled graph the noise is regenerated in backward, not saved."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    fw_graphs = []

    def fw_compiler(gm, example_inputs):
        fw_graphs.append(gm)
        return make_boxed_func(gm.forward)

    # the partitioner inductor uses, which may recompute or save intermediates as it sees fit
    backend = aot_autograd(
        fw_compiler=fw_compiler,
        bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
        partition_fn=min_cut_rematerialization_partition,
    )
    layer = NoisyLinear(64, 48, variation=V)
    x = torch.randn(3, 64, requires_grad=True)
    torch.compile(layer, backend=backend, fullgraph=True)(x).sum().backward()
    (gm,) = fw_graphs
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    saved = out_node.args[0][1:]  # first output: y; the rest is saved for backward
    for node in saved:
        val = node.meta.get("val")
        if node.op != "placeholder" and isinstance(val, torch.Tensor):
            assert val.numel() < layer.weight.numel(), f"compiled forward saves {node} {list(val.shape)}"


# ----------------------------------------------------------------------------------------------------------
# CUDA (skipped only without a GPU)
# ----------------------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_no_host_sync():
    layers = _layers("cuda")
    for layer, x in layers:  # warm-up: lazy CUDA/cuBLAS/cuDNN initialisation may synchronise
        x.requires_grad_(True)
        layer(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer, x in layers:
            layer(x).sum().backward()
            layer.set_instance(1, 2)
            layer(x).sum().backward()
            layer.set_instance(1, 3)  # in-place update of the instance rng, no sync either
            layer(x).sum().backward()
            layer.mode = "train"
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@needs_cuda
def test_cuda_graph_replays_draw_fresh_noise():
    torch.manual_seed(0)
    model = nn.Sequential(
        NoisyConv2d(2, 4, 3, padding=1, variation=V), nn.ReLU(), nn.Flatten(), NoisyLinear(4 * 5 * 5, 3, variation=V)
    ).cuda()
    static_x = torch.randn(4, 2, 5, 5, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            model(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.sum().backward()
    outs, grads = [], []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(static_y.clone())
        grads.append(model[0].weight.grad.clone())
    assert not torch.allclose(outs[0], outs[1])
    assert torch.isfinite(outs[0]).all() and torch.isfinite(grads[0]).all()


@needs_cuda
def test_cpu_and_cuda_layers_same_noise():
    for layer, x in _layers("cpu"):
        layer.set_instance(21, 4, layer_index=3)
        w_cpu = layer.noisy_weight()
        y_cpu = layer(x)
        rng = torch.tensor([123456789, 987654321])
        wr_cpu = layer.noisy_weight(rng)
        layer.cuda()
        assert layer._instance_rng.device.type == "cuda"
        w_cuda = layer.noisy_weight()
        # DESIGN §3: normals agree to 1e-5, so noise to σ_w · 1e-5
        torch.testing.assert_close(w_cuda.cpu(), w_cpu, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.noisy_weight(rng.cuda()).cpu(), wr_cpu, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer(x.cuda()).cpu(), y_cpu, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda(dtype):
    for layer, x in _layers("cuda"):
        x.requires_grad_(True)
        with torch.autocast("cuda", dtype=dtype):
            y = layer(x)
        assert y.dtype == dtype
        y.float().sum().backward()
        assert x.grad.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32


def test_set_chip_weight_runs_the_given_weight_until_the_plan_is_cleared():
    layer = NoisyLinear(4, 3, variation=V)
    x = torch.randn(2, 4)
    chip = torch.randn(3, 4)
    layer.set_chip_weight(chip)
    assert torch.equal(layer(x), F.linear(x, chip, layer.bias))
    layer.set_sample_plan(None)
    assert not torch.equal(layer(x), F.linear(x, chip, layer.bias))  # mode train again: a fresh chip
    with pytest.raises(ValueError, match="the weight's shape"):
        layer.set_chip_weight(torch.randn(4, 3))
    with pytest.raises(ValueError, match="needs a variation"):
        NoisyLinear(4, 3).set_chip_weight(chip)
