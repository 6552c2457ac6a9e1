"""Smoke tests of the benchmark suite (benchmarks/): it runs, prints its table and writes its JSON.

No timing is asserted: the figures depend on the machine. The suite runs in a subprocess (it sets
NFT_CUDA_STRICT=1 for itself, which must not leak into this process) on a tiny perturb case; the
helpers and one bench module's CLI run in-process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def bench(monkeypatch):
    """The benchmarks package imported here without leaving NFT_CUDA_STRICT set for other tests."""
    monkeypatch.setenv("NFT_CUDA_STRICT", os.environ.get("NFT_CUDA_STRICT", "0"))
    monkeypatch.syspath_prepend(ROOT)
    import benchmarks

    return benchmarks


def test_suite_quick_perturb_prints_table_and_writes_json(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    proc = _run(
        [
            "-m",
            "benchmarks",
            "--quick",
            "--device",
            "cpu",
            "--only",
            "perturb",
            "--numel",
            "65536",
            "--no-compile",
            "--json",
            str(out_json),
            "--markdown",
            str(out_md),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = "| case | variant | median (min–max) | throughput | ratio | DESIGN §8 target | met? |"
    assert header in proc.stdout
    assert "| perturb 0.0625M fp32 | perturb S=1 |" in proc.stdout
    assert "| ceiling | copy 64 MiB (best round) |" in proc.stdout
    assert header in out_md.read_text()

    data = json.loads(out_json.read_text())
    env = data["environment"]
    for key in ("date", "machine", "torch", "cuda", "commit", "nft_cuda", "cpu_threads", "load_average"):
        assert key in env
    assert env["extension"]["strict"] is True  # fallback to pure PyTorch is an error in the suite
    assert data["config"]["quick"] is True and data["config"]["device"] == "cpu"
    assert data["cases"] == ["perturb"]
    assert data["failures"] == [] and data["complete"] is True
    assert set(data["ceilings"]) >= {"copy", "GEMM fp32"}
    variants = {r["variant"] for r in data["results"] if r["case"].startswith("perturb")}
    assert variants == {"perturb S=1", "perturb S=4", "copy", "copy ×4", "reference"}
    for r in data["results"]:
        for key in ("case", "variant", "median_s", "min_s", "max_s", "runs", "throughput", "unit", "compares"):
            assert key in r
        assert r["runs"] >= 1 and r["min_s"] <= r["median_s"] <= r["max_s"]
    s1 = next(r for r in data["results"] if r["variant"] == "perturb S=1")
    targets = {c["baseline"]: c for c in s1["compares"]}
    assert targets["copy"]["target"] == "≤ 4×" and targets["copy"]["kind"] == "time"
    assert targets["reference"]["target"] == "≥ 5×" and targets["reference"]["kind"] == "speedup"
    # not the 4M elements DESIGN §8 names: judged, but marked as not its configuration
    assert targets["copy"]["exact"] is False and isinstance(targets["copy"]["met"], bool)


def test_bench_module_cli_still_runs(bench, tmp_path, capsys):
    from benchmarks import bench_perturb

    out_json = tmp_path / "perturb.json"
    bench_perturb.main(
        ["--device", "cpu", "--quick", "--numel", "16384", "--no-compile", "--no-ceiling", "--json", str(out_json)]
    )
    assert "| perturb 0.015625M fp32 | perturb S=4 (ratios per sample) |" in capsys.readouterr().out
    assert json.loads(out_json.read_text())["results"]


def test_unknown_case_is_rejected(bench):
    from benchmarks.__main__ import CASES
    from benchmarks.config import parse_only

    assert parse_only("perturb, eval", CASES) == ["perturb", "eval"]
    with pytest.raises(SystemExit, match="unknown case"):
        parse_only("perturb,nope", CASES)


def test_ratios_targets_and_table(bench):
    from benchmarks.config import Config
    from benchmarks.report import summary_table
    from benchmarks.results import Case, Row
    from benchmarks.timing import Timing

    cfg = Config(device="cpu", quick=True)
    case = Case(cfg)
    t = lambda name, s: Timing(name, s, s * 0.9, s * 1.1, 3)  # noqa: E731
    fast = case.add(Row("c", "nft", t("nft", 0.02)))
    copy = case.add(Row("c", "copy", t("copy", 0.01)))
    ref = case.add(Row("c", "reference", t("reference", 0.2)))
    c1 = case.compare(fast, copy, "time", "perturb_vs_copy")
    c2 = case.compare(fast, ref, "speedup", "perturb_vs_reference", exact=False)
    c3 = case.compare(ref, copy, "time")
    assert c1.value == pytest.approx(2.0) and c1.target == "≤ 4×" and c1.met is True
    assert c2.value == pytest.approx(10.0) and c2.target == "≥ 5×" and c2.met is True and not c2.exact
    assert c3.target is None and c3.met is None
    gpu = Case(Config(device="cuda"))
    assert gpu.compare(fast, copy, "time", "perturb_vs_copy").met is False  # ≤ 1.25× on GPU
    assert gpu.compare(fast, copy, "speedup", "fused_vs_materialised").target == "≥ 1.5×"
    assert case.compare(fast, copy, "speedup", "fused_vs_materialised").target is None  # no CPU target
    table = summary_table(case.rows)
    assert "| c | nft | 20 ms (18 ms–22 ms) |" in table
    assert "2.000× copy; speed-up 10.0× vs reference" in table
    assert "≤ 4×; ≥ 5× vs reference" in table and "yes; (yes)" in table


def test_time_group_interleaves_and_reports_spread(bench):
    from benchmarks.timing import time_group

    calls = []
    timings = time_group(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, min_run_time=0.0, warmup=1, rounds=3
    )
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then one call of each per round
    for name in ("a", "b"):
        tm = timings[name]
        assert tm.runs == 3 and tm.min_s <= tm.median_s <= tm.max_s and not math.isnan(tm.median_s)


def test_reference_way_matches_the_reference_loop(bench):
    import torch

    from benchmarks.baselines import reference_convert, reference_layers, reference_noise
    from benchmarks.config import VARIATION as v
    from benchmarks.reference_loop import reference_perturb_

    w = torch.randn(64, 32)
    want = w.clone()
    reference_perturb_(want, v, torch.Generator().manual_seed(1))
    got = w + reference_noise(w, v, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    model = reference_convert(torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)), v)
    layers = reference_layers(model)
    assert [type(m).__name__ for m in layers] == ["ReferenceLinear", "ReferenceLinear"]
    for layer in layers:
        layer.sigma = 0.0
    x = torch.randn(4, 32)
    plain = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x), plain(x))


def test_reference_loop_smoke(bench, tmp_path):
    import torch

    import nft_cuda
    from benchmarks.reference_loop import reference_monte_carlo
    from nft_cuda.io import save_model
    from nft_cuda.models import build_model

    torch.manual_seed(0)
    model = nft_cuda.convert(build_model("small", in_channels=1, num_classes=10), nft_cuda.Variation(0.1)).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 32, 32, generator=g)
    loader = [(x[:8], torch.arange(8) % 10), (x[8:], torch.arange(8) % 10)]
    spec = {"name": "small", "in_channels": 1, "num_classes": 10, "input_size": 32, "width": 1.0}
    save_model(str(tmp_path / "m.pt"), model, spec=spec, variation=nft_cuda.Variation(0.1))
    res = reference_monte_carlo(str(tmp_path / "m.pt"), loader, nft_cuda.Variation(0.3), 3, seed=0)
    assert len(res["per_instance_accuracy"]) == 3 and res["ekl"] > 0 and 0 < res["confidence"] <= 1


def test_snapshot_case_runs_and_checks_before_timing(bench, tmp_path, capsys):
    from benchmarks import bench_noisy_linear

    out_json = tmp_path / "snapshot.json"
    bench_noisy_linear.main(
        ["--device", "cpu", "--quick", "--only", "snapshot", "--no-compile", "--no-ceiling", "--json", str(out_json)]
    )
    assert "| snapshot_linear fwd fp32 B=16 64x32x32 pool 6 → 512 | snapshot_linear |" in capsys.readouterr().out
    variants = {r["variant"] for r in json.loads(out_json.read_text())["results"]}
    assert variants == {"snapshot_linear", "pool+noisy_linear", "pool+clean GEMM"}


# ---- the peer library (aihwkit-lightning): present and absent ----------------------------------------


@pytest.fixture
def no_peer(bench, monkeypatch):
    """aihwkit-lightning hidden, as if it were not installed (a None entry makes its import fail)."""
    for name in [m for m in sys.modules if m == "aihwkit_lightning" or m.startswith("aihwkit_lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "aihwkit_lightning", None)


def test_peer_absent_leaves_skipped_rows_with_the_reason(no_peer, tmp_path):
    import torch

    from benchmarks import config, peer, report, results

    reason = peer.missing()
    assert "aihwkit-lightning is not installed" in reason and "pip install --no-deps" in reason
    cfg = config.Config(device="cpu", quick=True)
    lin = torch.nn.Linear(8, 4)
    peers = peer.layer_variants(cfg, "c", lin, lin, config.LAYER_VARIATION, lambda layer: lambda: None)
    assert peers.items == {} and peers.skipped == {"aihwkit-lightning": reason}
    models = peer.model_variants(cfg, "c", lin, lin, config.LAYER_VARIATION)
    assert models.items == {} and models.skipped == {"aihwkit-lightning": reason}
    case = results.Case(cfg)
    t = results.Timing("NoisyLinear", 0.01, 0.009, 0.011, 3)
    rows = {"NoisyLinear": case.add(results.Row("c", "NoisyLinear", t))}
    peer.finish(case, rows, "c", "NoisyLinear", peers, "layer_vs_peer")
    skipped = case.rows[-1]
    assert skipped.skipped and skipped.variant == "aihwkit-lightning" and skipped.timing.runs == 0
    assert skipped.note == f"skipped: {reason}"
    assert rows["NoisyLinear"].compares == []  # nothing compared with a peer that did not run
    table = report.summary_table(case.rows)
    assert "| c | aihwkit-lightning (skipped: aihwkit-lightning is not installed" in table and "| — |" in table
    report.write_json(str(tmp_path / "r.json"), {}, case.rows)
    back = report.rows_from_json(json.loads((tmp_path / "r.json").read_text()))
    assert back[-1].skipped and back[-1].note == skipped.note


def test_peer_present_does_the_same_job_before_timing(bench):
    pytest.importorskip(
        "aihwkit_lightning",
        reason="aihwkit-lightning is not installed (pip install --no-deps aihwkit-lightning==2.1.0)",
    )
    import torch

    import nft_cuda
    from benchmarks import checks, config, peer, results

    v = config.LAYER_VARIATION
    cfg = config.Config(device="cpu", quick=True)
    torch.manual_seed(0)
    pairs = [
        (nft_cuda.NoisyLinear(512, 256, variation=v), torch.nn.Linear(512, 256)),
        (nft_cuda.NoisyConv2d(64, 128, 3, padding=1, variation=v), torch.nn.Conv2d(64, 128, 3, padding=1)),
    ]
    for noisy, clean in pairs:
        clean.load_state_dict(noisy.state_dict())
        # the probe reads back exactly the weight a forward used
        torch.testing.assert_close(checks.effective_weight(clean), clean.weight.detach(), rtol=0, atol=1e-6)
        peers = peer.layer_variants(cfg, "c", noisy, clean, v, lambda layer: lambda: layer)
        assert list(peers.items) == ["aihwkit-lightning"] and peers.skipped == {}
        assert peers.notes["aihwkit-lightning"].startswith("same noise: std / max abs W 0.07")
        layer = peers.items["aihwkit-lightning"]()
        assert layer.training and noisy.training  # left in train mode, as timed
        assert type(layer).__name__ in ("AnalogLinear", "AnalogConv2d")
        torch.testing.assert_close(layer.weight, clean.weight)
    # a peer injecting a different noise is caught before timing
    noisy = nft_cuda.NoisyLinear(512, 256, variation=v)
    wrong = peer.convert(torch.nn.Linear(512, 256), v.with_sigma(0.12))
    with pytest.raises(checks.CheckError, match="aihwkit-lightning injects noise of std"):
        checks.check_same_job(noisy, wrong, v, "c", "aihwkit-lightning")

    class WritesNoiseIntoWeight(torch.nn.Linear):  # as the peer's Triton path does (2.1.0)
        def forward(self, x):
            with torch.no_grad():
                self.weight.add_(torch.randn_like(self.weight) * 0.1 * self.weight.abs().max())
            return super().forward(x)

    with pytest.raises(checks.CheckError, match="changed its weight parameter"):
        checks.check_same_job(noisy, WritesNoiseIntoWeight(512, 256), v, "c", "peer")
    with pytest.raises(ValueError, match="only match RRAM1"):
        peer.rpu_config(config.VARIATION)
    # a model: every same-named layer big enough is compared; the speed-up carries the DESIGN target
    import copy

    from nft_cuda.models import build_model

    base = build_model("vgg8", in_channels=3, num_classes=10, width=0.25)
    models = peer.model_variants(cfg, "m", nft_cuda.convert(copy.deepcopy(base), v), base, v)
    assert list(models.items) == ["aihwkit-lightning"] and "(layer " in models.notes["aihwkit-lightning"]
    case = results.Case(cfg)
    rows = {
        k: case.add(results.Row("m", k, results.Timing(k, s, s, s, 3)))
        for k, s in (("noise", 0.1), ("clean", 0.09), ("aihwkit-lightning", 0.2))
    }
    models.skipped["aihwkit-lightning Triton"] = "its Triton path fails the same-job check: TypeError: …"
    peer.finish(case, rows, "m", "noise", models, "train_vs_peer")
    c = rows["noise"].compares[0]
    assert c.baseline == "aihwkit-lightning" and c.value == pytest.approx(2.0) and c.target == "≥ 1.5×" and c.met
    from benchmarks.report import peer_summary_rows

    assert case.rows[-1].skipped and case.rows[-1].variant == "aihwkit-lightning Triton"
    assert peer_summary_rows(case.rows, "aihwkit-lightning") == [
        ["m", "100 ms (noise)", "200 ms", "—", "—", "90 ms", "2.000×", "≥ 1.5× vs aihwkit-lightning", "yes"]
    ]


def test_peer_triton_failure_is_reported_not_fatal(bench, monkeypatch):
    from benchmarks import peer

    monkeypatch.delenv("AIHWKIT_USE_TRITON", raising=False)
    seen = []

    def broken():  # as the peer's Triton conv path (2.1.0): a TypeError inside its layer
        seen.append(os.environ.get("AIHWKIT_USE_TRITON"))
        raise TypeError("TritonLinear.forward() missing 1 required positional argument: 'training'")

    out = peer.Variants()
    assert peer._triton_check(out, broken) is False and seen == ["1"]  # run on the Triton path
    assert "AIHWKIT_USE_TRITON" not in os.environ  # and switched back off
    assert out.skipped["aihwkit-lightning Triton"].startswith("its Triton path fails the same-job check: TypeError")
    assert (
        peer._triton_check(out, lambda: "same noise") is True and out.notes["aihwkit-lightning Triton"] == "same noise"
    )


# ---- the performance history -------------------------------------------------------------------------


def test_json_without_path_writes_a_history_file(bench, tmp_path, monkeypatch, capsys):
    from benchmarks import bench_perturb, history

    monkeypatch.setattr(history, "HISTORY_DIR", str(tmp_path / "history"))
    for _ in range(2):
        bench_perturb.main(["--device", "cpu", "--quick", "--numel", "16384", "--no-compile", "--no-ceiling", "--json"])
    files = sorted(os.listdir(tmp_path / "history"))
    assert len(files) == 2 and all("-cpu-quick" in f and f.endswith(".json") for f in files)  # one file per run
    data = json.loads((tmp_path / "history" / files[0]).read_text())
    assert data["environment"]["commit"] in files[0].replace("-dirty", "+dirty")
    assert {"torch", "machine", "aihwkit_lightning", "triton"} <= set(data["environment"])
    assert data["results"]


def _run_json(ratio_rows):
    """A saved run with rows (case, variant, median, min, max) and a ratio of 'x' to 'base'."""
    results = []
    for case, variant, med, lo, hi, compares in ratio_rows:
        results.append(
            {
                "case": case,
                "variant": variant,
                "median_s": med,
                "min_s": lo,
                "max_s": hi,
                "runs": 3,
                "compares": compares,
            }
        )
    return {
        "environment": {"commit": "abc", "date": "d", "machine": "m"},
        "config": {"device": "cpu", "quick": True},
        "results": results,
    }


def test_compare_prints_ratio_changes_with_spreads(bench, tmp_path):
    from benchmarks import history
    from benchmarks.__main__ import main

    def run(x_med, x_lo, x_hi):
        return _run_json(
            [
                (
                    "c",
                    "x",
                    x_med,
                    x_lo,
                    x_hi,
                    [
                        {"baseline": "base", "kind": "time", "value": x_med / 1.0},
                        {"baseline": "base", "kind": "speedup", "value": 1.0 / x_med},
                    ],
                ),
                ("c", "base", 1.0, 0.99, 1.01, []),
            ]
        )

    a, b, c = run(1.2, 1.15, 1.25), run(1.5, 1.45, 1.55), run(1.21, 1.1, 1.3)
    for name, data in (("a", a), ("b", b), ("c", c)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    notes, table = history.compare_runs(a, b)
    assert notes == []
    time_row = next(r for r in table if r[2] == "time × base")
    assert time_row[3] == "1.200 (1.139–1.263)" and time_row[5] == "1.250" and time_row[6] == "**worse**"
    speed_row = next(r for r in table if r[2] == "speed-up vs base")
    assert speed_row[5] == "0.800" and speed_row[6] == "**worse**"
    _, table = history.compare_runs(b, a)
    assert {r[6] for r in table} == {"better"}
    _, table = history.compare_runs(a, c)  # overlapping spreads: no flag
    assert {r[6] for r in table} == {""}
    assert main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(SystemExit, match="not a benchmark run"):
        history.compare_text(str(tmp_path / "a.json"), str(tmp_path / "bad.json"))


# ---- the small-transformer training step (issue 27) --------------------------------------------------


def test_transformer_case_quick_gives_ratios_and_the_peer_skip_note(no_peer, tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    from benchmarks import bench_transformer, peer
    from benchmarks.__main__ import CASE_HELP, CASES

    assert CASES["transformer"] is bench_transformer.transformer_case and "transformer" in CASE_HELP
    out_json = tmp_path / "transformer.json"
    bench_transformer.main(["--device", "cpu", "--quick", "--no-ceiling", "--json", str(out_json)])
    assert "≤ 1.3×" in capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["failures"] == []
    by_case: dict = {}
    for r in data["results"]:
        by_case.setdefault(r["case"], {})[r["variant"]] = r
    assert [c.split()[0] for c in by_case] == ["BERT", "GPT-2", "ViT"]
    reason = peer.missing()
    for rows in by_case.values():
        assert set(rows) == {"clean", "noise", "aihwkit-lightning"}
        noise = rows["noise"]
        assert noise["runs"] >= 3 and noise["median_s"] > 0 and "noisy layers" in noise["note"]
        (c,) = noise["compares"]
        assert c["baseline"] == "clean" and c["kind"] == "time" and c["target_key"] == "transformer_step_vs_clean"
        assert c["target"] == "≤ 1.3×" and c["exact"] is False  # quick shapes: not the configuration
        assert c["value"] == pytest.approx(noise["median_s"] / rows["clean"]["median_s"])
        assert c["met"] == (c["value"] <= 1.3)
        skipped = rows["aihwkit-lightning"]
        assert skipped["skipped"] and skipped["runs"] == 0 and skipped["note"] == f"skipped: {reason}"


def test_transformer_case_checks_before_timing(bench, monkeypatch):
    pytest.importorskip("transformers")
    import copy

    import torch

    import nft_cuda
    from benchmarks import bench_transformer, checks, config, peer
    from benchmarks.results import Case

    cfg = config.Config(device="cpu", quick=True)
    torch.manual_seed(0)
    w = bench_transformer.gpt2(True, cfg.dev)
    v = config.LAYER_VARIATION
    note = bench_transformer.check_workload(
        "g", cfg, w, copy.deepcopy(w.model), nft_cuda.convert(copy.deepcopy(w.model), v)
    )
    assert note.startswith("5 noisy layers")  # c_attn, c_proj, c_fc, mlp c_proj (Conv1D) and the tied LM head
    partly = nft_cuda.convert(copy.deepcopy(w.model), v, exclude=["transformer.h.0.mlp.c_fc"])
    with pytest.raises(checks.CheckError, match="left these layers digital: transformer.h.0.mlp.c_fc"):
        bench_transformer.check_workload("g", cfg, w, copy.deepcopy(w.model), partly)
    silent = nft_cuda.convert(copy.deepcopy(w.model), v)
    with monkeypatch.context() as m:  # σ stays 0.1 where the check sets 0: the losses must then differ
        m.setattr(bench_transformer, "set_sigma", lambda model, sigma: None)
        with pytest.raises(checks.CheckError, match="noise at σ=0 vs clean"):
            bench_transformer.check_workload("g", cfg, w, copy.deepcopy(w.model), silent)
    off = nft_cuda.convert(copy.deepcopy(w.model), v)
    nft_cuda.set_noise_mode(off, "off")  # converted but injecting nothing
    with pytest.raises(checks.CheckError, match="loss at σ_d = 0.1 equals the clean loss"):
        bench_transformer.check_workload("g", cfg, w, copy.deepcopy(w.model), off)
    # the peer cannot do GPT-2's job even where it is installed: its conversion skips transformers' Conv1D
    monkeypatch.setattr(peer, "missing", lambda: "")
    gpt2_peer = bench_transformer._peers(cfg, "GPT-2", "g", silent, w.model)
    assert gpt2_peer.items == {} and gpt2_peer.skipped == {peer.NAME: bench_transformer.PEER_NO_CONV1D}
    assert (
        Case(config.Config(device="cuda"))
        .compare(*[peer.skipped_row("c", "x", k) for k in "ab"], "time", "transformer_step_vs_clean")
        .target
        is None
    )  # a CPU goal only


# ---- the cost of tiles and of each HWA knob (issue 26) ----------------------------------------------------


def test_hwa_case_quick_times_every_knob_against_clean_the_step_before_and_the_peer(bench, tmp_path):
    from benchmarks import bench_hwa, peer
    from benchmarks.__main__ import CASE_HELP, CASES

    assert CASES["hwa"] is bench_hwa.hwa_case and "hwa" in CASE_HELP
    out_json = tmp_path / "hwa.json"
    bench_hwa.main(["--device", "cpu", "--quick", "--no-ceiling", "--json", str(out_json)])
    data = json.loads(out_json.read_text())
    assert data["failures"] == []
    rows = {r["variant"]: r for r in data["results"]}
    reason = peer.missing()
    assert list(bench_hwa.VARIANTS)[-1] == "+ clip = lightning-hwa" and len(bench_hwa.VARIANTS) == 7
    previous = None
    for label in bench_hwa.VARIANTS:
        row = rows[label]
        assert row["runs"] >= 3 and row["median_s"] > 0
        by_baseline = {c["baseline"]: c for c in row["compares"]}
        clean = by_baseline["clean"]
        assert clean["value"] == pytest.approx(row["median_s"] / rows["clean"]["median_s"])
        if previous is not None:
            assert by_baseline[previous]["value"] == pytest.approx(row["median_s"] / rows[previous]["median_s"])
        other = rows[f"{peer.NAME} {label}"]
        if reason:
            assert other["skipped"] and other["note"] == f"skipped: {reason}"
        else:
            assert other["runs"] >= 3 and "output moved" in other["note"]
            speedup = by_baseline[f"{peer.NAME} {label}"]
            assert speedup["kind"] == "speedup"
            assert speedup["value"] == pytest.approx(other["median_s"] / row["median_s"])
        previous = label


def test_hwa_case_checks_catch_a_wrong_noise_a_missing_range_gradient_and_an_unclipped_weight(bench):
    import torch

    from benchmarks import bench_hwa, checks

    torch.manual_seed(0)
    base, batch = bench_hwa.mlp(True)
    x = torch.randn(batch, 1024)
    clean = copy.deepcopy(base).train()
    model, _ = bench_hwa.build(1, base, x, with_peer=False)  # + tiles 512
    assert "std" not in bench_hwa.check_variant("t", 1, {"nft_cuda": model}, clean, x)  # alone: output only
    twice, _ = bench_hwa.build(1, base, x, with_peer=False)
    for layer in twice.modules():
        if hasattr(layer, "variation"):
            layer.variation = dataclasses.replace(layer.variation, sigma=2 * layer.variation.sigma)
    with pytest.raises(checks.CheckError, match="weight noise std"):
        bench_hwa.check_variant("t", 1, {"nft_cuda": twice, "other": model}, clean, x)
    with pytest.raises(checks.CheckError, match="deviations differ"):
        bench_hwa.check_variant("t", 3, {"nft_cuda": twice, "other": model}, clean, x)
    learned, _ = bench_hwa.build(5, base, x, with_peer=False)
    with pytest.raises(checks.CheckError, match="no gradient"):
        bench_hwa.check_after_step("t", 5, learned)  # no step taken: no gradient yet
    clipped, _ = bench_hwa.build(6, base, x, with_peer=False)
    for name, p in clipped.named_parameters():
        if name.endswith("input_range"):
            p.grad = torch.ones_like(p)
    bench_hwa.check_after_step("t", 6, clipped)  # PyTorch's uniform init stays within √3 std of a row
    with torch.no_grad():
        clipped[0].weight[3, 7] = 10 * clipped[0].weight[3].std()
    with pytest.raises(checks.CheckError, match="beyond 2.5 std"):
        bench_hwa.check_after_step("t", 6, clipped)
