"""Parameter accounting: totals per component, and the cost of one prunable unit (neuron, head, KV head, block)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .architectures import ArchSpec
from .layer_config import head_dim, layer_shapes
from .layers import decoder_layers, layer_at


def _numel(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _unique_numel(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # parameters() already skips tied duplicates
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def count_parameters(model: nn.Module, spec: ArchSpec) -> dict:
    """Parameter counts: total, embeddings, lm_head (0 when tied), and per layer attention / MLP / norms."""
    layers = decoder_layers(model, spec)
    per_layer = []
    for layer in layers:
        attn = _numel(layer.get_submodule(spec.attention.module))
        mlp = _numel(layer.get_submodule(spec.mlp.module))
        per_layer.append({"attention": attn, "mlp": mlp, "other": _numel(layer) - attn - mlp})
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    return {
        "total": _unique_numel(model),
        "embeddings": _numel(emb),
        "lm_head": 0 if tied or head is None else _numel(head),
        "attention": sum(p["attention"] for p in per_layer),
        "mlp": sum(p["mlp"] for p in per_layer),
        "layers": per_layer,
    }


@dataclass(frozen=True)
class UnitCosts:
    """Parameters removed with one unit of a layer."""

    mlp_neuron: int
    query_head: int  # its q rows (+bias) and o columns
    kv_head: int  # its k and v rows (+biases)
    block: int

    def head_unit(self, mode: str, num_heads: int, num_kv_heads: int) -> int:
        """Parameters of one head-pruning unit: a KV group ('kv_group': its KV head and query heads) or, in
        'query' mode, one query head in every group (equal counts per group are removed together)."""
        if mode == "kv_group":
            return num_heads // max(num_kv_heads, 1) * self.query_head + self.kv_head
        return self.query_head * num_kv_heads


def _bias_numel(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return bias.numel() if bias is not None else 0


def unit_costs(model: nn.Module, spec: ArchSpec, layer_idx: int) -> UnitCosts:
    layer = layer_at(decoder_layers(model, spec), layer_idx)  # shapes only: a streamed block stays on disk
    shape = layer_shapes(model.config)[layer_idx]
    d, dh = model.config.hidden_size, head_dim(model.config)
    attn = layer.get_submodule(spec.attention.module)
    mlp = layer.get_submodule(spec.mlp.module)
    mlp_neuron = 0
    if shape.intermediate_size and "mlp" not in shape.skip:
        down = mlp.get_submodule(spec.mlp.down)
        mlp_neuron = (_numel(mlp) - _bias_numel(down)) // shape.intermediate_size
    query_head = kv_head = 0
    if "attention" not in shape.skip:
        a = spec.attention
        if a.fused:
            qkv = attn.get_submodule(a.qkv)
            per_row = d + (1 if qkv.bias is not None else 0)
            query_head, kv_head = dh * per_row + dh * d, 2 * dh * per_row
        else:
            q = attn.get_submodule(a.q)
            query_head = _numel(q) // shape.num_attention_heads + dh * d
            kv_head = (_numel(attn.get_submodule(a.k)) + _numel(attn.get_submodule(a.v))) // shape.num_key_value_heads
    return UnitCosts(mlp_neuron, query_head, kv_head, _numel(layer))
