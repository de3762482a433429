"""The commit payload: parse the client's NDJSON and apply its operations to a tree.

`huggingface_hub` posts `application/x-ndjson` to `/api/{type}s/{repo}/commit/{rev}`, one JSON object per line:
`{"key": "header", "value": {"summary", "description", "parentCommit"?}}` first, then any number of
`file` (base64 content of a regular file), `lfsFile` (path + sha256 oid [+ size] of an already uploaded LFS
object), `deletedFile` and `deletedFolder` items. The Hub refuses regular files over 10 MiB and binary regular
files (they must go through LFS), LFS pointers to objects it does not have, and deletions of missing paths.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field

from . import errors
from .objects import SHA256_RE, ObjectStore
from .storage import file_entry, lfs_entry

logger = logging.getLogger(__name__)

MAX_REGULAR_FILE_SIZE = 10 * 1024 * 1024
FORBIDDEN_SEGMENTS = {".git", "..", "."}


@dataclass
class CommitRequest:
    """A parsed commit payload."""

    summary: str
    description: str
    parent_commit: str | None
    operations: list[tuple[str, dict]] = field(default_factory=list)


def validate_path(path: object) -> str:
    """A path inside a repo: relative, no '..'/'.'/'.git' segments, no empty segments."""
    if not isinstance(path, str) or not path or len(path) > 1000:
        raise errors.bad_request(f"Invalid path: {path!r}")
    if path.startswith("/") or path.endswith("/") or "\\" in path or "\0" in path:
        raise errors.bad_request(f"Invalid path: {path!r}")
    parts = path.split("/")
    if any(p == "" or p in FORBIDDEN_SEGMENTS for p in parts):
        raise errors.bad_request(f"Invalid path: {path!r}")
    return path


def parse_ndjson(body: bytes) -> CommitRequest:
    """Parse and shape-check the NDJSON commit payload (400 on anything malformed)."""
    items = []
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise errors.bad_request(f"Invalid NDJSON on line {n}: {e}") from None
        if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not isinstance(item.get("value"),
                                                                                                  dict):
            raise errors.bad_request(f"Invalid commit item on line {n}: expected {{key, value}}")
        items.append(item)
    if not items or items[0]["key"] != "header":
        raise errors.bad_request("The first line of a commit payload must be its header")
    header = items[0]["value"]
    summary = header.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise errors.bad_request("Commit summary (title) is required")
    description = header.get("description") or ""
    parent = header.get("parentCommit")
    if parent is not None and (not isinstance(parent, str) or not 5 <= len(parent) <= 40):
        raise errors.bad_request(f"Invalid parentCommit: {parent!r}")
    request = CommitRequest(summary=summary.strip(), description=str(description), parent_commit=parent)
    for item in items[1:]:
        key = item["key"]
        if key not in ("file", "lfsFile", "deletedFile", "deletedFolder"):
            raise errors.bad_request(f"Unknown commit operation: {key!r}")
        request.operations.append((key, item["value"]))
    return request


def _decode_content(value: dict) -> bytes:
    content = value.get("content")
    encoding = value.get("encoding", "base64")
    if not isinstance(content, str):
        raise errors.bad_request(f"Missing content for file {value.get('path')!r}")
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise errors.bad_request(f"Invalid base64 content for file {value.get('path')!r}") from None
    if encoding in ("utf-8", "utf8", None):
        return content.encode()
    raise errors.bad_request(f"Unsupported encoding {encoding!r}")


def apply_operations(entries: dict, request: CommitRequest, objects: ObjectStore) -> tuple[dict, list[str]]:
    """Apply the operations to a copy of `entries` (path -> entry); returns (new entries, changed paths)."""
    new = dict(entries)
    changed: list[str] = []
    for key, value in request.operations:
        path = validate_path(value.get("path"))
        if key == "file":
            data = _decode_content(value)
            if len(data) > MAX_REGULAR_FILE_SIZE:
                raise errors.bad_request(
                    f"Your push was rejected because it contains files larger than 10 MiB ({path}). "
                    f"Please use https://git-lfs.github.com/ to store large files.")
            if b"\0" in data[:512]:
                raise errors.bad_request(
                    f"Your push was rejected because it contains binary files ({path}). "
                    f"Please use https://git-lfs.github.com/ to store binary files.")
            new[path] = file_entry(data, objects.put_blob(data))
        elif key == "lfsFile":
            oid = value.get("oid")
            if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256_RE.match(oid):
                raise errors.bad_request(f"Invalid LFS oid for {path!r}")
            size = objects.lfs_size(oid)
            if size is None:
                raise errors.bad_request(
                    f"Your push was rejected because an LFS pointer pointed to a file that does not exist "
                    f"({path}, oid {oid}). Upload it through the LFS batch API first.")
            if value.get("size") is not None and value["size"] != size:
                raise errors.bad_request(f"LFS object size mismatch for {path!r}: {value['size']} != {size}")
            new[path] = lfs_entry(oid, size)
        elif key == "deletedFile":
            if path not in new:
                raise errors.entry_not_found(path, message=f"A file with this name doesn't exist: {path}")
            del new[path]
        else:  # deletedFolder
            prefix = path + "/"
            doomed = [p for p in new if p.startswith(prefix)]
            if not doomed:
                raise errors.entry_not_found(path, message=f"A folder with this name doesn't exist: {path}")
            for p in doomed:
                del new[p]
        changed.append(path)
    _check_file_folder_clashes(new)
    return new, changed


def _check_file_folder_clashes(entries: dict) -> None:
    """A path cannot be both a file and a folder (e.g. 'a' and 'a/b')."""
    folders = set()
    for path in entries:
        parts = path.split("/")
        for i in range(1, len(parts)):
            folders.add("/".join(parts[:i]))
    clash = sorted(folders & set(entries))
    if clash:
        raise errors.bad_request(f"Path {clash[0]!r} would be both a file and a folder")
