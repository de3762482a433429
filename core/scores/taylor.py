"""First-order Taylor importance (Molchanov et al. 2019; LLM-Pruner): the loss change removing a unit would cause,
estimated as sum over the unit's weights of |w * dL/dw|, L the mean next-token NLL on the calibration data.
The gradients come from `gradient_stats` (a backward pass through the whole model, once per run).

Shapes as in `mlp.py` / `heads.py`; the gradients have the shape of their weights."""
from __future__ import annotations

import torch

from . import depth_score, head_score, mlp_score
from .gradient_stats import attention_gradients, depth_gradients, mlp_gradients
from .heads import AttentionTensors
from .mlp import MlpTensors


@mlp_score("taylor", needs_data=True, stats=mlp_gradients)
def mlp_taylor(t: MlpTensors) -> torch.Tensor:
    """First-order Taylor: sum of |w * dL/dw| over the neuron's gate row, up row and down column."""
    g = t.extra
    return ((t.gate * g["grad_gate"]).abs().sum(1) + (t.up * g["grad_up"]).abs().sum(1)
            + (t.down * g["grad_down"]).abs().sum(0))


def _per_head(w: torch.Tensor, heads: int, dh: int, dim: int) -> torch.Tensor:
    """Sum of a [rows, cols] tensor over each head's block of rows (dim 0) or columns (dim 1): [heads]."""
    if dim == 0:
        return w.reshape(heads, dh, -1).sum((1, 2))
    return w.reshape(w.shape[0], heads, dh).sum((0, 2))


@head_score("taylor", needs_data=True, stats=attention_gradients)
def head_taylor(t: AttentionTensors) -> torch.Tensor:
    """First-order Taylor: |w * dL/dw| over the head's q rows and o columns, plus its share of its KV head's k, v."""
    g, dh, rep = t.extra, t.head_dim, t.num_heads // t.num_kv_heads
    q = _per_head((t.q * g["grad_q"]).abs(), t.num_heads, dh, 0)
    o = _per_head((t.o * g["grad_o"]).abs(), t.num_heads, dh, 1)
    kv = _per_head((t.k * g["grad_k"]).abs(), t.num_kv_heads, dh, 0) + _per_head((t.v * g["grad_v"]).abs(),
                                                                                t.num_kv_heads, dh, 0)
    return q + o + kv.repeat_interleave(rep) / rep


@depth_score("taylor", kind="gradient", stats=depth_gradients)
def depth_taylor(stats: dict) -> torch.Tensor:
    """First-order Taylor: sum of |w * dL/dw| over every weight of the block or sub-layer."""
    return sum((w * g).abs().sum() for w, g in zip(stats["weights"], stats["grads"]))
