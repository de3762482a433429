"""Sparse checkpoints: measured sparsity, and the compressed-tensors sparse formats on disk.

A sparsity run is written dense by default (plain safetensors with zeros: every transformers and vLLM version
loads it). `compressed` writes compressed-tensors' sparse layouts, which save disk:

- `sparse-24-bitmask` (every compressed weight is 2:4 along its input dimension): `<module>.compressed`
  [rows, cols/2] (the kept values, row-major), `<module>.bitmask` uint8 [rows, ceil(cols/8)] (bit j % 8 of byte
  j // 8 set where column j is kept, little-endian bit order), `<module>.shape` int64 [2, 1];
- `sparse-bitmask` (any pattern): `<module>.compressed` (1-D non-zero values), `<module>.bitmask`,
  `<module>.row_offsets` int64 [rows] (index of each row's first value), `<module>.shape` int64 [2];

and config.json gets `quantization_config: {quant_method: compressed-tensors, format: dense, sparsity_config:
{format, sparsity_structure, global_sparsity, targets, ignore}}`. These are the layouts of compressed-tensors'
sparse compressors, which that library shipped up to 0.14 (transformers < 5, vLLM <= 0.18); compressed-tensors
>= 0.15 (needed by transformers 5) no longer decompresses them, so `core.load_pruned` does it here.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

DENSE, COMPRESSED = "dense", "compressed"
FORMATS = (DENSE, COMPRESSED)
BITMASK, BITMASK_24 = "sparse-bitmask", "sparse-24-bitmask"
PARTS = ("compressed", "bitmask", "row_offsets", "shape")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


# -- measuring ---------------------------------------------------------------------------------------------------

def is_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Every group of m consecutive input weights holds at most n non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight != 0).reshape(rows, cols // m, m).sum(-1) <= n).all())


def measure_sparsity(model: nn.Module, spec) -> dict:
    """Zeros in every decoder-block Linear weight, layer by layer: fractions per linear, per layer and overall."""
    from .layer_config import layer_shapes
    from .layers import decoder_layers
    from .methods.sparsity import linear_groups

    layers, zeros, total = [], 0, 0
    for i, shape in enumerate(layer_shapes(model.config)):
        layer = decoder_layers(model, spec)[i]
        entry, lz, lt = {}, 0, 0
        for _, group in linear_groups(layer, spec, shape, "all"):
            for path, module in group.items():
                w = module.weight.detach()
                z = int((w == 0).sum())
                entry[path] = round(z / w.numel(), 6)
                lz, lt = lz + z, lt + w.numel()
        layers.append({"layer": i, "sparsity": round(lz / max(lt, 1), 6), "linears": entry})
        zeros, total = zeros + lz, total + lt
    all_params = sum(p.numel() for p in model.parameters())
    return {"linear_weights": total, "zeros": zeros, "sparsity": round(zeros / max(total, 1), 6),
            "nonzero_parameters": all_params - zeros, "layers": layers}


# -- compressing -------------------------------------------------------------------------------------------------

def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], bit j % 8 of byte j // 8 = mask[:, j]."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, (cols + 7) // 8 * 8, dtype=torch.uint8)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of pack_mask."""
    bits = (packed.to(torch.int32)[..., None] >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def compress(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """{part: tensor} of one 2-D weight in `fmt` (values keep the weight's dtype)."""
    rows, cols = weight.shape
    if fmt == BITMASK_24:
        # the two largest of every four (kept zeros included when a group has fewer non-zeros), as 2:4 kernels need
        order = torch.argsort(weight.abs().reshape(rows, cols // 4, 4), dim=-1, descending=True, stable=True)
        mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, order[..., :2], True).reshape(rows, cols)
        return {"compressed": weight[mask].reshape(rows, cols // 2), "bitmask": pack_mask(mask),
                "shape": torch.tensor([rows, cols]).reshape(-1, 1)}
    mask = weight != 0
    counts = mask.sum(-1)
    return {"compressed": weight[mask], "bitmask": pack_mask(mask), "row_offsets": counts.cumsum(0) - counts,
            "shape": torch.tensor([rows, cols])}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    shape = [int(x) for x in parts["shape"].flatten()]
    mask = unpack_mask(parts["bitmask"], shape[1])
    out = torch.zeros(shape, dtype=parts["compressed"].dtype)
    out[mask] = parts["compressed"].flatten()
    return out


def _shards(folder: Path) -> tuple[list[Path], Path | None]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names], index
    return [folder / "model.safetensors"], None


def _layer_linear_weight(key: str, linears: set[str]) -> str | None:
    """The module name when `key` is the weight of a decoder-block Linear."""
    module = key[: -len(".weight")] if key.endswith(".weight") else None
    return module if module in linears and _LAYER.search(module + ".") else None


def write_compressed(folder: Path, linears: list[str]) -> dict:
    """Rewrite the dense shards in `folder` with the decoder-block linears that hold zeros compressed, one tensor
    and one shard at a time (a first pass over the stored tensors picks the format), and add the sparsity config
    to config.json. `linears`: the model's Linear module names (its structure only). Returns the sparsity config."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = set(linears)
    shards, index = _shards(folder)
    sparse, all_24, zeros, params = set(), True, 0, 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                params += t.numel()
                module = _layer_linear_weight(key, names)
                z = int((t == 0).sum()) if module else 0
                if z:
                    sparse.add(module)
                    zeros += z
                    all_24 = all_24 and is_nm(t)
    if not sparse:
        from .errors import InvalidTargetError

        raise InvalidTargetError("No decoder-block linear holds zeros: there is nothing to compress.")
    fmt = BITMASK_24 if all_24 else BITMASK
    weight_map = {}
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                module = _layer_linear_weight(key, names)
                if module in sparse:
                    for part, t in compress(f.get_tensor(key), fmt).items():
                        tensors[f"{module}.{part}"] = t.contiguous()
                else:
                    tensors[key] = f.get_tensor(key)
        save_file(tensors, str(shard), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in tensors})
    if index is not None:
        size = sum(s.stat().st_size for s in shards)
        index.write_text(json.dumps({"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))},
                                    indent=2) + "\n")
    config = {"format": fmt, "sparsity_structure": "2:4" if fmt == BITMASK_24 else "unstructured",
              "global_sparsity": round(zeros / max(params, 1), 6), "targets": ["Linear"],
              "ignore": [n for n in linears if n not in sparse], "registry_requires_subclass": False}
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"] = {"quant_method": "compressed-tensors", "format": "dense", "version": "0.14.0.1",
                                   "sparsity_config": config}
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return config


CONFIG_KEY = "pruning_sparsity"


def describe_sparsity(folder: Path, sparsity: dict, structure: str, sparse_format: str) -> dict:
    """Add to config.json, under `pruning_sparsity`, what a sparsity run left: {format, structure ('2:4', 'N:M' or
    'unstructured'), sparsity (measured over the targets), zeros, linear_weights, targets (the pruned linears, by
    name inside a decoder block), layers (measured per decoder layer; 0 where protected)}. transformers keeps an
    unknown config key as a plain attribute and nothing reads it: plain `from_pretrained` loads the dense
    checkpoint unchanged (unlike `quantization_config`, it never asks for a quantizer or decompressor).
    `sparsity`: `measure_sparsity`'s result. Returns the description."""
    targets = sorted({name for layer in sparsity["layers"] for name, z in layer["linears"].items() if z > 0})
    description = {"format": sparse_format, "structure": structure, "sparsity": sparsity["sparsity"],
                   "zeros": sparsity["zeros"], "linear_weights": sparsity["linear_weights"], "targets": targets,
                   "layers": [layer["sparsity"] for layer in sparsity["layers"]]}
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data[CONFIG_KEY] = description
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return description


# -- reading -----------------------------------------------------------------------------------------------------

def sparsity_config(config) -> dict | None:
    """The compressed-tensors sparsity config of a (transformers or JSON) config when its weights are compressed."""
    q = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    if q is not None and not isinstance(q, dict):
        q = q.to_dict() if hasattr(q, "to_dict") else vars(q)
    sc = (q or {}).get("sparsity_config") or {}
    return sc if sc.get("format") in (BITMASK, BITMASK_24) else None


def _grouped(f) -> dict[str, dict[str, str]]:
    """{module: {part: key}} for the compressed weights of an open safetensors file."""
    groups: dict[str, dict[str, str]] = {}
    for key in f.keys():
        module, _, part = key.rpartition(".")
        if part in PARTS:
            groups.setdefault(module, {})[part] = key
    return {m: p for m, p in groups.items() if {"compressed", "bitmask", "shape"} <= set(p)}


def decompress_folder(src: Path, dst: Path) -> None:
    """A dense copy of a compressed checkpoint folder (weights one shard at a time; other files copied)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copy2(item, dst / item.name)
    shards, index = _shards(src)
    weight_map = {}
    for shard in shards:
        tensors = {}
        with safe_open(str(shard), framework="pt") as f:
            groups = _grouped(f)
            parts_keys = {k for parts in groups.values() for k in parts.values()}
            for module, parts in groups.items():
                tensors[f"{module}.weight"] = decompress({p: f.get_tensor(k) for p, k in parts.items()})
            for key in f.keys():
                if key not in parts_keys:
                    tensors[key] = f.get_tensor(key)
        save_file(tensors, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in tensors})
    if index is not None:
        (dst / index.name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def decompressed_copy(folder: str | Path) -> Iterator[Path]:
    """A temporary dense copy of a compressed checkpoint (removed on exit)."""
    tmp = Path(tempfile.mkdtemp(prefix="sparse-dense-"))
    try:
        decompress_folder(Path(folder), tmp / "model")
        yield tmp / "model"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def folder_report(folder: str | Path, count_dense_zeros: bool = True) -> dict:
    """Measured sparsity per decoder layer and bytes on disk against dense, from a checkpoint folder, reading one
    tensor at a time (compressed weights: from their sizes only; dense weights: zeros counted if asked)."""
    from safetensors import safe_open

    folder = Path(folder)
    layers: dict[int, list[int]] = {}
    dense_bytes = overhead = 0
    for shard in _shards(folder)[0]:
        with safe_open(str(shard), framework="pt") as f:
            groups = _grouped(f)
            parts_keys = {k for parts in groups.values() for k in parts.values()}
            for module, parts in groups.items():
                sl = f.get_slice(parts["compressed"])
                shape = [int(x) for x in f.get_tensor(parts["shape"]).flatten()]
                numel = shape[0] * shape[1]
                itemsize = torch.empty(0, dtype=_dtype(sl.get_dtype())).element_size()
                nnz = _numel(sl.get_shape())
                if "row_offsets" not in parts:  # 2:4 keeps zeros inside groups with fewer non-zeros
                    nnz = int((f.get_tensor(parts["compressed"]) != 0).sum())
                dense_bytes += numel * itemsize
                overhead += sum(_nbytes(f.get_slice(parts[p])) for p in parts if p != "compressed")
                _add(layers, module, numel - nnz, numel)
            for key in f.keys():
                if key in parts_keys:
                    continue
                sl = f.get_slice(key)
                dense_bytes += _nbytes(sl)
                if count_dense_zeros and key.endswith(".weight") and len(sl.get_shape()) == 2 and _LAYER.search(key):
                    t = f.get_tensor(key)
                    _add(layers, key[: -len(".weight")], int((t == 0).sum()), t.numel())
    disk = sum(s.stat().st_size for s in _shards(folder)[0])
    zeros = sum(z for z, _ in layers.values())
    total = sum(n for _, n in layers.values())
    config_file = folder / "config.json"
    sc = sparsity_config(json.loads(config_file.read_text())) if config_file.exists() else None
    return {"format": sc["format"] if sc else DENSE, "layers": [{"layer": i, "sparsity": round(z / n, 6)} for i, (z, n) in sorted(layers.items())],
            "sparsity": round(zeros / total, 6) if total else 0.0, "disk_bytes": disk, "dense_bytes": dense_bytes,
            "index_bytes": overhead, "disk_vs_dense": round(disk / dense_bytes, 6) if dense_bytes else None}


def _add(layers: dict, module: str, zeros: int, numel: int) -> None:
    match = _LAYER.search(module + ".")
    if match:
        z, n = layers.get(int(match.group(1)), (0, 0))
        layers[int(match.group(1))] = [z + zeros, n + numel]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(sl) -> int:
    return _numel(sl.get_shape()) * torch.empty(0, dtype=_dtype(sl.get_dtype())).element_size()


def load_compressed(name: str, opts, load_dense):
    """Load a compressed sparse checkpoint (local folder or Hub id) through a temporary dense copy."""
    import dataclasses

    folder = Path(name) / (opts.subfolder or "")
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        pattern = f"{opts.subfolder}/*" if opts.subfolder else None
        root = snapshot_download(name, revision=opts.revision, token=opts.token, allow_patterns=pattern,
                                 local_files_only=bool(opts.local_files_only))
        folder = Path(root) / (opts.subfolder or "")
    with decompressed_copy(folder) as dense:
        model, tokenizer = load_dense(str(dense), dataclasses.replace(opts, revision=None, subfolder=None, token=None))
    model.config._name_or_path = name
    return model, tokenizer
