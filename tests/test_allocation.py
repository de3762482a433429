"""Targets, rounding and layer selection; global parameter targets met as closely as uniform layers allow."""
from __future__ import annotations

import pytest

import core
from core import LayerSelection, LoadConfig, Recipe, Target
from core.allocation import keep_count, ratio_for_budget, round_to_multiple
from core.errors import InvalidTargetError, PruningError
from core.params import unit_costs


@pytest.mark.parametrize("kwargs", [{}, {"ratio": 0.5, "width": 64}, {"param_ratio": 0.1, "target_params": 10}])
def test_target_needs_exactly_one_field(kwargs):
    with pytest.raises(InvalidTargetError, match="exactly one target"):
        Target(**kwargs)


@pytest.mark.parametrize("key,value", [("ratio", 1.0), ("ratio", -0.1), ("param_ratio", 1.0), ("param_ratio", -0.1),
                                       ("ratio", 1.5)])
def test_ratio_outside_unit_interval_is_rejected(key, value):
    with pytest.raises(InvalidTargetError, match=r"must be in \[0, 1\)") as err:
        Target(**{key: value})
    assert key in str(err.value) and "fraction removed" in str(err.value)


@pytest.mark.parametrize("key", ["target_params", "expansion_rate", "width"])
def test_sizes_must_be_positive(key):
    with pytest.raises(InvalidTargetError, match="must be positive"):
        Target(**{key: 0})


def test_ratio_zero_is_refused_and_errors_are_pruning_errors():
    for key in ("ratio", "param_ratio"):
        with pytest.raises(InvalidTargetError, match="removes nothing"):
            Target(**{key: 0.0})
    assert issubclass(InvalidTargetError, PruningError) and issubclass(InvalidTargetError, ValueError)


def test_params_to_remove():
    assert Target(param_ratio=0.25).params_to_remove(1000) == 250
    assert Target(target_params=600).params_to_remove(1000) == 400
    assert Target(ratio=0.5).params_to_remove(1000) is None
    assert Target(width=8).params_to_remove(1000) is None
    with pytest.raises(InvalidTargetError, match="not below"):
        Target(target_params=1000).params_to_remove(1000)


@pytest.mark.parametrize("units,ratio,multiple,kept", [
    (96, 0.25, 1, 72),
    (96, 0.0, 64, 96),  # ratio 0 leaves the layer alone, even when its width is not a multiple
    (96, 0.5, 64, 64),  # 48 -> nearest multiple of 64
    (100, 0.3, 8, 72),  # 70 -> 72
    (100, 0.3, 16, 64),  # 70 -> 64
    (100, 0.01, 64, 100),  # rounding up past the width keeps the width
    (4096, 0.5, 128, 2048),
])
def test_keep_count_rounds_to_multiples(units, ratio, multiple, kept):
    got = keep_count(units, ratio, multiple)
    assert got == kept
    assert 0 < got <= units


@pytest.mark.parametrize("units,ratio,multiple", [(96, 0.5, 128), (4, 0.9, 1), (96, 0.996, 1)])
def test_keep_count_refuses_to_remove_everything(units, ratio, multiple):
    with pytest.raises(InvalidTargetError, match="would remove all of them") as err:
        keep_count(units, ratio, multiple, "MLP neurons", layer=3)
    assert "layer 3" in str(err.value) and f"multiple of {multiple}" in str(err.value)


def test_round_to_multiple():
    assert round_to_multiple(70, 1) == 70
    assert round_to_multiple(70.4, 1) == 70
    assert round_to_multiple(70, 8) == 72
    assert round_to_multiple(20, 64) == 0


def test_ratio_for_budget():
    assert ratio_for_budget(250, 1000, "MLPs") == 0.25
    with pytest.raises(InvalidTargetError, match="hold only 1,000"):
        ratio_for_budget(1000, 1000, "MLPs")
    with pytest.raises(InvalidTargetError):
        ratio_for_budget(1, 0, "MLPs")


def test_layer_selection_protection():
    assert LayerSelection().prunable(4) == [0, 1, 2, 3]
    assert LayerSelection(protect_first=1, protect_last=2).prunable(6) == [1, 2, 3]
    assert LayerSelection(protect_first=1).layer_ratios(4, 0.5) == [0.0, 0.5, 0.5, 0.5]
    assert LayerSelection(protect_last=1).layer_ratios(3, 0.25) == [0.25, 0.25, 0.0]
    with pytest.raises(InvalidTargetError, match="leaves nothing to prune"):
        LayerSelection(protect_first=2, protect_last=2).prunable(4)
    with pytest.raises(InvalidTargetError, match=">= 0"):
        LayerSelection(protect_first=-1).prunable(4)


def test_layer_selection_explicit_ratios():
    assert LayerSelection(ratios=(0.0, 0.5, 0.25)).layer_ratios(3, 0.9) == [0.0, 0.5, 0.25]
    with pytest.raises(InvalidTargetError, match="Got 2 per-layer ratios for a model with 3 layers"):
        LayerSelection(ratios=(0.1, 0.2)).layer_ratios(3, 0.5)
    with pytest.raises(InvalidTargetError, match=r"layer 1 is outside \[0, 1\)"):
        LayerSelection(ratios=(0.1, 1.0, 0.2)).layer_ratios(3, 0.5)


# -- global parameter targets on a real (tiny) model ----------------------------------------------------------------

def _run(src, method, target, **kw):
    return core.run_recipe(Recipe(model=str(src), method=method, target=target, load=LoadConfig(device="cpu"), **kw))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from conftest import save_tiny, tiny_model

    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("alloc-llama"))


def _removed(result) -> tuple[int, int]:
    return result.params_before["total"], result.params_before["total"] - result.params_after["total"]


# Layers stay uniform (plain transformers reloads them), so a global target moves in steps of one unit in every
# prunable layer: the result is the uniform width closest to the target, within half a step. That is one neuron /
# one KV group per layer, not one in total (see e.g. param_ratio 0.033 below: 331 parameters off, a neuron is 192).

@pytest.mark.parametrize("target", [Target(param_ratio=0.1), Target(param_ratio=0.033), Target(param_ratio=0.005),
                                    Target(target_params=360_000)])
def test_global_parameter_target_mlp_width(llama_dir, target):
    result = _run(llama_dir, "mlp_width", target)
    total, removed = _removed(result)
    wanted = target.params_to_remove(total)
    neuron = unit_costs(result.model, result.spec, 0).mlp_neuron
    assert neuron == 3 * 64  # a gate row, an up row and a down column
    widths = [layer["intermediate_size"] for layer in result.layers()]
    assert len(set(widths)) == 1 and result.uniform
    assert removed == (96 - widths[0]) * len(widths) * neuron  # whole neurons, nothing else
    step = len(widths) * neuron  # one neuron fewer in every layer
    assert abs(removed - wanted) <= step / 2
    assert all(abs(removed - wanted) <= abs(removed + k * step - wanted) for k in (-1, 1))


@pytest.mark.parametrize("target", [Target(param_ratio=0.05), Target(param_ratio=0.08), Target(target_params=361_000)])
def test_global_parameter_target_attention_heads(llama_dir, target):
    result = _run(llama_dir, "attention_heads", target)
    total, removed = _removed(result)
    wanted = target.params_to_remove(total)
    costs = unit_costs(result.model, result.spec, 0)
    group = 2 * costs.query_head + costs.kv_head  # a KV head and its two query heads
    assert group == 6144  # 2 x (16 q rows + 16 o columns) x 64 + 2 x 16 x 64
    assert [layer["num_key_value_heads"] for layer in result.layers()] == [1, 1, 1, 1]
    assert removed == 4 * group  # whole groups, nothing else
    step = 4 * group
    assert abs(removed - wanted) <= step / 2
    assert all(abs(removed - wanted) <= abs(removed + k * step - wanted) for k in (-1, 1))


def test_parameter_target_far_from_the_nearest_step_is_refused(llama_dir):
    # 0.04 of the parameters is 31% of the KV groups; with 2 groups per layer the nearest step removes 50%
    with pytest.raises(InvalidTargetError, match=r"asks for 31% of the KV groups but would remove 50%.*0\.5 \(1 of 2"):
        _run(llama_dir, "attention_heads", Target(param_ratio=0.04))


def test_global_parameter_target_respects_protected_layers(llama_dir):
    result = _run(llama_dir, "mlp_width", Target(param_ratio=0.05), layers=LayerSelection(protect_first=1,
                                                                                        protect_last=1))
    total, removed = _removed(result)
    widths = [layer["intermediate_size"] for layer in result.layers()]
    assert widths[0] == widths[3] == 96 and widths[1] == widths[2] < 96
    neuron = unit_costs(result.model, result.spec, 1).mlp_neuron
    assert abs(removed - round(0.05 * total)) <= neuron


def test_global_parameter_target_larger_than_the_component_fails(llama_dir):
    with pytest.raises(InvalidTargetError, match="hold only"):
        _run(llama_dir, "mlp_width", Target(param_ratio=0.5))


def test_width_target_rounds_and_is_checked(llama_dir):
    result = _run(llama_dir, "mlp_width", Target(expansion_rate=0.75), round_to=16)  # 48 -> 48
    assert {layer["intermediate_size"] for layer in result.layers()} == {48}
    with pytest.raises(InvalidTargetError, match="larger than layer 0's MLP"):
        _run(llama_dir, "mlp_width", Target(width=128))
