"""Depth-pruning scores of a block or sub-layer. Higher = more important (remove the lowest first).

Per-token scores take the residual stream before (x) and after (y) the unit, [N, d] each, and return [N]; the
unit's score is their mean over calibration tokens.

Sub-network scores (Shapley-style) take a [S, U] boolean matrix of evaluated sub-networks (True = unit present)
and their utilities [S] (higher = better, e.g. minus the LM loss) and return one value per unit [U]. Each comes
with the sub-networks it needs (`masks`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import DEPTH_SCORES, Score, depth_score


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
class SubnetworkScore:
    """Which sub-networks to evaluate, and how their utilities become unit values."""

    masks: Callable[[int, int, float, torch.Generator], torch.Tensor]  # (units, samples, keep, gen) -> [S, U]
    values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (masks, utilities) -> [U]


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


def _subnetwork(name: str, doc: str, masks, values) -> None:
    DEPTH_SCORES.add(name, Score(name, SubnetworkScore(masks, values), True, doc, "subnetwork"))


_subnetwork("ppl_drop", "Utility lost when the unit alone is removed (loss utility: ranks like the perplexity "
            "drop).", leave_one_out_masks, drop_when_removed)
_subnetwork("shapley_loo", "Shapley estimate over leave-one-out sub-networks: E[U | present] - E[U | absent].",
            leave_one_out_masks, present_minus_absent)
_subnetwork("shapley_mc", "Monte-Carlo Shapley estimate over random sub-networks keeping a fraction of units.",
            random_masks, present_minus_absent)
