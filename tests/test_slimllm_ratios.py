"""SlimLLM per-layer ratios: heads and channels of a layer at the ratio it reports, never past the clip, end layers
untouched unless asked, the rounding residue absorbed in proportion to the ratios, the paper's constants."""
from __future__ import annotations

import math
import random

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

import core
from conftest import save_tiny
from core.errors import InvalidTargetError
from core.layer_config import layer_shapes
from core.methods.slimllm import PAPER_SETTINGS, default_alpha, default_pruned_layers
from core.methods.slimllm_budget import LayerSizes, allocate, channel_range, head_count

CALIB = core.CalibrationConfig(n_samples=4, seq_len=48)


def _model(layers: int = 6, heads: int = 8, kv: int = 8, width: int = 96, seed: int = 0, quiet=()):
    """A random tiny Llama; the blocks in `quiet` get near-zero output projections (cos(in, out) ~ 1: the blocks
    eq. 11 prunes hardest)."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv, head_dim=64 // heads,
                         intermediate_size=width, num_hidden_layers=layers, vocab_size=4096,
                         max_position_embeddings=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
        for i in quiet:
            layer = model.model.layers[i]
            layer.self_attn.o_proj.weight.mul_(1e-3)
            layer.mlp.down_proj.weight.mul_(1e-3)
    return model.eval()


def _run(folder, options=None, target=None, **kwargs):
    recipe = core.Recipe(model=str(folder), method="slimllm", target=target or core.Target(ratio=0.4),
                         options=options or {}, calibration=CALIB, batch_size=4, **kwargs)
    return core.run_recipe(recipe)


def _removed_fractions(result, original):
    """(heads, channels) fraction removed per layer, measured on the pruned model."""
    before, after = layer_shapes(original.config), layer_shapes(result.model.config)
    return [(1 - a.num_attention_heads / b.num_attention_heads, 1 - a.intermediate_size / b.intermediate_size)
            for b, a in zip(before, after)]


def _layer_state(model, i):
    return {k: v.clone() for k, v in model.model.layers[i].state_dict().items()}


# -- the allocation, as a pure function ----------------------------------------------------------------------------

def _random_case(seed: int):
    rng = random.Random(seed)
    n = rng.randint(3, 12)
    layers = []
    for _ in range(n):
        units = rng.choice([2, 4, 8, 32])
        width = rng.choice([96, 768, 1000, 11008])
        layers.append(LayerSizes(units, rng.randint(500, 5000), width, rng.randint(50, 300)))
    ratios = [0.0 if rng.random() < 0.2 else rng.uniform(0.05, 0.85) for _ in range(n)]
    ratios[rng.randrange(n)] = rng.uniform(0.1, 0.85)
    most = sum(math.floor(0.9 * l.head_units) * l.head_cost + 0.9 * l.channels * l.channel_cost
               for l, r in zip(layers, ratios) if r > 0)
    multiple = rng.choice([m for m in (1, 1, 8, 64) if m * 8 <= min(l.channels for l in layers)])
    return layers, ratios, int(rng.uniform(0.1, 0.7) * most), multiple


@pytest.mark.parametrize("seed", range(40))
def test_allocation_keeps_each_layer_at_one_ratio_within_one_unit_and_the_clip(seed):
    layers, ratios, target, multiple = _random_case(seed)
    clip = 0.9
    try:
        plan = allocate(ratios, layers, target, clip, multiple)
    except InvalidTargetError:
        pytest.skip("target above what the clip allows")
    for r, r_used, k, c, l in zip(ratios, plan.ratios, plan.heads, plan.channels, layers):
        assert r_used == pytest.approx(min(clip, plan.scale * r))  # one common scale: residue in proportion
        assert r_used <= clip + 1e-12
        assert abs(k - r_used * l.head_units) < 1 + 1e-9  # heads within one unit of the layer's ratio
        assert abs(c - r_used * l.channels) <= max(multiple, 1) + 1e-9  # channels within one rounding unit
        assert k <= clip * l.head_units + 1e-9 and c <= clip * l.channels + 1e-9
        assert c % max(multiple, 1) == 0
        if r == 0:
            assert k == c == 0
    assert plan.removed == sum(k * l.head_cost + c * l.channel_cost
                               for k, c, l in zip(plan.heads, plan.channels, layers))


def test_allocation_absorbs_the_head_rounding_residue_in_the_channels_of_every_layer():
    # 3 layers with 4 head units each: heads round to whole units, channels (fine) take up the rest
    layers = [LayerSizes(4, 1_000, 1000, 10)] * 3
    ratios = [0.2, 0.3, 0.4]
    target = 12_600  # 0.3 of every layer: 3.6 head units, which round to 4 (one too many)
    plan = allocate(ratios, layers, target, 0.9)
    assert plan.heads == [1, 1, 2]
    assert abs(plan.removed - target) <= 10  # one channel
    # the proportion between layers survives: every ratio moved by the same factor
    assert plan.ratios[1] / plan.ratios[0] == pytest.approx(1.5) and plan.ratios[2] / plan.ratios[0] == pytest.approx(2)
    assert plan.scale != pytest.approx(1.0)


def test_allocation_never_goes_past_the_clip_and_refuses_a_target_above_it():
    layers = [LayerSizes(8, 1000, 100, 10)] * 2
    plan = allocate([0.85, 0.2], layers, 1000 * 7 + 90 * 10 + 4000, 0.9)  # pushes layer 0 into the clip
    assert plan.ratios[0] == 0.9 and plan.ratios[1] > 0.2
    assert plan.heads[0] <= 7 and plan.channels[0] <= 90
    with pytest.raises(InvalidTargetError, match="clip"):
        allocate([0.5, 0.5], layers, 2 * (7 * 1000 + 90 * 10) + 1, 0.9)


def test_unit_rounding_helpers():
    assert head_count(0.9, 32, 0.9) == 28  # round(28.8) = 29 would pass the clip
    assert head_count(0.9, 4, 0.9) == 3 and head_count(0.99, 2, 0.99) == 1  # never every unit
    assert channel_range(0.5, 768, 64, 0.9) == (384, 384)
    assert channel_range(0.53, 768, 64, 0.9) == (384, 448)
    assert channel_range(0.95, 768, 64, 0.9) == (640, 640)  # clip 0.9 * 768 = 691 -> 640


# -- on a model ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """(original model, its folder, the result of SlimLLM with default options at 30% of heads + MLP)."""
    original = _model()
    folder = save_tiny(original, tmp_path_factory.mktemp("slim-src"))
    return original, folder, _run(folder, target=core.Target(ratio=0.3))


def test_heads_and_channels_follow_the_reported_ratio_of_each_layer(default_run):
    original, _, result = default_run
    report = result.report
    measured = _removed_fractions(result, original)
    for entry, (heads, channels) in zip(report["layers"], measured):
        r = entry["ratio"]
        assert r <= 0.9
        assert abs(heads - r) <= 1 / 8 + 1e-9, entry  # within one of 8 KV groups
        assert abs(channels - r) <= 1 / 96 + 1e-9, entry  # within one of 96 channels
        assert heads <= 0.9 and channels <= 0.9
        assert (entry["heads_removed_fraction"], entry["channels_removed_fraction"]) == pytest.approx((heads, channels))
    requested = [e["ratio_requested"] for e in report["layers"]]
    used = [e["ratio"] for e in report["layers"]]
    for q, u in zip(requested, used):
        assert u == pytest.approx(min(0.9, report["ratio_scale"] * q))
    # the head and MLP weight matrices lose about 30% of their parameters (up to the head-rounding steps)
    def matrices(model):
        return sum(p.numel() for layer in model.model.layers for p in layer.parameters() if p.dim() == 2)

    removed = matrices(original) - matrices(result.model)
    assert abs(removed - 0.3 * matrices(original)) < 0.02 * matrices(original)


def test_a_heavy_target_never_pushes_an_mlp_past_the_clip(tmp_path):
    """The old MLP top-up took a tiny model's MLP to 0.99 where r_l was 0.9."""
    original = _model(quiet=(2,))  # layer 2 gets the highest eq. 11 ratio
    folder = save_tiny(original, tmp_path / "src")
    result = _run(folder, options={"alpha": 30.0}, target=core.Target(ratio=0.55))
    fractions = _removed_fractions(result, original)
    assert max(c for _, c in fractions) <= 0.9 and max(h for h, _ in fractions) <= 0.9
    assert result.report["layers"][2]["ratio"] == 0.9  # the clip binds there, and the excess went elsewhere


def test_end_layers_are_untouched_by_default_and_pruned_when_asked(tmp_path):
    # the first and last blocks are made the most input/output-similar: eq. 11 alone would prune them hardest
    original = _model(quiet=(0, 5))
    folder = save_tiny(original, tmp_path / "src")
    result = _run(folder)
    ratios = [e["ratio"] for e in result.report["layers"]]
    assert ratios[0] == ratios[5] == 0.0 and all(r > 0 for r in ratios[1:5])
    for i in (0, 5):
        kept, before = _layer_state(result.model, i), _layer_state(original, i)
        for name, value in before.items():
            torch.testing.assert_close(kept[name], value, rtol=0, atol=0)  # not even the regression fold
        for name in set(kept) - set(before):  # the family's bias flags add biases to every layer: zero here
            assert name.endswith("bias") and not kept[name].any()
    unprotected = _run(folder, options={"protect_ends": False})
    ratios = [e["ratio"] for e in unprotected.report["layers"]]
    assert ratios[0] > max(ratios[1:5]) and ratios[5] > max(ratios[1:5])


def test_the_share_of_protected_ends_goes_to_the_middle_layers_as_eq11_does(default_run):
    report = default_run[2].report
    prunable = [e for e in report["layers"] if e["ratio_requested"] > 0]
    assert [e["layer"] for e in prunable] == [1, 2, 3, 4]
    assert report["pruned_layers"] == 4
    # eq. 11 over the middle layers: r_l = r0 * N_p * softmax(alpha * c_l), averaging r0 = rho * L / N_p
    # layers below the clip keep the proportions of exp(alpha * c_l); those above it sit at the clip
    sims = torch.tensor([e["similarity"] for e in prunable], dtype=torch.float64)
    weights = torch.exp(report["alpha"] * (sims - sims.max()))
    ratios = torch.tensor([e["ratio_requested"] for e in prunable], dtype=torch.float64)
    free = ratios < 0.9 - 1e-12
    assert free.sum() >= 2 and torch.allclose(ratios[~free], torch.tensor(0.9, dtype=torch.float64))
    assert torch.allclose(ratios[free] / weights[free], (ratios[free] / weights[free])[0].expand(int(free.sum())))
    assert ratios.mean().item() == pytest.approx(report["r0"])
    assert report["r0"] == pytest.approx(report["average_ratio"] * 6 / 4)


def test_a_two_layer_model_with_protected_ends_is_a_clear_error(tmp_path):
    folder = save_tiny(_model(layers=2), tmp_path / "src")
    with pytest.raises(InvalidTargetError, match="protect_ends=false"):
        _run(folder)
    assert _run(folder, options={"protect_ends": False}).params_after["total"] < _model(layers=2).num_parameters()


def test_the_ratios_used_are_written_to_the_recipe(default_run, tmp_path):
    result = default_run[2]
    out = core.save_pruned(result, tmp_path / "out")
    written = yaml.safe_load((out / "pruning_recipe.yaml").read_text())
    layers = next(v["layers"] for v in _dicts(written) if isinstance(v.get("layers"), list)
                  and v["layers"] and "ratio_requested" in v["layers"][0])
    assert [l["ratio"] for l in layers] == pytest.approx([e["ratio"] for e in result.report["layers"]])
    assert [l["heads_removed_fraction"] for l in layers] == pytest.approx(
        [e["heads_removed_fraction"] for e in result.report["layers"]])
    assert "protect_ends" in yaml.safe_dump(written)


def _dicts(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _dicts(v)


# -- the paper's constants -----------------------------------------------------------------------------------------

def test_the_papers_llama7b_settings_are_reproduced_exactly():
    """LLaMA-7B (L = 32): r0 = 0.25, N_p = 26, alpha = 10 and r0 = 0.55, N_p = 30, alpha = 7 remove r0 * N_p / L of
    the heads + MLP parameters; at those targets our derivation gives back exactly the paper's constants."""
    for (rho, frac, alpha), (r0, n_p) in zip(PAPER_SETTINGS, [(0.25, 26), (0.55, 30)]):
        assert rho == pytest.approx(r0 * n_p / 32) and frac == n_p / 32
        assert default_pruned_layers(32, rho) == n_p
        assert default_alpha(rho) == pytest.approx(alpha)
        assert rho * 32 / default_pruned_layers(32, rho) == pytest.approx(r0)
    # as fractions of all LLaMA-7B parameters (d 4096, MLP 11008, vocab 32000 untied): 19.5% and 49.6%
    d, m, vocab = 4096, 11008, 32000
    per_layer = 4 * d * d + 3 * d * m
    total = 32 * (per_layer + 2 * d) + 2 * vocab * d + d
    assert [round(rho * 32 * per_layer / total, 3) for rho, _, _ in PAPER_SETTINGS] == [0.195, 0.496]
    # what the module docstring states for round targets: of the heads + MLP, and of all parameters
    r0 = lambda rho: rho * 32 / default_pruned_layers(32, rho)  # noqa: E731
    assert [round(r0(r), 3) for r in (0.2, 0.5)] == [0.246, 0.533]
    assert [round(r0(r * total / (32 * per_layer)), 3) for r in (0.2, 0.5)] == [0.256, 0.555]
