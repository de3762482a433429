"""Depth pruning (Siddiqui et al. 2024): remove whole blocks, or attention-only / MLP-only sub-layers.

Units are ranked by a per-token score on the residual stream (cosine, angular, update norms) or by a sub-network
score (Shapley values, perplexity drop, the leave-one-out and random sub-network contrasts) with a loss,
logit-distance or multiple-choice task utility, once or iteratively (re-scoring after each removal), or given
explicitly. Optional recovery replaces each removed unit by the constant mean of its
update on the calibration tokens (computed on the unpruned or on the progressively pruned model), stored in the
checkpoint: in the bias of the preceding MLP output projection for blocks where the family allows it, otherwise
as a removed sub-layer that keeps a constant output.
"""
from __future__ import annotations

import functools
import logging
import warnings
from dataclasses import dataclass

import torch

from ..errors import InvalidTargetError, RecipeError
from ..feasibility import check_rounding
from ..layer_config import layer_shapes
from ..layers import SKIP_ATTENTION, SKIP_MLP, decoder_layers, layer_at, units_disabled
from ..params import count_parameters
from ..scores import DEPTH_SCORES
from ..scores.depth import RENAMED, Sampling
from ..scores.shapley import EXACT_MAX_UNITS
from ..stats import BranchOutputs, collect, linear
from .. import recover_depth
from ..surgery import LayerPlan, enable_bias, prune_layer, remove_layers
from ..options import option
from ..utility import UTILITIES, make_utility
from . import Method, PruneContext, register_method

logger = logging.getLogger(__name__)

UNITS = ("block", "attention", "mlp")
RECOVERY = ("none", "mean_update", "learned_bias", "lowrank")  # the learned ones: core/recover_depth.py
SOURCES = ("unpruned", "pruned")


def _unit_params(model, spec, layer_idx: int, unit: str) -> int:
    layer = layer_at(decoder_layers(model, spec), layer_idx)
    if unit == "block":
        return sum(p.numel() for p in layer.parameters())
    names = [spec.attention.module if unit == "attention" else spec.mlp.module]
    if f"{unit}_out" in spec.norms:
        names.append(spec.norms[f"{unit}_out"])
    return sum(p.numel() for name in names for p in layer.get_submodule(name).parameters())


def _tokens(t: torch.Tensor, skip_first: bool) -> torch.Tensor:
    """[b, T, d] -> [N, d], optionally without position 0 (the attention sink)."""
    return (t[:, 1:] if skip_first else t).flatten(0, -2)


@register_method
class Depth(Method):
    """Removes whole decoder blocks, or only their attention or MLP sub-layers"""

    name = "depth"
    scores = DEPTH_SCORES
    default_score = "cosine"

    @dataclass(frozen=True)
    class Options:
        unit: str = option("block", choices=UNITS, help="what is removed")
        layers: tuple[int, ...] | None = None  # explicit units to remove (no scoring)
        iterative: bool = False  # re-score the remaining units after each removal
        utility: str = option("loss", choices=UTILITIES, help="sub-network scores: the loss, the logit distance to "
                              "the full model, or accuracy on a multiple-choice task")
        task: str = "pydoc_cloze"  # utility=task: a multiple-choice lm-eval task (bundled, lm-eval's or task_dir's)
        task_docs: int = option(100, min=0, help="utility=task: the task's first documents used (0 = all)")
        task_dir: str | None = None  # utility=task: a folder of lm-eval task YAMLs
        samples: int = option(64, min=2, help="shapley: orderings when sampling; subnet_contrast: random "
                              "sub-networks")
        keep: float = option(0.9, min=0, max=1, exclusive=True, help="subnet_contrast: fraction of units present in "
                             "each sub-network")
        exact_max: int = option(12, min=0, max=EXACT_MAX_UNITS, help="shapley: exact enumeration (2^units "
                                "sub-networks) up to this many units")
        recovery: str = option("none", choices=RECOVERY, help="mean_update: replace a removed unit by its mean update")
        recovery_source: str = option("unpruned", choices=SOURCES, help="mean update measured on the unpruned or "
                                      "the progressively pruned model")
        recovery_skip_first: bool = False  # leave position 0 (attention sink) out of the mean
        recovery_rank: int = 8  # lowrank: rank of the learned map B A x added to the constant
        recovery_steps: int = 200  # learned_bias / lowrank: optimizer steps

        def __post_init__(self) -> None:
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
            if self.recovery_rank < 1 or self.recovery_steps < 0:
                raise RecipeError("Depth recovery needs recovery_rank >= 1 and recovery_steps >= 0.")

    def score_name(self, recipe) -> str | None:
        name = super().score_name(recipe)
        if name in RENAMED:
            _renamed(name)
            return RENAMED[name]
        return name

    def streams(self, recipe) -> bool:
        # learned_bias trains constants end to end through the whole model
        return super().streams(recipe) and self.options(recipe).recovery != "learned_bias"

    def needs_data(self, recipe) -> bool:
        opts = self.options(recipe)
        return opts.layers is None or opts.recovery != "none"

    def candidates(self, ctx: PruneContext, unit: str) -> list[int]:
        shapes = layer_shapes(ctx.model.config)
        prunable = ctx.recipe.layers.prunable(len(shapes))
        if unit == "block":
            return [i for i in prunable if not shapes[i].skip]
        return [i for i in prunable if unit not in shapes[i].skip]

    # -- scoring ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def per_token_scores(self, ctx: PruneContext, opts, candidates: list[int], disabled: list[int]) -> dict[int, float]:
        """Mean per-token score of each candidate on the calibration data, with `disabled` units removed."""
        score = self.score(ctx.recipe)
        model, spec = ctx.model, ctx.spec
        n = model.config.num_hidden_layers
        result = {}
        with units_disabled(model, spec, opts.unit, disabled):
            runner = ctx.runner()
            for i in range(n):
                inputs = runner.hidden
                if i in candidates and opts.unit != "block":
                    layer = decoder_layers(model, spec)[i]
                    attn = BranchOutputs()
                    outputs = collect(runner, i, {"attn": (layer.get_submodule(spec.branch_module("attention")), attn)})
                    mids = [x + a.to(x.device) for x, a in zip(inputs, attn.outputs)]
                    pairs = zip(inputs, mids) if opts.unit == "attention" else zip(mids, outputs)
                else:
                    outputs = runner.run_layer(i)
                    pairs = zip(inputs, outputs)
                if i in candidates:
                    total = count = 0.0
                    for x, y in pairs:
                        values = score.fn(x.flatten(0, -2), y.flatten(0, -2))
                        total += values.sum().item()
                        count += values.numel()
                    result[i] = total / count
                runner.advance(i, outputs)
                ctx.progress.update(f"depth: {score.name} ({opts.unit})", i + 1, n)
        return result

    def make_utility(self, ctx: PruneContext, opts):
        """The sub-network utility, built on the model as it is before any removal."""
        return make_utility(opts.utility, ctx.model, ctx.spec, ctx.calibration_ids, ctx.recipe.batch_size,
                            ctx.tokenizer, opts.task, opts.task_docs, [opts.task_dir] if opts.task_dir else [])

    @torch.no_grad()
    def subnetwork_scores(self, ctx: PruneContext, opts, candidates: list[int], disabled: list[int],
                          utility) -> tuple[dict[int, float], dict]:
        """Unit values from the utilities of the sub-networks the score plans (each distinct one evaluated once)."""
        score = self.score(ctx.recipe)
        model, spec = ctx.model, ctx.spec
        gen = torch.Generator().manual_seed(ctx.recipe.seed)
        plan = score.fn.plan(len(candidates), Sampling(opts.samples, opts.keep, opts.exact_max), gen)
        unique, inverse = torch.unique(plan.masks, dim=0, return_inverse=True)
        values = []
        for row, mask in enumerate(unique):
            off = [c for c, present in zip(candidates, mask.tolist()) if not present]
            with units_disabled(model, spec, opts.unit, disabled + off):
                values.append(utility(model, spec))
            ctx.progress.update(f"depth: {score.name} sub-networks", row + 1, len(unique))
        estimate = plan.estimate(torch.tensor(values, dtype=torch.float64)[inverse])
        info = {**estimate.info, "utility": opts.utility, "subnetworks_evaluated": len(unique)}
        if opts.utility == "task":
            info.update(task=opts.task, task_docs=len(utility.task.docs))
        if estimate.stderr is not None:
            info["stderr"] = {str(c): e for c, e in zip(candidates, estimate.stderr.tolist())}
        return dict(zip(candidates, estimate.values.tolist())), info

    def unit_scores(self, ctx: PruneContext, opts, candidates: list[int], disabled: list[int],
                    utility=None) -> tuple[dict[int, float], dict | None]:
        score = self.score(ctx.recipe)
        if score.kind == "subnetwork":
            return self.subnetwork_scores(ctx, opts, candidates, disabled, utility)
        if score.kind == "gradient":  # stats from a backward pass (core/scores/gradient_stats.py)
            stats = score.stats(ctx, opts, candidates, disabled)
            return {i: float(score.fn(stats[i])) for i in candidates}, None
        return self.per_token_scores(ctx, opts, candidates, disabled), None

    # -- selection --------------------------------------------------------------------------------------------

    def removal_budget(self, ctx: PruneContext) -> tuple[int | None, int | None]:
        """(number of units, or parameters) the target asks to remove."""
        recipe = ctx.recipe
        to_remove = recipe.target.params_to_remove(count_parameters(ctx.model, ctx.spec)["total"])
        if to_remove is None:
            n = ctx.model.config.num_hidden_layers
            count = round(recipe.target.ratio * n)
            check_rounding(recipe.target, [recipe.target.ratio], [n], [n - count], "layers", scope="the model")
            return count, None
        return None, to_remove

    def select(self, ctx: PruneContext, opts, candidates: list[int]) -> tuple[list[int], list[dict], list[dict]]:
        """Units to remove, the scores seen at each step (one step when one-shot) and, for sub-network scores, what
        each step's estimate rests on (estimator, sample count, standard errors)."""
        count, to_remove = self.removal_budget(ctx)
        chosen: list[int] = []
        history: list[dict] = []
        estimates: list[dict] = []
        utility = self.make_utility(ctx, opts) if self.score(ctx.recipe).kind == "subnetwork" else None
        removed = 0

        def done() -> bool:
            return len(chosen) >= count if count is not None else removed >= to_remove

        while not done():
            remaining = [c for c in candidates if c not in chosen]
            if not remaining:
                what = f"{count} units" if count is not None else f"{to_remove:,} parameters"
                raise InvalidTargetError(f"The target asks for {what} of {opts.unit} removal but only "
                                         f"{len(candidates)} candidates exist (protected or already removed units "
                                         "are excluded). Lower the target.")
            scores, info = self.unit_scores(ctx, opts, remaining, chosen, utility)
            history.append({str(k): v for k, v in sorted(scores.items())})
            if info is not None:
                estimates.append(info)
            ranked = sorted(remaining, key=lambda i: (scores[i], i))
            for unit in ranked[:1] if opts.iterative else ranked:
                if done():
                    break
                params = _unit_params(ctx.model, ctx.spec, unit, opts.unit)
                if count is None and chosen and removed + params - to_remove > to_remove - removed:
                    to_remove = removed  # stopping here lands closer to the parameter target
                    break
                chosen.append(unit)
                removed += params
        if opts.unit == "block" and len(chosen) >= ctx.model.config.num_hidden_layers:
            raise InvalidTargetError("The target removes every block; lower it.")
        return sorted(chosen), history, estimates

    # -- recovery and removal ---------------------------------------------------------------------------------

    @torch.no_grad()
    def mean_updates(self, ctx: PruneContext, opts, units: list[int], progressive: bool) -> dict[int, torch.Tensor]:
        """Mean update of each unit on the calibration tokens. With `progressive`, units are removed (replaced by
        their constant) as the pass goes, so each later mean is measured on the pruned model."""
        model, spec = ctx.model, ctx.spec
        runner = ctx.runner()
        n = model.config.num_hidden_layers
        means: dict[int, torch.Tensor] = {}
        for i in range(n):
            if i not in units:
                runner.advance(i)
                continue
            layer = decoder_layers(model, spec)[i]
            if opts.unit == "block":
                outputs = runner.run_layer(i)
                deltas = [_tokens(y - x, opts.recovery_skip_first) for x, y in zip(runner.hidden, outputs)]
            else:
                branch = BranchOutputs()
                outputs = collect(runner, i, {"b": (layer.get_submodule(spec.branch_module(opts.unit)), branch)})
                deltas = [_tokens(o, opts.recovery_skip_first) for o in branch.outputs]
            stacked = torch.cat([d.double() for d in deltas])
            means[i] = stacked.mean(0).to(next(layer.parameters()).dtype)
            if progressive:
                self.replace(ctx, opts, i, means[i])
                outputs = None
            runner.advance(i, outputs)
            ctx.progress.update("depth: mean updates", i + 1, n)
        return means

    def replace(self, ctx: PruneContext, opts, layer_idx: int, constant: torch.Tensor | None,
                adapter: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Remove a unit in place, leaving `constant` (if any, plus a low-rank `adapter`) as its output."""
        skip = {SKIP_ATTENTION, SKIP_MLP} if opts.unit == "block" else {opts.unit}
        bias_branch = SKIP_MLP if opts.unit == "block" else opts.unit
        bias = {bias_branch: constant} if constant is not None else {}
        adapters = {bias_branch: adapter} if adapter is not None else {}
        prune_layer(ctx.model, ctx.spec, layer_idx, LayerPlan(skip=skip, skip_bias=bias, skip_adapter=adapters))

    def finalize_blocks(self, ctx: PruneContext, opts, blocks: list[int], means: dict[int, torch.Tensor]) -> dict:
        """Delete removed blocks; fold each block's mean update (if any) into the preceding kept block's MLP output
        bias when the family allows it, else keep the block as an empty layer carrying the constant."""
        model, spec = ctx.model, ctx.spec
        foldable = "mlp" in spec.bias_flags and "mlp_out" not in spec.norms and opts.recovery != "lowrank"
        kept_as_constant, folded = [], []
        removed_set = set(blocks)
        for i in blocks:
            if i not in means:
                continue
            pred = max((j for j in range(i) if j not in removed_set), default=None)
            if foldable and pred is not None and SKIP_MLP not in layer_shapes(model.config)[pred].skip:
                enable_bias(model, spec, "mlp")
                down = linear(decoder_layers(model, spec)[pred], spec, "mlp", "down")
                with torch.no_grad():
                    down.bias.add_(means[i].to(down.bias.device, down.bias.dtype))
                folded.append(i)
            else:
                if not layer_shapes(model.config)[i].skip:  # not yet replaced by its constant
                    self.replace(ctx, opts, i, means[i])
                kept_as_constant.append(i)
        remove_layers(model, spec, [i for i in blocks if i not in kept_as_constant])
        return {"folded_into_previous_mlp_bias": folded, "kept_as_constant_layer": kept_as_constant}

    def learn(self, ctx: PruneContext, opts, chosen: list[int], storage: dict, reference, fits: dict) -> dict:
        """The learned recoveries' report (and, for learned_bias, the end-to-end training of the constants)."""
        if opts.recovery == "lowrank":
            return {"method": "lowrank", "rank": opts.recovery_rank, "steps": opts.recovery_steps, "fits": fits}
        if opts.recovery != "learned_bias":
            return {}
        folded = recover_depth.folded_targets(chosen, storage.get("folded_into_previous_mlp_bias", []),
                                              storage.get("kept_as_constant_layer", []))
        params = recover_depth.trainable_constants(ctx.model, ctx.spec, folded)
        return {"method": "learned_bias", "steps": opts.recovery_steps, **recover_depth.learn_constants(
            ctx.model, params, ctx.calibration_ids(), reference, ctx.recipe.batch_size, opts.recovery_steps,
            seed=ctx.recipe.seed)}

    def run(self, ctx: PruneContext) -> dict:
        opts = self.options(ctx.recipe)
        model = ctx.model
        n = model.config.num_hidden_layers
        candidates = self.candidates(ctx, opts.unit)
        recover = opts.recovery != "none"
        means: dict[int, torch.Tensor] = {}
        reference = recover_depth.final_states(model, ctx.calibration_ids(), ctx.recipe.batch_size) if (
            opts.recovery == "learned_bias") else None
        if recover and opts.recovery_source == "unpruned" and opts.recovery != "lowrank":
            means = self.mean_updates(ctx, opts, candidates, progressive=False)
        history: list[dict] = []
        estimates: list[dict] = []
        if opts.layers is not None:
            bad = [i for i in opts.layers if i not in range(n)]
            if bad:
                raise InvalidTargetError(f"Layers {bad} do not exist; the model has layers 0..{n - 1}.")
            chosen = sorted(set(opts.layers))
            if recover and opts.recovery_source == "unpruned" and opts.recovery != "lowrank":
                missing = [i for i in chosen if i not in means]
                means.update(self.mean_updates(ctx, opts, missing, progressive=False) if missing else {})
        else:
            chosen, history, estimates = self.select(ctx, opts, candidates)
        fits = {}
        if opts.recovery == "lowrank":
            means, fits = recover_depth.lowrank_pass(ctx, opts, chosen, self.replace)
        elif recover and opts.recovery_source == "pruned":
            means = self.mean_updates(ctx, opts, chosen, progressive=True)
        elif opts.unit != "block":
            for i in chosen:
                self.replace(ctx, opts, i, means.get(i) if recover else None)
        storage = self.finalize_blocks(ctx, opts, chosen, means if recover else {}) if opts.unit == "block" else {}
        report = {"unit": opts.unit, "score": self.score_name(ctx.recipe) if opts.layers is None else None,
                  "removed": chosen, "scores": history[0] if len(history) == 1 else history}
        if estimates:
            report["estimate"] = estimates[0] if len(estimates) == 1 else estimates
        if recover:
            report["recovery"] = {"source": opts.recovery_source, "skip_first": opts.recovery_skip_first,
                                  "norms": {str(i): means[i].float().norm().item() for i in chosen}, **storage}
            report["recovery"].update(self.learn(ctx, opts, chosen, storage, reference, fits))
        return report


def _renamed(old: str) -> None:
    """Say that a depth score was renamed (the former names still work): a DeprecationWarning each time, a log line
    once per process."""
    message = (f"Depth score {old!r} is now called {RENAMED[old]!r} (it is not a Shapley estimate; use 'shapley' "
               f"for Shapley values). The former name still works but is deprecated.")
    warnings.warn(message, DeprecationWarning, stacklevel=3)
    _log_once(message)


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    logger.warning(message)
