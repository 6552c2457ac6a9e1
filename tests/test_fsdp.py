"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with noisy layers, under torchrun with 2 CPU processes
(gloo): a tiny Llama trains with noise injection, and its chips are those of the same weights in one
process, because a weight's noise depends on (seed, layer key, element of the full weight) only, never on
the sharding (docs/llm.md "Sharded training")."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)

sys.path.insert(0, str(Path(__file__).parent / "support"))
import fsdp_worker  # noqa: E402
from test_train_ddp import _torchrun  # noqa: E402


def test_fsdp2_training_draws_the_single_process_chip(tmp_path):
    _torchrun(str(Path(fsdp_worker.__file__)), str(tmp_path), timeout=300)
    run = torch.load(tmp_path / "fsdp.pt")
    single = fsdp_worker.build()
    assert torch.equal(fsdp_worker.chip_logits(single), run["before"])  # the chip of the initial weights
    trained = fsdp_worker.build()
    trained.load_state_dict(run["weights"])
    assert not torch.equal(run["after"], run["before"])  # the two noise-injection steps moved the weights
    assert torch.equal(fsdp_worker.chip_logits(trained), run["after"])
