"""Perplexity: one window equals transformers' own loss; strided windows score every token exactly once."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_model
from core.evaluate import perplexity_of_ids, windows


def test_single_window_matches_transformers_loss():
    model = tiny_model("llama")
    ids = torch.randint(0, 4096, (120,), generator=torch.Generator().manual_seed(3))
    ppl = perplexity_of_ids(model, ids, max_length=120)
    with torch.no_grad():
        loss = model(ids[None], labels=ids[None]).loss.item()
    assert ppl.tokens == 119 and ppl.windows == 1
    assert ppl.nll == pytest.approx(loss, abs=1e-5)
    assert ppl.perplexity == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("n,length,stride", [(100, 16, 16), (100, 16, 8), (17, 16, 5), (16, 16, 16)])
def test_windows_score_each_token_once(n, length, stride):
    scored = []
    for begin, end, first in windows(n, length, stride):
        assert end - begin <= length and first >= 1
        scored += list(range(begin + first, end))
    overlapping = stride < length
    assert scored == sorted(set(scored))
    assert scored[-1] == n - 1
    if overlapping:
        assert scored == list(range(1, n))


def test_overlapping_windows_batching_does_not_change_the_result():
    model = tiny_model("qwen3")
    ids = torch.randint(0, 4096, (150,), generator=torch.Generator().manual_seed(4))
    a = perplexity_of_ids(model, ids, max_length=40, stride=20, batch_size=1)
    b = perplexity_of_ids(model, ids, max_length=40, stride=20, batch_size=16)
    assert a.tokens == b.tokens == 149
    assert a.nll == pytest.approx(b.nll, abs=1e-5)


def test_eval_cli_compares_two_models(tiny_dir, tmp_path):
    src = tiny_dir("llama")
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = subprocess.run([sys.executable, "-m", "core", "eval", str(src), "--compare", str(src), "--ppl", str(text),
                          "--max-length", "64", "--json"], cwd=ROOT, capture_output=True, text=True, check=True)
    import json

    results = json.loads(out.stdout)["results"]
    assert len(results) == 2
    assert results[0]["perplexity"] == results[1]["perplexity"]
    assert results[0]["parameters"] == sum(p.numel() for p in tiny_model("llama").parameters())


def test_speed_measurement_reports_prefill_decode_and_memory():
    from core.speed import measure_speed

    model = tiny_model("gemma3")
    speed = measure_speed(model, prompt_len=16, new_tokens=4, batch_sizes=(1, 2), repeats=1, warmup=0)
    assert speed["prefill_seconds"] > 0 and speed["peak_rss_bytes"] > 0
    assert set(speed["decode"]) == {"1", "2"}
    assert all(v["tokens_per_second"] > 0 for v in speed["decode"].values())  # ratios and verdicts: test_speed.py


def test_comparison_of_base_and_pruned_goes_into_the_card(tiny_dir, tmp_path):
    import yaml
    from huggingface_hub import ModelCard

    import core
    from core.card import add_comparison
    from core.compare import EvalSettings, compare

    src = tiny_dir("llama")
    base, tokenizer = core.load_model(str(src), core.LoadOptions(device="cpu"))
    result = core.run_recipe(core.Recipe(model=str(src), method="maw", target=core.Target(ratio=0.5)))
    text = tmp_path / "eval.txt"
    text.write_text("Return the list of names in the module namespace. " * 60)
    settings = EvalSettings(text=text, text_label="test text", max_tokens=256, prompt_tokens=16, new_tokens=4,
                            repeats=1)
    comparison = compare(base, result.model, tokenizer, settings)
    assert comparison.ratios["params"] == pytest.approx(result.params_after["total"] / result.params_before["total"])
    assert comparison.base.eval_tokens == comparison.pruned.eval_tokens > 0
    assert "perplexity" in comparison.ratios
    assert set(comparison.speed["metrics"]) == {"prefill", "decode_b1"}  # one round: no spread, so no speed ratio
    assert not any("speedup" in k for k in comparison.ratios)
    out = core.save_pruned(result, tmp_path / "out")
    card = add_comparison(ModelCard.load(out / "README.md"), comparison, "org/tiny-maw-50pct")
    meta = yaml.safe_load(card.content.split("---")[1])
    entry = meta["model-index"][0]
    assert entry["name"] == "org/tiny-maw-50pct"
    metric = entry["results"][0]["metrics"][0]
    assert metric["type"] == "perplexity" and metric["value"] == pytest.approx(comparison.pruned.perplexity, rel=1e-4)
    assert "| perplexity |" in card.text and "| parameters |" in card.text
