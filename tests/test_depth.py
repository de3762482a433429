"""Depth-pruning study: scores, sub-network estimators, iterative selection, average-update recovery, round trips."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import core
from conftest import logits
from core.calibration import load_calibration
from core.scores.depth import (drop_when_removed, leave_one_out_masks, present_minus_absent, random_masks,
                               relative_update_norm, update_norm)

CALIB = core.CalibrationConfig(n_samples=4, seq_len=32)


def _run(src, **kwargs):
    options = kwargs.pop("options", {})
    target = kwargs.pop("target", core.Target(ratio=0.25))
    recipe = core.Recipe(model=str(src), method="depth", target=target, options=options, calibration=CALIB,
                         batch_size=2, **kwargs)
    return core.run_recipe(recipe)


def test_update_norm_scores():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    y = torch.tensor([[3.0, 4.0], [1.0, 2.0]])
    assert update_norm(x, y).tolist() == [0.0, 2.0]
    assert relative_update_norm(x, y).tolist() == [0.0, 2.0]


def test_subnetwork_estimators():
    masks = leave_one_out_masks(3)
    assert masks.tolist() == [[True, True, True], [False, True, True], [True, False, True], [True, True, False]]
    utilities = torch.tensor([-1.0, -3.0, -1.5, -1.0], dtype=torch.float64)  # removing unit 0 hurts most
    assert drop_when_removed(masks, utilities).tolist() == [2.0, 0.5, 0.0]
    values = present_minus_absent(masks, utilities)
    # unit 0: present in rows 0, 2, 3 (mean -7/6), absent in row 1 (-3)
    assert values[0].item() == pytest.approx(-3.5 / 3 + 3.0)
    assert values.argmax().item() == 0 and values.argmin().item() == 2
    gen = torch.Generator().manual_seed(0)
    rand = random_masks(10, 20, 0.9, gen)
    assert rand.shape == (20, 10) and (rand.sum(1) == 9).all()
    assert torch.equal(rand, random_masks(10, 20, 0.9, torch.Generator().manual_seed(0)))
    never_absent = present_minus_absent(torch.ones(4, 2, dtype=torch.bool), torch.zeros(4, dtype=torch.float64))
    assert torch.isinf(never_absent).all()


@pytest.mark.parametrize("score", ["cosine", "angular", "update_norm", "relative_update_norm", "ppl_drop",
                                   "shapley", "loo_contrast", "subnet_contrast"])
@pytest.mark.parametrize("unit", ["block", "attention", "mlp"])
def test_every_score_and_unit_removes_the_lowest_units(tiny_dir, score, unit):
    src = tiny_dir("llama")
    result = _run(src, score=score, options={"unit": unit, "samples": 6})
    removed = result.report["removed"]
    assert len(removed) == 1
    scores = {int(k): v for k, v in result.report["scores"].items()}
    assert removed[0] == min(scores, key=lambda i: (scores[i], i))
    shapes = [l.get("skip", []) for l in result.layers()]
    if unit == "block":
        assert result.model.config.num_hidden_layers == 3
    else:
        assert sum(unit in s for s in shapes) == 1


def test_sublayer_scores_are_measured_around_the_sublayer(tiny_dir):
    """update_norm of an attention sub-layer = mean over tokens of the norm of that sub-layer's output."""
    src = tiny_dir("llama")
    model, tokenizer = core.load_model(str(src), core.LoadOptions(device="cpu"))
    ids = load_calibration(tokenizer, CALIB)
    result = _run(src, score="update_norm", options={"unit": "attention"})
    outs: dict[int, list] = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o, k=k: outs.setdefault(k, []).append(o[0]))
             for k, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids[:2], use_cache=False)
        model(ids[2:], use_cache=False)
    for h in hooks:
        h.remove()
    scores = result.report["scores"]
    assert sorted(scores) == ["0", "1", "2", "3"]
    for layer, batches in outs.items():
        expected = torch.cat([o.flatten(0, -2) for o in batches]).norm(dim=-1).mean().item()
        assert scores[str(layer)] == pytest.approx(expected, rel=1e-4)


def test_iterative_rescoring_scores_once_per_removal(tiny_dir):
    src = tiny_dir("llama")
    result = _run(src, options={"unit": "attention", "iterative": True}, target=core.Target(ratio=0.5))
    history = result.report["scores"]
    assert isinstance(history, list) and len(history) == 2
    first, second = history
    removed_first = min(first, key=lambda k: (first[k], int(k)))
    assert removed_first not in second and len(second) == len(first) - 1


def test_subnet_contrast_evaluates_each_distinct_subnetwork_once(tiny_dir):
    src = tiny_dir("llama")
    seen = []
    recipe = core.Recipe(model=str(src), method="depth", score="subnet_contrast", target=core.Target(ratio=0.25),
                         options={"samples": 5, "keep": 0.75, "utility": "logit_distance"}, calibration=CALIB)
    result = core.run_recipe(recipe, progress=lambda stage, done, total: seen.append((stage, total)))
    distinct = len(torch.unique(random_masks(4, 5, 0.75, torch.Generator().manual_seed(recipe.seed)), dim=0))
    assert ("depth: subnet_contrast sub-networks", distinct) in seen
    estimate = result.report["estimate"]
    assert estimate["samples"] == 5 and estimate["subnetworks_evaluated"] == distinct
    assert estimate["utility"] == "logit_distance"


def _mean_updates(model, ids, skip_first=False):
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    sl = slice(1, None) if skip_first else slice(None)
    return [(hs[i + 1] - hs[i])[:, sl].flatten(0, 1).double().mean(0) for i in range(len(hs) - 2)]


@pytest.mark.parametrize("family,stored", [("llama", "folded_into_previous_mlp_bias"),
                                           ("gemma2", "kept_as_constant_layer")])
@pytest.mark.parametrize("skip_first", [False, True])
def test_average_update_recovery_reproduces_the_mean_update(tiny_dir, tmp_path, family, stored, skip_first, tokens):
    src = tiny_dir(family)
    model, tokenizer = core.load_model(str(src), core.LoadOptions(device="cpu"))
    ids = load_calibration(tokenizer, CALIB)
    expected = _mean_updates(model, ids, skip_first)
    result = _run(src, options={"layers": [2], "recovery": "mean_update", "recovery_skip_first": skip_first})
    info = result.report["recovery"]
    assert info[stored] == [2]
    pruned = result.model
    if stored == "folded_into_previous_mlp_bias":
        assert pruned.config.num_hidden_layers == 3 and pruned.config.mlp_bias
        before = model.model.layers[1].mlp.down_proj
        added = pruned.model.layers[1].mlp.down_proj.bias.double() - (before.bias.double() if before.bias is not None else 0)
        torch.testing.assert_close(added, expected[2], atol=1e-5, rtol=1e-4)
    else:
        assert pruned.config.per_layer_config[2].skip == ["attention", "mlp"]
        constant = pruned.model.layers[2].mlp.bias.double()
        torch.testing.assert_close(constant, expected[2], atol=1e-5, rtol=1e-4)
        # the constant layer moves every token's residual stream by exactly the mean update
        with torch.no_grad():
            hs = pruned(ids, output_hidden_states=True, use_cache=False).hidden_states
        delta = (hs[3] - hs[2]).flatten(0, 1).double()
        torch.testing.assert_close(delta, expected[2].expand_as(delta), atol=1e-4, rtol=1e-4)
    out = core.save_pruned(result, tmp_path / "out")
    reloaded = core.load_pruned(str(out), device="cpu")
    torch.testing.assert_close(logits(reloaded, tokens), logits(pruned, tokens), atol=1e-5, rtol=0)


def test_recovery_on_the_pruned_model_is_progressive(tiny_dir):
    src = tiny_dir("llama")
    a = _run(src, options={"unit": "attention", "layers": [1, 2], "recovery": "mean_update"})
    b = _run(src, options={"unit": "attention", "layers": [1, 2], "recovery": "mean_update",
                           "recovery_source": "pruned"})
    na, nb = a.report["recovery"]["norms"], b.report["recovery"]["norms"]
    assert na["1"] == pytest.approx(nb["1"], rel=1e-5)  # nothing removed before layer 1
    assert na["2"] != pytest.approx(nb["2"], rel=1e-6)  # layer 2 sees the pruned layer 1


DEPTH_OPTIONS = [
    ({"unit": "block"}, True),
    ({"unit": "block", "recovery": "mean_update"}, True),  # folded into the previous MLP bias: still uniform
    ({"unit": "attention", "recovery": "mean_update", "recovery_source": "pruned"}, False),
    ({"unit": "mlp", "iterative": True}, False),
    ({"unit": "block", "iterative": True, "utility": "logit_distance"}, True),
]


@pytest.mark.parametrize("options,uniform", DEPTH_OPTIONS, ids=lambda v: str(v))
def test_depth_options_round_trip(tiny_dir, tmp_path, options, uniform, tokens):
    src = tiny_dir("llama")
    result = _run(src, score="shapley_loo" if "utility" in options else "cosine", options=options)
    assert result.uniform == uniform
    out = core.save_pruned(result, tmp_path / "out")
    if uniform:
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    else:
        reloaded = core.load_pruned(str(out), device="cpu")
    torch.testing.assert_close(logits(reloaded, tokens), logits(result.model, tokens), atol=1e-5, rtol=0)
    assert core.Recipe.from_file(out / "pruning_recipe.yaml").options == options


@pytest.mark.parametrize("param_ratio", [0.05, 0.1, 0.16])
def test_parameter_target_removes_the_closest_number_of_blocks(tiny_dir, param_ratio):
    src = tiny_dir("llama")
    result = _run(src, target=core.Target(param_ratio=param_ratio))
    before = result.params_before["total"]
    block = result.params_before["layers"][0]["attention"] + result.params_before["layers"][0]["mlp"] + \
        result.params_before["layers"][0]["other"]
    wanted = param_ratio * before
    k = len(result.report["removed"])
    assert before - result.params_after["total"] == k * block
    best = min(range(1, 4), key=lambda n: abs(n * block - wanted))
    assert k == best


def test_subnetwork_plans_evaluate_the_networks_they_name():
    from core.scores import depth

    gen = torch.Generator().manual_seed(0)
    plan = depth._loo_plan(drop_when_removed, "leave_one_out")(3, depth.Sampling(), gen)
    assert plan.masks.tolist() == leave_one_out_masks(3).tolist()  # the full network, then each unit removed
    estimate = plan.estimate(torch.tensor([-1.0, -3.0, -1.5, -1.0], dtype=torch.float64))
    assert estimate.values.tolist() == [2.0, 0.5, 0.0] and estimate.stderr is None
    assert estimate.info == {"estimator": "leave_one_out", "subnetworks": 4}
    exact = depth._shapley(3, depth.Sampling(exact_max=12), gen)
    assert exact.masks.shape == (8, 3)  # every subset of three units: exact enumeration
    additive = exact.masks.double() @ torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    assert torch.allclose(exact.estimate(additive).values, torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
