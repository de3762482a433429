"""Width pruning of gated MLPs with any registered MLP score."""
from __future__ import annotations

from ..allocation import keep_count, ratio_for_budget, round_to_multiple
from ..errors import InvalidTargetError
from ..feasibility import check_rounding
from ..layer_config import layer_shapes
from ..layers import SKIP_MLP, decoder_layers
from ..params import count_parameters, unit_costs
from ..replay import MlpReplay
from ..scores import MLP_SCORES
from ..scores.mlp import MlpTensors
from ..stats import InputNorms, collect, linear
from ..surgery import LayerPlan, prune_layer
from . import Method, PruneContext, register_method, top_k


def mlp_tensors(layer, spec, shape, input_norm=None, act_norm=None, seed=0) -> MlpTensors:
    m = shape.intermediate_size
    if spec.mlp.fused:
        w = linear(layer, spec, "mlp", "gate_up").weight.detach()
        gate, up = w[:m], w[m:]
    else:
        gate = linear(layer, spec, "mlp", "gate").weight.detach()
        up = linear(layer, spec, "mlp", "up").weight.detach()
    down = linear(layer, spec, "mlp", "down").weight.detach()
    return MlpTensors(gate, up, down, input_norm, act_norm, seed)  # float32 copies made as scores read them


@register_method
class MlpWidth(Method):
    """Removes MLP neurons (rows of gate/up and columns of down) of gated MLPs"""

    name = "mlp_width"
    scores = MLP_SCORES
    default_score = "maw"

    def keep_widths(self, ctx: PruneContext) -> list[int]:
        """Kept MLP width per layer from the recipe's target, layer selection and rounding."""
        recipe, model = ctx.recipe, ctx.model
        shapes = layer_shapes(model.config)
        n = len(shapes)
        sel, target, multiple = recipe.layers, recipe.target, recipe.round_to
        widths = [0 if SKIP_MLP in s.skip else s.intermediate_size for s in shapes]
        if target.width is not None or target.expansion_rate is not None:
            wanted = target.width or target.expansion_rate * model.config.hidden_size
            kept = max(multiple, round_to_multiple(wanted, multiple))
            out = list(widths)
            for i in sel.prunable(n):
                if widths[i] and kept > widths[i]:
                    raise InvalidTargetError(f"Target width {kept} is larger than layer {i}'s MLP ({widths[i]}).")
                out[i] = kept if widths[i] else 0
            asked = [1 - k / w if w else 0.0 for w, k in zip(widths, out)]
            check_rounding(target, asked, widths, out, "MLP neurons", step=multiple)
            return out
        ratio = target.ratio
        to_remove = target.params_to_remove(count_parameters(model, ctx.spec)["total"])
        if to_remove is not None:
            removable = sum(widths[i] * unit_costs(model, ctx.spec, i).mlp_neuron for i in sel.prunable(n))
            ratio = ratio_for_budget(to_remove, removable, "MLPs")
        ratios = sel.layer_ratios(n, ratio)
        kept = [keep_count(w, r, multiple, "MLP neurons", i) if w else 0 for i, (w, r) in enumerate(zip(widths, ratios))]
        finer = "A smaller rounding multiple (round_to) gives finer steps." if multiple > 1 else ""
        check_rounding(target, ratios, widths, kept, "MLP neurons", finer, step=multiple)
        return kept

    def run(self, ctx: PruneContext) -> dict:
        model, spec = ctx.model, ctx.spec
        score = self.score(ctx.recipe)
        widths = self.keep_widths(ctx)
        shapes = layer_shapes(model.config)
        runner = ctx.runner() if score.needs_data else None
        n = len(shapes)
        for i, (shape, kept) in enumerate(zip(shapes, widths)):
            layer = decoder_layers(model, spec)[i]
            if kept == shape.intermediate_size or SKIP_MLP in shape.skip:
                if runner is not None:
                    runner.advance(i)
                ctx.progress.update("mlp_width", i + 1, n)
                continue
            input_norm = act_norm = replay = None
            if runner is not None:
                norms = InputNorms()
                in_role = "gate_up" if spec.mlp.fused else "gate"
                hooks = {"in": (linear(layer, spec, "mlp", in_role), norms),
                         "down": (linear(layer, spec, "mlp", "down"), norms)}
                replay = MlpReplay.start(runner, layer, spec, shape.intermediate_size)
                if replay is not None:
                    hooks.update(replay.hooks(layer))
                collect(runner, i, hooks)
                input_norm, act_norm = norms.norm("in"), norms.norm("down")
            tensors = mlp_tensors(layer, spec, shape, input_norm, act_norm, ctx.layer_seed(i))
            if score.stats is not None:
                tensors.extra = score.stats(ctx, i, runner)
            scores = score.fn(tensors)
            del tensors  # no weights held past the block
            channels = top_k(scores, kept)
            prune_layer(model, spec, i, LayerPlan(mlp=channels))
            if runner is not None:
                runner.advance(i, replay.outputs(runner, i, channels) if replay is not None else None)
            ctx.progress.update("mlp_width", i + 1, n)
        return {"score": score.name}
