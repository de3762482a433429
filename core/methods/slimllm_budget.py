"""SlimLLM's per-layer counts: heads and MLP channels of a layer at the same ratio r_l (the paper's rule).

Rounding head counts (a layer has only a few KV groups or query heads per group) leaves a residue against the
global parameter target. It is absorbed by scaling every layer's ratio by one common factor s, so each layer moves
in proportion to its ratio and none goes past `clip`: r'_l = min(clip, s * r_l). Per layer the counts are then
heads = round(r'_l * units) and channels = r'_l * m rounded down or up to the rounding multiple, so both stay
within one unit of r'_l; the choice between down and up (largest remainders first) lands the target as closely as
the units allow. Pure functions of the layer sizes; the method reports r'_l as the ratio actually used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidTargetError

_TOL = 1e-9


@dataclass(frozen=True)
class LayerSizes:
    """What one layer can lose: head units (KV groups or query heads per group) and MLP channels."""

    head_units: int  # 0 when the layer's heads are not pruned
    head_cost: int  # parameters removed with one head unit
    channels: int  # MLP width; 0 when the layer's MLP is not pruned
    channel_cost: int  # parameters removed with one channel


@dataclass(frozen=True)
class Allocation:
    ratios: list[float]  # r'_l, the ratio actually used in each layer
    heads: list[int]  # head units removed per layer
    channels: list[int]  # channels removed per layer
    scale: float  # s, the common factor applied to the requested ratios
    removed: int  # parameters the counts remove


def head_count(ratio: float, units: int, clip: float) -> int:
    """round(ratio * units), never past `clip` and never every unit."""
    if units == 0 or ratio <= 0:
        return 0
    return max(0, min(round(ratio * units), math.floor(clip * units + _TOL), units - 1))


def channel_range(ratio: float, width: int, multiple: int, clip: float) -> tuple[int, int]:
    """ratio * width rounded down and up to `multiple`, capped by `clip` and by keeping at least one multiple."""
    if width == 0 or ratio <= 0:
        return 0, 0
    unit = max(multiple, 1)
    cap = max(0, min(math.floor(clip * width / unit + _TOL), width // unit - 1) * unit)
    x = ratio * width / unit
    return min(cap, math.floor(x + _TOL) * unit), min(cap, math.ceil(x - _TOL) * unit)


def _scaled(ratios: list[float], s: float, clip: float) -> list[float]:
    return [min(clip, s * r) for r in ratios]


def _counts(ratios: list[float], layers: list[LayerSizes], multiple: int, clip: float, target: int | None,
            same_width: bool) -> tuple[list[int], list[int], int]:
    """Counts at fixed ratios; channels rounded down or up to land nearest `target` (nearest rounding if None)."""
    heads = [head_count(r, l.head_units, clip) for r, l in zip(ratios, layers)]
    ranges = [channel_range(r, l.channels, multiple, clip) for r, l in zip(ratios, layers)]
    removed = sum(k * l.head_cost for k, l in zip(heads, layers))
    if target is None:
        channels = [lo if r * l.channels - lo <= hi - r * l.channels else hi
                    for (lo, hi), r, l in zip(ranges, ratios, layers)]
        return heads, channels, removed + sum(c * l.channel_cost for c, l in zip(channels, layers))
    channels = [lo for lo, _ in ranges]
    removed += sum(c * l.channel_cost for c, l in zip(channels, layers))
    steps = [i for i, (lo, hi) in enumerate(ranges) if hi > lo]
    if same_width:  # every layer the same width (a plain-transformers checkpoint): all down or all up
        up = sum((ranges[i][1] - ranges[i][0]) * layers[i].channel_cost for i in steps)
        if steps and abs(target - removed - up) < abs(target - removed):
            channels = [hi for _, hi in ranges]
            removed += up
        return heads, channels, removed
    # largest remainders first, while rounding up brings the total closer to the target
    steps.sort(key=lambda i: -(ratios[i] * layers[i].channels - ranges[i][0]))
    for i in steps:
        step = (ranges[i][1] - ranges[i][0]) * layers[i].channel_cost
        if abs(target - removed - step) >= abs(target - removed):
            break
        channels[i] = ranges[i][1]
        removed += step
    return heads, channels, removed


def _proxy(ratios: list[float], layers: list[LayerSizes], multiple: int, clip: float) -> float:
    """Parameters removed at these ratios with exact head rounding and unrounded channels (monotone in s)."""
    total = 0.0
    for r, l in zip(ratios, layers):
        total += head_count(r, l.head_units, clip) * l.head_cost
        if l.channels:
            cap = channel_range(1.0, l.channels, multiple, clip)[0]
            total += min(r * l.channels, cap) * l.channel_cost
    return total


def allocate(ratios: list[float], layers: list[LayerSizes], target: int | None, clip: float, multiple: int = 1,
             same_width: bool = False) -> Allocation:
    """Counts per layer for requested `ratios` (e.g. from eq. 11) that remove about `target` parameters.

    `target=None` keeps the ratios as given (explicit per-layer ratios). Raises when even every ratio at `clip`
    removes fewer parameters than the target.
    """
    if target is None or not any(r > 0 for r in ratios):
        heads, channels, removed = _counts(ratios, layers, multiple, clip, None, same_width)
        return Allocation(list(ratios), heads, channels, 1.0, removed)
    s_max = clip / min(r for r in ratios if r > 0)
    if _proxy(_scaled(ratios, s_max, clip), layers, multiple, clip) < target:
        most = _counts(_scaled(ratios, s_max, clip), layers, multiple, clip, None, same_width)[2]
        raise InvalidTargetError(f"The target removes {target:,} parameters, but with every pruned layer at the "
                                 f"clip {clip:.0%} SlimLLM removes at most {most:,}. Lower the target, raise `clip`, "
                                 "prune more layers (`pruned_layers`) or turn `protect_ends` off.")
    lo, hi = 0.0, s_max  # proxy(lo) < target <= proxy(hi)
    for _ in range(100):
        mid = (lo + hi) / 2
        if _proxy(_scaled(ratios, mid, clip), layers, multiple, clip) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-12 * s_max:
            break
    best = None
    for s in (hi, lo):  # either side of a head-rounding step
        heads, channels, removed = _counts(_scaled(ratios, s, clip), layers, multiple, clip, target, same_width)
        if best is None or abs(target - removed) < abs(target - best.removed):
            best = Allocation(_scaled(ratios, s, clip), heads, channels, s, removed)
    return best
