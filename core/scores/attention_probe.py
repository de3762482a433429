"""Per-head attention statistics for the tutorial's head score: the mean entropy of each head's attention
distribution and the mean norm of its value vectors, on the calibration tokens of one layer.

The attention probabilities are computed from the query / key states the attention module hands to its attention
function (after rotary embeddings and any q/k norms, whatever the family), by standing in for that function for
one calibration pass of the layer: the layer's output is still computed by the original implementation."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ..layers import decoder_layers

PROBE = "core_attention_probe"


class HeadStats:
    """Accumulates, per query head, the summed entropy over query positions and the summed value-vector norm."""

    def __init__(self) -> None:
        self.entropy = self.value_norm = None
        self.queries = self.values = 0

    def add(self, query, key, value, attention_mask, scaling, sliding_window=None) -> None:
        """query [b, H, T, dh]; key, value [b, KV, S, dh]; attention_mask: None (causal) or [b, 1, T, S]."""
        q, k, v = query.detach().float(), key.detach().float(), value.detach().float()
        heads, kv = q.shape[1], k.shape[1]
        k = k.repeat_interleave(heads // kv, dim=1)
        scores = q @ k.transpose(-1, -2) * scaling
        t, s = scores.shape[-2:]
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask[..., :s]
            scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.float()
        else:
            pos_q = torch.arange(s - t, s, device=q.device)[:, None]
            pos_k = torch.arange(s, device=q.device)[None, :]
            allowed = pos_k <= pos_q
            if sliding_window:
                allowed &= pos_k > pos_q - sliding_window
            scores = scores.masked_fill(~allowed, -math.inf)
        p = scores.softmax(-1)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # [b, H, T]
        ent = ent[:, :, 1:] if t > 1 else ent  # position 0 attends only to itself: always zero
        norms = v.norm(dim=-1).mean(-1).repeat_interleave(heads // kv, dim=1)  # [b, H]
        batch_entropy, batch_norm = ent.sum((0, 2)).cpu(), norms.sum(0).cpu()
        self.entropy = batch_entropy if self.entropy is None else self.entropy + batch_entropy
        self.value_norm = batch_norm if self.value_norm is None else self.value_norm + batch_norm
        self.queries += ent.shape[0] * ent.shape[2]
        self.values += norms.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {"attention_entropy": self.entropy / self.queries, "value_norm": self.value_norm / self.values}


@contextlib.contextmanager
def probing(attention: torch.nn.Module, stats: HeadStats) -> Iterator[None]:
    """While active, `attention` records its heads' statistics in `stats` and computes its output as before."""
    config = attention.config
    original = config._attn_implementation

    def probe(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        stats.add(query, key, value, attention_mask, scaling if scaling is not None else query.shape[-1] ** -0.5,
                  sliding_window)
        inner = sdpa_attention_forward if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]
        return inner(module, query, key, value, attention_mask, scaling=scaling, sliding_window=sliding_window,
                     **kwargs)

    AttentionInterface.register(PROBE, probe)
    config._attn_implementation = PROBE
    try:
        yield
    finally:
        config._attn_implementation = original


def head_statistics(ctx, layer_idx: int, runner) -> dict[str, torch.Tensor]:
    """{'attention_entropy': [H], 'value_norm': [H]} of layer `layer_idx` on the runner's hidden states."""
    layer = decoder_layers(ctx.model, ctx.spec)[layer_idx]
    stats = HeadStats()
    with probing(layer.get_submodule(ctx.spec.attention.module), stats):
        runner.run_layer(layer_idx)
    return stats.result()
