"""Which units each method removes, end to end on tiny models with planted structure.

In every layer some units are made unimportant on purpose (weights 1000x smaller, an output that is exactly zero,
large weights that only read dead input features, a block that is the identity) and the pruned model is compared
with the original weight by weight to find out which units survived. The expected sets are the planted ones,
written down here, never computed with the library's ranking helpers: a selection that keeps the lowest-scored
units instead of the highest, or shifts its ranks, removes the wrong rows and fails these tests.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

import core
from conftest import TOKENIZER_DIR, tiny_model
from core import CalibrationConfig, LayerSelection, Recipe, Target
from core.architectures import spec_for_config
from core.errors import CalibrationError
from core.layer_config import layer_shapes
from core.layers import decoder_layers
from core.methods import METHODS

CALIB = CalibrationConfig(n_samples=4, seq_len=32)
M, DH, HEADS, KV, LAYERS = 96, 16, 4, 2, 4  # the tiny Llama of conftest: 4 query heads in 2 KV groups


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def _mlp(model, i):
    return decoder_layers(model, spec_for_config(model.config))[i].mlp


def _attn(model, i):
    return decoder_layers(model, spec_for_config(model.config))[i].self_attn


def surviving_rows(before: torch.Tensor, after: torch.Tensor, size: int = 1) -> list[int]:
    """Which blocks of `size` rows of `before` are the rows of `after` (matched exactly, in order)."""
    index = {tuple(before[j * size:(j + 1) * size].flatten().tolist()): j for j in range(before.shape[0] // size)}
    assert len(index) == before.shape[0] // size, "planted rows must be distinct to be recognised"
    return [index[tuple(after[j * size:(j + 1) * size].flatten().tolist())] for j in range(after.shape[0] // size)]


def _planted_neurons(layer: int, count: int = 24) -> list[int]:
    g = torch.Generator().manual_seed(100 + layer)
    return sorted(torch.randperm(M, generator=g)[:count].tolist())


@torch.no_grad()
def _shrink_neurons(model, planted: dict[int, list[int]], factor: float = 1e-3) -> None:
    for i, neurons in planted.items():
        mlp = _mlp(model, i)
        mlp.gate_proj.weight[neurons] *= factor
        mlp.up_proj.weight[neurons] *= factor
        mlp.down_proj.weight[:, neurons] *= factor


def _removed_neurons(original, pruned) -> dict[int, list[int]]:
    out = {}
    for i in range(LAYERS):
        kept = surviving_rows(_mlp(original, i).gate_proj.weight, _mlp(pruned, i).gate_proj.weight)
        assert kept == sorted(kept)
        out[i] = sorted(set(range(M)) - set(kept))
    return out


def _prune(model, tokenizer, **recipe):
    return core.prune(model, tokenizer, Recipe(calibration=CALIB, batch_size=2, **recipe))


# ------------------------------------------------------------------------------------------------ MLP width

@pytest.mark.parametrize("score", ["maw", "maw_range", "vow", "pon", "l2", "activation"])
def test_mlp_width_removes_exactly_the_planted_small_neurons(score, tokenizer):
    original = tiny_model("llama")
    planted = {i: _planted_neurons(i) for i in range(LAYERS)}
    _shrink_neurons(original, planted)
    model = copy.deepcopy(original)
    _prune(model, tokenizer, method="mlp_width", score=score, target=Target(ratio=0.25))  # 24 of 96 per layer
    assert _removed_neurons(original, model) == planted


@torch.no_grad()
def test_activation_removes_neurons_that_read_only_dead_features_and_maw_keeps_them(tokenizer):
    """Features 0..15 of every MLP input are zero on any data (their norm weight is 0). Planted neurons carry large
    weights on those features only: they never fire, so `activation` removes them; `maw` sees large weights."""
    original = tiny_model("llama")
    planted = {i: _planted_neurons(i) for i in range(LAYERS)}
    dead = list(range(16))
    for i, neurons in planted.items():
        layer = decoder_layers(original, spec_for_config(original.config))[i]
        layer.post_attention_layernorm.weight[dead] = 0.0
        mlp = layer.mlp
        for j in neurons:
            for w in (mlp.gate_proj.weight, mlp.up_proj.weight):
                w[j] = 0.0
                w[j, dead] = 0.5 + 0.01 * torch.arange(16.0) + 0.001 * j  # distinct rows
            mlp.down_proj.weight[:, j] *= 10.0
    by_activation = copy.deepcopy(original)
    _prune(by_activation, tokenizer, method="mlp_width", score="activation", target=Target(ratio=0.25))
    assert _removed_neurons(original, by_activation) == planted
    by_weights = copy.deepcopy(original)
    _prune(by_weights, tokenizer, method="mlp_width", score="maw", target=Target(ratio=0.25))
    for i, removed in _removed_neurons(original, by_weights).items():
        assert not set(removed) & set(planted[i])


def test_random_score_removes_the_lowest_of_its_seeded_draws(tokenizer):
    original = tiny_model("llama")
    model = copy.deepcopy(original)
    _prune(model, tokenizer, method="mlp_width", score="random", target=Target(ratio=0.25), seed=3)
    for i, removed in _removed_neurons(original, model).items():
        draws = torch.rand(M, generator=torch.Generator().manual_seed(3 * 100_003 + i)).tolist()
        assert removed == sorted(sorted(range(M), key=lambda j: (draws[j], j))[:24])


# ------------------------------------------------------------------------------------------ attention heads

def _kept_heads(original, pruned, i) -> list[int]:
    return surviving_rows(_attn(original, i).q_proj.weight, _attn(pruned, i).q_proj.weight, DH)


@torch.no_grad()
def _scale_heads(model, i, heads, q=1.0, o=1.0, v=None):
    attn = _attn(model, i)
    for h in heads:
        attn.q_proj.weight[h * DH:(h + 1) * DH] *= q
        attn.o_proj.weight[:, h * DH:(h + 1) * DH] *= o
    if v is not None:
        for g in {h // (HEADS // KV) for h in heads}:
            attn.v_proj.weight[g * DH:(g + 1) * DH] *= v
            attn.k_proj.weight[g * DH:(g + 1) * DH] *= max(v, 1e-3)


def _heads_case(plant: str):
    """Per layer: the planted (unimportant) heads. Layer i plants KV group i % 2 (kv_group) or, in each group,
    query head (i % 2) (query mode)."""
    original = tiny_model("llama")
    planted = {}
    for i in range(LAYERS):
        group_heads = [2 * (i % 2), 2 * (i % 2) + 1]
        per_group = [i % 2, 2 + i % 2]
        if plant == "tiny_group":  # a whole KV group with weights 1000x smaller
            _scale_heads(original, i, group_heads, q=1e-3, o=1e-3, v=1e-3)
            planted[i] = group_heads
        elif plant == "silent_group":  # v = 0: the group outputs nothing, but q, k and o are large
            _scale_heads(original, i, group_heads, q=3.0, o=3.0, v=0.0)
            planted[i] = group_heads
        elif plant == "tiny_query":
            _scale_heads(original, i, per_group, q=1e-3, o=1e-3)
            planted[i] = per_group
        elif plant == "silent_query":  # o columns 0: no contribution, but large query weights
            _scale_heads(original, i, per_group, q=5.0, o=0.0)
            planted[i] = per_group
    return original, copy.deepcopy(original), planted


@pytest.mark.parametrize("score,mode,plant", [
    ("magnitude", "kv_group", "tiny_group"), ("magnitude", "query", "tiny_query"),
    ("activation", "kv_group", "tiny_group"), ("activation", "query", "tiny_query"),
    ("activation", "kv_group", "silent_group"), ("activation", "query", "silent_query"),
])
def test_head_pruning_removes_exactly_the_planted_heads(score, mode, plant, tokenizer):
    original, model, planted = _heads_case(plant)
    _prune(model, tokenizer, method="attention_heads", score=score, target=Target(ratio=0.5), options={"mode": mode})
    for i in range(LAYERS):
        assert _kept_heads(original, model, i) == sorted(set(range(HEADS)) - set(planted[i])), f"layer {i}"


@pytest.mark.parametrize("mode,plant", [("kv_group", "silent_group"), ("query", "silent_query")])
def test_magnitude_keeps_heads_with_large_weights_that_contribute_nothing(mode, plant, tokenizer):
    original, model, planted = _heads_case(plant)
    _prune(model, tokenizer, method="attention_heads", score="magnitude", target=Target(ratio=0.5),
           options={"mode": mode})
    for i in range(LAYERS):
        assert set(planted[i]) <= set(_kept_heads(original, model, i))


# ------------------------------------------------------------------------------------------------- depth

@torch.no_grad()
def _identity_units(model, unit: str) -> int:
    """Make one unit the identity (zero output projection); returns its layer."""
    layer = {"block": 2, "attention": 1, "mlp": 3}[unit]
    if unit in ("block", "attention"):
        _attn(model, layer).o_proj.weight.zero_()
    if unit in ("block", "mlp"):
        _mlp(model, layer).down_proj.weight.zero_()
    return layer


@pytest.mark.parametrize("score", ["cosine", "angular", "update_norm", "relative_update_norm", "ppl_drop",
                                   "shapley_loo", "shapley_mc"])
@pytest.mark.parametrize("unit", ["block", "attention", "mlp"])
def test_depth_removes_the_planted_identity_unit(score, unit, tokenizer):
    """Sub-network scores use the logit-distance utility: removing the identity unit costs exactly nothing, while
    on a random model removing a real block may even lower the loss."""
    original = tiny_model("llama")
    planted = _identity_units(original, unit)
    model = copy.deepcopy(original)
    result = _prune(model, tokenizer, method="depth", score=score, target=Target(ratio=0.25),
                    options={"unit": unit, "utility": "logit_distance", "samples": 8})
    assert result.report["removed"] == [planted]
    if unit == "block":
        kept = [i for i in range(LAYERS) if i != planted]
        for new, old in enumerate(kept):
            assert torch.equal(_attn(model, new).q_proj.weight, _attn(original, old).q_proj.weight)
    else:
        skips = [s.skip for s in layer_shapes(model.config)]
        assert [unit in s for s in skips] == [i == planted for i in range(LAYERS)]


# ----------------------------------------------------------------------------------------------- SlimLLM

SLIM_HEADS = {"prune_mlp": False, "nonuniform": False, "protect_ends": False}  # every layer prunable


@pytest.mark.parametrize("mode,plant", [("kv_group", "silent_group"), ("query", "silent_query")])
@pytest.mark.parametrize("greedy", [True, False])
def test_slimllm_prunes_heads_that_contribute_nothing(mode, plant, greedy, tokenizer):
    original, model, planted = _heads_case(plant)
    # half the units, as a share of the attention parameters: a KV group costs q, k, v and o rows (norms and the
    # like stay, so 0.5 is out of reach), a query head only q and o (half of them: about 0.32)
    result = _prune(model, tokenizer, method="slimllm", target=Target(ratio=0.45 if mode == "kv_group" else 0.3),
                    options={**SLIM_HEADS, "head_mode": mode, "greedy": greedy})
    for i in range(LAYERS):
        assert _kept_heads(original, model, i) == sorted(set(range(HEADS)) - set(planted[i])), f"layer {i}"
        assert torch.equal(_mlp(model, i).gate_proj.weight, _mlp(original, i).gate_proj.weight)  # prune_mlp=False
        assert torch.equal(_mlp(model, i).down_proj.weight, _mlp(original, i).down_proj.weight)
    assert result.report["regression_fold"]["mlp"] == "none"


@torch.no_grad()
def _planted_channels(seed: int = 0):
    """Per layer 40 channels with weights 1e4 times smaller, one of which (the lowest, `zero`) is exactly zero."""
    original = tiny_model("llama", seed)
    planted, zero = {}, {}
    for i in range(LAYERS):
        planted[i] = _planted_neurons(i, 40)
        _shrink_neurons(original, {i: planted[i]}, 1e-4)
        zero[i] = planted[i][i]
        mlp = _mlp(original, i)
        mlp.gate_proj.weight[zero[i]] = 0.0
        mlp.up_proj.weight[zero[i]] = 0.0
        mlp.down_proj.weight[:, zero[i]] = 0.0
    return original, copy.deepcopy(original), planted, zero


@pytest.mark.parametrize("keep_lowest", [True, False])
@pytest.mark.parametrize("feature_space", [True, False])
def test_slimllm_prunes_the_lowest_channels_but_keeps_the_lowest_one_percent(keep_lowest, feature_space, tokenizer):
    """m = 96 channels: the 1% rule keeps round(0.96) = 1 channel, the lowest-scored (the all-zero one); the next
    ones pruned are planted channels. Without the rule the zero channel goes first."""
    original, model, planted, zero = _planted_channels()
    _prune(model, tokenizer, method="slimllm", target=Target(ratio=0.25),
           options={"prune_heads": False, "nonuniform": False, "keep_lowest": keep_lowest,
                    "feature_space": feature_space, "protect_ends": False})
    removed = _removed_neurons(original, model)
    for i in range(LAYERS):
        assert 20 <= len(removed[i]) <= 39  # about 25% of the channels, fewer than the planted ones
        assert set(removed[i]) <= set(planted[i]), f"layer {i}: unplanted channels pruned"
        assert (zero[i] in removed[i]) is not keep_lowest
        assert _kept_heads(original, model, i) == list(range(HEADS))  # prune_heads=False: attention untouched
        assert torch.equal(_attn(model, i).o_proj.weight, _attn(original, i).o_proj.weight)


@torch.no_grad()
def _layer_cosines(model, ids) -> list[float]:
    """Mean over tokens of cos(input, output) of every decoder layer, from hooks on a plain forward."""
    sums: dict[int, list[float]] = {}

    def hook(i):
        def fn(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).flatten(0, -2)
            y = (output[0] if isinstance(output, tuple) else output).flatten(0, -2)
            cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
            acc = sums.setdefault(i, [0.0, 0])
            acc[0] += cos.sum().item()
            acc[1] += cos.numel()
        return fn

    layers = decoder_layers(model, spec_for_config(model.config))
    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for start in range(0, ids.shape[0], 2):
            model(ids[start:start + 2], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [sums[i][0] / sums[i][1] for i in range(len(layers))]


def test_slimllm_nonuniform_ratios_prune_the_most_similar_unprotected_layers(tokenizer):
    """Eq. 11 prunes the N_p layers whose output is most similar to their input (cosine measured here with hooks on
    the unpruned model), never a protected one; within them only planted channels go."""
    from core.calibration import load_calibration

    original, model, planted, zero = _planted_channels(seed=1)
    cosines = _layer_cosines(original, load_calibration(tokenizer, CALIB))
    expected = set(sorted(range(1, LAYERS), key=lambda i: -cosines[i])[:2])  # layer 0 protected
    result = _prune(model, tokenizer, method="slimllm", target=Target(ratio=0.1),
                    layers=LayerSelection(protect_first=1), options={"prune_heads": False, "pruned_layers": 2, "protect_ends": False})
    ratios = [entry["ratio"] for entry in result.report["layers"]]
    assert {i for i, r in enumerate(ratios) if r > 0} == expected
    removed = _removed_neurons(original, model)
    for i in range(LAYERS):
        assert bool(removed[i]) == (i in expected), f"layer {i}"
        assert set(removed[i]) <= set(planted[i])


@pytest.mark.parametrize("method, score, needs", [
    ("mlp_width", None, False), ("mlp_width", "maw", False), ("mlp_width", "maw_range", False),
    ("mlp_width", "activation", True), ("attention_heads", None, False), ("attention_heads", "activation", True),
    ("depth", None, True)])
def test_a_method_asks_for_calibration_data_only_when_its_score_reads_activations(method, score, needs):
    """Weight scores are computed from the checkpoint alone: no calibration text is read (nor its file checked)."""
    recipe = Recipe(method=method, score=score, target=Target(ratio=0.25),
                    calibration=CalibrationConfig(source="no/such/calibration.txt"))
    chosen = METHODS.get(method)
    assert chosen.needs_data(recipe) is needs
    if not needs:
        chosen.validate(recipe)  # the missing file does not matter
    else:
        with pytest.raises(CalibrationError, match="does not exist"):
            chosen.validate(recipe)
