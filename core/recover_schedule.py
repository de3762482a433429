"""Iterative pruning: reach a recipe's target in N prune -> recover rounds, for any method.

The fraction of the final pruning done after round t of n is s_t = t / n (linear) or 1 - (1 - t / n)^3 (cubic,
Zhu & Gupta 2017: large steps first, small ones near the end). Each round prunes the current (already pruned and
recovered) model, so its target is translated to that model:
- parameter targets: the round keeps P_t = P_0 - s_t (P_0 - P_final) parameters of the original P_0;
- component ratios r (MLP neurons, heads, blocks; explicit per-layer ratios too): the cumulative fraction
  r_t = s_t r of the original component is removed, i.e. 1 - (1 - r_t) / (1 - r_{t-1}) of what is left;
- widths / expansion rates: the width moves linearly (or cubically) from the original to the final one.
Methods whose target counts what is already pruned (sparsity: the fraction of zeros in the full weights) set
`cumulative_target = True`; their rounds simply get the cumulative fraction s_t of the final target.
"""
from __future__ import annotations

from dataclasses import dataclass

from .allocation import Target
from .errors import RecipeError
from .recipe import Recipe


def fractions(rounds: int, schedule: str) -> list[float]:
    """Cumulative fraction of the final pruning reached after each round: [s_1, ..., s_n], s_n = 1."""
    if schedule == "linear":
        return [t / rounds for t in range(1, rounds + 1)]
    return [1 - (1 - t / rounds) ** 3 for t in range(1, rounds + 1)]


def _relative(r_now: float, r_before: float) -> float:
    """Ratio of what is left that takes the cumulative removed fraction from r_before to r_now."""
    return max(0.0, 1 - (1 - r_now) / (1 - r_before))


@dataclass(frozen=True)
class Schedule:
    """The rounds of one recipe, given the original model's size: total parameters, MLP width, hidden size."""

    recipe: Recipe
    cumulative: bool
    params_original: int
    width_original: int
    hidden_size: int

    def __post_init__(self) -> None:
        if self.recipe.recover.rounds > 1 and self.recipe.options.get("layers") is not None:
            raise RecipeError("Explicit depth layers remove fixed units in one go; they cannot be reached in "
                              "rounds. Drop recover.rounds or give a ratio / parameter target instead.")

    @property
    def rounds(self) -> int:
        return self.recipe.recover.rounds

    def fraction(self, t: int) -> float:
        """s_t: the cumulative fraction of the final pruning reached after round t (0-based)."""
        return fractions(self.rounds, self.recipe.recover.schedule)[t]

    def round_recipe(self, t: int, params_now: int, reached: float | None = None) -> Recipe | None:
        """The recipe of round t (0-based) for the current model; None when the round has nothing to prune.

        `reached` is the cumulative fraction s of the last round that really pruned (default: round t - 1's). A
        round finer than the method's units prunes nothing, so the next component-ratio step starts from there."""
        target, recipe = self.recipe.target, self.recipe.replace(recover=None)
        now = self.fraction(t)
        before = reached if reached is not None else (self.fraction(t - 1) if t else 0.0)
        if target.target_params is not None or (target.param_ratio is not None and not self.cumulative):
            final = target.target_params if target.target_params is not None else round(
                self.params_original * (1 - target.param_ratio))
            keep = round(self.params_original - now * (self.params_original - final))
            return recipe.replace(target=Target(target_params=keep)) if keep < params_now else None
        if target.param_ratio is not None:
            return recipe.replace(target=Target(param_ratio=now * target.param_ratio))
        if target.ratio is not None:
            def step(r: float) -> float:
                return r * now if self.cumulative else _relative(r * now, r * before)

            layers = recipe.layers
            if layers.ratios is not None:
                layers = type(layers)(ratios=tuple(step(r) for r in layers.ratios))
            return recipe.replace(target=Target(ratio=step(target.ratio)), layers=layers)
        if t == self.rounds - 1:
            return recipe  # the final width / expansion rate exactly
        final = target.width if target.width is not None else target.expansion_rate * self.hidden_size
        width = round(self.width_original - now * (self.width_original - final))
        return recipe.replace(target=Target(width=max(1, width)))
