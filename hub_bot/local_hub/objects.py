"""Content-addressed object store on disk, and the atomic-write helpers everything else uses.

Two kinds of content live here, shared by all repos:

* regular blobs, keyed by their git blob sha1 (`sha1("blob <size>\\0" + content)`), the Hub's ETag for such files;
* LFS objects, keyed by the sha256 of their content (the LFS oid), with the size checked on the way in.

Every write goes to a temporary file in the same filesystem and is renamed into place (after an fsync), so a crash
never leaves a half-written object under its final name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

logger = logging.getLogger(__name__)

SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob with this content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in the git tree for an LFS object."""
    return LFS_POINTER_TEMPLATE.format(oid=oid, size=size).encode()


def canonical_json(obj) -> bytes:
    """Deterministic JSON encoding (sorted keys, no whitespace), the input of content hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file + fsync + rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False).encode())


def read_json(path: Path):
    with open(path, "rb") as f:
        return json.loads(f.read())


class ObjectStore:
    """Regular blobs (by git sha1) and LFS objects (by sha256) under `root`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.blobs = self.root / "blobs"
        self.lfs = self.root / "lfs"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.lfs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def _clean_tmp(self) -> None:
        """Remove leftovers of interrupted uploads (they never reached their final name)."""
        for p in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                p.unlink()

    @staticmethod
    def _fanout(base: Path, key: str) -> Path:
        return base / key[:2] / key[2:]

    # regular blobs
    def blob_path(self, oid: str) -> Path:
        if not SHA1_RE.match(oid):
            raise ValueError(f"not a git sha1: {oid!r}")
        return self._fanout(self.blobs, oid)

    def put_blob(self, data: bytes) -> str:
        """Store a regular file's content; returns its git blob sha1 (idempotent)."""
        oid = git_blob_sha1(data)
        path = self.blob_path(oid)
        if not path.exists():
            atomic_write_bytes(path, data)
        return oid

    def read_blob(self, oid: str) -> bytes:
        return self.blob_path(oid).read_bytes()

    # LFS objects
    def lfs_path(self, oid: str) -> Path:
        if not SHA256_RE.match(oid):
            raise ValueError(f"not a sha256: {oid!r}")
        return self._fanout(self.lfs, oid)

    def has_lfs(self, oid: str) -> bool:
        return SHA256_RE.match(oid or "") is not None and self.lfs_path(oid).is_file()

    def lfs_size(self, oid: str) -> int | None:
        try:
            return self.lfs_path(oid).stat().st_size
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def lfs_writer(self, expected_oid: str, expected_size: int) -> Iterator["LfsWriter"]:
        """Stream an LFS object in; on exit it is checked (sha256 and size) and renamed into place."""
        writer = LfsWriter(self, expected_oid, expected_size)
        try:
            yield writer
            writer.finish()
        finally:
            writer.discard()


class LfsWriter:
    """Temporary file + running sha256 for one LFS upload (see :meth:`ObjectStore.lfs_writer`)."""

    def __init__(self, store: ObjectStore, expected_oid: str, expected_size: int):
        self.store = store
        self.expected_oid = expected_oid
        self.expected_size = expected_size
        fd, self.tmp = tempfile.mkstemp(prefix="lfs-", dir=store.tmp)
        self.file = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.done = False

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.expected_size:
            raise ValueError(f"more data than the announced size ({self.expected_size} bytes)")
        self.file.write(chunk)
        self.hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.size != self.expected_size:
            raise ValueError(f"size mismatch: announced {self.expected_size} bytes, received {self.size}")
        digest = self.hash.hexdigest()
        if digest != self.expected_oid:
            raise ValueError(f"sha256 mismatch: announced {self.expected_oid}, received {digest}")
        final = self.store.lfs_path(self.expected_oid)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.tmp, final)
        _fsync_dir(final.parent)
        self.done = True
        logger.debug("stored LFS object %s (%d bytes)", digest, self.size)

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if not self.done:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
