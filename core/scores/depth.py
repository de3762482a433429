"""Depth-pruning scores of a block or sub-layer. Higher = more important (remove the lowest first).

Per-token scores take the residual stream before (x) and after (y) the unit, [N, d] each, and return [N]; the
unit's score is their mean over calibration tokens.

Sub-network scores plan which sub-networks to evaluate (a [S, U] boolean matrix, True = unit present) and turn their
utilities [S] (higher = better: minus the LM loss, minus the logit distance to the full model, or a task's accuracy)
into one value per unit [U], with a standard error where the estimator has one:
- `shapley`: Shapley values, exact up to `exact_max` units, antithetic permutation sampling above (shapley.py);
- `ppl_drop`: the utility lost when the unit alone is removed;
- `loo_contrast`: E[U | i present] - E[U | i absent] over the full network and its leave-one-out sub-networks (what
  the released code of Siddiqui et al. computes; it ranks exactly like `ppl_drop`, it is no Shapley estimate);
- `subnet_contrast`: the same contrast over random sub-networks keeping a fraction of the units.
`shapley_loo` and `shapley_mc`, the former names of the two contrasts, are still accepted (with a deprecation
warning) by the depth method."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import DEPTH_SCORES, Score, depth_score
from .shapley import Estimate, Plan, shapley_plan


def _cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).clamp(-1.0, 1.0)


@depth_score("cosine")
def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Block influence (ShortGPT): 1 - cos(x, y)."""
    return 1.0 - _cos(x, y)


@depth_score("angular")
def angular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Angular distance arccos(cos(x, y)) / pi."""
    return torch.arccos(_cos(x, y)) / math.pi


@depth_score("update_norm")
def update_norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Norm of the update ||y - x||_2."""
    return (y.float() - x.float()).norm(dim=-1)


@depth_score("relative_update_norm")
def relative_update_norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Relative update norm ||y - x||_2 / ||x||_2."""
    return (y.float() - x.float()).norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-12)


@dataclass(frozen=True)
class Sampling:
    """How many sub-networks a score may sample."""

    samples: int = 64  # shapley: orderings (above exact_max units); subnet_contrast: random sub-networks
    keep: float = 0.9  # subnet_contrast: fraction of units present in each sub-network
    exact_max: int = 12  # shapley: exact enumeration up to this many units


@dataclass(frozen=True)
class SubnetworkScore:
    """Which sub-networks to evaluate, and how their utilities become unit values."""

    plan: Callable[[int, Sampling, torch.Generator], Plan]


def leave_one_out_masks(units: int, samples: int = 0, keep: float = 1.0, gen=None) -> torch.Tensor:
    """The full network followed by each single-unit removal: [U + 1, U]."""
    return torch.cat([torch.ones(1, units, dtype=torch.bool), ~torch.eye(units, dtype=torch.bool)])


def random_masks(units: int, samples: int, keep: float, gen: torch.Generator) -> torch.Tensor:
    """`samples` random sub-networks keeping round(keep * U) units each (at least one unit removed)."""
    kept = min(units - 1, max(1, round(keep * units)))
    masks = torch.zeros(samples, units, dtype=torch.bool)
    for s in range(samples):
        masks[s, torch.randperm(units, generator=gen)[:kept]] = True
    return masks


def present_minus_absent(masks: torch.Tensor, utilities: torch.Tensor) -> torch.Tensor:
    """value_i = E[U | i present] - E[U | i absent]; a unit never absent gets +inf (never removed on no evidence)."""
    m = masks.double()
    u = utilities.double()[:, None]
    present, absent = m.sum(0), (1 - m).sum(0)
    e_present = (m * u).sum(0) / present.clamp_min(1)
    e_absent = ((1 - m) * u).sum(0) / absent.clamp_min(1)
    values = e_present - e_absent
    return torch.where(absent > 0, values, torch.full_like(values, math.inf))


def drop_when_removed(masks: torch.Tensor, utilities: torch.Tensor) -> torch.Tensor:
    """U(full) - U(full without i), from leave-one-out sub-networks (row 0 is the full network)."""
    return utilities[0] - utilities[1:]


def _loo_plan(values: Callable, estimator: str) -> Callable[[int, Sampling, torch.Generator], Plan]:
    def plan(units: int, sampling: Sampling, gen: torch.Generator) -> Plan:
        masks = leave_one_out_masks(units)
        return Plan(masks, lambda u: Estimate(values(masks, u), None, {"estimator": estimator,
                                                                        "subnetworks": units + 1}))

    return plan


def _random_plan(units: int, sampling: Sampling, gen: torch.Generator) -> Plan:
    masks = random_masks(units, sampling.samples, sampling.keep, gen)
    return Plan(masks, lambda u: Estimate(present_minus_absent(masks, u), None, {
        "estimator": "random_subnetwork_contrast", "samples": sampling.samples, "keep": sampling.keep}))


def _shapley(units: int, sampling: Sampling, gen: torch.Generator) -> Plan:
    return shapley_plan(units, sampling.samples, gen, sampling.exact_max)


def _subnetwork(name: str, doc: str, plan) -> None:
    DEPTH_SCORES.add(name, Score(name, SubnetworkScore(plan), True, doc, "subnetwork"))


_subnetwork("shapley", "Shapley value of the unit: exact up to exact_max units, else antithetic permutation "
            "sampling (samples orderings) with a standard error.", _shapley)
_subnetwork("ppl_drop", "Utility lost when the unit alone is removed (loss utility: ranks like the perplexity "
            "drop).", _loo_plan(drop_when_removed, "leave_one_out"))
_subnetwork("loo_contrast", "E[U | present] - E[U | absent] over the full network and its leave-one-out "
            "sub-networks (the released code's 'Shapley'; ranks like ppl_drop).",
            _loo_plan(present_minus_absent, "leave_one_out_contrast"))
_subnetwork("subnet_contrast", "E[U | present] - E[U | absent] over random sub-networks keeping a fraction "
            "`keep` of the units (not a Shapley value: sub-networks of different composition).", _random_plan)

RENAMED = {"shapley_loo": "loo_contrast", "shapley_mc": "subnet_contrast"}  # former name -> name
