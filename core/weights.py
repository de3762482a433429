"""Safetensors checkpoints read and written one tensor group at a time, never as a whole.

`Checkpoint` maps tensor names to shard files (the index's weight map, or the headers of the files) and reads the
tensors asked for, opening each shard only for that read, so a process that streams a model holds one group of
tensors, not the checkpoint. A tensor read on the CPU in its stored dtype shares the file's pages (safetensors maps
the file; the mapping lives as long as such a tensor, and its pages are clean page cache the kernel can drop); a
tensor cast to another dtype or moved to a GPU is a copy, and the mapping goes with the read. `write_shard` writes one group (checking the free
disk space first), `rename_tensors` renames the tensors of a written shard in place (only its header changes) and
`write_index` writes the index that ties the shards together.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import DiskFullError, ModelLoadError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
METADATA = {"format": "pt"}  # what transformers expects in a PyTorch safetensors header
DISK_MARGIN = 64 * 2**20  # never fill the disk to the last byte: other writes (config, card, index) follow

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets), without reading any tensor."""
    try:
        with open(path, "rb") as fh:
            total = os.fstat(fh.fileno()).st_size
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > total - 8:
                raise ValueError("its header is longer than the file")
            header = json.loads(fh.read(size))
            end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
            if 8 + size + end > total:
                raise ValueError("the file is shorter than its header says")
            return header
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as err:
        raise ModelLoadError(f"{path} could not be read ({err}): it is damaged, truncated or not safetensors. "
                             "Download the model again.") from None


class Checkpoint:
    """The safetensors files of one model folder, read by tensor name."""

    def __init__(self, folder: str | os.PathLike, files: list[str] | None = None) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if files is not None:
            pass
        elif index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{self.folder} has no *.safetensors weights to stream from.")
        self.weight_map: dict[str, str] = {}
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for name in files:  # the headers, not the index, say what each file holds
            header = read_header(self.folder / name)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                self.weight_map[key] = name
                self._info[key] = (_DTYPES[entry["dtype"]], tuple(entry["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def names(self) -> list[str]:
        return list(self.weight_map)

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def nbytes(self, names=None) -> int:
        names = self.weight_map if names is None else names
        return sum(torch.Size(self.shape(n)).numel() * _itemsize(self.dtype(n)) for n in names)

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype holding most of the floating-point bytes (the checkpoint's dtype)."""
        totals: dict[torch.dtype, int] = {}
        for name in self.weight_map:
            dtype = self.dtype(name)
            if dtype.is_floating_point:
                totals[dtype] = totals.get(dtype, 0) + self.nbytes([name])
        return max(totals, key=totals.get) if totals else None

    def read(self, names, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict:
        """{name: tensor} for `names`, cast to `dtype` (floating tensors only) and moved to `device`."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise ModelLoadError(f"{self.folder} has no tensor {missing[0]!r} ({len(missing)} missing).")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, group in by_file.items():
            with safe_open(self.folder / file, framework="pt") as fh:  # closed (unmapped) after each group
                for name in group:
                    out[name] = _convert(fh.get_tensor(name), dtype, device)
        return out

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
        """Rows `rows` (sorted, unique) of a 2-D tensor, reading only those rows: [len(rows), ...]."""
        values = rows.tolist()
        runs, start = [], 0
        for k in range(1, len(values) + 1):  # consecutive ids become one slice
            if k == len(values) or values[k] != values[k - 1] + 1:
                runs.append((values[start], values[k - 1] + 1))
                start = k
        with safe_open(self.folder / self.weight_map[name], framework="pt") as fh:
            view = fh.get_slice(name)
            parts = [view[a:b] for a, b in runs]
        return _convert(torch.cat(parts) if parts else torch.empty(0, *self.shape(name)[1:]), dtype, device)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _convert(t: torch.Tensor, dtype: torch.dtype | None, device) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device)


def check_free_space(folder: Path, needed: int) -> None:
    """Raise DiskFullError before a write of `needed` bytes that the disk cannot hold."""
    free = shutil.disk_usage(folder).free
    if free < needed + DISK_MARGIN:
        raise DiskFullError(f"Not enough disk space in {folder}: {needed / 2**30:.2f} GiB to write, "
                            f"{free / 2**30:.2f} GiB free. Free some space or write the output to another disk "
                            "(--out on a larger volume).")


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Write `tensors` (CPU or device, any dtype) to one safetensors file. Returns the bytes of tensor data."""
    from safetensors.torch import save_file

    size = sum(t.numel() * t.element_size() for t in tensors.values())
    check_free_space(path.parent, size)
    cpu = {k: t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    try:
        save_file(cpu, str(path), metadata=METADATA)
    except Exception as err:  # safetensors reports I/O failures as its own error type, with the OS message
        full = isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left" in str(err)
        if full:
            path.unlink(missing_ok=True)
            raise DiskFullError(f"The disk holding {path.parent} filled up while writing the output. Free some "
                                "space or write the output to another disk.") from err
        raise
    return size


def rename_tensors(path: Path, mapping: dict[str, str]) -> None:
    """Rename tensors of a written shard by rewriting its header in place (the data does not move).

    The new header must not be longer than the old one; it is padded with spaces, which the format allows."""
    with open(path, "r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        renamed = {mapping.get(k, k): v for k, v in header.items()}
        data = json.dumps(renamed, separators=(",", ":")).encode()
        assert len(data) <= size, "renamed header must fit in place (names only get shorter or stay equal)"
        fh.seek(8)
        fh.write(data + b" " * (size - len(data)))


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
