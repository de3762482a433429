"""Unstructured and N:M sparsity of the decoder blocks' Linear weights: magnitude, Wanda, SparseGPT, Taylor.
Shapes stay: the model is no smaller in memory and no faster without sparse kernels (2:4 on Ampere or newer GPUs).
On the reference model at 50% zeros (no fine-tuning; held-out perplexity 21.19 dense), SparseGPT reaches 22.03,
Wanda 22.36, magnitude 22.48; at 2:4, 23.14 / 24.23 / 24.60 (bench/results/sparsity_reference_cpu.md).

Weights are zeroed in place (use a structured stage first to also shrink the model). Embeddings and the LM head
are never touched. Blocks are processed in order through the layer-by-layer pipeline: block i is
calibrated on the outputs of the already-pruned blocks 0..i-1, and inside a block the attention projections are
calibrated and pruned before the MLP (option `order: linear` also does q/k/v before o and gate/up before down).

Patterns: `unstructured` at the target ratio (compared per layer, per output row, or, for magnitude, against one
global threshold over every pruned Linear of the model), or `N:M` (keep N of every M consecutive input weights,
e.g. 2:4, the layout of sparse tensor cores; the ratio is then 1 - N/M).

`taylor` is computed block by block: the loss of block i is its output projected on random directions,
L = <r, f_i(x)>, so the mean of (w * dL/dw)^2 over the probes estimates the squared first-order change of the
block's output when w is removed (against the block's own output, not the model's LM loss: no whole-model backward
pass is needed, and it streams like every other score).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InvalidTargetError, RecipeError
from ..layer_config import layer_shapes
from ..layers import SKIP_ATTENTION, SKIP_MLP, decoder_layers
from ..scores import SPARSITY_SCORES
from ..scores.sparsity import GlobalThreshold, LinearTensors, Pattern, hessian_factor, pattern_mask, sparsegpt_shared
from ..stats import InputGram, InputNorms, TaylorSquares, collect, linear
from . import Method, PruneContext, register_method

logger = logging.getLogger(__name__)

SCOPES = ("layer", "row", "global")
ORDERS = ("branch", "linear")
LINEARS = ("all", "attention", "mlp")
DEFAULT_SCOPE = {"magnitude": "layer", "random": "layer", "wanda": "row", "taylor": "layer"}


def parse_pattern(value) -> Pattern:
    """'unstructured', 'N:M' (YAML 1.1 reads an unquoted 2:4 as the base-60 number 124: decoded back)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 60:
        value = f"{value // 60}:{value % 60}"
    text = str(value).strip().lower()
    if text in ("unstructured", ""):
        return Pattern()
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise RecipeError(f"Sparsity pattern must be 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4' or '4:8' "
                          f"(got {value!r}).")
    return Pattern(int(match.group(1)), int(match.group(2)))


def implied_target(options: dict) -> dict | None:
    """The target an N:M pattern implies ({'ratio': 1 - N/M}), for front ends where the target may be left out."""
    try:
        pattern = parse_pattern(options.get("pattern", "unstructured"))
    except RecipeError:
        return None
    return {"ratio": pattern.ratio} if pattern.structured else None


def recipe_structure(recipe) -> str:
    """The layout a recipe's sparsity stages leave: the last stage's N:M (earlier zeros score lowest, so each group
    keeps at most N non-zeros), or 'unstructured'."""
    stages = [s for s in recipe.stages() if s.method == "sparsity"]
    return str(parse_pattern(stages[-1].options.get("pattern", "unstructured"))) if stages else "unstructured"


def linear_groups(layer: nn.Module, spec, shape, which: str) -> list[tuple[str, dict[str, nn.Module]]]:
    """The block's Linear modules in calibration order, grouped by shared input: (branch, {path: module})."""
    groups = []
    for branch, first, second, skip in (("attention", ("qkv",) if spec.attention.fused else ("q", "k", "v"), "o",
                                         SKIP_ATTENTION),
                                        ("mlp", ("gate_up",) if spec.mlp.fused else ("gate", "up"), "down", SKIP_MLP)):
        if which not in ("all", branch) or skip in shape.skip:
            continue
        part = spec.attention if branch == "attention" else spec.mlp
        for roles in (first, (second,)):
            groups.append((branch, {f"{part.module}.{getattr(part, r)}": linear(layer, spec, branch, r) for r in roles}))
    return groups


def calibration_passes(groups, order: str) -> list[list[dict[str, nn.Module]]]:
    """The groups calibrated together in one pass over the block: 'branch': one pass per branch (attention, then
    MLP); 'linear': one pass per group of a shared input."""
    if order == "linear":
        return [[g] for _, g in groups]
    passes: dict[str, list[dict[str, nn.Module]]] = {}
    for branch, g in groups:
        passes.setdefault(branch, []).append(g)
    return list(passes.values())


def zero_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).sum()) / weight.numel()


@register_method
class Sparsity(Method):
    """Removes single weights of the decoder-block linears (set to zero, shapes kept): unstructured or N:M (2:4)"""

    name = "sparsity"
    scores = SPARSITY_SCORES
    default_score = "wanda"
    cumulative_target = True  # prune -> recover rounds ask for the cumulative fraction (zeros score lowest: kept zero)

    @dataclass(frozen=True)
    class Options:
        # 'unstructured', or 'N:M' (e.g. '2:4', '4:8'): keep N of every M inputs (an int is YAML's base-60 reading
        # of an unquoted N:M)
        pattern: str | int = "unstructured"
        scope: str | None = None  # unstructured: compare per 'layer', per output 'row', or 'global' (magnitude)
        linears: str = "all"  # 'all' decoder-block linears, or only the 'attention' / 'mlp' ones
        order: str = "branch"  # 'branch': attention before MLP; 'linear': also q/k/v before o, gate/up before down
        block_size: int = 128  # sparsegpt: columns per block
        dampening: float = 0.01  # sparsegpt: lambda = dampening * mean(diag H)
        probes: int = 8  # taylor: random output directions per calibration batch

        def __post_init__(self) -> None:
            object.__setattr__(self, "pattern", str(parse_pattern(self.pattern)))
            for key, allowed in (("scope", SCOPES), ("order", ORDERS), ("linears", LINEARS)):
                value = getattr(self, key)
                if value is not None and value not in allowed:
                    raise RecipeError(f"Sparsity option {key} must be one of {allowed} (got {value!r}).")
            if self.block_size < 1 or self.probes < 1:
                raise RecipeError("block_size and probes must be >= 1.")
            if self.dampening <= 0:
                raise RecipeError(f"dampening must be > 0 (got {self.dampening}).")

    def validate(self, recipe) -> None:
        super().validate(recipe)
        opts, score = self.options(recipe), self.score_name(recipe)
        pattern = parse_pattern(opts.pattern)
        target = recipe.target
        if target.ratio is None:
            raise InvalidTargetError("Sparsity zeroes weights without removing parameters: give `ratio`, the "
                                     "fraction of the weights of each pruned linear set to zero (e.g. 0.5).")
        if pattern.structured:
            if abs(target.ratio - pattern.ratio) > 1e-9:
                raise InvalidTargetError(f"Pattern {pattern} zeroes {pattern.ratio:g} of the weights; the target "
                                         f"ratio {target.ratio:g} disagrees. Use ratio {pattern.ratio:g} or drop "
                                         "the pattern.")
            if opts.scope is not None:
                raise RecipeError(f"An N:M pattern fixes the count in every group; scope {opts.scope!r} does not "
                                  "apply. Drop the scope option.")
            if score == "sparsegpt" and opts.block_size % pattern.m:
                raise RecipeError(f"block_size {opts.block_size} must be a multiple of M = {pattern.m}.")
            ratios = recipe.layers.ratios
            if ratios is not None and any(r not in (0.0, pattern.ratio) for r in ratios):
                raise InvalidTargetError(f"With pattern {pattern}, per-layer ratios can only be 0 (protected) or "
                                         f"{pattern.ratio:g}.")
        if opts.scope == "global":
            if score != "magnitude":
                raise RecipeError(f"A global threshold compares raw magnitudes across layers; it applies to score "
                                  f"magnitude only (got {score!r}). Use scope layer or row.")
            if recipe.layers.ratios is not None:
                raise InvalidTargetError("A global threshold sets every layer's ratio itself; drop the per-layer "
                                         "ratios or use scope layer.")
        if score == "sparsegpt" and opts.scope is not None:
            raise RecipeError("sparsegpt chooses its mask block by block (columns of 128); scope does not apply.")

    def canonical(self, recipe):
        if "pattern" not in recipe.options:
            return recipe
        return recipe.replace(options=dict(recipe.options, pattern=str(parse_pattern(recipe.options["pattern"]))))

    # -- helpers -------------------------------------------------------------------------------------------

    def _check_shapes(self, ctx: PruneContext, pattern: Pattern, layers: list[int], which: str) -> None:
        if not pattern.structured:
            return
        shapes = layer_shapes(ctx.model.config)
        for i in layers:
            for _, group in linear_groups(decoder_layers(ctx.model, ctx.spec)[i], ctx.spec, shapes[i], which):
                for path, module in group.items():
                    if module.in_features % pattern.m:
                        raise InvalidTargetError(f"Layer {i} {path} has {module.in_features} inputs, not a multiple "
                                                 f"of M = {pattern.m}; use another pattern or protect that layer.")

    def _global_threshold(self, ctx: PruneContext, layers: list[int], ratio: float, which: str) -> GlobalThreshold:
        """A weight-only pass over the pruned linears, one layer at a time (two passes for float32 weights)."""
        shapes = layer_shapes(ctx.model.config)

        def weights():
            for i in layers:
                for _, group in linear_groups(decoder_layers(ctx.model, ctx.spec)[i], ctx.spec, shapes[i], which):
                    for module in group.values():
                        yield module.weight

        total = sum(w.numel() for w in weights())
        threshold = GlobalThreshold(round(ratio * total))
        for w in weights():
            threshold.count(w)
        if threshold.needs_refine:
            for w in weights():
                threshold.refine(w)
        threshold.finish()
        return threshold

    def _collect(self, ctx, runner, i: int, layer: nn.Module, groups: list[dict[str, nn.Module]], score,
                 opts) -> dict:
        """Calibration statistics of the groups' linears (one pass over block i): {path: LinearTensors fields}.
        Input statistics are collected once per group (its linears share their input), by a forward that stops
        after the last watched linear (groups come in the block's execution order)."""
        modules = {p: m for g in groups for p, m in g.items()}
        first = {p: next(iter(g)) for g in groups for p in g}
        if score.name in ("wanda", "sparsegpt"):
            stats = InputNorms() if score.name == "wanda" else InputGram()
            hooks = {p: (m, stats) for g in groups for p, m in list(g.items())[:1]}
            # the forward ends at the last watched linear: an attention pass runs no MLP
            collect(runner, i, hooks, stop_after=list(hooks.values())[-1][0])
            if score.name == "wanda":
                return {p: {"input_norm": stats.norm(first[p])} for p in modules}
            return {p: {"gram": stats.gram[first[p]]} for p in modules}
        if score.name == "taylor":
            stats = TaylorSquares(modules, opts.probes, ctx.layer_seed(i))
            with stats.watching(layer):
                collect(runner, i, {"block": (layer, stats)})
            return {p: {"taylor_sq": stats.mean(p)} for p in modules}
        return {p: {} for p in modules}

    @torch.no_grad()
    def _reconstruct(self, group: dict[str, nn.Module], gram: torch.Tensor, pattern: Pattern, ratio: float,
                     opts) -> None:
        """SparseGPT (the one reconstruction score) of the linears that share one input: one Hessian factor and
        one pass over the columns for all of them (the same result as one linear at a time)."""
        weights = [m.weight for m in group.values()]
        factor = hessian_factor(gram.to(weights[0].device), opts.dampening)
        for w, new in zip(weights, sparsegpt_shared(weights, factor, pattern, ratio, opts.block_size)):
            w.copy_(new.to(w.dtype))

    @torch.no_grad()
    def _prune_linear(self, module: nn.Module, score, stats: dict, pattern: Pattern, ratio: float, scope: str,
                      opts, threshold: GlobalThreshold | None, seed: int) -> None:
        w = module.weight
        if threshold is not None:
            mask = threshold.mask(w)
        else:
            scores = score.fn(LinearTensors(w.detach().float(), seed=seed, **stats))
            mask = pattern_mask(scores, pattern, ratio, per_row=scope == "row")
        w.mul_(mask.to(w.device, w.dtype))

    # -- run -----------------------------------------------------------------------------------------------

    def run(self, ctx: PruneContext) -> dict:
        model, spec, recipe = ctx.model, ctx.spec, ctx.recipe
        opts = self.options(recipe)
        score = self.score(recipe)
        pattern = parse_pattern(opts.pattern)
        scope = opts.scope or DEFAULT_SCOPE.get(score.name, "layer")
        shapes = layer_shapes(model.config)
        n = len(shapes)
        ratios = recipe.layers.layer_ratios(n, recipe.target.ratio)
        if pattern.structured:
            ratios = [pattern.ratio if r else 0.0 for r in ratios]
        pruned = [i for i, r in enumerate(ratios) if r > 0]
        self._check_shapes(ctx, pattern, pruned, opts.linears)
        threshold = None
        if scope == "global" and not pattern.structured:
            threshold = self._global_threshold(ctx, pruned, recipe.target.ratio, opts.linears)
        runner = ctx.runner() if score.needs_data else None
        per_layer = []
        for i in range(n):
            if ratios[i] == 0:
                if runner is not None:
                    runner.advance(i)
                ctx.progress.update("sparsity", i + 1, n)
                continue
            entry: dict = {"layer": i, "ratio": ratios[i], "linears": {}}
            layer = decoder_layers(model, spec)[i]
            groups = linear_groups(layer, spec, shapes[i], opts.linears)
            for pass_groups in calibration_passes(groups, opts.order):
                modules = {p: m for g in pass_groups for p, m in g.items()}
                stats = self._collect(ctx, runner, i, layer, pass_groups, score, opts) if runner else \
                    {p: {} for p in modules}
                if score.kind == "reconstruction":
                    for group in pass_groups:
                        self._reconstruct(group, stats[next(iter(group))]["gram"], pattern, ratios[i], opts)
                else:
                    for k, (path, module) in enumerate(modules.items()):
                        self._prune_linear(module, score, stats[path], pattern, ratios[i], scope, opts, threshold,
                                           ctx.layer_seed(i) * 31 + k)
                for path, module in modules.items():
                    entry["linears"][path] = round(zero_fraction(module.weight), 6)
            if runner is not None:
                runner.advance(i)
            per_layer.append(entry)
            ctx.progress.update("sparsity", i + 1, n)
        return {"score": score.name, "pattern": str(pattern), "scope": None if pattern.structured else scope,
                "order": opts.order, "linears": opts.linears, "layers": per_layer}
