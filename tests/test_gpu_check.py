"""benchmarks/gpu_check.sh stays a plan that fits one GPU slot (checked on CPU, with a stub Python):
planned caps within the deadline, at most 6 files back, a failed build or unregistered kernels stop it,
and the junit verdict counts a skipped CUDA test as a failure."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DEVICE_FILE_LIMIT = 6  # the device returns at most 8 files; the plan keeps two spare
DEADLINE_LIMIT_S = 510


def _plan(**env) -> str:
    r = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_plan_fits_the_slot():
    text = _plan()
    caps = [int(c) for c in re.findall(r"^tier \S+ cap (\d+) s", text, flags=re.M)]
    assert sum(caps) <= DEADLINE_LIMIT_S
    assert f"planned caps: {sum(caps)} s" in text
    deadline = int(re.search(r"deadline (\d+) s", text).group(1))
    assert deadline <= DEADLINE_LIMIT_S and sum(caps) <= deadline
    files = re.search(r"^files: (.*)$", text, flags=re.M).group(1).split()
    assert 0 < len(files) <= DEVICE_FILE_LIMIT
    tiers = re.findall(r"^tier (\S+)", text, flags=re.M)
    assert tiers[:2] == ["env", "build"] and tiers[-1] == "rest"  # the build gate comes before any test
    for path in re.search(r"^gpu tests: (.*)$", text, flags=re.M).group(1).split():
        assert (ROOT / path).is_file(), path


def _stub(tmp_path: Path, fail_on: str, build_s: int = 0) -> tuple[Path, Path]:
    """A fake python that logs its arguments, fails when they contain ``fail_on`` and takes ``build_s``
    seconds to "build"."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "fakepy"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{log}"\n'
        'if [ "$1" = "-" ]; then cat > /dev/null; fi\n'
        f'case "$*" in *setup.py*) sleep {build_s};; esac\n'
        f'case "$*" in *{fail_on}*) echo "stub failure for: $*"; exit 1;; esac\n'
        "exit 0\n"
    )
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return stub, log


def _run(tmp_path: Path, stub: Path, **env) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    base = {**os.environ, "PYTHON": str(stub), "OUT": str(out), "NFT_COMMIT": "test", "PATH": os.environ["PATH"]}
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={**base, **env}, timeout=120)
    return r, out


def test_failed_build_stops_the_script(tmp_path):
    stub, log = _stub(tmp_path, "setup.py")
    r, out = _run(tmp_path, stub)
    assert r.returncode == 2, r.stdout + r.stderr
    summary = (out / "summary.md").read_text()
    assert "BUILD FAILED" in summary and "stub failure for" in summary
    assert "-m pytest" not in log.read_text()  # nothing after the gate ran
    assert len(list(out.iterdir())) <= DEVICE_FILE_LIMIT


def test_unregistered_kernels_stop_the_script(tmp_path):
    stub, log = _stub(tmp_path, "NOSUCHARG")
    stub.write_text(
        stub.read_text().replace("cat > /dev/null; fi", 'cat > /dev/null; echo "no CUDA kernel"; exit 1; fi')
    )
    r, out = _run(tmp_path, stub)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "not all registered" in (out / "summary.md").read_text()
    assert "-m pytest" not in log.read_text()


def test_deadline_skips_tiers_and_bounds_files(tmp_path):
    stub, log = _stub(tmp_path, "NOSUCHARG", build_s=7)
    r, out = _run(tmp_path, stub, DEADLINE_S="20")
    summary = (out / "summary.md").read_text()
    # With 20 s, env and the 7 s build run; the 13 s left are under the 15 s a tier needs.
    assert re.search(r"- tests: skipped, \d+ s left before the 20 s deadline", summary), summary
    assert re.search(r"- env: rc=0 .*\n.*- build: rc=0", summary), summary
    assert re.search(r"- rest: skipped", summary) and "-m pytest" not in log.read_text()
    assert "total:" in summary and "commit test" in summary
    assert len(list(out.iterdir())) <= DEVICE_FILE_LIMIT
    assert (out / "logs.tar.gz").is_file()


def _junit(tmp_path: Path, cases: str) -> Path:
    path = tmp_path / "junit.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{cases}</testsuite></testsuites>')
    return path


@pytest.mark.parametrize(
    ("cases", "rc", "expect"),
    [
        ('<testcase classname="tests.test_rng" name="test_a[cuda]"/>', 0, "1 passed"),
        (
            '<testcase classname="tests.test_rng" name="test_a[cuda]"><skipped message="no CUDA device"/></testcase>'
            '<testcase classname="tests.test_rng" name="test_b[cuda]"/>',
            1,
            "SKIPPED (counts as a failure) tests.test_rng::test_a[cuda]: no CUDA device",
        ),
        ('<testcase classname="tests.test_x" name="test_c[cuda]"><failure message="boom"/></testcase>', 1, "FAILED"),
        ("", 1, "0 passed"),  # a run that ran nothing is no pass
    ],
)
def test_junit_verdict(tmp_path, cases, rc, expect):
    path = _junit(tmp_path, cases)
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "junit_verdict.py"), str(path)], capture_output=True, text=True
    )
    assert r.returncode == rc, r.stdout
    assert expect in r.stdout


def test_roofline_script_runs_on_cpu(tmp_path):
    """The timing script's code paths (sweep and memory tables, JSON) on CPU, so the GPU slot is not the
    first time they run."""
    path = tmp_path / "roofline.json"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "kernel_roofline.py"),
            "--device",
            "cpu",
            "--quick",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    import json

    rows = json.loads(path.read_text())
    assert {row["table"] for row in rows} == {"sweep", "memory"}
    assert not [row for row in rows if "error" in row]
    assert "twin / fused" in r.stdout and "share of copy bandwidth" in r.stdout
