"""Iterative pruning: N prune -> recover rounds reach the same final size as one-shot pruning, for every
structured method, with linear and cubic schedules; methods whose target is cumulative (sparsity) get the
cumulative fraction."""
from __future__ import annotations

import pytest

import core
from conftest import save_tiny, tiny_model
from recover_fixtures import one_thread, tokenizer  # noqa: F401  (fixtures)
from core import LayerSelection, Recipe, Target
from core.errors import RecipeError
from core.recover_config import RecoverConfig
from core.recover_schedule import Schedule, fractions

ROUNDS_ONLY = RecoverConfig(steps=0, rounds=3)



@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("schedule-src"))


def test_fractions():
    assert fractions(4, "linear") == [0.25, 0.5, 0.75, 1.0]
    cubic = fractions(4, "cubic")
    assert cubic[-1] == 1.0 and cubic[0] == pytest.approx(1 - 0.75 ** 3)
    steps = [b - a for a, b in zip([0.0] + cubic, cubic)]
    assert steps == sorted(steps, reverse=True)  # big steps first, small ones near the end


def _schedule(target, cumulative=False, rounds=4, ratios=None):
    recipe = Recipe(method="mlp_width", target=target, recover=RecoverConfig(steps=0, rounds=rounds),
                    layers=LayerSelection(ratios=ratios))
    return Schedule(recipe, cumulative, params_original=1000, width_original=96, hidden_size=64)


def test_round_targets_compose_to_the_final_one():
    s = _schedule(Target(ratio=0.5), ratios=(0.0, 0.5))
    left = 1.0
    per_layer = 1.0
    for t in range(4):
        r = s.round_recipe(t, 1000)
        left *= 1 - r.target.ratio
        per_layer *= 1 - r.layers.ratios[1]
        assert r.layers.ratios[0] == 0.0 and r.recover is None
        assert left == pytest.approx(1 - 0.5 * (t + 1) / 4)  # the cumulative removed fraction is linear
    assert per_layer == pytest.approx(0.5)
    params = _schedule(Target(param_ratio=0.4))
    assert [params.round_recipe(t, 1000).target.target_params for t in range(4)] == [900, 800, 700, 600]
    assert params.round_recipe(1, 750) is None  # an earlier round overshot: nothing to prune this round
    width = _schedule(Target(width=48))
    assert [width.round_recipe(t, 1000).target.width for t in range(3)] == [84, 72, 60]
    assert width.round_recipe(3, 1000).target == Target(width=48)  # the exact final target
    cumulative = _schedule(Target(ratio=0.5), cumulative=True)
    assert [cumulative.round_recipe(t, 1000).target.ratio for t in range(4)] == [0.125, 0.25, 0.375, 0.5]


def test_a_round_that_pruned_nothing_leaves_its_share_to_the_next():
    s = _schedule(Target(ratio=0.5), rounds=3)
    assert s.round_recipe(1, 1000).target.ratio == pytest.approx(0.2)  # 1/3 of the way after 1/6: 0.2 of what is left
    assert s.round_recipe(1, 1000, reached=0.0).target.ratio == pytest.approx(1 / 3)  # round 1 pruned nothing
    assert s.round_recipe(2, 1000, reached=0.0).target.ratio == pytest.approx(0.5)  # nor did round 2: all at once


def test_explicit_depth_layers_cannot_be_scheduled():
    with pytest.raises(RecipeError, match="rounds"):
        Schedule(Recipe(method="depth", target=Target(ratio=0.5), options={"layers": [1]},
                        recover=RecoverConfig(rounds=2)), False, 1, 1, 1)


CASES = [
    ("mlp_width", dict(score="maw"), Target(ratio=0.5), {}),
    ("mlp_width", dict(score="activation"), Target(param_ratio=0.1), {}),
    # 2 query heads per group: only 50% steps exist, so the finer rounds prune nothing and the last one catches up
    ("attention_heads", dict(score="magnitude"), Target(ratio=0.5), {"mode": "query"}),
    ("depth", dict(score="cosine"), Target(param_ratio=0.16), {}),  # a block is 8% of the tiny model
    ("slimllm", {}, Target(param_ratio=0.1), {"prune_heads": False, "protect_ends": False}),  # 2 heads per group run out in rounds
]


@pytest.mark.parametrize("method,extra,target,options", CASES,
                         ids=[f"{(c.values if hasattr(c, 'values') else c)[0]}-{i}" for i, c in enumerate(CASES)])
def test_rounds_reach_the_one_shot_size(src, method, extra, target, options):
    base = Recipe(method=method, target=target, model=str(src), options=options, **extra)
    one_shot = core.run_recipe(base)
    rounds = core.run_recipe(base.replace(recover=ROUNDS_ONLY))
    per_round = rounds.extra["recovery"]["per_round"]
    assert len(per_round) == 3 and rounds.report["rounds"]
    sizes = [r["params_after"] for r in per_round if r["target"]]
    steps = 1 if method == "attention_heads" else 2  # it really prunes in steps where the units allow it
    assert sizes == sorted(sizes, reverse=True) and len(sizes) >= steps
    unit = max(2 * 64 * 16 + 64 * 16, 3 * 64)  # one query head (q rows + o columns) or one neuron, whichever larger
    tolerance = unit if method != "depth" else one_shot.params_before["total"] // 4
    assert abs(rounds.params_after["total"] - one_shot.params_after["total"]) <= tolerance


def test_rounds_with_recovery_record_each_round(src):
    cfg = RecoverConfig(steps=6, rounds=2, batch_size=2, seq_len=32, eval_every=3, data_tokens=10_000, lm=1.0,
                        lr=3e-3, schedule="cubic")
    result = core.run_recipe(Recipe(method="maw", target=Target(ratio=0.5), model=str(src), recover=cfg))
    rec = result.extra["recovery"]
    assert rec["rounds"] == 2 and rec["schedule"] == "cubic" and rec["steps"] == 6
    assert {h["round"] for h in rec["loss_curve"]} == {1, 2}
    assert [r["round"] for r in rec["per_round"]] == [1, 2]
    widths = {s.intermediate_size for s in core.layer_config.layer_shapes(result.model.config)}
    assert widths == {48}


def test_prune_cli_flags_fill_the_recover_section(src, tmp_path):
    import yaml

    from core.cli import main
    from core.export import RECIPE_FILE

    out = tmp_path / "out"
    assert main(["prune", str(src), "--method", "maw", "--ratio", "0.5", "--steps", "2", "--schedule", "cubic",
                 "--recover-steps", "4", "--recover-batch-size", "2", "--recover-seq-len", "32", "--recover-lm", "1",
                 "--recover-eval-every", "2", "--out", str(out), "-q"]) == 0
    doc = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert doc["recover"]["rounds"] == 2 and doc["recover"]["steps"] == 4 and doc["recover"]["schedule"] == "cubic"
    assert doc["recover"]["batch_size"] == 2 and doc["recover"]["lm"] == 1.0
    assert doc["result"]["recovery"]["steps"] == 4 and len(doc["result"]["recovery"]["per_round"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the resumable checkpoint is gone


def test_each_round_warms_up_in_proportion_to_its_steps():
    from core.recover_run import _round_config

    cfg = RecoverConfig(steps=48, rounds=4, warmup=10)
    assert _round_config(cfg, 12).warmup == 3 and _round_config(cfg, 12).steps == 12
    assert _round_config(RecoverConfig(steps=48, warmup=10), 48).warmup == 10  # one round: the whole warm-up
