"""Speed measurement: warm-up, repeats, interleaved rounds, medians with spread, and the verdict.

Timing logic is tested on a virtual clock (no timed assertions): a fake model advances `time.perf_counter` by a
planted cost per forward pass, and a "busy machine" multiplier slows whole rounds. The real tiny models are used
only for the shapes of the results and for the command line.
"""
from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

import core.speed as speed
from conftest import save_tiny, tiny_model
from core.cli import main
from core.compare import Comparison, EvalSettings, Measurement
from core.speed import NOT_MEASURABLE, compare_timings, measure_pair, measure_speed, speed_ratios, stats


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.load = 1.0  # the machine's slowness during the current round

    def __call__(self) -> float:
        return self.now


class FakeModel(nn.Module):
    """A causal-LM-shaped module whose every forward pass costs `cost` virtual seconds (times the clock's load)."""

    def __init__(self, clock: Clock, cost: float, name: str, calls: list) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 4)
        self.config = types.SimpleNamespace(max_position_embeddings=512)
        self.clock, self.cost, self.name, self.calls = clock, cost, name, calls

    def get_input_embeddings(self):
        return self.embed

    def forward(self, ids, past_key_values=None, use_cache=True):
        self.clock.now += self.cost * self.clock.load
        self.calls.append(self.name)
        return types.SimpleNamespace(logits=torch.zeros(ids.shape[0], ids.shape[1], 32), past_key_values=None)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(speed.time, "perf_counter", c)
    return c


def test_stats_median_quartiles_spread():
    s = stats([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median"], s["q1"], s["q3"]) == (3.0, 2.0, 4.0)
    assert s["spread"] == pytest.approx(2.0 / 3.0)
    assert s["samples"] == [5.0, 1.0, 4.0, 2.0, 3.0]  # in measurement order (rounds stay paired)
    few = stats([2.0, 1.0])
    assert (few["q1"], few["q3"]) == (1.0, 2.0)  # fewer than 4: the extremes


def test_rounds_are_interleaved_after_warmup(clock):
    calls: list[str] = []
    base, pruned = FakeModel(clock, 2.0, "base", calls), FakeModel(clock, 1.0, "pruned", calls)
    progress = []
    a, b = measure_pair(base, pruned, prompt_len=4, new_tokens=3, repeats=4, warmup=1,
                        progress=lambda *p: progress.append(p))
    per_round = 1 + (1 + 3)  # prefill, then decode: its prompt pass plus 3 tokens
    order = [calls[i] for i in range(0, len(calls), per_round)]
    assert order == ["base", "pruned", "pruned", "base", "base", "pruned", "pruned", "base", "base", "pruned"]
    assert progress == [("speed", i, 5) for i in range(1, 6)]
    assert a["interleaved"] and b["interleaved"] and a["repeats"] == 4 and a["warmup"] == 1
    assert a["timings"]["prefill"]["samples"] == [2.0] * 4  # warm-up not recorded
    assert a["timings"]["decode_b1"]["samples"] == [6.0] * 4  # 3 tokens x 2 s, the prompt pass excluded
    assert b["decode"]["1"]["tokens_per_second"] == pytest.approx(1.0)


def test_a_busy_machine_cancels_out_of_paired_rounds(clock, monkeypatch):
    """Whole rounds slowed by up to 5x: separately measured, the spread hides the 2x effect; interleaved, each
    round's ratio is exactly 2."""
    calls: list[str] = []
    loads = iter([1, 1, 5, 5, 1, 1, 3, 3, 1, 1, 4, 4, 1, 1] * 4)
    base, pruned = FakeModel(clock, 2.0, "base", calls), FakeModel(clock, 1.0, "pruned", calls)

    real_round = speed._Bench.round

    def round_with_load(self):
        clock.load = next(loads)
        return real_round(self)

    monkeypatch.setattr(speed._Bench, "round", round_with_load)
    a, b = measure_pair(base, pruned, prompt_len=4, new_tokens=2, repeats=6, warmup=1)
    paired = compare_timings(a, b)
    assert paired["paired"]
    entry = paired["metrics"]["prefill"]
    assert entry["speedup"] == {"median": 2.0, "low": 2.0, "high": 2.0}
    assert entry["verdict"] == "faster" and entry["text"].startswith("2.00x faster")

    unpaired = compare_timings(dict(a, interleaved=False), b)
    assert not unpaired["paired"]
    assert unpaired["metrics"]["prefill"]["verdict"] == NOT_MEASURABLE
    assert unpaired["metrics"]["prefill"]["text"].startswith(NOT_MEASURABLE)


def _timed(samples: dict[str, list[float]], interleaved: bool = True) -> dict:
    timings = {k: stats(v) for k, v in samples.items()}
    return {"interleaved": interleaved, "prompt_tokens": 8, "new_tokens": 4, "timings": timings,
            "prefill_seconds": timings["prefill"]["median"],
            "decode": {"1": {"seconds": timings["decode_b1"]["median"]}}}


@pytest.mark.parametrize("base,pruned,expected", [
    ([10, 11, 10, 12, 10], [5, 5.5, 5, 6, 5], "faster"),
    ([5, 5.5, 5, 6, 5], [10, 11, 10, 12, 10], "slower"),
    ([10, 5, 20, 8, 12], [9, 15, 6, 11, 10], NOT_MEASURABLE),
])
def test_verdicts(base, pruned, expected):
    result = compare_timings(_timed({"prefill": base, "decode_b1": base}),
                             _timed({"prefill": pruned, "decode_b1": pruned}))
    entry = result["metrics"]["prefill"]
    assert entry["verdict"] == expected
    low, high = entry["speedup"]["low"], entry["speedup"]["high"]
    assert low <= entry["speedup"]["median"] <= high
    assert (low > 1) == (expected == "faster") and (high < 1) == (expected == "slower")
    measurable = speed_ratios(_timed({"prefill": base, "decode_b1": base}),
                              _timed({"prefill": pruned, "decode_b1": pruned}), measurable_only=True)
    assert ("prefill_speedup" in measurable) == (expected != NOT_MEASURABLE)
    json.dumps(result)  # JSON-able as documented


def test_comparison_shows_no_ratio_when_not_measurable():
    noisy = Comparison(Measurement(100, 400, speed=_timed({"prefill": [10, 5, 20, 8, 12], "decode_b1": [4, 4, 4, 4]})),
                       Measurement(80, 320, speed=_timed({"prefill": [9, 15, 6, 11, 10], "decode_b1": [2, 2, 2, 2]})),
                       EvalSettings())
    assert "prefill_speedup" not in noisy.ratios
    assert noisy.ratios["decode_speedup_batch1"] == pytest.approx(2.0)
    rows = {r[0]: r for r in noisy.rows()}
    prefill = next(r for name, r in rows.items() if name.startswith("prefill"))
    assert prefill[3].startswith(NOT_MEASURABLE) and "faster" not in prefill[3]
    decode = next(r for name, r in rows.items() if name.startswith("decode"))
    assert decode[3].startswith("2.00x faster")
    assert NOT_MEASURABLE in noisy.markdown()
    doc = noisy.to_dict()
    assert doc["speed"]["metrics"]["prefill"]["verdict"] == NOT_MEASURABLE
    json.dumps(doc)


def test_real_model_result_shape():
    model = tiny_model("gemma3")
    result = measure_speed(model, prompt_len=16, new_tokens=4, batch_sizes=(1, 2), repeats=2, warmup=0)
    assert set(result["decode"]) == {"1", "2"} and set(result["timings"]) == {"prefill", "decode_b1", "decode_b2"}
    assert all(len(t["samples"]) == 2 for t in result["timings"].values())
    assert result["peak_rss_bytes"] > 0 and not result["interleaved"]
    json.dumps(result)


@pytest.mark.parametrize("kwargs", [dict(repeats=0), dict(warmup=-1), dict(batch_sizes=(0,))])
def test_bad_settings_are_errors(kwargs):
    from core.errors import RecipeError

    with pytest.raises(RecipeError):
        measure_speed(tiny_model("llama"), **kwargs)


def test_eval_cli_ratios_read_in_argument_order(tmp_path, capsys):
    """`eval PRUNED --compare BASE`: ratios are PRUNED relative to BASE, speed measured in interleaved rounds."""
    import core
    from core import LoadConfig, Recipe, Target

    base = save_tiny(tiny_model("llama"), tmp_path / "base")
    pruned = core.save_pruned(core.run_recipe(Recipe(model=str(base), method="maw", target=Target(ratio=0.5),
                                                     load=LoadConfig(device="cpu"))), tmp_path / "pruned")
    text = tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    assert main(["eval", str(pruned), "--compare", str(base), "--ppl", str(text), "--max-length", "32", "--speed",
                 "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "3", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["ratios"]["parameters"] < 1  # the first model is the smaller one
    assert payload["speed"]["paired"]
    assert set(payload["speed"]["metrics"]) == {"prefill", "decode_b1"}
    for entry in payload["speed"]["metrics"].values():
        assert entry["verdict"] in ("faster", "slower", NOT_MEASURABLE)
        key = "prefill_speedup" if "prefill" in entry["label"] else "decode_speedup_batch1"
        assert (key in payload["ratios"]) == (entry["verdict"] != NOT_MEASURABLE)
    assert [len(r["speed"]["timings"]["prefill"]["samples"]) for r in payload["results"]] == [3, 3]
