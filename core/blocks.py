"""Where each decoder block of a streamed model lives, and moving blocks between disk and memory.

A `BlockStore` knows, for every block position, which checkpoint holds the block's current tensors (the source, or
a block file written after a change) and which block is loaded. `load(i, module)` reads block i into the module's
meta tensors (in the compute dtype, on the compute device), after releasing the block loaded before; `release()`
writes the loaded block if it changed and drops its weights. A change is a replaced module (surgery) or a parameter
modified in place (seen from the parameter's identity, version counter and storage; a change made through `.data`
is not seen). Blocks are written in the source dtype; tensors the source dtype cannot hold exactly also get an exact
copy in the compute dtype, which later loads read, so every pass sees what the in-memory path would.
`write_weights` assembles an output folder from the written blocks (linked, renamed in place when blocks before
them were removed) and the untouched tensors (copied from the source).
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .architectures import ArchSpec
from .errors import ModelLoadError
from .staging import remove_stale, staged_name
from .layer_config import layer_config, layer_shapes
from .layers import apply_skips, decoder_layer_class, decoder_layers
from .weights import SINGLE_FILE, Checkpoint, rename_tensors, write_index, write_shard

logger = logging.getLogger(__name__)

BLOCKS_DIR = ".blocks"  # inside the work folder: written blocks, then linked into the output shards
EXACT_DIR = ".exact"  # exact compute-dtype copies of tensors the source dtype cannot hold


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers()))


def _is_loaded_layer(module: nn.Module) -> bool:
    """A module holding real weights (not a skeleton on meta, not a parameter-free stand-in)."""
    params = list(module.parameters())
    return bool(params) and not any(p.is_meta for p in params)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by name (the objects themselves, not state_dict's detached views)."""
    out = dict(module.named_parameters())
    for mod_name, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = buf
    return out


def _representable(value: torch.Tensor, cast: torch.Tensor) -> bool:
    """Whether `cast` (value in a narrower dtype) holds `value` exactly."""
    if value.dtype == torch.float32 and cast.dtype == torch.bfloat16:  # bf16 is fp32 without its low 16 bits
        return not torch.bitwise_and(value.view(torch.int32), 0xFFFF).any().item()
    return torch.equal(cast.to(value.dtype), value)


def _fingerprint(t: torch.Tensor) -> tuple:
    return id(t), t._version, t.data_ptr()


def _to_meta(module: nn.Module) -> None:
    """Drop the weights of a block (parameters and persistent buffers go to the meta device, in place)."""
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for name, b in mod._buffers.items():
            if b is not None and not b.is_meta and name not in mod._non_persistent_buffers_set:
                mod._buffers[name] = b.to("meta")


@dataclass
class BlockOrigin:
    """Where a block's current tensors live: a checkpoint, under the names of layer `index`."""

    reader: Checkpoint
    index: int
    exact: Checkpoint | None = None  # exact copies of some tensors, in the compute dtype
    files: list[Path] = field(default_factory=list)  # work files owned by this origin (deleted when superseded)


class BlockStore:
    """The blocks of one streamed model: where each one's tensors are, which one is loaded, and the writes."""

    def __init__(self, model: nn.Module, spec: ArchSpec, source: Checkpoint, device: torch.device,
                 dtype: torch.dtype, source_dtype: torch.dtype | None) -> None:
        self.model = model
        self.spec = spec
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.source_dtype = source_dtype
        self.prefix = spec.layers
        self.origins = [BlockOrigin(source, i) for i in range(model.config.num_hidden_layers)]
        self.active: int | None = None
        self.active_module: nn.Module | None = None
        self.changed = False  # the active block was replaced since it was loaded
        self._loaded: dict[str, tuple] = {}
        self.work: Path | None = None
        self._finalizer = None
        self._count = itertools.count()
        self.loads = self.writes = 0  # statistics for logs and benchmarks
        self.after_load = None  # optional callback(layer_idx), e.g. a benchmark sampling memory
        self.head_saved = None  # the head's meta tensors while it is loaded (core.streaming)
        self.pinned = False  # inside `whole()`: every block stays loaded

    # -- work folder ----------------------------------------------------------------------------------------

    def use_work_folder(self, folder: Path) -> None:
        """Write blocks into `folder` (created; removed by `close` unless it became the output)."""
        assert self.work is None, "the work folder is chosen before the first write"
        folder.mkdir(parents=True)
        self.work = folder
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(folder), True)

    def _work_file(self, kind: str) -> Path:
        if self.work is None:  # named like a staged output, so a later run removes it if this process is killed
            temp = Path(tempfile.gettempdir())
            remove_stale(temp)
            self.use_work_folder(staged_name(temp / "core-stream"))
        folder = self.work / kind
        folder.mkdir(exist_ok=True)
        return folder / f"block-{next(self._count):06d}.safetensors"

    def close(self) -> None:
        """Forget the written blocks and delete the work folder (nothing of an unsaved run stays on disk)."""
        self.release(write=False)
        if self._finalizer is not None:
            self._finalizer()
        self.work = None

    # -- loading and releasing ------------------------------------------------------------------------------

    def _names(self, index: int, keys) -> dict[str, str]:
        return {k: f"{self.prefix}.{index}.{k}" for k in keys}

    def _read(self, origin: BlockOrigin, module: nn.Module, keys: list[str], dtype, device) -> dict:
        """Tensors `keys` (relative to the block) from `origin`; a bias the block has but the origin lacks (a bias
        flag switched on by surgery) starts at zero."""
        names = self._names(origin.index, keys)
        exact = [k for k in keys if origin.exact is not None and names[k] in origin.exact]
        present = [k for k in keys if k not in exact and names[k] in origin.reader]
        state = {}
        if exact:
            got = origin.exact.read([names[k] for k in exact], dtype, device)
            state.update({k: got[names[k]] for k in exact})
        got = origin.reader.read([names[k] for k in present], dtype, device)
        state.update({k: got[names[k]] for k in present})
        like = module.state_dict()
        for k in set(keys) - set(state):
            weight = f"{self.prefix}.{origin.index}.{k[: -len('bias')]}weight"
            if not k.endswith(".bias") or weight not in origin.reader:
                raise ModelLoadError(f"{origin.reader.folder} has no tensor {names[k]!r}: the checkpoint's names do "
                                     "not match the model's. Load it in memory instead (--no-stream).")
            state[k] = torch.zeros(like[k].shape, dtype=dtype or origin.reader.dtype(weight), device=device)
        return state

    def load(self, i: int, module: nn.Module) -> nn.Module:
        """Block i with its weights on the compute device (the block loaded before is released first)."""
        if not _has_meta(module):
            return module  # already loaded, or a stand-in without weights (pipeline catchers, disabled blocks)
        if self.active is not None and not self.pinned:
            self.release()
        keys = [k for k, t in _tensors(module).items() if t.is_meta]
        state = self._read(self.origins[i], module, keys, self.dtype, self.device)
        module.load_state_dict(state, strict=False, assign=True)
        for mod in module.modules():  # non-persistent buffers (computed at construction) follow the weights
            for name, b in mod._buffers.items():
                if b is not None and not b.is_meta and b.device != self.device:
                    mod._buffers[name] = b.to(self.device)
        assert not _has_meta(module), f"block {i} still has tensors on the meta device after loading"
        self.active, self.active_module, self.changed = i, module, False
        self._loaded = {k: _fingerprint(t) for k, t in _tensors(module).items()}
        self.loads += 1
        if self.after_load is not None:
            self.after_load(i)
        return module

    def _modified(self, module: nn.Module) -> bool:
        if self.changed:
            return True
        now = _tensors(module)
        for name, t in now.items():
            before = self._loaded.get(name)
            if before is None:
                if not t.is_meta:
                    return True  # a tensor added to the block
            elif _fingerprint(t) != before:
                return True
        return False  # tensors missing now were swapped out (units disabled for scoring), not changed

    def release(self, write: bool = True) -> None:
        """Write the loaded block if it changed, then drop its weights."""
        if self.active is None:
            return
        i, module = self.active, self.active_module
        if write and self._modified(module):
            self._write(i, module)
        _to_meta(module)
        self.active = self.active_module = None
        self._loaded = {}

    def replacing(self, i: int, old: nn.Module, new: nn.Module) -> None:
        """Keep track of what is loaded when position i gets `new` (surgery's rebuilt block, or a stand-in)."""
        if old is self.active_module and old is not None:
            if _is_loaded_layer(new):  # surgery rebuilt the loaded block: the new one is the block now
                self.active_module, self.changed = new, True
                _to_meta(old)  # its weights go now, not when the next block comes in
                return
            self.release()  # a stand-in takes the loaded block's place for a while
        elif _is_loaded_layer(new):
            self.release()
            self.active, self.active_module, self.changed = i, new, True
            self._loaded = {}

    def deleting(self, i: int) -> None:
        self.release()
        self._drop_files(self.origins.pop(i))

    def _drop_files(self, origin: BlockOrigin) -> None:
        for f in origin.files:
            f.unlink(missing_ok=True)

    def _expected_keys(self, i: int) -> set[str]:
        shape = layer_shapes(self.model.config)[i]
        cfg = layer_config(self.model.config, shape)
        with torch.device("meta"):
            layer = decoder_layer_class(type(self.model))(cfg, i)
        apply_skips(layer, self.spec, cfg, i)
        return set(layer.state_dict())

    def _write(self, i: int, module: nn.Module) -> None:
        state = module.state_dict()
        expected = self._expected_keys(i)
        assert set(state) == expected, (f"block {i} changed while some of its units were swapped out: it holds "
                                        f"{sorted(set(state) ^ expected)} unlike its config")
        out, exact = {}, {}
        for key, t in self._names(i, state).items():
            value = state[key]
            if self.source_dtype is not None and value.is_floating_point() and value.dtype != self.source_dtype:
                cast = value.to(self.source_dtype)
                if not _representable(value, cast):
                    exact[t] = value
                value = cast
            out[t] = value
        path = self._work_file(BLOCKS_DIR)
        write_shard(path, out)
        files = [path]
        exact_reader = None
        if exact:
            exact_path = self._work_file(EXACT_DIR)
            write_shard(exact_path, exact)
            files.append(exact_path)
            exact_reader = Checkpoint(exact_path.parent, files=[exact_path.name])
        self._drop_files(self.origins[i])
        self.origins[i] = BlockOrigin(Checkpoint(path.parent, files=[path.name]), i, exact_reader, files)
        self.writes += 1

    # -- output ---------------------------------------------------------------------------------------------

    def write_weights(self, folder: Path, max_shard_bytes: int) -> None:
        """Write the model's weights to `folder` in the source dtype: one `model.safetensors` when they fit in
        `max_shard_bytes`, else sharded safetensors + index with one shard per decoder block (each was written
        when the block was released) and the other tensors in shards of at most `max_shard_bytes`."""
        self.release()
        layers = decoder_layers(self.model, self.spec)
        shards: list[tuple[Path, list[str], int]] = []
        for i, module in enumerate(layers):
            origin = self.origins[i]
            keys = sorted(module.state_dict())
            stored, final = self._names(origin.index, keys), self._names(i, keys)
            reusable = origin.files and set(origin.reader.names()) == set(stored.values()) and all(
                not origin.reader.dtype(n).is_floating_point or origin.reader.dtype(n) == self.source_dtype
                for n in stored.values())
            if reusable:  # a written block, in the output dtype: reuse it
                path = origin.files[0]
                if origin.index != i:  # blocks before it were removed: rename its tensors, it stays valid
                    rename_tensors(path, {stored[k]: final[k] for k in keys})
                    origin.reader, origin.index = Checkpoint(path.parent, files=[path.name]), i
                shards.append((path, list(final.values()), origin.reader.nbytes()))
                continue
            state = self._read(origin, module, keys, self.source_dtype, "cpu")  # untouched: copied from the source
            path = self._work_file(BLOCKS_DIR)
            size = write_shard(path, {final[k]: state[k] for k in keys})
            shards.append((path, list(final.values()), size))
        shards = self._write_rest(max_shard_bytes) + shards
        owned = {f for origin in self.origins for f in origin.files}
        total_size = sum(size for _, _, size in shards)
        if total_size <= max_shard_bytes:  # small enough for one file, as save_pretrained writes it
            merged = {}
            for path, names, _ in shards:
                merged.update(Checkpoint(path.parent, files=[path.name]).read(names))
            write_shard(folder / SINGLE_FILE, merged)
        else:
            weight_map = {}
            for k, (path, names, _) in enumerate(shards, 1):
                name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                _link_or_copy(path, folder / name)  # the block files stay valid until the output is in place
                weight_map.update({n: name for n in names})
            write_index(folder, weight_map, total_size)
        for path, _, _ in shards:
            if path not in owned:
                path.unlink(missing_ok=True)
        if folder == self.work:  # the work folder becomes the output: no block files may stay in it
            self.forget_written()

    def forget_written(self) -> None:
        """Delete the work files of written blocks (after they were linked into an output)."""
        for origin in self.origins:
            self._drop_files(origin)
            origin.files = []
        if self.work is not None:
            for kind in (BLOCKS_DIR, EXACT_DIR):
                shutil.rmtree(self.work / kind, ignore_errors=True)

    def _write_rest(self, max_shard_bytes: int) -> list[tuple[Path, list[str], int]]:
        """The tensors outside the decoder blocks (embeddings, final norm, head), from memory when loaded (cast to
        the source dtype) or copied from the source; tied copies are left out, as save_pretrained does."""
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        params = _tensors(self.model)
        names = [n for n in params if not n.startswith(self.prefix + ".") and n not in tied]
        shards, group, size = [], {}, 0

        def flush():
            nonlocal group, size
            if group:
                path = self._work_file(BLOCKS_DIR)
                shards.append((path, list(group), write_shard(path, group)))
            group, size = {}, 0

        for name in names:
            t = params[name]
            if t.is_meta:
                t = self.source.read([name], self.source_dtype)[name]
            elif self.source_dtype is not None and t.is_floating_point():
                t = t.to(self.source_dtype)
            nbytes = t.numel() * t.element_size()
            if group and size + nbytes > max_shard_bytes:
                flush()
            group[name], size = t, size + nbytes
        flush()
        return shards

    def reopen(self, folder: Path) -> None:
        """Stream from a written output folder from now on (the work folder became it, or is deleted)."""
        self.forget_written()
        if self._finalizer is not None:
            if self.work.exists():  # a work folder of its own (not renamed into the output): delete it
                self._finalizer()
            self._finalizer.detach()
        self._finalizer, self.work = None, None
        self.source = Checkpoint(folder)
        self.origins = [BlockOrigin(self.source, i) for i in range(len(self.origins))]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link when both are on one file system (no data copied), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
