"""Per-token importance of a block or sub-layer from the residual stream before (x) and after (y) it.

Shapes: x, y: [N, d]; every function returns [N]; the unit's score is the mean over calibration tokens.
Higher = more important (remove the lowest first).
"""
from __future__ import annotations

import math

import torch

from . import depth_score


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
