"""Language models under variation (nft_cuda.eval.lm): perplexity over chips, pairing, generation."""

from __future__ import annotations

import math

import pytest
import torch

import nft_cuda
from nft_cuda.eval.lm import ByteTokenizer, generate_on_chip, lm_batches, lm_chips, load_corpus
from nft_cuda.eval.paired import paired_difference

transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e .[test])")


@pytest.fixture(scope="module")
def gpt2_and_batches():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = ByteTokenizer().encode(load_corpus()[:6000])
    batches = lm_batches(ids, 32, 8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):  # a little training, so the model is better than uniform
        opt.zero_grad()
        model(batches[step % len(batches)], labels=batches[step % len(batches)]).loss.backward()
        opt.step()
    model.eval()
    return nft_cuda.convert(model, nft_cuda.Variation(0.3)), batches[:4]


def test_tokenizer_and_corpus_round_trip():
    text = load_corpus()
    assert len(text) > 30_000 and "Philox" in text
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("σ_d = 0.3")) == "σ_d = 0.3"


def test_batches():
    b = lm_batches(torch.arange(100), 16, 4)
    assert [x.shape for x in b] == [torch.Size([4, 16]), torch.Size([2, 16])]
    assert torch.equal(torch.cat(b).reshape(-1), torch.arange(96))
    with pytest.raises(ValueError, match="fewer than one window"):
        lm_batches(torch.arange(5), 16, 4)
    with pytest.raises(ValueError, match="1-D"):
        lm_batches(torch.zeros(2, 3, dtype=torch.long), 2, 1)


def test_perplexity_over_chips(gpt2_and_batches, one_thread):
    model, batches = gpt2_and_batches
    r = lm_chips(model, batches, 5, seed=0)
    assert r["tokens"] == sum(b[:, 1:].numel() for b in batches)
    assert r["per_instance_ppl"] == [math.exp(v) for v in r["per_instance_nll"]]
    assert r["ppl_mean"] == pytest.approx(sum(r["per_instance_ppl"]) / 5)
    assert r["ppl_ci95"] > 0 and len(set(r["per_instance_ppl"])) == 5
    assert r["ppl_mean"] > r["clean_ppl"]  # σ_d 0.3 hurts
    assert r["clean_ppl"] < 200  # trained: better than uniform over 256 bytes
    assert set(r["accuracy_tails"]) == {"1", "5", "10"}
    # Chip 2's NLL equals transformers' own loss under that chip (mean CE of the shifted tokens).
    nft_cuda.set_instance(model, 0, 2)
    with torch.no_grad():
        losses = [float(model(b, labels=b).loss) * b[:, 1:].numel() for b in batches]
    nft_cuda.set_noise_mode(model, "train")
    assert r["per_instance_nll"][2] == pytest.approx(sum(losses) / r["tokens"], rel=1e-5)
    assert lm_chips(model, batches, 5, seed=0)["per_instance_nll"] == r["per_instance_nll"]  # reproducible


def test_paired_against_itself_is_zero(gpt2_and_batches, one_thread):
    model, batches = gpt2_and_batches
    a = lm_chips(model, batches[:2], 4, seed=1)
    b = lm_chips(model, batches[:2], 4, seed=1)
    d = paired_difference(a["per_instance_ppl"], b["per_instance_ppl"])
    assert d["mean"] == 0 and d["verdict"] == "no significant difference"


def test_generation_on_a_chip(gpt2_and_batches):
    model, batches = gpt2_and_batches
    prompt = batches[0][0, :8]
    one = generate_on_chip(model, prompt, seed=0, instance=3, max_new_tokens=12)
    assert one.shape == (20,) and torch.equal(one[:8], prompt)
    assert torch.equal(one, generate_on_chip(model, prompt, seed=0, instance=3, max_new_tokens=12))
    assert all(layer.mode == "train" for _, layer in nft_cuda.noisy_layers(model))  # state restored


def test_bad_arguments(gpt2_and_batches):
    model, batches = gpt2_and_batches
    with pytest.raises(ValueError, match="runs"):
        lm_chips(model, batches, 0, seed=0)
    with pytest.raises(ValueError, match="no field 'scores'"):
        lm_chips(model, batches, 1, seed=0, output="scores")
    with pytest.raises(ValueError, match="prompt"):
        generate_on_chip(model, torch.tensor([]), seed=0, instance=0)


def test_the_llm_example_of_docs_llm_runs(tmp_path, monkeypatch, one_thread):
    """examples/llm_finetune.py (docs/llm.md) end to end at a tiny scale: both models train and are
    evaluated on the same chips, and the JSON holds what the page reports."""
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    sys.modules.pop("examples.llm_finetune", None)
    from examples import llm_finetune

    out = tmp_path / "llm.json"
    args = ["--steps", "3", "--runs", "2", "--eval-batches", "1", "--batch", "4", "--json", str(out)]
    result = llm_finetune.main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["models"]) == {"digital", "noise"}
    for report in result["models"].values():
        assert report["clean_ppl"] > 1 and math.isfinite(report["ppl_mean"])
    assert result["nll_noise_minus_digital"]["verdict"] in ("better", "worse", "no significant difference")


def test_nft_eval_lm_reports_perplexity_paired_against_a_baseline(tmp_path, monkeypatch, one_thread, capsys):
    """`nft eval --lm` on the example's exported models: perplexity with CI95 per model, the per-chip NLL
    paired against the baseline, a continuation on one chip, and the JSON equal to the Python API's."""
    import json
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root))
    sys.modules.pop("examples.llm_finetune", None)
    from examples import llm_finetune
    from nft_cuda.cli import main
    from nft_cuda.eval.lm import lm_checkpoints, text_batches

    llm_finetune.main(["--steps", "2", "--runs", "2", "--eval-batches", "1", "--batch", "2", "--out", str(tmp_path)])
    noise, digital = str(tmp_path / "noise.pt"), str(tmp_path / "digital.pt")
    out = tmp_path / "lm.json"
    args = ["eval", "--lm", noise, digital, "--baseline", digital, "--runs", "3", "--lm-batches", "1"]
    assert main([*args, "--batch-size", "4", "--json", str(out), "--generate", "The ", "--chip", "1"]) == 0
    printed = capsys.readouterr().out
    assert "per-chip NLL of noise.pt − baseline" in printed and "chip 1: 'The " in printed
    report = json.loads(out.read_text())
    want = lm_checkpoints([noise, digital], text_batches(load_corpus(), 64, 4, 1), runs=3, baseline=digital)
    assert [m["per_instance_nll"] for m in report["models"]] == [m["per_instance_nll"] for m in want["models"]]
    assert report["paired"][noise]["mean"] == want["paired"][noise]["mean"]
    with pytest.raises(ValueError, match="is not one of the checkpoints"):
        lm_checkpoints([noise], text_batches(load_corpus(), 64, 4, 1), runs=2, baseline=digital)
