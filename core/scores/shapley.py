"""Shapley values of units (blocks or sub-layers) from the utilities of sub-networks: pure functions.

A plan lists the sub-networks to evaluate (a [S, U] boolean matrix, True = unit present; rows may repeat, the caller
evaluates each distinct row once) and turns their utilities [S] into one estimate per unit.

- `exact_plan`: all 2^U sub-networks; phi_i = sum over S not holding i of |S|! (U-|S|-1)! / U! (v(S + i) - v(S)).
- `permutation_plan`: random orderings in antithetic pairs (an ordering and its reverse); unit i's marginal
  contribution v(units before i, plus i) - v(units before i) averaged over orderings is an unbiased estimate of
  phi_i, and the pair means are independent, so their spread gives a standard error.
Both satisfy efficiency exactly: the values sum to v(all units) - v(no unit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

EXACT_MAX_UNITS = 16  # 2^16 sub-networks: beyond this, exact enumeration is never what anyone wants


@dataclass(frozen=True)
class Estimate:
    """Values [U] (higher = more important), their standard errors [U] (None when the method gives none) and a
    JSON-able description (estimator, sample count, sub-networks)."""

    values: torch.Tensor
    stderr: torch.Tensor | None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    masks: torch.Tensor  # [S, U] bool
    estimate: Callable[[torch.Tensor], Estimate]  # utilities [S] -> Estimate


def _codes(units: int) -> torch.Tensor:
    """All subsets as [2^U, U] bool; row c holds unit i iff bit i of c is set."""
    c = torch.arange(2 ** units)
    return (c[:, None] >> torch.arange(units)[None, :]) & 1 == 1


def exact_values(utilities: torch.Tensor, units: int) -> torch.Tensor:
    """Exact Shapley values from the utilities of all 2^U subsets, indexed as in `_codes`: [U] float64."""
    v = utilities.double()
    c = torch.arange(2 ** units)
    size = _codes(units).sum(1)
    weight = torch.tensor([math.factorial(s) * math.factorial(units - s - 1) / math.factorial(units)
                           if s < units else 0.0 for s in range(units + 1)], dtype=torch.float64)
    values = torch.empty(units, dtype=torch.float64)
    for i in range(units):
        without = c[(c >> i) & 1 == 0]
        values[i] = (weight[size[without]] * (v[without | (1 << i)] - v[without])).sum()
    return values


def exact_plan(units: int) -> Plan:
    if units > EXACT_MAX_UNITS:
        raise ValueError(f"exact Shapley values over {units} units need 2^{units} sub-networks")

    def estimate(utilities: torch.Tensor) -> Estimate:
        return Estimate(exact_values(utilities, units), torch.zeros(units, dtype=torch.float64),
                        {"estimator": "exact", "subnetworks": 2 ** units})

    return Plan(_codes(units), estimate)


def permutation_plan(units: int, samples: int, gen: torch.Generator) -> Plan:
    """`samples` orderings (rounded up to whole antithetic pairs); each contributes its U + 1 prefixes."""
    pairs = max(1, math.ceil(samples / 2))
    orders = []
    for _ in range(pairs):
        order = torch.randperm(units, generator=gen)
        orders += [order, order.flip(0)]
    masks = torch.zeros(len(orders), units + 1, units, dtype=torch.bool)
    for p, order in enumerate(orders):
        for j, unit in enumerate(order.tolist()):
            masks[p, j + 1:, unit] = True
    rows = masks.reshape(-1, units)

    def estimate(utilities: torch.Tensor) -> Estimate:
        v = utilities.double().reshape(len(orders), units + 1)
        marginal = torch.empty(len(orders), units, dtype=torch.float64)
        for p, order in enumerate(orders):
            marginal[p, order] = v[p, 1:] - v[p, :-1]
        pair_means = marginal.reshape(pairs, 2, units).mean(1)
        values = pair_means.mean(0)
        stderr = (pair_means.std(0, correction=1) / math.sqrt(pairs) if pairs > 1
                  else torch.full((units,), math.inf, dtype=torch.float64))
        return Estimate(values, stderr, {"estimator": "permutation_antithetic", "samples": 2 * pairs,
                                         "pairs": pairs})

    return Plan(rows, estimate)


def shapley_plan(units: int, samples: int, gen: torch.Generator, exact_max: int = 12) -> Plan:
    """Exact enumeration up to `exact_max` units, antithetic permutation sampling above."""
    return exact_plan(units) if units <= exact_max else permutation_plan(units, samples, gen)
