"""Scores of attention query heads. A KV group (one KV head and its query heads) scores the sum of its heads.

Shapes: q: [H*dh, d]; k, v: [KV*dh, d]; o: [d, H*dh]; contribution_norm: [H], the Frobenius norm over
calibration tokens of head i's contribution Z_i W_O^i^T to the attention output. Every function returns [H].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import head_score


@dataclass
class AttentionTensors:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    contribution_norm: torch.Tensor | None = None
    seed: int = 0
    extra: dict = field(default_factory=dict)  # what a score's `stats` collected (e.g. gradients)


def group_scores(head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[H] query-head scores -> [KV] group scores (heads are grouped contiguously by KV head)."""
    return head_scores.view(num_kv_heads, -1).sum(dim=1)


@head_score("magnitude")
def magnitude(t: AttentionTensors) -> torch.Tensor:
    """||W_q rows of head i|| + ||W_o columns of head i||, plus the head's share of its KV head's ||W_k|| + ||W_v||."""
    dh, rep = t.head_dim, t.num_heads // t.num_kv_heads
    q = t.q.view(t.num_heads, dh, -1).flatten(1).norm(dim=1)
    o = t.o.view(t.o.shape[0], t.num_heads, dh).transpose(0, 1).flatten(1).norm(dim=1)
    kv = t.k.view(t.num_kv_heads, dh, -1).flatten(1).norm(dim=1) + t.v.view(t.num_kv_heads, dh, -1).flatten(1).norm(dim=1)
    return q + o + kv.repeat_interleave(rep) / rep


@head_score("activation", needs_data=True)
def activation(t: AttentionTensors) -> torch.Tensor:
    """Output norm of each head's contribution to the attention output on calibration data."""
    assert t.contribution_norm is not None, "activation score needs calibration statistics"
    return t.contribution_norm


@head_score("random")
def random(t: AttentionTensors) -> torch.Tensor:
    """Uniform random scores (seeded)."""
    gen = torch.Generator().manual_seed(t.seed)
    return torch.rand(t.num_heads, generator=gen)
