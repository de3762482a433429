"""SlimLLM (Guo et al., ICML 2025): Pearson-similarity head pruning with greedy search, PCA feature-space channel
importance, linear-regression recovery and cosine-driven per-layer ratios, processed layer by layer.

Every component is a switch (greedy, feature_space, nonuniform, regression, keep_lowest, protect_ends) so the
paper's ablation can be re-run. Choices of ours (GQA units, deriving r0 / N_p / alpha from a global target, the 0.9
clip, one common scale of the ratios that absorbs the head-rounding residue, the no-intercept fit where a family
cannot hold a bias) are recorded in the method report, with the ratio each layer actually used.

The paper's constants and ours. It runs LLaMA-7B (L = 32 layers) at r0 = 0.25, N_p = 26, alpha = 10 ("20%") and
r0 = 0.55, N_p = 30, alpha = 7 ("50%"), with heads and channels of a pruned layer at r_l and r_l averaging r0 over
the N_p layers. So those settings remove r0 * N_p / L of the heads + MLP parameters: 0.203125 and 0.515625 (19.5% and
49.6% of all LLaMA-7B parameters). We take the target instead and derive r0 = rho * L / N_p, rho = the fraction of
heads + MLP parameters to remove, with N_p and alpha interpolated linearly in rho through the paper's two settings:
at rho = 0.203125 / 0.515625 this gives exactly N_p = 26 / 30, alpha = 10 / 7 and r0 = 0.25 / 0.55 (a target of
20% / 50% of the heads + MLP gives r0 = 0.246 / 0.533 instead; 20% / 50% of all parameters, 0.256 / 0.555).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import InvalidTargetError, RecipeError
from ..layer_config import head_dim, layer_shapes
from ..layers import SKIP_ATTENTION, SKIP_MLP, decoder_layers
from ..params import count_parameters, unit_costs
from ..scores.depth import cosine
from ..scores.slimllm import (channels_to_prune, eq11_ratios, feature_space_importance,
                              feature_space_importance_from_outputs, greedy_search, input_terms, leave_one_out,
                              regression_fit)
from ..stats import ContributionStats, InputNorms, KeptOutputSums, OutputCovariance, collect, linear
from ..surgery import LayerPlan, enable_bias, prune_layer
from ..options import option
from ..replay import MlpReplay
from . import Method, PruneContext, register_method
from .slimllm_budget import Allocation, LayerSizes, allocate
from .width import mlp_tensors

logger = logging.getLogger(__name__)

HEAD_MODES = ("kv_group", "query")


# the paper's two LLaMA-7B settings as (rho = r0 * N_p / L, N_p / L, alpha); see the module docstring
PAPER_SETTINGS = ((0.25 * 26 / 32, 26 / 32, 10.0), (0.55 * 30 / 32, 30 / 32, 7.0))


def _through_paper(rho: float, column: int) -> float:
    (x0, *a), (x1, *b) = PAPER_SETTINGS
    y0, y1 = a[column], b[column]
    return y0 + (rho - x0) * (y1 - y0) / (x1 - x0)


def default_pruned_layers(n_layers: int, ratio: float) -> int:
    """N_p: the paper's 26/32 and 30/32 layers at its two settings, linear in between and beyond, kept within
    [L/2, L] [ours]. `ratio` = rho, the fraction of heads + MLP parameters to remove."""
    frac = min(1.0, max(0.5, _through_paper(ratio, 0)))
    return max(1, round(frac * n_layers + 1e-9))


def default_alpha(ratio: float) -> float:
    """alpha: the paper's 10 and 7 at its two settings, linear in rho, clamped to [5, 12] [ours]."""
    return min(12.0, max(5.0, _through_paper(ratio, 1)))


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
        protect_ends: bool = True  # first and last layers keep everything (the paper's ratio 0); False prunes them
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
        if opts.protect_ends:
            prunable = [i for i in prunable if i not in (0, n - 1)]
            if not prunable:
                raise InvalidTargetError(f"With its first and last layers protected, this {n}-layer model has no "
                                         "layer left to prune. Set the option protect_ends=false.")
        if not opts.nonuniform:
            r = rho * n / len(prunable)
            if r > opts.clip:
                raise InvalidTargetError(f"The target needs {r:.0%} of every prunable layer, above the clip "
                                         f"{opts.clip:.0%}. Lower the target or protect fewer layers"
                                         f"{' (protect_ends=false)' if opts.protect_ends else ''}.")
            return [r if i in prunable else 0.0 for i in range(n)], {"ratios": "uniform", "r": r}
        n_p = min(opts.pruned_layers or default_pruned_layers(n, rho), len(prunable))
        while rho * n / n_p > opts.clip and n_p < len(prunable):
            n_p += 1
        r0 = rho * n / n_p
        if r0 > opts.clip:
            raise InvalidTargetError(f"The target needs an average ratio {r0:.0%} over the {n_p} prunable layers, "
                                     f"above the clip {opts.clip:.0%}. Lower the target"
                                     f"{' or set protect_ends=false' if opts.protect_ends else ''}.")
        alpha = opts.alpha if opts.alpha is not None else default_alpha(rho)
        masked = similarity.clone()
        blocked = [i for i in range(n) if i not in prunable]
        masked[blocked] = -1e9  # protected layers are never among the N_p most similar
        ratios = eq11_ratios(masked, r0, n_p, alpha, opts.clip)
        return ratios.tolist(), {"ratios": "eq11", "r0": r0, "pruned_layers": n_p, "alpha": alpha}

    # -- counts ---------------------------------------------------------------------------------------------

    def layer_sizes(self, ctx: PruneContext, opts) -> list[LayerSizes]:
        """Head units (KV groups, or query heads per group) and MLP channels each layer may lose, with costs."""
        model, spec = ctx.model, ctx.spec
        sizes = []
        for i, shape in enumerate(layer_shapes(model.config)):
            c = unit_costs(model, spec, i)
            units = cost = 0
            if opts.prune_heads and SKIP_ATTENTION not in shape.skip:
                rep = shape.num_attention_heads // shape.num_key_value_heads
                if opts.head_mode == "query" and rep == 1:
                    raise InvalidTargetError(f"Layer {i} has no GQA groups; use head_mode kv_group.")
                units = shape.num_key_value_heads if opts.head_mode == "kv_group" else rep
                cost = c.head_unit(opts.head_mode, shape.num_attention_heads, shape.num_key_value_heads)
            width = shape.intermediate_size if opts.prune_mlp and SKIP_MLP not in shape.skip else 0
            sizes.append(LayerSizes(units, cost, width, c.mlp_neuron if width else 0))
        return sizes

    def counts(self, ctx: PruneContext, opts, ratios: list[float], to_remove: int | None) -> Allocation:
        """Heads and channels of each layer at one ratio r'_l = min(clip, s * r_l), s fitted to the target."""
        sizes = self.layer_sizes(ctx, opts)
        pruned = [i for i, r in enumerate(ratios) if r > 0]
        # every layer at one width keeps the checkpoint loadable by plain transformers
        same = (len(pruned) == len(sizes) and len({(ratios[i], sizes[i]) for i in pruned}) == 1)
        clip = opts.clip if to_remove is not None else 1.0  # explicit ratios are taken as given
        return allocate(ratios, sizes, to_remove, clip, ctx.recipe.round_to, same)

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
        collect(runner, i, {"o": (o_proj, stats)}, stop_after=o_proj)  # the MLP need not run
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

    def prune_mlp(self, ctx, opts, runner, i: int, count: int, fold_bias: bool) -> tuple[dict, list | None]:
        """Prune block i's MLP to `count` fewer channels; returns the report entry and the block's new outputs
        (None: the caller recomputes them)."""
        model, spec = ctx.model, ctx.spec
        shape = layer_shapes(model.config)[i]
        layer = decoder_layers(model, spec)[i]
        norms, cov = InputNorms(), OutputCovariance()
        in_role = "gate_up" if spec.mlp.fused else "gate"
        down = linear(layer, spec, "mlp", "down")
        hooks = {"in": (linear(layer, spec, "mlp", in_role), norms), "down": (down, norms)}
        replay = MlpReplay.start(runner, layer, spec, shape.intermediate_size, outputs=True)
        if replay is not None:  # the PCA, the regression and the next block's inputs then need no further forward
            hooks.update(replay.hooks(layer))
        # fewer tokens than features: the PCA comes from the recorded outputs (an N x N eigenproblem, not d x d;
        # cheaper up to about 0.8 d tokens, where the N x N products catch up with the d x d eigh they replace)
        low_rank = opts.feature_space and replay is not None and 5 * runner.num_tokens <= 4 * down.out_features
        if opts.feature_space and not low_rank:
            hooks["out"] = (down, cov)
        collect(runner, i, hooks)
        t = mlp_tensors(layer, spec, shape)
        if low_rank:  # the centring removes a bias: the outputs are taken as recorded
            outputs = torch.cat([y.flatten(0, -2).to(t.down.device) for y in replay.down_outputs])
            importance = feature_space_importance_from_outputs(t.down, norms.norm("down"), outputs)
            del outputs
        else:
            importance = feature_space_importance(t.down, norms.norm("down"), cov.centred() if cov.n else None,
                                                  smooth=opts.feature_space)
        score = input_terms(t.gate, t.up, norms.norm("in")) + importance
        pruned = set(channels_to_prune(score.cpu(), count, opts.keep_lowest))
        kept = [j for j in range(shape.intermediate_size) if j not in pruned]
        a = b = None
        if opts.regression:
            sums = KeptOutputSums(kept)
            if replay is not None:
                for inputs, outputs in zip(replay.down_inputs, replay.down_outputs):
                    sums.add_recorded(inputs, outputs, down)
            else:
                collect(runner, i, {"down": (down, sums)})
            a, b = regression_fit(sums.sx, sums.sy, sums.sxx, sums.sxy, sums.n, fold_bias)
        prune_layer(model, spec, i, LayerPlan(mlp=kept))
        if a is not None:
            _fold(linear(decoder_layers(model, spec)[i], spec, "mlp", "down"), a, b if fold_bias else None)
        outputs = replay.outputs(runner, i, kept) if replay is not None else None
        return {"intermediate_size": len(kept)}, outputs

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
        explicit = ratio_info["ratios"] == "explicit"
        plan = self.counts(ctx, opts, ratios, None if explicit else to_remove)
        sizes = self.layer_sizes(ctx, opts)
        runner = ctx.runner()
        n = model.config.num_hidden_layers
        per_layer = []
        for i in range(n):
            k, c = plan.heads[i], plan.channels[i]
            entry = {"layer": i, "ratio": plan.ratios[i], "ratio_requested": ratios[i],
                     "similarity": similarity[i].item(),
                     "heads_removed_fraction": k / sizes[i].head_units if sizes[i].head_units else 0.0,
                     "channels_removed_fraction": c / sizes[i].channels if sizes[i].channels else 0.0}
            if k:
                entry.update(self.prune_heads(ctx, opts, runner, i, k, folds["attention"] == "scale+bias"))
            outputs = None
            if c:
                info, outputs = self.prune_mlp(ctx, opts, runner, i, c, folds["mlp"] == "scale+bias")
                entry.update(info)
            runner.advance(i, outputs)
            per_layer.append(entry)
            ctx.progress.update("slimllm: pruning", i + 1, n)
        return {"options": {k: getattr(opts, k) for k in opts.__dataclass_fields__}, "average_ratio": rho,
                "regression_fold": folds, **ratio_info, "ratio_scale": plan.scale,
                "params_to_remove": None if explicit else to_remove, "params_removed_planned": plan.removed,
                "layers": per_layer}


@torch.no_grad()
def _fold(module: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor | None) -> None:
    """W' = diag(a) W; bias' = bias + b (the regression of the pruned output onto the original one)."""
    module.weight.mul_(a.to(module.weight.device, module.weight.dtype)[:, None])
    if b is not None:
        assert module.bias is not None, "bias folding needs the family's bias flag switched on"
        module.bias.add_(b.to(module.bias.device, module.bias.dtype))
