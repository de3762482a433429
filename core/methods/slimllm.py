"""SlimLLM (Guo et al., ICML 2025): Pearson-similarity head pruning with greedy search, PCA feature-space channel
importance, linear-regression recovery and cosine-driven per-layer ratios, processed layer by layer.

Every component is a switch (greedy, feature_space, nonuniform, regression, keep_lowest) so the paper's ablation
can be re-run. Choices of ours (GQA units, deriving r0 / N_p / alpha from a global target, the 0.9 clip, the MLP
fix-up that lands the global parameter target, the no-intercept fit where a family cannot hold a bias) are
recorded in the method report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..allocation import round_to_multiple
from ..errors import InvalidTargetError, RecipeError
from ..layer_config import head_dim, layer_shapes
from ..layers import SKIP_ATTENTION, SKIP_MLP, decoder_layers
from ..params import count_parameters, unit_costs
from ..scores.depth import cosine
from ..scores.slimllm import (channels_to_prune, eq11_ratios, feature_space_importance, greedy_search,
                              input_terms, leave_one_out, regression_fit)
from ..stats import ContributionStats, InputNorms, KeptOutputSums, OutputCovariance, collect, linear
from ..surgery import LayerPlan, enable_bias, prune_layer
from ..options import option
from . import Method, PruneContext, register_method
from .width import mlp_tensors

logger = logging.getLogger(__name__)

HEAD_MODES = ("kv_group", "query")


def default_pruned_layers(n_layers: int, ratio: float) -> int:
    """N_p from the paper's LLaMA-7B settings (26/32 layers at 20%, 30/32 at 50%), interpolated [ours]."""
    frac = min(1.0, max(0.5, 0.8125 + (ratio - 0.2) * (0.125 / 0.3)))
    return max(1, round(frac * n_layers))


def default_alpha(ratio: float) -> float:
    """alpha from the paper's settings (10 at 20%, 7 at 50%), interpolated and clamped to [5, 12] [ours]."""
    return min(12.0, max(5.0, 10.0 - 10.0 * (ratio - 0.2)))


@register_method
class SlimLLM(Method):
    """Removes attention heads and MLP channels (SlimLLM), with per-layer ratios and regression recovery"""

    name = "slimllm"

    @dataclass(frozen=True)
    class Options:
        greedy: bool = True  # greedy swap search after the leave-one-out ranking of heads
        feature_space: bool = True  # PCA-weighted channel importance (False: plain output-weight norms)
        nonuniform: bool = True  # eq. 11 per-layer ratios (False: the same ratio in every prunable layer)
        regression: bool = True  # least-squares scale (+ bias) folded into o_proj / down_proj
        keep_lowest: bool = True  # keep the lowest-scored 1% of channels (LoRAP's rule)
        head_mode: str = option("kv_group", choices=HEAD_MODES, help="kv_group: KV head + its query heads; query: "
                                "the same count per group")
        alpha: float | None = option(None, min=0, exclusive=True, help="eq. 11 temperature (default: from the ratio)")
        pruned_layers: int | None = option(None, min=1, help="N_p, the number of pruned layers (default: from the "
                                           "ratio)")
        clip: float = option(0.9, min=0, max=1, exclusive=True, help="maximum per-layer ratio")
        prune_heads: bool = True
        prune_mlp: bool = True

        def __post_init__(self) -> None:
            if not (self.prune_heads or self.prune_mlp):
                raise RecipeError("SlimLLM with prune_heads and prune_mlp both off removes nothing.")

    def needs_data(self, recipe) -> bool:
        return True

    # -- per-layer ratios -------------------------------------------------------------------------------------

    @torch.no_grad()
    def layer_similarity(self, ctx: PruneContext) -> torch.Tensor:
        """c_l = mean over tokens of cos(layer input, layer output) on the unpruned model."""
        runner = ctx.runner()
        n = ctx.model.config.num_hidden_layers
        sims = []
        for i in range(n):
            outputs = runner.run_layer(i)
            total = count = 0.0
            for x, y in zip(runner.hidden, outputs):
                values = 1.0 - cosine(x.flatten(0, -2), y.flatten(0, -2))
                total += values.sum().item()
                count += values.numel()
            sims.append(total / count)
            runner.advance(i, outputs)
            ctx.progress.update("slimllm: layer similarity", i + 1, n)
        return torch.tensor(sims, dtype=torch.float64)

    def prunable_params(self, ctx: PruneContext, opts) -> list[int]:
        """Parameters of the prunable parts (heads and/or MLP channels) of each layer."""
        counts = count_parameters(ctx.model, ctx.spec)["layers"]
        return [(c["attention"] if opts.prune_heads else 0) + (c["mlp"] if opts.prune_mlp else 0) for c in counts]

    def layer_ratios(self, ctx: PruneContext, opts, similarity: torch.Tensor, rho: float) -> tuple[list[float], dict]:
        recipe = ctx.recipe
        n = similarity.numel()
        if recipe.layers.ratios is not None:
            return recipe.layers.layer_ratios(n, 0.0), {"ratios": "explicit"}
        prunable = recipe.layers.prunable(n)
        if not opts.nonuniform:
            r = rho * n / len(prunable)
            if r > opts.clip:
                raise InvalidTargetError(f"The target needs {r:.0%} of every prunable layer, above the clip "
                                         f"{opts.clip:.0%}. Lower the target or protect fewer layers.")
            return recipe.layers.layer_ratios(n, r), {"ratios": "uniform", "r": r}
        n_p = min(opts.pruned_layers or default_pruned_layers(n, rho), len(prunable))
        while rho * n / n_p > opts.clip and n_p < len(prunable):
            n_p += 1
        r0 = rho * n / n_p
        if r0 > opts.clip:
            raise InvalidTargetError(f"The target needs an average ratio {r0:.0%} over the {n_p} prunable layers, "
                                     f"above the clip {opts.clip:.0%}. Lower the target.")
        alpha = opts.alpha if opts.alpha is not None else default_alpha(rho)
        masked = similarity.clone()
        blocked = [i for i in range(n) if i not in prunable]
        masked[blocked] = -1e9  # protected layers are never among the N_p most similar
        ratios = eq11_ratios(masked, r0, n_p, alpha, opts.clip)
        return ratios.tolist(), {"ratios": "eq11", "r0": r0, "pruned_layers": n_p, "alpha": alpha}

    # -- counts ---------------------------------------------------------------------------------------------

    def head_counts(self, ctx: PruneContext, opts, ratios: list[float]) -> list[int]:
        """Units to prune per layer: KV groups (kv_group mode) or query heads per group (query mode)."""
        counts = []
        for i, (shape, r) in enumerate(zip(layer_shapes(ctx.model.config), ratios)):
            if not opts.prune_heads or r == 0 or SKIP_ATTENTION in shape.skip:
                counts.append(0)
                continue
            rep = shape.num_attention_heads // shape.num_key_value_heads
            units = shape.num_key_value_heads if opts.head_mode == "kv_group" else rep
            if opts.head_mode == "query" and rep == 1:
                raise InvalidTargetError(f"Layer {i} has no GQA groups; use head_mode kv_group.")
            counts.append(min(round(r * units), units - 1))
        return counts

    def mlp_counts(self, ctx: PruneContext, opts, ratios: list[float], head_counts: list[int],
                   to_remove: int) -> list[int]:
        """Channels to prune per layer: r_l * m rounded to the recipe's multiple, then adjusted so that heads plus
        channels remove the target's parameters within one rounding unit [ours]."""
        model, spec, multiple = ctx.model, ctx.spec, ctx.recipe.round_to
        shapes = layer_shapes(model.config)
        costs = [unit_costs(model, spec, i) for i in range(len(shapes))]
        removed_heads = 0
        for shape, c, k in zip(shapes, costs, head_counts):
            removed_heads += k * c.head_unit(opts.head_mode, shape.num_attention_heads, shape.num_key_value_heads)
        active = [i for i, r in enumerate(ratios) if r > 0 and opts.prune_mlp and SKIP_MLP not in shapes[i].skip]
        if not active:
            return [0] * len(shapes)
        weights = {i: ratios[i] * shapes[i].intermediate_size for i in active}
        need = max(0, to_remove - removed_heads)
        counts = [0] * len(shapes)
        if len(active) == len(shapes) and len({(ratios[i], shapes[i].intermediate_size) for i in active}) == 1:
            # uniform: one width for every layer, so the checkpoint stays loadable by plain transformers
            m = shapes[0].intermediate_size
            wanted = need / sum(costs[i].mlp_neuron for i in active)
            kept = max(multiple, round_to_multiple(m - wanted, multiple))
            return [m - min(kept, m)] * len(shapes)
        per_weight = need / sum(weights[i] * costs[i].mlp_neuron for i in active)
        for i in active:
            m = shapes[i].intermediate_size
            cap = m - max(multiple, 1)
            counts[i] = min(cap, max(0, m - round_to_multiple(m - weights[i] * per_weight, multiple)))
        # largest-remainder style fix-up, one rounding unit at a time
        unit = max(multiple, 1)
        removed = lambda: removed_heads + sum(counts[i] * costs[i].mlp_neuron for i in active)  # noqa: E731
        step_cost = max(costs[i].mlp_neuron for i in active) * unit
        for _ in range(10_000):
            gap = to_remove - removed()
            if abs(gap) <= step_cost / 2:
                break
            if gap > 0:
                room = [i for i in active if counts[i] + unit <= shapes[i].intermediate_size - unit]
                if not room:
                    break
                i = max(room, key=lambda j: weights[j] * per_weight - counts[j])
                counts[i] += unit
            else:
                room = [i for i in active if counts[i] >= unit]
                if not room:
                    break
                i = min(room, key=lambda j: weights[j] * per_weight - counts[j])
                counts[i] -= unit
        return counts

    # -- per-layer pruning ----------------------------------------------------------------------------------

    def prune_heads(self, ctx, opts, runner, i: int, k: int, fold_bias: bool) -> dict:
        model, spec = ctx.model, ctx.spec
        shape = layer_shapes(model.config)[i]
        dh = head_dim(model.config)
        rep = shape.num_attention_heads // shape.num_key_value_heads
        layer = decoder_layers(model, spec)[i]
        o_proj = linear(layer, spec, "attention", "o")
        if opts.head_mode == "kv_group":
            units = [[g * rep + j for j in range(rep)] for g in range(shape.num_key_value_heads)]
            groups, n_prune = None, k
        else:
            units = [[h] for h in range(shape.num_attention_heads)]
            groups, n_prune = torch.arange(shape.num_attention_heads) // rep, k * shape.num_key_value_heads
        stats = ContributionStats(units, dh)
        collect(runner, i, {"o": (o_proj, stats)})
        moments = stats.moments
        cov = moments.covariance().cpu()
        scores = leave_one_out(cov)
        kept, start, best = greedy_search(cov, scores, n_prune, groups, opts.greedy)
        heads = sorted(h for u in kept for h in units[u])
        kv = sorted({h // rep for h in heads})
        a = b = None
        if opts.regression:
            keep = torch.zeros(len(units), dtype=torch.float64)
            keep[kept] = 1
            m1, m2 = moments.m1.cpu(), moments.m2.cpu()
            ones = torch.ones_like(keep)
            a, b = regression_fit(keep @ m1, ones @ m1, torch.einsum("u,duv,v->d", keep, m2, keep),
                                  torch.einsum("u,duv,v->d", keep, m2, ones), moments.n, fold_bias)
        prune_layer(model, spec, i, LayerPlan(heads=heads, kv_heads=kv))
        if a is not None:
            _fold(linear(decoder_layers(model, spec)[i], spec, "attention", "o"), a, b if fold_bias else None)
        return {"heads": len(heads), "kv_heads": len(kv), "similarity_ranking": start, "similarity_greedy": best}

    def prune_mlp(self, ctx, opts, runner, i: int, count: int, fold_bias: bool) -> dict:
        model, spec = ctx.model, ctx.spec
        shape = layer_shapes(model.config)[i]
        layer = decoder_layers(model, spec)[i]
        norms, cov = InputNorms(), OutputCovariance()
        in_role = "gate_up" if spec.mlp.fused else "gate"
        down = linear(layer, spec, "mlp", "down")
        collect(runner, i, {"in": (linear(layer, spec, "mlp", in_role), norms), "down": (down, norms),
                            "out": (down, cov)})
        t = mlp_tensors(layer, spec, shape)
        score = input_terms(t.gate, t.up, norms.norm("in")) + feature_space_importance(
            t.down, norms.norm("down"), cov.centred(), smooth=opts.feature_space)
        pruned = set(channels_to_prune(score.cpu(), count, opts.keep_lowest))
        kept = [j for j in range(shape.intermediate_size) if j not in pruned]
        a = b = None
        if opts.regression:
            sums = KeptOutputSums(kept)
            collect(runner, i, {"down": (down, sums)})
            a, b = regression_fit(sums.sx, sums.sy, sums.sxx, sums.sxy, sums.n, fold_bias)
        prune_layer(model, spec, i, LayerPlan(mlp=kept))
        if a is not None:
            _fold(linear(decoder_layers(model, spec)[i], spec, "mlp", "down"), a, b if fold_bias else None)
        return {"intermediate_size": len(kept)}

    def run(self, ctx: PruneContext) -> dict:
        opts = self.options(ctx.recipe)
        model, spec, recipe = ctx.model, ctx.spec, ctx.recipe
        original_total = count_parameters(model, spec)["total"]
        similarity = self.layer_similarity(ctx)
        folds = {"attention": "none", "mlp": "none"}
        if opts.regression:
            for branch in ("attention", "mlp"):
                on = (opts.prune_heads if branch == "attention" else opts.prune_mlp)
                folds[branch] = ("scale+bias" if enable_bias(model, spec, branch) else "scale") if on else "none"
        total = count_parameters(model, spec)["total"]  # biases switched on for regression count too
        prunable = self.prunable_params(ctx, opts)
        to_remove = recipe.target.params_to_remove(original_total)
        if to_remove is None:
            to_remove = round(recipe.target.ratio * sum(prunable))
        to_remove += total - original_total
        rho = to_remove / sum(prunable)
        if rho >= 1:
            raise InvalidTargetError(f"The target removes {to_remove:,} parameters but heads and MLPs hold only "
                                     f"{sum(prunable):,}. Lower the target.")
        ratios, ratio_info = self.layer_ratios(ctx, opts, similarity, rho)
        heads = self.head_counts(ctx, opts, ratios)
        channels = self.mlp_counts(ctx, opts, ratios, heads, to_remove)
        runner = ctx.runner()
        n = model.config.num_hidden_layers
        per_layer = []
        for i in range(n):
            entry = {"layer": i, "ratio": ratios[i], "similarity": similarity[i].item()}
            if heads[i]:
                entry.update(self.prune_heads(ctx, opts, runner, i, heads[i], folds["attention"] == "scale+bias"))
            if channels[i]:
                entry.update(self.prune_mlp(ctx, opts, runner, i, channels[i], folds["mlp"] == "scale+bias"))
            runner.advance(i)
            per_layer.append(entry)
            ctx.progress.update("slimllm: pruning", i + 1, n)
        return {"options": {k: getattr(opts, k) for k in opts.__dataclass_fields__}, "average_ratio": rho,
                "regression_fold": folds, **ratio_info, "layers": per_layer}


@torch.no_grad()
def _fold(module: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor | None) -> None:
    """W' = diag(a) W; bias' = bias + b (the regression of the pruned output onto the original one)."""
    module.weight.mul_(a.to(module.weight.device, module.weight.dtype)[:, None])
    if b is not None:
        assert module.bias is not None, "bias folding needs the family's bias flag switched on"
        module.bias.add_(b.to(module.bias.device, module.bias.dtype))
