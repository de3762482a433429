"""Statistics that need gradients of the calibration LM loss (first-order Taylor importance, the tutorial's layer
score). Collected with a backward pass through the whole model (the loss depends on every later block, so the
gradient of one block is not block-local): peak memory is the weights, one batch's activations of the whole model
and the gradients of the decoder's weight matrices. Where that does not fit, use an activation score instead.

The collectors hand plain tensors to the pure score functions in `taylor.py` and `tutorial.py`."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..layer_config import head_dim, layer_shapes
from ..layers import decoder_layers, units_disabled
from ..stats import linear


@contextlib.contextmanager
def _grads_on(params: list[nn.Parameter], model: nn.Module) -> Iterator[None]:
    """Only `params` require gradients while active (frozen embeddings, norms and head save memory)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def calibration_backward(model: nn.Module, ids: torch.Tensor, batch_size: int, params: list[nn.Parameter]) -> None:
    """Accumulate d(mean next-token NLL over all calibration tokens)/d(params) into `.grad`."""
    device = model.get_input_embeddings().weight.device
    total = ids.shape[0] * (ids.shape[1] - 1)
    with _grads_on(params, model):
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)
            logits = model(batch, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            (nll / total).backward()


def _matrices(layer: nn.Module, spec) -> dict[str, nn.Module]:
    a, m = spec.attention, spec.mlp
    roles = [("attention", r) for r in (("qkv", "o") if a.fused else ("q", "k", "v", "o"))]
    roles += [("mlp", r) for r in (("gate_up", "down") if m.fused else ("gate", "up", "down"))]
    out = {}
    for branch, role in roles:
        try:
            out[role] = linear(layer, spec, branch, role)
        except AttributeError:  # a removed branch (stand-in) has no projections
            continue
    return out


def weight_gradients(ctx) -> dict[int, dict[str, torch.Tensor]]:
    """Gradients of every decoder projection, by layer and role, computed once per pruning run (cached in the
    context) on the model as it is at the first call, i.e. before the method changed anything."""
    if "weight_gradients" in ctx.cache:
        return ctx.cache["weight_gradients"]
    layers = decoder_layers(ctx.model, ctx.spec)
    modules = {i: _matrices(layer, ctx.spec) for i, layer in enumerate(layers)}
    params = [m.weight for mods in modules.values() for m in mods.values()]
    calibration_backward(ctx.model, ctx.calibration_ids(), ctx.recipe.batch_size, params)
    grads: dict[int, dict[str, torch.Tensor]] = {}
    for i, mods in modules.items():
        grads[i] = {}
        for role, module in mods.items():
            grads[i][role] = module.weight.grad.float()
            module.weight.grad = None
    ctx.cache["weight_gradients"] = grads
    return grads


def mlp_gradients(ctx, layer_idx: int, runner=None) -> dict[str, torch.Tensor]:
    """{'grad_gate': [m, d], 'grad_up': [m, d], 'grad_down': [d, m]} of layer `layer_idx` (released after use)."""
    g = weight_gradients(ctx).pop(layer_idx)
    if "gate_up" in g:
        gate, up = g["gate_up"].chunk(2, dim=0)
    else:
        gate, up = g["gate"], g["up"]
    return {"grad_gate": gate, "grad_up": up, "grad_down": g["down"]}


def attention_gradients(ctx, layer_idx: int, runner=None) -> dict[str, torch.Tensor]:
    """{'grad_q', 'grad_k', 'grad_v', 'grad_o'} of layer `layer_idx`, fused qkv split (released after use)."""
    g = weight_gradients(ctx).pop(layer_idx)
    if "qkv" in g:
        shape = layer_shapes(ctx.model.config)[layer_idx]
        dh = head_dim(ctx.model.config)
        q, k, v = g["qkv"].split([shape.num_attention_heads * dh, shape.num_key_value_heads * dh,
                                  shape.num_key_value_heads * dh])
    else:
        q, k, v = g["q"], g["k"], g["v"]
    return {"grad_q": q, "grad_k": k, "grad_v": v, "grad_o": g["o"]}


def _unit_module(layer: nn.Module, spec, unit: str) -> nn.Module:
    if unit == "block":
        return layer
    return layer.get_submodule(spec.attention.module if unit == "attention" else spec.mlp.module)


def depth_gradients(ctx, opts, candidates: list[int], disabled: list[int]) -> dict[int, dict]:
    """Per candidate unit: its weights and their gradients ('weights', 'grads': lists of tensors), and per token
    the norm of its update and of the loss gradient at its output ('update_norm', 'grad_norm': [N]), with the
    `disabled` units removed."""
    model, spec = ctx.model, ctx.spec
    stats: dict[int, dict] = {i: {"update_norm": [], "grad_norm": []} for i in candidates}
    with units_disabled(model, spec, opts.unit, disabled):
        layers = decoder_layers(model, spec)
        units = {i: _unit_module(layers[i], spec, opts.unit) for i in candidates}
        params = {i: [p for p in m.parameters() if p.dim() >= 1] for i, m in units.items()}
        handles = []
        for i in candidates:
            target = layers[i] if opts.unit == "block" else layers[i].get_submodule(spec.branch_module(opts.unit))
            handles.append(target.register_forward_hook(_recorder(stats[i], block=opts.unit == "block"),
                                                        with_kwargs=True))
        try:
            calibration_backward(model, ctx.calibration_ids(), ctx.recipe.batch_size,
                                 [p for ps in params.values() for p in ps])
        finally:
            for h in handles:
                h.remove()
        for i in candidates:
            stats[i]["weights"] = [p.detach().float() for p in params[i]]
            stats[i]["grads"] = [p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                                 for p in params[i]]
            for p in params[i]:
                p.grad = None
            stats[i]["update_norm"] = torch.cat(stats[i]["update_norm"])
            stats[i]["grad_norm"] = torch.cat(stats[i]["grad_norm"])
    return stats


def _recorder(store: dict, block: bool):
    """Forward hook: the unit's update per token (block: output - input; branch: its output) and, through a
    tensor hook, the norm of the loss gradient at that output."""
    def hook(module, args, kwargs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if block:
            inp = args[0] if args else kwargs["hidden_states"]
            update = out - inp
        else:
            update = out
        store["update_norm"].append(update.detach().float().norm(dim=-1).flatten().cpu())
        # the unit's own weights require gradients, so its output always does
        out.register_hook(lambda g: store["grad_norm"].append(g.detach().float().norm(dim=-1).flatten().cpu()))

    return hook
