"""The pruning tutorial's data-driven criteria.

Heads: value norm / attention entropy. A head whose values are large and whose attention is focused (low entropy)
moves the residual stream in a specific direction; a head that spreads attention evenly over small values does
little. Inputs [H]: mean entropy (nats) of each head's attention over query positions, mean norm of its value
vectors (a KV head's, shared by its query heads), from `attention_probe`.

Layers: residual contribution x gradient magnitude, mean over tokens of ||update_t|| * ||dL/dh_t||, the size of
what the unit adds times how much the loss reacts to the stream where it adds it (an upper bound of the
first-order loss change |g . update| of removing it). Inputs [N]: from `gradient_stats.depth_gradients`.
"""
from __future__ import annotations

import torch

from . import depth_score, head_score
from .attention_probe import head_statistics
from .gradient_stats import depth_gradients
from .heads import AttentionTensors


@head_score("entropy", needs_data=True, stats=head_statistics)
def value_norm_over_entropy(t: AttentionTensors) -> torch.Tensor:
    """Tutorial head score: mean value-vector norm / mean attention entropy (focused heads with large values)."""
    return t.extra["value_norm"] / t.extra["attention_entropy"].clamp_min(1e-6)


@depth_score("contribution_gradient", kind="gradient", stats=depth_gradients)
def contribution_gradient(stats: dict) -> torch.Tensor:
    """Tutorial layer score: mean over tokens of ||update|| x ||dL/d(residual stream)|| at the unit's output."""
    return (stats["update_norm"] * stats["grad_norm"]).mean()
