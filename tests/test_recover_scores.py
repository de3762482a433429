"""Gradient-based and tutorial scores, registered in the existing methods: first-order Taylor for MLP neurons, heads
and blocks; value-norm / attention-entropy for heads; residual contribution x gradient for layers. Planted units
that cannot matter (their output is zeroed) must be the ones removed; the Taylor values must equal |w * dL/dw|
computed directly with autograd."""
from __future__ import annotations

import math

import pytest
import torch

import core
from conftest import tiny_model
from recover_fixtures import one_thread, tokenizer  # noqa: F401  (fixtures)
from core import CalibrationConfig, Recipe, Target
from core.layer_config import layer_shapes
from core.scores import DEPTH_SCORES, HEAD_SCORES, MLP_SCORES
from core.scores.attention_probe import HeadStats

CALIB = CalibrationConfig(n_samples=8, seq_len=32)




def test_registered_in_the_existing_methods():
    assert {"taylor"} <= set(MLP_SCORES) and {"taylor", "entropy"} <= set(HEAD_SCORES)
    assert {"taylor", "contribution_gradient"} <= set(DEPTH_SCORES)
    assert MLP_SCORES.get("taylor").needs_data and HEAD_SCORES.get("entropy").stats is not None


def _prune(model, tokenizer, **recipe):
    return core.prune(model, tokenizer, Recipe(calibration=CALIB, **recipe))


def test_mlp_taylor_removes_dead_neurons_that_magnitude_keeps(tokenizer):
    dead = [0, 5, 7]
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0  # their output never reaches the residual stream
            layer.mlp.gate_proj.weight[dead] *= 4  # and their input rows are the largest
    kept = 96 - len(dead)
    _prune(model, tokenizer, method="mlp_width", score="taylor", target=Target(width=kept))
    for layer in model.model.layers:
        # a dead neuron's columns are gone: no zero column is left in down_proj
        assert (layer.mlp.down_proj.weight.abs().sum(0) > 0).all()
    magnitude = tiny_model("llama")
    with torch.no_grad():
        for layer in magnitude.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
            layer.mlp.gate_proj.weight[dead] *= 4
    _prune(magnitude, tokenizer, method="mlp_width", score="maw", target=Target(width=kept))
    assert any((layer.mlp.down_proj.weight.abs().sum(0) == 0).any() for layer in magnitude.model.layers)


def test_taylor_values_equal_autograd(tokenizer):
    """The MLP Taylor score of layer 1 equals sum |w * dL/dw| from a direct autograd computation."""
    from core.methods import PruneContext
    from core.methods.width import mlp_tensors
    from core.progress import Progress
    from core.scores.gradient_stats import mlp_gradients
    from core.scores.taylor import mlp_taylor

    model = tiny_model("llama")
    recipe = Recipe(method="mlp_width", score="taylor", target=Target(ratio=0.5), calibration=CALIB, batch_size=3)
    ctx = PruneContext(model, tokenizer, core.architectures.spec_for_config(model.config), recipe, Progress())
    ids = ctx.calibration_ids()
    mlp = model.model.layers[1].mlp
    loss = sum(torch.nn.functional.cross_entropy(model(ids[s:s + 3]).logits[:, :-1].flatten(0, 1),
                                                 ids[s:s + 3, 1:].flatten(), reduction="sum")
               for s in range(0, ids.shape[0], 3)) / (ids.shape[0] * (ids.shape[1] - 1))
    g_gate, g_up, g_down = torch.autograd.grad(loss, [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight])
    expected = ((mlp.gate_proj.weight * g_gate).abs().sum(1) + (mlp.up_proj.weight * g_up).abs().sum(1)
                + (mlp.down_proj.weight * g_down).abs().sum(0)).detach()
    tensors = mlp_tensors(model.model.layers[1], ctx.spec, layer_shapes(model.config)[1])
    tensors.extra = mlp_gradients(ctx, 1)
    torch.testing.assert_close(mlp_taylor(tensors), expected, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("score,plant", [("taylor", "o"), ("entropy", "q")])
def test_head_scores_remove_planted_heads(tokenizer, score, plant):
    """Heads 0 and 3 (one in each KV group) are planted: o columns zeroed (no effect: Taylor is zero) or q rows
    zeroed (uniform attention: maximal entropy). Query mode keeps one head per group: heads 1 and 2 remain."""
    model = tiny_model("llama")
    dh = 16
    with torch.no_grad():
        for layer in model.model.layers:
            for h in (0, 3):
                if plant == "o":
                    layer.self_attn.o_proj.weight[:, h * dh:(h + 1) * dh] = 0
                else:
                    layer.self_attn.q_proj.weight[h * dh:(h + 1) * dh] = 0
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    _prune(model, tokenizer, method="attention_heads", score=score, target=Target(ratio=0.5),
           options={"mode": "query"})
    for i, layer in enumerate(model.model.layers):
        q = reference[f"model.layers.{i}.self_attn.q_proj.weight"]
        torch.testing.assert_close(layer.self_attn.q_proj.weight, torch.cat([q[dh:2 * dh], q[2 * dh:3 * dh]]))


def test_head_entropy_statistics():
    stats = HeadStats()
    b, t, dh = 1, 5, 4
    q = torch.zeros(b, 2, t, dh)
    q[:, 1, :, 0] = 50.0  # head 1 attends (almost) only to key 0, the one its queries point at
    k = torch.zeros(b, 1, t, dh)
    k[:, :, 0] = 1.0
    v = torch.ones(b, 1, t, dh)
    stats.add(q, k, v, None, scaling=1.0)
    out = stats.result()
    uniform = sum(math.log(n) for n in range(2, t + 1)) / (t - 1)  # causal: query i sees i + 1 keys
    assert out["attention_entropy"][0].item() == pytest.approx(uniform, rel=1e-5)
    assert out["attention_entropy"][1].item() < 1e-3  # all its attention on key 0
    assert out["value_norm"].tolist() == pytest.approx([2.0, 2.0])


@pytest.mark.parametrize("score", ["taylor", "contribution_gradient"])
@pytest.mark.parametrize("unit", ["block", "attention"])
def test_depth_gradient_scores_remove_the_planted_unit(tokenizer, score, unit):
    """Block 2's (or its attention's) output projections are zeroed: its update is zero, so is its score."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        if unit == "block":
            model.model.layers[2].mlp.down_proj.weight.zero_()
    result = _prune(model, tokenizer, method="depth", score=score, target=Target(ratio=0.25),
                    options={"unit": unit, "iterative": True})
    assert result.report["removed"] == [2]
    assert all(p.grad is None for p in model.parameters())
