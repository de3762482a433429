"""Behaviour on the shipped reference model (a trained 5.6M-parameter Llama): pruning by a data-driven score must
give a lower held-out perplexity than pruning the same amount by the inverted score, and SlimLLM at 20% must stay
below a recorded bound. A bug that inverts or scrambles a method's choice fails here even when every shape is right.

Every run is deterministic on CPU (seeded calibration windows from the shipped calibration split, evaluation on the
first EVAL_TOKENS tokens of the held-out split `reference/corpus/eval.txt`)."""
from __future__ import annotations

import copy

import pytest
import torch

import core
from core.evaluate import perplexity_of_ids
from core.scores import DEPTH_SCORES, HEAD_SCORES, MLP_SCORES, Score
from core.scores.depth import SubnetworkScore
from core.scores.shapley import Plan

ROOT_EVAL = core.calibration.BUILTIN_TEXT.parent / "eval.txt"
EVAL_TOKENS = 2048  # 8 windows of 256 tokens
CALIB = core.CalibrationConfig(n_samples=8, seq_len=128)


@pytest.fixture(scope="module")
def reference():
    model, tokenizer = core.load_model(None, core.LoadOptions(device="cpu", dtype="float32"))
    text = ROOT_EVAL.read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer(text[:12_000], add_special_tokens=False, verbose=False)["input_ids"][:EVAL_TOKENS])
    assert ids.numel() == EVAL_TOKENS
    return model, tokenizer, ids


def _ppl(reference, recipe: core.Recipe) -> float:
    base, tokenizer, ids = reference
    model = copy.deepcopy(base)
    if recipe is not None:
        core.prune(model, tokenizer, recipe)
    return perplexity_of_ids(model, ids, max_length=256).perplexity


def _inverted(registry, name: str, monkeypatch) -> str:
    """Register 'inverted_<name>': the same score negated (highest first becomes lowest first)."""
    score = registry.get(name)
    if score.kind == "subnetwork":  # unit values are linear in the utility: negating it inverts them
        def plan(units, sampling, gen):
            inner = score.fn.plan(units, sampling, gen)
            return Plan(inner.masks, lambda utilities: inner.estimate(-utilities))

        fn = SubnetworkScore(plan)
    elif score.kind == "per_token":
        fn = lambda x, y: -score.fn(x, y)  # noqa: E731
    else:
        fn = lambda t: -score.fn(t)  # noqa: E731
    inverted = f"inverted_{name}"
    monkeypatch.setitem(registry._items, inverted, Score(inverted, fn, score.needs_data, score.doc, score.kind))
    return inverted


def _score_beats_inverted(reference, monkeypatch, registry, name, **recipe):
    good = _ppl(reference, core.Recipe(score=name, calibration=CALIB, **recipe))
    bad = _ppl(reference, core.Recipe(score=_inverted(registry, name, monkeypatch), calibration=CALIB, **recipe))
    assert good < bad, f"{name}: perplexity {good:.3f} by the score, {bad:.3f} by the inverted score"
    return good, bad


# Perplexities measured when these tests were written (dense: 6.66) are noted next to each test.

def test_mlp_activation_beats_its_inverse(reference, monkeypatch):  # 7.87 vs 14.31
    _score_beats_inverted(reference, monkeypatch, MLP_SCORES, "activation", method="mlp_width",
                          target=core.Target(param_ratio=0.2))


def test_head_activation_beats_its_inverse(reference, monkeypatch):  # 7.16 vs 10.35
    _score_beats_inverted(reference, monkeypatch, HEAD_SCORES, "activation", method="attention_heads",
                          target=core.Target(ratio=0.25), options={"mode": "query"})


@pytest.mark.parametrize("name", ["cosine", "angular", "update_norm", "relative_update_norm"])
def test_depth_per_token_score_beats_its_inverse(reference, monkeypatch, name):  # 9.48 (update_norm 10.16) vs 2648
    _score_beats_inverted(reference, monkeypatch, DEPTH_SCORES, name, method="depth", target=core.Target(ratio=1 / 3))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppl_drop", "shapley", "loo_contrast", "subnet_contrast"])
def test_depth_subnetwork_score_beats_its_inverse(reference, monkeypatch, name):  # 9.57 vs 2648
    _score_beats_inverted(reference, monkeypatch, DEPTH_SCORES, name, method="depth", target=core.Target(ratio=1 / 3),
                          options={"samples": 12})


# query-head mode as in bench/compare_methods.py: the reference model has 2 KV heads, whole groups are 50% steps
SLIM = core.Recipe(method="slimllm", target=core.Target(param_ratio=0.2), options={"head_mode": "query"},
                   calibration=CALIB)


@pytest.fixture(scope="module")
def slimllm_20(reference) -> float:
    return _ppl(reference, SLIM)


def test_slimllm_beats_slimllm_with_inverted_scores(reference, slimllm_20, monkeypatch):  # 7.31 vs 7.97
    """Inverted: heads ranked by minus their leave-one-out similarity, channels by minus their importance (the same
    per-layer ratios, search, 1% rule and regression)."""
    import core.methods.slimllm as slim

    good = slimllm_20
    loo, channels = slim.leave_one_out, slim.channels_to_prune
    monkeypatch.setattr(slim, "leave_one_out", lambda cov: -loo(cov))
    monkeypatch.setattr(slim, "channels_to_prune", lambda scores, count, keep_lowest=True:
                        channels(-scores, count, keep_lowest))
    bad = _ppl(reference, SLIM)
    assert good < bad, f"SlimLLM {good:.3f}, with inverted scores {bad:.3f}"


# Recorded on 2026-11-30 (torch 2.13.0 CPU, transformers 5.23.0, commit 3852402 of core) with exactly SLIM and
# EVAL_TOKENS above: dense 6.66; SlimLLM at 20% of all parameters 7.305; the same without the greedy search 7.33,
# with uniform ratios 7.83, with inverted scores 7.97; random MLP neurons at 20% 9.26. The bound is the recorded
# value plus 2%: it fails when SlimLLM loses its per-layer ratios or its scores invert, not on floating-point
# noise. When a change makes SlimLLM better, lower the recorded value here (this test prints the value with -s).
# Re-recorded after the paper-fidelity changes (issue 14: end layers protected by default, heads and channels of a
# layer at one ratio): 7.4906. That is the paper's setting, not a regression; it stays clear of uniform ratios
# (7.83) and inverted scores (7.97).
SLIMLLM_20_BOUND = 7.4906 * 1.02


def test_slimllm_at_20_percent_stays_below_its_recorded_bound(slimllm_20):
    value = slimllm_20
    print(f"SlimLLM at 20%: perplexity {value:.4f} (bound {SLIMLLM_20_BOUND:.4f})")
    assert value < SLIMLLM_20_BOUND
