"""Decoder-layer plumbing shared by pruning and reloading: find layers, build a layer from its own config,
and stand-ins for removed (skipped) attention / MLP sub-layers.

Reloading a per-layer checkpoint and pruning in memory both go through `build_layer`, so a pruned model and its
reloaded copy are built by the same code.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Iterator

import torch
from torch import nn

from .architectures import ArchSpec

SKIP_ATTENTION = "attention"
SKIP_MLP = "mlp"
# per-layer config key naming the skipped branches that keep a constant (bias) in place of their output
SKIP_BIAS_KEY = "skip_bias"
# per-layer config key: rank of the learned low-rank map those branches add to the constant (0: none)
SKIP_RANK_KEY = "skip_rank"


class StandIn(nn.Module):
    """Output of a removed branch: zeros, or a constant `bias`, plus optionally a learned low-rank map of the
    branch's input, adapter_out(adapter_in(x)) (depth pruning's learned recovery)."""

    def __init__(self, hidden_size: int, with_bias: bool = False, rank: int = 0) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if with_bias else None
        if rank:
            self.adapter_in = nn.Linear(hidden_size, rank, bias=False)
            self.adapter_out = nn.Linear(rank, hidden_size, bias=False)

    def output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        if hasattr(self, "adapter_in"):
            out = out + self.adapter_out(self.adapter_in(hidden_states))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent_path), name, module)


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The decoder-layer list. Indexing it (`layers[i]`) gives block i with its weights: a streamed model loads
    them then (see core.streaming); iterating it or `layer_at` never loads anything."""
    return get_submodule(model, spec.layers)


def layer_at(layers: nn.ModuleList, i: int) -> nn.Module:
    """The module at position i as it stands, without loading a streamed block's weights (they may be on the meta
    device): for shapes, counting and swapping sub-modules."""
    return list(layers)[i]


def decoder_layer_class(model_class: type) -> type:
    """The decoder-layer class of a transformers model class (named first in its `_no_split_modules`)."""
    name = model_class._no_split_modules[0]
    return getattr(sys.modules[model_class.__module__], name)


class SkippedAttention(StandIn):
    """Stands in for a removed attention sub-layer: outputs zeros, or a learned/computed constant `bias`.

    It still records zero-width keys/values in the KV cache so that sequence-length bookkeeping (positions,
    masks) keeps working when layer 0's attention is the one removed; the cache costs no memory.
    """

    def __init__(self, hidden_size: int, layer_idx: int, with_bias: bool = False, rank: int = 0) -> None:
        super().__init__(hidden_size, with_bias, rank)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], 0)
            past_key_values.update(empty, empty, self.layer_idx)
        return self.output(hidden_states), None


class SkippedMlp(StandIn):
    """Stands in for a removed MLP sub-layer: outputs zeros, or a constant `bias`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(hidden_states)


def apply_skips(layer: nn.Module, spec: ArchSpec, layer_config, layer_idx: int) -> None:
    """Replace the branches named in `layer_config.skip` by their stand-ins (and their output norms by identity,
    so a stored constant joins the residual stream unchanged)."""
    skip = set(getattr(layer_config, "skip", None) or ())
    with_bias = set(getattr(layer_config, SKIP_BIAS_KEY, None) or ())
    rank = int(getattr(layer_config, SKIP_RANK_KEY, 0) or 0)
    hidden = layer_config.hidden_size
    if SKIP_ATTENTION in skip:
        with_attention_bias = SKIP_ATTENTION in with_bias
        set_submodule(layer, spec.attention.module,
                      SkippedAttention(hidden, layer_idx, with_attention_bias, rank if with_attention_bias else 0))
        if "attention_out" in spec.norms:
            set_submodule(layer, spec.norms["attention_out"], nn.Identity())
    if SKIP_MLP in skip:
        set_submodule(layer, spec.mlp.module, SkippedMlp(hidden, SKIP_MLP in with_bias,
                                                         rank if SKIP_MLP in with_bias else 0))
        if "mlp_out" in spec.norms:
            set_submodule(layer, spec.norms["mlp_out"], nn.Identity())


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def per_layer_construction(layer_class: type, spec: ArchSpec) -> Iterator[None]:
    """While active, `layer_class(config, i)` builds layer i from `config.per_layer_config[i]` and applies its skips.

    transformers reads `per_layer_config` in configs but the Llama-family modeling code does not consume it yet;
    this is the one place where we make it do so, so that `from_pretrained` machinery (sharding, device maps,
    dtypes, Hub downloads) works unchanged for per-layer checkpoints.
    """
    original_init = layer_class.__init__

    def init(self, config, layer_idx, *args, **kwargs):
        layer_config = config.per_layer_config[layer_idx] if config.is_heterogeneous else config
        original_init(self, layer_config, layer_idx, *args, **kwargs)
        apply_skips(self, spec, layer_config, layer_idx)

    with _PATCH_LOCK:
        layer_class.__init__ = init
        try:
            yield
        finally:
            layer_class.__init__ = original_init


def build_layer(layer_class: type, spec: ArchSpec, layer_config, layer_idx: int,
                state: dict[str, torch.Tensor], zero_missing_biases: bool = False) -> nn.Module:
    """Build one decoder layer from its own config and fill it with `state` (tensors are used, not copied).

    With `zero_missing_biases`, biases the config asks for but `state` lacks start at zero (a bias flag was
    switched on)."""
    with torch.device("meta"):
        layer = layer_class(layer_config, layer_idx)
    apply_skips(layer, spec, layer_config, layer_idx)
    if zero_missing_biases:
        state = dict(state)
        for key, tensor in layer.state_dict().items():
            weight = state.get(key[: -len("bias")] + "weight") if key.endswith(".bias") else None
            if key not in state and weight is not None:
                state[key] = torch.zeros(tensor.shape, dtype=weight.dtype, device=weight.device)
    layer.load_state_dict(state, strict=True, assign=True)
    if not any(t.is_meta for t in state.values()):  # a streamed model's unloaded blocks are rebuilt on meta
        leftover = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
        assert not leftover, f"tensors left uninitialised after rebuilding layer {layer_idx}: {leftover}"
    return layer


def set_layer_index(layer: nn.Module, layer_idx: int) -> None:
    """Renumber a decoder layer (and its attention's KV-cache slot) after blocks before it were removed."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = layer_idx


class PassThrough(nn.Module):
    """A decoder block that does nothing (for evaluating a network with the block temporarily removed)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def units_disabled(model: nn.Module, spec: ArchSpec, unit: str, indices) -> Iterator[None]:
    """Temporarily remove blocks ('block') or sub-layers ('attention' / 'mlp') without touching their weights."""
    layers = decoder_layers(model, spec)
    hidden = model.config.hidden_size
    restore: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for i in sorted(set(indices)):
            if unit == "block":
                restore.append((layers, str(i), layer_at(layers, i)))
                layers[i] = PassThrough()
                continue
            layer = layer_at(layers, i)
            module = spec.attention.module if unit == SKIP_ATTENTION else spec.mlp.module
            stub = SkippedAttention(hidden, i) if unit == SKIP_ATTENTION else SkippedMlp(hidden)
            swaps = [(module, stub)]
            if f"{unit}_out" in spec.norms:
                swaps.append((spec.norms[f"{unit}_out"], nn.Identity()))
            for path, new in swaps:
                restore.append((layer, path, get_submodule(layer, path)))
                set_submodule(layer, path, new)
        yield
    finally:
        for parent, path, old in reversed(restore):
            if isinstance(parent, nn.ModuleList):
                parent[int(path)] = old
            else:
                set_submodule(parent, path, old)
