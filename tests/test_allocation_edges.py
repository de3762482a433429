"""Edges of turning targets into unit counts: rounding to a multiple, a zero ratio, the smallest budgets."""
from __future__ import annotations

import pytest

import core

from core.allocation import keep_count, ratio_for_budget, round_to_multiple
from core.errors import InvalidTargetError


@pytest.mark.parametrize("count,multiple,expected", [
    (5, 2, 4),  # 2.5 -> 2 (round half to even) -> 4
    (7, 2, 8),
    (130, 64, 128),
    (5.4, 1, 5),
    (5.6, 1, 6),
])
def test_round_to_multiple(count, multiple, expected):
    assert round_to_multiple(count, multiple) == expected


def test_a_zero_ratio_keeps_the_layer_even_when_rounding_would_shrink_it():
    # 90 rounded to a multiple of 64 is 64: a layer that is not pruned must still keep all 90
    assert keep_count(90, 0.0, 64) == 90
    assert keep_count(90, 0.01, 64) == 64


def test_the_smallest_budgets():
    assert ratio_for_budget(0, 1, "MLPs") == 0.0
    assert ratio_for_budget(1, 2, "MLPs") == 0.5
    for to_remove, removable in ((1, 1), (0, 0), (5, -1)):
        with pytest.raises(InvalidTargetError, match="hold only"):
            ratio_for_budget(to_remove, removable, "MLPs")


def test_the_smallest_valid_targets():
    assert core.Target(width=1).width == 1 and core.Target(expansion_rate=1e-3).expansion_rate == 1e-3
    assert core.Target(target_params=1).target_params == 1


@pytest.mark.parametrize("protect", [{"protect_first": 1}, {"protect_last": 1}, {"protect_first": 1, "protect_last": 1}])
def test_explicit_ratios_refuse_any_protected_layer(protect):
    """Per-layer ratios already say which layers are pruned: protecting the first or the last layers as well (either
    one alone) is refused rather than silently ignored."""
    with pytest.raises(InvalidTargetError, match="not both"):
        core.LayerSelection(ratios=(0.1, 0.2, 0.3), **protect)
    assert core.LayerSelection(ratios=(0.0, 0.2, 0.0)).layer_ratios(3, 0.5) == [0.0, 0.2, 0.0]
