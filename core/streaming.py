"""Models larger than memory: the decoder blocks stay on disk and come into memory one at a time.

`open_streamed(folder)` builds the model's module tree without weights (accelerate's empty-weights context; buffers
such as rotary frequencies are real), loads the small non-block tensors (final norm), and replaces the decoder-layer
list by a `StreamedLayers` list backed by a `BlockStore` (core.blocks). Indexing that list (`layers[i]`, which every
method and the layer pipeline do) loads block i onto the compute device in the compute dtype, after releasing (and,
if it changed, writing) the block loaded before; iterating it, `layer_at`, counting and surgery on shapes never load
anything. Slicing it (what a transformers decoder does in its forward) loads the blocks one by one as the forward
reaches them, so `model(ids)` works, one block at a time.

The input embedding never comes into memory whole: a forward reads only the rows of the token ids it embeds. The
output head is loaded on first use (whole-model forwards: evaluation, sub-network utilities) and dropped by
`drop_head`. `whole(model)` loads everything for measurements that need the model on one device (speed).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import weakref
from pathlib import Path

import torch
from torch import nn

from .architectures import spec_for_config
from .blocks import BlockStore, _tensors, _to_meta
from .errors import ModelLoadError
from .layers import decoder_layers, get_submodule, set_submodule
from .weights import Checkpoint

logger = logging.getLogger(__name__)


def is_streamed(model: nn.Module) -> bool:
    return getattr(model, "core_stream", None) is not None


class StreamedLayers(nn.ModuleList):
    """A decoder-layer list whose blocks live on disk; `store` loads and releases them (see the module doc)."""

    def __init__(self, modules, store: "BlockStore") -> None:
        super().__init__(modules)
        self.store = store

    def _index(self, idx: int) -> int:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range")
        return idx % n

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return _LazySlice(self, range(len(self))[idx])
        i = self._index(idx)
        return self.store.load(i, super().__getitem__(i))

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        i = self._index(idx)
        self.store.replacing(i, super().__getitem__(i), module)
        super().__setitem__(i, module)

    def __delitem__(self, idx) -> None:
        if isinstance(idx, slice):
            raise TypeError("delete streamed blocks one index at a time")
        i = self._index(idx)
        self.store.deleting(i)
        super().__delitem__(i)

    def insert(self, index: int, module: nn.Module) -> None:
        raise TypeError("blocks cannot be inserted into a streamed model")


class _LazySlice:
    """What `layers[a:b]` returns: iterating it loads each block when the forward reaches it."""

    def __init__(self, layers: StreamedLayers, indices: range) -> None:
        self.layers, self.indices = layers, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        for i in self.indices:
            yield self.layers[i]

    def __getitem__(self, k: int):
        return self.layers[self.indices[k]]


def _install_embedding_hooks(model: nn.Module, store: BlockStore) -> None:
    """The embedding reads the rows of the ids it embeds, per forward; the head loads on first use."""
    embed = model.get_input_embeddings()
    name = _module_name(model, embed) + ".weight"
    state = {}

    def before(module, args):
        if not module.weight.is_meta:
            return None
        ids = args[0]
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        weight = store.source.read_rows(name, rows.cpu(), store.dtype, store.device)
        state["saved"] = (module.weight, module.padding_idx)
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.padding_idx = None  # the padding row only matters for gradients
        return (inverse.view_as(ids),) + tuple(args[1:])

    def after(module, args, output):
        if "saved" in state:
            module.weight, module.padding_idx = state.pop("saved")

    embed.register_forward_pre_hook(before)
    embed.register_forward_hook(after)
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: load_head(model))


def load_head(model: nn.Module) -> None:
    """Load a streamed model's output head (tied or not) onto the compute device; it stays until `drop_head`."""
    store = model.core_stream
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or not head.weight.is_meta:
        return
    tied = head.weight is embed.weight
    name = _module_name(model, head) + ".weight"
    if tied or name not in store.source:  # tied heads are stored under the embedding's name
        name = _module_name(model, embed) + ".weight"
    store.head_saved = (head.weight, embed.weight)
    weight = nn.Parameter(store.source.read([name], store.dtype, store.device)[name], requires_grad=False)
    head.weight = weight
    if tied:
        embed.weight = weight


def drop_head(model: nn.Module) -> None:
    """Give the head's memory back (a streamed model keeps it after a whole-model forward until then)."""
    store = model.core_stream
    if store.head_saved is not None:
        model.get_output_embeddings().weight, model.get_input_embeddings().weight = store.head_saved
        store.head_saved = None


@contextlib.contextmanager
def whole(model: nn.Module):
    """A streamed model with every weight in memory on its compute device while the block runs (read-only: for
    measurements such as speed that need the model on one device); streamed again afterwards."""
    store = model.core_stream
    store.release()
    embed = model.get_input_embeddings()
    saved = embed.weight
    layers = decoder_layers(model, store.spec)
    store.pinned = True
    try:
        load_head(model)
        if embed.weight.is_meta:
            name = _module_name(model, embed) + ".weight"
            embed.weight = nn.Parameter(store.source.read([name], store.dtype, store.device)[name],
                                        requires_grad=False)
        for i in range(len(layers)):
            layers[i]  # loads block i and keeps it (pinned)
        yield model
    finally:
        store.pinned = False
        for module in layers:
            _to_meta(module)
        store.active = store.active_module = None
        drop_head(model)
        embed.weight = saved


def reopen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The same streamed model (its current sizes, its written blocks) computing in `dtype`: a new module tree,
    nothing re-read or re-written. The old model must not be used afterwards."""
    store = model.core_stream
    store.release()
    drop_head(model)
    new = open_streamed(store.source.folder, model.config, store.device, dtype, store.source_dtype, check=False)
    new_store = new.core_stream
    new_store.source, new_store.origins = store.source, store.origins
    new_store.work, new_store._count = store.work, store._count
    if store._finalizer is not None and store._finalizer.detach() is not None:
        # a finalizer is bound to its object: the old store, once collected, would delete the work folder
        new_store._finalizer = weakref.finalize(new_store, shutil.rmtree, str(store.work), True)
    new_store.loads, new_store.writes = store.loads, store.writes
    store.work = store._finalizer = None
    new.source_dtype = model.source_dtype
    return new


def open_streamed(folder: str | os.PathLike, config=None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, source_dtype: torch.dtype | None = None,
                  trust_remote_code: bool = False, check: bool = True) -> nn.Module:
    """A model of the checkpoint in `folder` whose decoder blocks stream from disk (see the module doc).

    `dtype` is the compute dtype, `source_dtype` the dtype outputs are written in (default: the checkpoint's)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .model_io import layer_construction, load_config

    folder = Path(folder)
    config = config or load_config(str(folder))
    spec = spec_for_config(config)
    source = Checkpoint(folder)
    with init_empty_weights(), layer_construction(config, spec):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [n for n in _tensors(model) if n not in source and n not in tied] if check else []
    head = model.get_output_embeddings()
    if missing:
        raise ModelLoadError(f"{folder} lacks tensors the model needs, e.g. {missing[0]!r} ({len(missing)} in all): "
                             "its tensor names do not follow the transformers layout. Load it in memory instead "
                             "(--no-stream).")
    store = BlockStore(model, spec, source, device, dtype, source_dtype or source.floating_dtype())
    layers = decoder_layers(model, spec)
    streamed = StreamedLayers(list(layers), store)
    set_submodule(model, spec.layers, streamed)
    skip = {_module_name(model, model.get_input_embeddings())}
    if head is not None:
        skip.add(_module_name(model, head))
    for name, t in _tensors(model).items():  # the small tensors outside the blocks (final norm) stay loaded
        owner, _, attr = name.rpartition(".")
        if name.startswith(spec.layers + ".") or owner in skip:
            continue
        value = source.read([name], dtype, device)[name]
        module = get_submodule(model, owner)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and not b.is_meta:
                module._buffers[name] = b.to(device)
    _install_embedding_hooks(model, store)
    model.core_stream = store
    model.source_dtype = store.source_dtype
    model.eval()
    model.config.use_cache = True
    return model


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is module:
            return name
    raise AssertionError("module not in the model")
