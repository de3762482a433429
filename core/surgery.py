"""Surgery: the one place that removes heads, MLP neurons, sub-layers and blocks.

Given the kept indices of every layer, it slices weights and biases, rebuilds each changed decoder layer from
its own config (the same code path `load_pruned` uses), removes blocks and rewrites the config (uniform sizes
when every layer agrees, `per_layer_config` otherwise).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import ArchSpec
from .errors import InvalidTargetError
from .layer_config import LayerShape, head_dim, layer_config, layer_shapes, write_layer_shapes
from .layers import (SKIP_ATTENTION, SKIP_MLP, build_layer, decoder_layer_class, decoder_layers, layer_at,
                     set_layer_index)

logger = logging.getLogger(__name__)


@dataclass
class LayerPlan:
    """What to keep in one decoder layer. `None` keeps everything of that kind.

    heads: kept query-head indices; kv_heads: kept KV-head indices (each kept KV head must keep the same number
    of its query heads); mlp: kept MLP neurons; skip: branches to remove entirely ('attention', 'mlp').
    """

    heads: list[int] | None = None
    kv_heads: list[int] | None = None
    mlp: list[int] | None = None
    skip: set[str] = field(default_factory=set)
    skip_bias: dict[str, torch.Tensor] = field(default_factory=dict)  # constant output of a removed branch
    # learned low-rank map (A [r, d], B [d, r]) a removed branch adds to its constant: B A x (needs skip_bias)
    skip_adapter: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _rows(units: list[int], size: int) -> torch.Tensor:
    """Row indices of whole units (heads) of `size` rows each."""
    idx = torch.as_tensor(sorted(units), dtype=torch.long)
    return (idx[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def _take(t: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    return t.index_select(dim, idx.to(t.device)).contiguous()


def _check_heads(plan: LayerPlan, shape: LayerShape, layer_idx: int) -> tuple[list[int], list[int]]:
    heads = sorted(plan.heads if plan.heads is not None else range(shape.num_attention_heads))
    kv = sorted(plan.kv_heads if plan.kv_heads is not None else range(shape.num_key_value_heads))
    rep = shape.num_attention_heads // shape.num_key_value_heads
    if not heads or not kv:
        raise InvalidTargetError(f"Layer {layer_idx}: pruning would remove every attention head; lower the "
                                 "ratio, or remove the attention sub-layer with depth pruning instead.")
    per_group = {g: 0 for g in kv}
    for h in heads:
        g = h // rep
        if g not in per_group:
            raise InvalidTargetError(f"Layer {layer_idx}: query head {h} kept but its KV head {g} removed.")
        per_group[g] += 1
    if len(set(per_group.values())) != 1:
        raise InvalidTargetError(f"Layer {layer_idx}: every kept KV head needs the same number of query heads "
                                 f"(got {per_group}); GQA layers cannot hold uneven groups.")
    return heads, kv


def _slice_attention(state: dict, spec: ArchSpec, shape: LayerShape, dh: int, heads: list[int],
                     kv: list[int]) -> None:
    a = spec.attention
    prefix = a.module + "."
    q_rows, kv_rows = _rows(heads, dh), _rows(kv, dh)
    if a.fused:
        n_q, n_kv = shape.num_attention_heads * dh, shape.num_key_value_heads * dh
        for kind in ("weight", "bias"):
            key = f"{prefix}{a.qkv}.{kind}"
            if key in state:
                q, k, v = state[key].split([n_q, n_kv, n_kv], dim=0)
                state[key] = torch.cat([_take(q, 0, q_rows), _take(k, 0, kv_rows), _take(v, 0, kv_rows)])
    else:
        for name, rows in ((a.q, q_rows), (a.k, kv_rows), (a.v, kv_rows)):
            for kind in ("weight", "bias"):
                key = f"{prefix}{name}.{kind}"
                if key in state:
                    state[key] = _take(state[key], 0, rows)
    key = f"{prefix}{a.o}.weight"
    state[key] = _take(state[key], 1, q_rows)


def _slice_mlp(state: dict, spec: ArchSpec, shape: LayerShape, keep: list[int]) -> None:
    m = spec.mlp
    prefix = m.module + "."
    idx = torch.as_tensor(sorted(keep), dtype=torch.long)
    if m.fused:
        rows = torch.cat([idx, idx + shape.intermediate_size])
        for kind in ("weight", "bias"):
            key = f"{prefix}{m.gate_up}.{kind}"
            if key in state:
                state[key] = _take(state[key], 0, rows)
    else:
        for name in (m.gate, m.up):
            for kind in ("weight", "bias"):
                key = f"{prefix}{name}.{kind}"
                if key in state:
                    state[key] = _take(state[key], 0, idx)
    key = f"{prefix}{m.down}.weight"
    state[key] = _take(state[key], 1, idx)


def _drop_branch(state: dict, spec: ArchSpec, branch: str) -> None:
    module = spec.attention.module if branch == SKIP_ATTENTION else spec.mlp.module
    prefixes = [module + "."]
    if f"{branch}_out" in spec.norms:
        prefixes.append(spec.norms[f"{branch}_out"] + ".")
    for key in [k for k in state if k.startswith(tuple(prefixes))]:
        del state[key]


def _replace_layer(layers: nn.ModuleList, i: int, new: nn.Module) -> None:
    old = layer_at(layers, i)
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:  # keep accelerate's device placement for dispatched models
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    new.train(old.training)
    layers[i] = new


def prune_layer(model: nn.Module, spec: ArchSpec, layer_idx: int, plan: LayerPlan) -> LayerShape:
    """Apply `plan` to one decoder layer in place and update the config. Returns the layer's new shape."""
    config = model.config
    shapes = layer_shapes(config)
    shape = shapes[layer_idx]
    layers = decoder_layers(model, spec)
    state = dict(layers[layer_idx].state_dict())
    dh = head_dim(config)
    new_skip = set(plan.skip) - set(shape.skip)
    skipped = set(shape.skip) | new_skip

    if SKIP_ATTENTION not in skipped and (plan.heads is not None or plan.kv_heads is not None):
        heads, kv = _check_heads(plan, shape, layer_idx)
        _slice_attention(state, spec, shape, dh, heads, kv)
        shape.num_attention_heads, shape.num_key_value_heads = len(heads), len(kv)
    if SKIP_MLP not in skipped and plan.mlp is not None:
        if not plan.mlp:
            raise InvalidTargetError(f"Layer {layer_idx}: pruning would remove every MLP neuron; lower the ratio, "
                                     "or remove the MLP sub-layer with depth pruning instead.")
        _slice_mlp(state, spec, shape, plan.mlp)
        shape.intermediate_size = len(plan.mlp)
    for branch in sorted(new_skip):
        _drop_branch(state, spec, branch)
        shape.skip = sorted(set(shape.skip) | {branch})
        if branch in plan.skip_bias:
            module = spec.attention.module if branch == SKIP_ATTENTION else spec.mlp.module
            state[f"{module}.bias"] = plan.skip_bias[branch].detach().clone()
            shape.skip_bias = sorted(set(shape.skip_bias) | {branch})
        if branch in plan.skip_adapter:
            a, b = plan.skip_adapter[branch]
            state[f"{module}.adapter_in.weight"], state[f"{module}.adapter_out.weight"] = a.detach(), b.detach()
            shape.skip_rank = a.shape[0]
    if skipped >= {SKIP_ATTENTION, SKIP_MLP}:
        logger.debug("layer %d has both sub-layers removed (an empty block)", layer_idx)

    layer_class = decoder_layer_class(type(model))
    new = build_layer(layer_class, spec, layer_config(config, shape), layer_idx, state)
    _replace_layer(layers, layer_idx, new)
    shapes[layer_idx] = shape
    write_layer_shapes(config, shapes)
    return shape


def remove_layers(model: nn.Module, spec: ArchSpec, remove: list[int]) -> None:
    """Delete whole decoder blocks, renumber the rest and keep per-layer config lists in step."""
    config = model.config
    n = config.num_hidden_layers
    remove_set = set(remove)
    if not remove_set:
        return
    if not remove_set <= set(range(n)):
        raise InvalidTargetError(f"Layer indices {sorted(remove_set - set(range(n)))} do not exist "
                                 f"(the model has {n} layers, numbered 0..{n - 1}).")
    if len(remove_set) >= n:
        raise InvalidTargetError("Removing every decoder block leaves no model; remove fewer blocks.")
    keep = [i for i in range(n) if i not in remove_set]
    shapes = layer_shapes(config)
    layers = decoder_layers(model, spec)
    for i in sorted(remove_set, reverse=True):  # in place: a streamed layer list keeps track of its blocks
        del layers[i]
    for new_idx, layer in enumerate(layers):
        set_layer_index(layer, new_idx)

    config.per_layer_config = None
    for list_name in spec.per_layer_lists:
        values = getattr(config, list_name, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, list_name, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)
    write_layer_shapes(config, [shapes[i] for i in keep])


def enable_bias(model: nn.Module, spec: ArchSpec, branch: str) -> bool:
    """Give the projections of `branch` ('attention' or 'mlp') biases by switching the family's config flag
    (zeros for every new bias). Returns False when the family has no such flag (it cannot hold a bias)."""
    flag = spec.bias_flags.get(branch)
    config = model.config
    if flag is None:
        return False
    if getattr(config, flag, False):
        return True
    setattr(config, flag, True)
    layers = decoder_layers(model, spec)
    layer_class = decoder_layer_class(type(model))
    for i, (layer, shape) in enumerate(zip(layers, layer_shapes(config))):  # iterating loads no streamed block
        new = build_layer(layer_class, spec, layer_config(config, shape), i, dict(layer.state_dict()),
                          zero_missing_biases=True)
        _replace_layer(layers, i, new)
    return True
