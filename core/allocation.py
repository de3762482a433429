"""Turning a target (ratio, parameter budget, width) into how many units each layer keeps."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidTargetError


@dataclass(frozen=True)
class Target:
    """Exactly one field is set.

    ratio: fraction of the pruned component removed (MLP neurons, heads, blocks...), in (0, 1).
    param_ratio: fraction of all model parameters removed, in (0, 1).
    target_params: parameter count of the pruned model.
    expansion_rate: MLP only, kept width = rate * hidden_size.
    width: MLP only, kept width.
    """

    ratio: float | None = None
    param_ratio: float | None = None
    target_params: int | None = None
    expansion_rate: float | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        given = [k for k, v in self.__dict__.items() if v is not None]
        if len(given) != 1:
            raise InvalidTargetError("Give exactly one target: ratio, param_ratio, target_params, expansion_rate "
                                     f"or width (got {given or 'none'}).")
        for key in ("ratio", "param_ratio"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise InvalidTargetError(f"{key} must be in [0, 1) (got {value}); it is the fraction removed.")
            if value == 0.0:
                raise InvalidTargetError(f"{key} 0 removes nothing; give the fraction to remove, e.g. 0.2.")
        if self.target_params is not None and self.target_params <= 0:
            raise InvalidTargetError(f"target_params must be positive (got {self.target_params}).")
        if self.expansion_rate is not None and self.expansion_rate <= 0:
            raise InvalidTargetError(f"expansion_rate must be positive (got {self.expansion_rate}).")
        if self.width is not None and self.width <= 0:
            raise InvalidTargetError(f"width must be positive (got {self.width}).")

    def params_to_remove(self, total: int) -> int | None:
        """Parameters to remove for a parameter-level target; None for component-level targets."""
        if self.param_ratio is not None:
            return round(self.param_ratio * total)
        if self.target_params is not None:
            if self.target_params >= total:
                raise InvalidTargetError(f"target_params {self.target_params:,} is not below the model's "
                                         f"{total:,} parameters.")
            return total - self.target_params
        return None


@dataclass(frozen=True)
class LayerSelection:
    """Which layers may be pruned, and optionally an explicit ratio per layer."""

    ratios: tuple[float, ...] | None = None
    protect_first: int = 0
    protect_last: int = 0

    def __post_init__(self) -> None:
        if self.ratios is not None and (self.protect_first or self.protect_last):
            raise InvalidTargetError("Explicit per-layer ratios already say which layers are pruned; give either "
                                     "ratios or protect_first/protect_last, not both (use ratio 0 to protect).")

    def prunable(self, n_layers: int) -> list[int]:
        if self.protect_first < 0 or self.protect_last < 0:
            raise InvalidTargetError("protect_first / protect_last must be >= 0.")
        layers = list(range(self.protect_first, n_layers - self.protect_last))
        if not layers:
            raise InvalidTargetError(f"Protecting the first {self.protect_first} and last {self.protect_last} of "
                                     f"{n_layers} layers leaves nothing to prune.")
        return layers

    def layer_ratios(self, n_layers: int, ratio: float) -> list[float]:
        """Per-layer removal ratios: explicit ones, or `ratio` on every unprotected layer (0 on protected ones)."""
        if self.ratios is not None:
            if len(self.ratios) != n_layers:
                raise InvalidTargetError(f"Got {len(self.ratios)} per-layer ratios for a model with {n_layers} "
                                         "layers; give one ratio per layer.")
            for i, r in enumerate(self.ratios):
                if not 0.0 <= r < 1.0:
                    raise InvalidTargetError(f"Per-layer ratio {r} of layer {i} is outside [0, 1).")
            return list(self.ratios)
        prunable = set(self.prunable(n_layers))
        return [ratio if i in prunable else 0.0 for i in range(n_layers)]


def round_to_multiple(count: float, multiple: int) -> int:
    return int(round(count / multiple)) * multiple if multiple > 1 else int(round(count))


def keep_count(units: int, ratio: float, multiple: int = 1, what: str = "units", layer: int = 0) -> int:
    """How many of `units` a layer keeps at removal `ratio`, rounded to `multiple`; never zero."""
    if ratio == 0.0:
        return units
    kept = round_to_multiple(units * (1.0 - ratio), multiple)
    kept = min(kept, units)
    if kept <= 0:
        raise InvalidTargetError(f"Removing {ratio:.0%} of the {units} {what} of layer {layer} (rounded to a "
                                 f"multiple of {multiple}) would remove all of them. Use a lower ratio or a smaller "
                                 "rounding multiple.")
    return kept


def ratio_for_budget(to_remove: int, removable: int, what: str) -> float:
    """The uniform ratio of a component that removes `to_remove` parameters out of its `removable` ones."""
    if removable <= 0 or to_remove >= removable:
        raise InvalidTargetError(f"The target needs {to_remove:,} parameters removed, but the {what} of the "
                                 f"prunable layers hold only {removable:,}. Lower the target or prune more parts.")
    return to_remove / removable
