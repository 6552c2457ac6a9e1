"""``nft train`` under torchrun with 2 CPU processes (gloo): DESIGN §7.

The runs are tiny (256 training samples, one epoch) so the whole file takes well under a minute on two
CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nft_cuda.io import load_model

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)

_TORCHRUN_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*args, timeout=120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _train(method: str, out: Path) -> subprocess.CompletedProcess:
    return _torchrun(
        "-m",
        "nft_cuda",
        "train",
        "--method",
        method,
        "--epochs",
        "1",
        "--limit-train",
        "256",
        "--limit-eval",
        "128",
        "--no-progress",
        "--out",
        str(out),
        "--device",
        "cpu",
    )


def _weights(path: Path) -> dict:
    model, _ = load_model(str(path))
    return model.state_dict()


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["noise", "ovf"])
def test_torchrun_train_is_deterministic(method, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = _train(method, out)
        # Only rank 0 logs and writes: one epoch line, one checkpoint, one metrics row.
        assert proc.stdout.count("epoch 1/1:") == 1, proc.stdout
        assert "distributed: 2 ranks (gloo)" in proc.stdout
        assert (out / "model.pt").is_file() and (out / "checkpoint.pt").is_file()
        assert not (out / "checkpoint.prev.pt").exists()
        assert not list(out.glob(".tmp-*"))
        assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
        summary = json.loads((out / "summary.json").read_text())
        assert summary["epochs"] == 1 and summary["test_acc_clean"] is not None
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert len(ckpt["rng"]["ranks"]) == 2  # every rank's noise stream, for resuming
        # ranks draw different training noise
        assert not torch.equal(ckpt["rng"]["ranks"][0]["torch"], ckpt["rng"]["ranks"][1]["torch"])
        runs.append((_weights(out / "model.pt"), ckpt["model"]))
    _assert_identical(runs[0][0], runs[1][0])
    _assert_identical(runs[0][1], runs[1][1])


_RESUME_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from nft_cuda.train.trainer import TrainConfig, train

    base = sys.argv[1]
    dist.init_process_group("gloo")  # train() uses this group and leaves it initialised
    kw = dict(method="ovf", epochs=2, limit_train=128, limit_eval=64, batch_size=32, device="cpu")
    train(TrainConfig(out=base + "/full", **kw), progress=False, log=None)
    r = train(TrainConfig(out=base + "/cut", **kw), progress=False, log=None, stop_after=1)
    assert r["stopped"] and dist.is_initialized()
    r = train(TrainConfig(out=base + "/cut", resume=True, **kw), progress=False, log=None)
    assert r["resumed_from"] == 1 and r["epochs"] == 2, r
    if dist.get_rank() == 0:
        a = torch.load(base + "/full/checkpoint.pt", weights_only=True)
        b = torch.load(base + "/cut/checkpoint.pt", weights_only=True)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        for x, y in zip(a["rng"]["ranks"], b["rng"]["ranks"]):
            assert torch.equal(x["torch"], y["torch"])
        print("RESUME-OK")
    dist.destroy_process_group()
""")


def test_torchrun_resume_is_exact(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_SCRIPT)
    proc = _torchrun(str(script), str(tmp_path))
    assert "RESUME-OK" in proc.stdout, proc.stdout + proc.stderr
