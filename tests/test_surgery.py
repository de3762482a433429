"""Surgery invariants for every family: keeping everything changes nothing; removing a unit whose output weights
are zero changes nothing; the config and the KV cache stay consistent."""
from __future__ import annotations

import pytest
import torch

from conftest import logits, tiny_model
from core.architectures import spec_for_config
from core.errors import InvalidTargetError
from core.layer_config import head_dim, layer_shapes
from core.layers import decoder_layers
from core.surgery import LayerPlan, prune_layer, remove_layers

ATOL = 1e-5


def _assert_cache_consistent(model, tokens):
    """Greedy generation with the KV cache gives the same tokens as without it."""
    kwargs = dict(max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(tokens))
    with torch.no_grad():
        assert torch.equal(model.generate(tokens, **kwargs), model.generate(tokens, use_cache=False, **kwargs))


def _o_and_down(model, spec, i):
    layer = decoder_layers(model, spec)[i]
    o = layer.get_submodule(f"{spec.attention.module}.{spec.attention.o}")
    down = layer.get_submodule(f"{spec.mlp.module}.{spec.mlp.down}")
    return o, down


def test_keep_everything_is_identity(family, tokens):
    model = tiny_model(family)
    spec = spec_for_config(model.config)
    ref = logits(model, tokens)
    for i, s in enumerate(layer_shapes(model.config)):
        prune_layer(model, spec, i, LayerPlan(heads=list(range(s.num_attention_heads)),
                                              kv_heads=list(range(s.num_key_value_heads)),
                                              mlp=list(range(s.intermediate_size))))
    assert torch.equal(logits(model, tokens), ref)
    assert not model.config.is_heterogeneous


def test_zero_down_column_neuron_removal_is_identity(family, tokens):
    model = tiny_model(family)
    spec = spec_for_config(model.config)
    _, down = _o_and_down(model, spec, 1)
    with torch.no_grad():
        down.weight[:, 7] = 0
    ref = logits(model, tokens)
    m = layer_shapes(model.config)[1].intermediate_size
    prune_layer(model, spec, 1, LayerPlan(mlp=[j for j in range(m) if j != 7]))
    assert decoder_layers(model, spec)[1].get_submodule(f"{spec.mlp.module}.{spec.mlp.down}").weight.shape[1] == m - 1
    torch.testing.assert_close(logits(model, tokens), ref, atol=ATOL, rtol=0)
    assert model.config.per_layer_config[1].intermediate_size == m - 1


def test_zero_output_kv_group_removal_is_identity(family, tokens):
    model = tiny_model(family)
    spec = spec_for_config(model.config)
    shape = layer_shapes(model.config)[2]
    dh = head_dim(model.config)
    rep = shape.num_attention_heads // shape.num_key_value_heads
    o, _ = _o_and_down(model, spec, 2)
    with torch.no_grad():  # silence the query heads of the last KV group
        o.weight[:, (shape.num_key_value_heads - 1) * rep * dh:] = 0
    ref = logits(model, tokens)
    kept_groups = list(range(shape.num_key_value_heads - 1))
    prune_layer(model, spec, 2, LayerPlan(heads=list(range(len(kept_groups) * rep)), kv_heads=kept_groups))
    torch.testing.assert_close(logits(model, tokens), ref, atol=ATOL, rtol=0)
    cfg = model.config.per_layer_config[2]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (len(kept_groups) * rep, len(kept_groups))


def test_block_removal_keeps_config_lists_and_cache_consistent(family, tokens):
    model = tiny_model(family)
    spec = spec_for_config(model.config)
    types_before = list(getattr(model.config, "layer_types", None) or [])
    remove_layers(model, spec, [1])
    assert model.config.num_hidden_layers == 3
    assert len(decoder_layers(model, spec)) == 3
    if types_before:
        assert model.config.layer_types == [types_before[i] for i in (0, 2, 3)]
    for new_idx, layer in enumerate(decoder_layers(model, spec)):
        assert getattr(layer.get_submodule(spec.attention.module), "layer_idx", new_idx) == new_idx
    _assert_cache_consistent(model, tokens)


def test_skipped_attention_in_layer_zero_keeps_generation_consistent(family, tokens):
    model = tiny_model(family)
    spec = spec_for_config(model.config)
    prune_layer(model, spec, 0, LayerPlan(skip={"attention"}))
    prune_layer(model, spec, 2, LayerPlan(skip={"mlp"}))
    assert model.config.per_layer_config[0].skip == ["attention"]
    _assert_cache_consistent(model, tokens)


def test_skipping_a_zero_output_mlp_is_identity(family, tokens):
    model = tiny_model(family)
    spec = spec_for_config(model.config)
    _, down = _o_and_down(model, spec, 3)
    with torch.no_grad():
        down.weight.zero_()
        if down.bias is not None:
            down.bias.zero_()
    ref = logits(model, tokens)
    prune_layer(model, spec, 3, LayerPlan(skip={"mlp"}))
    torch.testing.assert_close(logits(model, tokens), ref, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ error paths

def _unchanged(model, before: dict, config_before: dict) -> None:
    """A refused plan leaves the model as it was: same weights, same config."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.config.to_dict() == config_before


@pytest.mark.parametrize("plan,message", [
    (LayerPlan(heads=[0, 1, 2], kv_heads=[0, 1]), "same number of query heads"),  # 2 + 1: uneven GQA groups
    (LayerPlan(heads=[0, 2], kv_heads=[0]), "query head 2 kept but its KV head 1 removed"),
    (LayerPlan(heads=[], kv_heads=[0]), "every attention head"),
    (LayerPlan(heads=[0, 1], kv_heads=[]), "every attention head"),
    (LayerPlan(mlp=[]), "every MLP neuron"),
])
def test_surgery_refuses_impossible_plans_and_changes_nothing(plan, message):
    model = tiny_model("llama")  # 4 query heads in 2 KV groups of 2
    spec = spec_for_config(model.config)
    before, config_before = {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()
    with pytest.raises(InvalidTargetError, match=message) as err:
        prune_layer(model, spec, 1, plan)
    assert "Layer 1" in str(err.value)
    _unchanged(model, before, config_before)


@pytest.mark.parametrize("remove,message", [([0, 1, 2, 3], "every decoder block"), ([1, 4], r"\[4\] do not exist")])
def test_block_removal_refuses_to_remove_every_block_or_unknown_ones(remove, message):
    model = tiny_model("llama")
    spec = spec_for_config(model.config)
    before, config_before = {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()
    with pytest.raises(InvalidTargetError, match=message):
        remove_layers(model, spec, remove)
    _unchanged(model, before, config_before)
    remove_layers(model, spec, [])  # nothing to remove: nothing changes
    _unchanged(model, before, config_before)


def test_methods_refuse_targets_that_remove_every_unit(tiny_dir):
    import core

    src = tiny_dir("llama")
    cases = [
        (dict(method="depth", target=core.Target(ratio=0.99)), "removes every block"),
        (dict(method="attention_heads", target=core.Target(ratio=0.9)), "remove all of them"),
        (dict(method="mlp_width", score="maw", target=core.Target(ratio=0.999)), "remove all of them"),
        (dict(method="depth", target=core.Target(ratio=0.5), options={"layers": [0, 1, 2, 3]}), "every decoder block"),
    ]
    for recipe, message in cases:
        with pytest.raises(InvalidTargetError, match=message):
            core.run_recipe(core.Recipe(model=str(src), calibration=core.CalibrationConfig(n_samples=2, seq_len=16),
                                        **recipe))
