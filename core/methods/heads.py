"""Attention-head pruning, GQA-aware: whole KV groups (a KV head and its query heads), or query heads only with
the same count kept in every group (no KV-cache saving, finer grain)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..allocation import keep_count, ratio_for_budget
from ..errors import InvalidTargetError
from ..feasibility import check_rounding
from ..layer_config import head_dim, layer_shapes
from ..layers import SKIP_ATTENTION, decoder_layers
from ..params import count_parameters, unit_costs
from ..scores import HEAD_SCORES
from ..scores.heads import AttentionTensors, group_scores
from ..stats import HeadContributions, collect, linear
from ..surgery import LayerPlan, prune_layer
from ..options import option
from . import Method, PruneContext, register_method, top_k

MODES = ("kv_group", "query")


def attention_tensors(layer, spec, shape, dh, contribution_norm=None, seed=0) -> AttentionTensors:
    a = spec.attention
    if a.fused:
        w = linear(layer, spec, "attention", "qkv").weight.detach().float()
        q, k, v = w.split([shape.num_attention_heads * dh, shape.num_key_value_heads * dh,
                           shape.num_key_value_heads * dh])
    else:
        q, k, v = (linear(layer, spec, "attention", r).weight.detach().float() for r in ("q", "k", "v"))
    o = linear(layer, spec, "attention", "o").weight.detach().float()
    return AttentionTensors(q, k, v, o, shape.num_attention_heads, shape.num_key_value_heads, dh,
                            contribution_norm, seed)


def plan_heads(scores: torch.Tensor, shape, mode: str, keep: int) -> LayerPlan:
    """Kept heads for one layer. keep = KV groups kept (kv_group mode) or query heads kept per group (query)."""
    kv, rep = shape.num_key_value_heads, shape.num_attention_heads // shape.num_key_value_heads
    if mode == "kv_group":
        groups = top_k(group_scores(scores, kv), keep)
        return LayerPlan(heads=[g * rep + j for g in groups for j in range(rep)], kv_heads=groups)
    per_group = scores.view(kv, rep)
    heads = [g * rep + j for g in range(kv) for j in top_k(per_group[g], keep)]
    return LayerPlan(heads=heads, kv_heads=list(range(kv)))


@register_method
class AttentionHeads(Method):
    """Removes attention heads: whole KV groups (a KV head with its query heads) or query heads only"""

    name = "attention_heads"
    scores = HEAD_SCORES
    default_score = "magnitude"

    @dataclass(frozen=True)
    class Options:
        mode: str = option("kv_group", choices=MODES, help="kv_group: a KV head and its query heads (smaller KV "
                           "cache); query: query heads only, the same count in every group (finer steps)")

    def keep_counts(self, ctx: PruneContext, mode: str) -> list[int]:
        model, recipe = ctx.model, ctx.recipe
        shapes = layer_shapes(model.config)
        n = len(shapes)
        units = []
        for i, s in enumerate(shapes):
            rep = s.num_attention_heads // s.num_key_value_heads
            if mode == "query" and rep == 1 and SKIP_ATTENTION not in s.skip:
                raise InvalidTargetError(f"Layer {i} has one query head per KV head (no GQA); query-only pruning "
                                         "cannot remove anything there. Use mode kv_group.")
            units.append(0 if SKIP_ATTENTION in s.skip else (s.num_key_value_heads if mode == "kv_group" else rep))
        ratio = recipe.target.ratio
        to_remove = recipe.target.params_to_remove(count_parameters(model, ctx.spec)["total"])
        if to_remove is not None:
            removable = 0
            for i in recipe.layers.prunable(n):
                s = shapes[i]
                per_unit = unit_costs(model, ctx.spec, i).head_unit(mode, s.num_attention_heads, s.num_key_value_heads)
                removable += units[i] * per_unit
            ratio = ratio_for_budget(to_remove, removable, "attention heads")
        ratios = recipe.layers.layer_ratios(n, ratio)
        what = "KV groups" if mode == "kv_group" else "query heads per KV group"
        keeps = [keep_count(u, r, 1, what, i) if u else 0 for i, (u, r) in enumerate(zip(units, ratios))]
        rep = max((s.num_attention_heads // s.num_key_value_heads for s in shapes), default=1)
        finer = (f"For finer steps use mode query (query heads: steps of {1 / rep:.0%})." if mode == "kv_group"
                 and rep > 1 else "")
        check_rounding(recipe.target, ratios, units, keeps, what, finer)
        return keeps

    def run(self, ctx: PruneContext) -> dict:
        model, spec = ctx.model, ctx.spec
        mode = self.options(ctx.recipe).mode
        score = self.score(ctx.recipe)
        keeps = self.keep_counts(ctx, mode)
        shapes = layer_shapes(model.config)
        dh = head_dim(model.config)
        runner = ctx.runner() if score.needs_data else None
        n = len(shapes)
        for i, (shape, keep) in enumerate(zip(shapes, keeps)):
            full = shape.num_key_value_heads if mode == "kv_group" else shape.num_attention_heads // max(
                shape.num_key_value_heads, 1)
            if SKIP_ATTENTION in shape.skip or keep == full:
                if runner is not None:
                    runner.advance(i)
                ctx.progress.update("attention_heads", i + 1, n)
                continue
            layer = decoder_layers(model, spec)[i]
            contribution = None
            if runner is not None:
                stats = HeadContributions(shape.num_attention_heads, dh)
                o_proj = linear(layer, spec, "attention", "o")
                collect(runner, i, {"o": (o_proj, stats)}, stop_after=o_proj)  # the MLP need not run
                contribution = stats.norm()
            tensors = attention_tensors(layer, spec, shape, dh, contribution, ctx.layer_seed(i))
            if score.stats is not None:
                tensors.extra = score.stats(ctx, i, runner)
            scores = score.fn(tensors).cpu()
            del tensors  # no weights held past the block
            prune_layer(model, spec, i, plan_heads(scores, shape, mode, keep))
            if runner is not None:
                runner.advance(i)
            ctx.progress.update("attention_heads", i + 1, n)
        return {"score": score.name, "mode": mode}
