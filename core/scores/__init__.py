"""Importance scores: pure tensor functions, higher = keep. Registries are filled on import of the submodules."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry


@dataclass(frozen=True)
class Score:
    """A registered score: `fn` maps tensors (and optional statistics) to one value per unit."""

    name: str
    fn: Callable
    needs_data: bool
    doc: str
    # 'weights', 'per_token' (depth: f(x, y) per token), 'subnetwork' (depth: utilities), 'gradient' (depth: from
    # `stats`, which needs a backward pass) or 'reconstruction' (sparsity: returns the pruned and updated weight
    # instead of scores)
    kind: str = "weights"
    # collects what `fn` reads besides weights: (ctx, layer_idx, runner) -> dict put in the tensors' `extra`
    # (depth 'gradient' scores: (ctx, opts, candidates, disabled) -> {unit: dict}); None: nothing extra
    stats: Callable | None = None


MLP_SCORES: Registry[Score] = Registry("MLP score")
HEAD_SCORES: Registry[Score] = Registry("attention-head score")
DEPTH_SCORES: Registry[Score] = Registry("depth score")
SPARSITY_SCORES: Registry[Score] = Registry("sparsity score")


def _register(registry: Registry[Score], name: str, needs_data: bool = False, kind: str = "weights",
              stats: Callable | None = None):
    def deco(fn: Callable) -> Callable:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        registry.add(name, Score(name, fn, needs_data, doc, kind, stats))
        return fn

    return deco


def mlp_score(name: str, needs_data: bool = False, stats: Callable | None = None):
    return _register(MLP_SCORES, name, needs_data, stats=stats)


def head_score(name: str, needs_data: bool = False, stats: Callable | None = None):
    return _register(HEAD_SCORES, name, needs_data, stats=stats)


def depth_score(name: str, kind: str = "per_token", stats: Callable | None = None):
    return _register(DEPTH_SCORES, name, True, kind, stats)


def sparsity_score(name: str, needs_data: bool = False, kind: str = "weights"):
    return _register(SPARSITY_SCORES, name, needs_data, kind)


from . import depth, heads, mlp, sparsity, taylor, tutorial  # noqa: E402,F401  (fill the registries)
