"""A resumable study made of *units* (one training and its evaluation each): the machinery the fidelity and
the tail studies share. The config checks they have in common, the JSON-lines results file that makes a
study resumable across sessions, the reuse of a recorded training, and the loop that does the units not
yet recorded. What a unit is, how it trains and what it measures stay in each study's runner.

The results file is one JSON object per line: a config line each time ``run_units`` starts (the config,
an environment stamp, the start time), then one record per finished unit (``key``, ``spec`` = everything
that shapes its result, and what it measured). A line is flushed to disk as soon as it is written, so a
kill leaves at most a torn last line, which loading drops.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from studies import reproduce

__all__ = ["append_record", "check_config", "load_results", "run_units", "train_or_reuse"]


def check_config(path, cfg: dict, required) -> None:
    """The checks every unit study's config needs: no ``required`` entry missing, positive σ_d, at least
    two chips. One clear ValueError naming the bad entry."""
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing config entries {missing}")
    if any(not (isinstance(s, (int, float)) and s > 0) for s in cfg["sigmas"]):
        raise ValueError(f"{path}: sigmas must be positive numbers, got {cfg['sigmas']}")
    if not (isinstance(cfg["runs"], int) and cfg["runs"] >= 2):
        raise ValueError(f"{path}: runs must be an int >= 2 (a CI needs two chips), got {cfg['runs']!r}")


def load_results(path, spec_of: Callable[[dict, dict], dict]) -> dict:
    """{"config": the config of the last run line, "environment": its stamp, "units": [records]}: the
    units whose recorded spec equals ``spec_of(config, unit)`` (records made with earlier settings are
    superseded), the last record of each key. A torn last line is dropped; a missing file gives no units."""
    cfg, env, units = None, None, {}
    if not os.path.exists(path):
        return {"config": None, "environment": None, "units": []}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                break
            if "config" in rec:
                cfg, env = rec["config"], rec.get("environment")
            else:
                units[rec["key"]] = rec  # a redone unit replaces its earlier record
    current = [u for u in units.values() if cfg is None or u["spec"] == spec_of(cfg, u)]
    return {"config": cfg, "environment": env, "units": current}


def append_record(path: Path, obj: dict) -> None:
    """One JSON line, flushed to disk (a kill leaves at most a torn last line, which loading drops)."""
    from nft_cuda._files import json_safe

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(json_safe(obj), allow_nan=False, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def train_or_reuse(
    cfg: dict, item: dict, spec: dict, out: Path, record_name: str, progress: bool, shared: dict
) -> tuple[dict, bool]:
    """(training result, reused): the training ``item`` in ``out/train/<name>`` (studies.reproduce's
    ``train_one``), unless one with the same ``spec`` is in ``shared`` (made earlier in this process) or
    recorded in that folder's ``record_name`` beside its exported model (made by an earlier process: the
    clean model of another σ_d, or a unit killed during its evaluation). A new training writes its
    record and enters ``shared``."""
    from nft_cuda.io import MODEL_FILE

    name = item["name"]
    record = Path(out) / "train" / name / record_name
    if name in shared and shared[name]["spec"] == spec:
        return shared[name]["result"], True
    if record.is_file() and (record.parent / MODEL_FILE).is_file():
        rec = json.loads(record.read_text())
        if rec.get("spec") == spec:
            shared[name] = rec
            return rec["result"], True
    result = reproduce.with_cpu_time(reproduce.train_one, cfg, item, Path(out), progress)
    rec = {"spec": spec, "result": result}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(rec, indent=1) + "\n")
    shared[name] = rec
    return result, False


def run_units(
    cfg: dict,
    units: list[dict],
    results: Path,
    *,
    spec_of: Callable[[dict, dict], dict],
    do_unit: Callable[[dict, dict], dict],
    describe: Callable[[dict], str],
    log=print,
    max_units: int | None = None,
) -> dict:
    """Do the ``units`` (in order) whose record in ``results`` is missing or has another spec, at most
    ``max_units`` of them: ``do_unit(unit, shared)`` makes a unit's record (``shared``: the trainings made
    in this process), which is appended at once; ``describe(record)`` is its one-line summary for the
    log. A config line opens the invocation in the file. Returns the file's :func:`load_results`."""
    import torch

    done = {u["key"]: u for u in load_results(results, spec_of)["units"]}
    append_record(results, {"config": cfg, "environment": reproduce.environment_stamp(), "started": time.time()})
    todo = [u for u in units if done.get(u["key"], {}).get("spec") != spec_of(cfg, u)]
    log(f"{len(units) - len(todo)} of {len(units)} units already in {results}; {len(todo)} to do")
    shared: dict = {}
    t0 = time.perf_counter()
    for i, unit in enumerate(todo[:max_units] if max_units is not None else todo, start=1):
        threads = torch.get_num_threads()
        log(f"[{i}/{len(todo)}] {unit['key']} (torch threads {threads}, {time.perf_counter() - t0:.0f} s)")
        record = do_unit(unit, shared)
        append_record(results, record)
        log(f"    {describe(record)}")
    return load_results(results, spec_of)
