"""Refusing targets that round to no change, or to a size far from what was asked, before anything is pruned.

Units come in whole numbers per layer (2 KV groups, 6 blocks, 96 neurons), so a ratio can only be met to the
nearest step. `check_rounding` compares what a plan removes with what the target asked and, when the plan removes
nothing or misses by more than `TOLERANCE` of the request, raises an error that names the nearest achievable
ratios (and a finer unit when there is one).
"""
from __future__ import annotations

from collections import Counter

from .allocation import Target
from .errors import InvalidTargetError

TOLERANCE = 0.5  # a plan may remove up to 50% more or less than asked (relative) before it is refused


def describe_target(target: Target) -> str:
    for key, label in (("ratio", "ratio"), ("param_ratio", "parameter ratio"), ("target_params", "parameter target"),
                       ("expansion_rate", "expansion rate"), ("width", "width")):
        value = getattr(target, key)
        if value is not None:
            return f"The {label} {value:,}" if key == "target_params" else f"The {label} {value}"
    return "The target"


def nearest_ratios(asked: float, units: int, step: int = 1) -> list[float]:
    """The achievable removal ratios (k * step / units, 0 < k * step < units) nearest to `asked`: at most two."""
    ratios = [k / units for k in range(step, units, step)]
    return sorted(sorted(ratios, key=lambda r: (abs(r - asked), r))[:2])


def check_rounding(target: Target, asked: list[float], units: list[int], kept: list[int], what: str,
                   finer: str = "", step: int = 1, scope: str = "a layer") -> None:
    """Raise when `kept` (per layer, out of `units`) removes nothing or lands far from the `asked` per-layer ratios.

    what: the unit's name in plural ("KV groups"); finer: a hint naming a finer-grained alternative, or "";
    step: units are removed in multiples of this (rounding of MLP widths); scope: what holds `units` ("a layer",
    or "the model" for blocks).
    """
    pruned = [(u, r, k) for u, r, k in zip(units, asked, kept) if u and r > 0]
    total = sum(u for u, _, _ in pruned)
    wanted = sum(u * r for u, r, _ in pruned)
    removed = sum(u - k for u, k in zip(units, kept) if u)
    hint = f" {finer}" if finer else ""
    if removed > 0 and abs(removed - wanted) <= TOLERANCE * wanted:
        return
    if not pruned:
        raise InvalidTargetError(f"{describe_target(target)} removes nothing: no layer loses any {what}. Give a "
                                 f"smaller width or a ratio above 0.{hint}")
    typical = Counter(u for u, _, _ in pruned).most_common(1)[0][0]
    choices = nearest_ratios(wanted / total, typical, step)
    if not choices:
        raise InvalidTargetError(f"{describe_target(target)} cannot be met: {scope} has {typical} {what}, which "
                                 f"cannot be split further.{hint}")
    per = " per layer" if scope == "a layer" else ""
    options = ", ".join(f"{r:.3g} ({round(r * typical)} of {typical}{per})" for r in choices)
    got = "removes nothing" if removed == 0 else f"would remove {removed / total:.0%} of them instead"
    raise InvalidTargetError(
        f"{describe_target(target)} asks for {wanted / total:.0%} of the {what} but {got}: {scope} has {typical} "
        f"{what}, so ratios come in steps of {step / typical:.0%}. Nearest achievable ratios of the {what}: "
        f"{options}.{hint}")
