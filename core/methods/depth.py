"""Depth pruning: remove whole blocks, or attention-only / MLP-only sub-layers, ranked by a depth score on
calibration data (one-shot) or given explicitly."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidTargetError, RecipeError
from ..layer_config import layer_shapes
from ..layers import SKIP_ATTENTION, SKIP_MLP, decoder_layers
from ..params import count_parameters
from ..scores import DEPTH_SCORES
from ..stats import BranchOutputs, collect
from ..surgery import LayerPlan, prune_layer, remove_layers
from . import Method, PruneContext, register_method

UNITS = ("block", "attention", "mlp")


def _branch_params(model, spec, layer_idx: int, unit: str) -> int:
    layer = decoder_layers(model, spec)[layer_idx]
    if unit == "block":
        return sum(p.numel() for p in layer.parameters())
    names = [spec.attention.module if unit == "attention" else spec.mlp.module]
    out_norm = spec.norms.get(f"{unit}_out")
    if out_norm:
        names.append(out_norm)
    return sum(p.numel() for name in names for p in layer.get_submodule(name).parameters())


@register_method
class Depth(Method):
    name = "depth"
    scores = DEPTH_SCORES
    default_score = "cosine"

    @dataclass(frozen=True)
    class Options:
        unit: str = "block"  # 'block', 'attention' or 'mlp'
        layers: tuple[int, ...] | None = None  # explicit units to remove (no scoring)

        def __post_init__(self) -> None:
            if self.unit not in UNITS:
                raise RecipeError(f"Depth unit must be one of {UNITS} (got {self.unit!r}).")
            if self.layers is not None:
                object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    def needs_data(self, recipe) -> bool:
        return self.options(recipe).layers is None

    def candidates(self, ctx: PruneContext, unit: str) -> list[int]:
        shapes = layer_shapes(ctx.model.config)
        prunable = ctx.recipe.layers.prunable(len(shapes))
        if unit == "block":
            return prunable
        return [i for i in prunable if unit not in shapes[i].skip]

    @torch.no_grad()
    def unit_scores(self, ctx: PruneContext, unit: str, candidates: list[int]) -> dict[int, float]:
        """Mean per-token score of each candidate unit on the calibration data (unpruned model, one pass)."""
        score = self.score(ctx.recipe)
        model, spec = ctx.model, ctx.spec
        runner = ctx.runner()
        n = model.config.num_hidden_layers
        result = {}
        for i in range(n):
            inputs = runner.hidden
            if i in candidates and unit != "block":
                layer = decoder_layers(model, spec)[i]
                attn = BranchOutputs()
                outputs = collect(runner, i, {"attn": (layer.get_submodule(spec.branch_module("attention")), attn)})
                mids = [x + a.to(x.device) for x, a in zip(inputs, attn.outputs)]
                pairs = zip(inputs, mids) if unit == "attention" else zip(mids, outputs)
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
            ctx.progress.update(f"depth scores ({unit})", i + 1, n)
        return result

    def run(self, ctx: PruneContext) -> dict:
        opts = self.options(ctx.recipe)
        model, spec, recipe = ctx.model, ctx.spec, ctx.recipe
        n = model.config.num_hidden_layers
        candidates = self.candidates(ctx, opts.unit)
        scores: dict[int, float] = {}
        if opts.layers is not None:
            bad = [i for i in opts.layers if i not in range(n)]
            if bad:
                raise InvalidTargetError(f"Layers {bad} do not exist; the model has layers 0..{n - 1}.")
            chosen = sorted(set(opts.layers))
        else:
            scores = self.unit_scores(ctx, opts.unit, candidates)
            ranked = sorted(candidates, key=lambda i: (scores[i], i))
            to_remove = recipe.target.params_to_remove(count_parameters(model, spec)["total"])
            if to_remove is None:
                count = round(recipe.target.ratio * n)
            else:
                count, removed = 0, 0
                while removed < to_remove and count < len(ranked):
                    removed += _branch_params(model, spec, ranked[count], opts.unit)
                    count += 1
                if removed < to_remove:
                    raise InvalidTargetError(f"Removing every candidate {opts.unit} frees only {removed:,} of the "
                                             f"{to_remove:,} parameters the target needs.")
            if count > len(ranked) or (opts.unit == "block" and count >= n):
                raise InvalidTargetError(f"The target removes {count} {opts.unit} units but only {len(ranked)} are "
                                         "candidates (protected or already removed ones excluded). Lower the ratio.")
            chosen = sorted(ranked[:count])
        if opts.unit == "block":
            remove_layers(model, spec, chosen)
        else:
            branch = SKIP_ATTENTION if opts.unit == "attention" else SKIP_MLP
            for i in chosen:
                prune_layer(model, spec, i, LayerPlan(skip={branch}))
        return {"unit": opts.unit, "removed": chosen, "scores": {str(k): v for k, v in sorted(scores.items())}}
