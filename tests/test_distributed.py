"""nft_cuda.distributed: the backend follows the device (no process group is really created here;
tests/test_train_ddp.py and tests/test_eval_cli.py run real 2-process groups)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from nft_cuda import distributed


def test_one_process_is_an_inactive_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = distributed.join("cpu")
    assert not group.active and group.is_main and group.world == 1
    t = torch.ones(3)
    assert group.sum_(t) is t and group.broadcast(t) is t and group.gather_objects(5) == [5]
    assert group.broadcast_object("x") == "x"
    group.close()
    assert not distributed.current().active


@pytest.mark.parametrize(
    "device, cuda_present, backend", [("cpu", True, "gloo"), ("cpu", False, "gloo"), ("auto", False, "gloo")]
)
def test_join_picks_the_backend_of_the_device(monkeypatch, device, cuda_present, backend):
    """`nft eval --device cpu` on a machine with CUDA used to ask for nccl."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_present)
    monkeypatch.setattr(dist, "init_process_group", lambda b: seen.setdefault("backend", b))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    group = distributed.join(device)
    assert seen["backend"] == backend
    assert group.active and group.rank == 1 and not group.is_main and group.device.type == "cpu"


def test_nft_eval_joins_with_its_device(monkeypatch, tmp_path):
    from nft_cuda import cli

    asked = []

    def fake_join(device_name="auto"):
        asked.append(device_name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(distributed, "join", fake_join)
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    assert cli.main(["eval", str(model), "--device", "cpu"]) == 1
    assert cli.main(["eval", str(model)]) == 1
    assert asked == ["cpu", "auto"]
