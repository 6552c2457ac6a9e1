"""IRS heads feed their snapshots through ops.snapshot_linear with exactly the noise of the head's
first noisy layer (the layer path and the op path agree, values and gradients)."""

from __future__ import annotations

import torch

import nft_cuda
from nft_cuda.train.irs import IRSHead


def _run(head, act, use_op: bool):
    act = act.clone().requires_grad_()
    if not use_op:
        head._snapshot_op_ok = lambda a: False  # force the layer path
    torch.manual_seed(5)
    out = head(act)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    if not use_op:
        del head._snapshot_op_ok
    return out.detach(), act.grad, grads


def test_snapshot_op_path_matches_layer_path():
    torch.manual_seed(0)
    head = IRSHead(channels=6, pool=3, num_classes=4, variation=nft_cuda.Variation(0.3), hidden=16)
    act = torch.randn(5, 6, 7, 9)
    out_op, gx_op, gp_op = _run(head, act, use_op=True)
    out_layer, gx_layer, gp_layer = _run(head, act, use_op=False)
    torch.testing.assert_close(out_op, out_layer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_op, gx_layer, rtol=1e-5, atol=1e-6)
    for a, b in zip(gp_op, gp_layer):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_snapshot_op_used_in_train_mode(monkeypatch):
    calls = []
    real = nft_cuda.ops.snapshot_linear
    monkeypatch.setattr(nft_cuda.ops, "snapshot_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    head = IRSHead(channels=2, pool=2, num_classes=3, variation=nft_cuda.Variation(0.1), hidden=8)
    head(torch.randn(2, 2, 4, 4))
    assert calls == [1]
    nft_cuda.set_noise_mode(head, "off")
    head(torch.randn(2, 2, 4, 4))
    assert calls == [1]


def test_autocast_uses_layer_path_with_one_draw():
    head = IRSHead(channels=3, pool=2, num_classes=3, variation=nft_cuda.Variation(0.2), hidden=8)
    act = torch.randn(4, 3, 6, 6, requires_grad=True)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(act)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and act.grad is not None
    assert head.fc1._sample_plan is None  # the temporary plan is cleared
