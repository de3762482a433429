"""How the Hub decides, at preupload, whether a file goes to LFS or into git, and whether it is ignored.

A file is uploaded as LFS when the repo's `.gitattributes` tracks it (`filter=lfs`; a new repo tracks
`*.safetensors`, `*.bin`, `*.pt`, ...), when it is larger than 10 MiB, or when its first 512 bytes (the sample the
client sends) contain a NUL byte (binary). Everything else is "regular" (sent base64 inside the commit).
`shouldIgnore` follows the `.gitignore` sent with the request, else the one in the repo.
"""
from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


def _glob_to_regex(pattern: str, anchored: bool) -> re.Pattern:
    """Translate a gitattributes/gitignore glob ('*', '?', '**', '[...]') to a regex over '/'-separated paths."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:j].replace("\\", "\\\\")
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    prefix = "^" if anchored else "^(?:.*/)?"
    return re.compile(prefix + "".join(out) + "$")


def _matches(pattern: str, path: str) -> bool:
    """Git pattern semantics: a pattern without '/' matches the basename at any depth, else it is root-anchored."""
    pattern = pattern.strip()
    if not pattern:
        return False
    anchored = "/" in pattern.rstrip("/")
    return _glob_to_regex(pattern.lstrip("/"), anchored).match(path) is not None


def lfs_patterns(gitattributes: str) -> list[tuple[str, bool]]:
    """(pattern, tracked) pairs from a .gitattributes, in order (later lines win)."""
    out = []
    for line in gitattributes.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        pattern, attrs = parts[0], parts[1:]
        if "filter=lfs" in attrs:
            out.append((pattern, True))
        elif "-filter" in attrs or "!filter" in attrs or any(a.startswith("filter=") for a in attrs):
            out.append((pattern, False))
    return out


def is_lfs_tracked(path: str, gitattributes: str) -> bool:
    tracked = False
    for pattern, value in lfs_patterns(gitattributes):
        if _matches(pattern, path):
            tracked = value
    return tracked


def upload_mode(path: str, size: int, sample: bytes, gitattributes: str) -> str:
    """'lfs' or 'regular', as the Hub's preupload endpoint answers."""
    if is_lfs_tracked(path, gitattributes) or size > LFS_SIZE_THRESHOLD or b"\0" in sample[:512]:
        return "lfs"
    return "regular"


def is_ignored(path: str, gitignore: str | None) -> bool:
    """Whether `path` is ignored by a .gitignore (patterns, '!' negation, trailing '/' for folders)."""
    if not gitignore:
        return False
    ignored = False
    parts = path.split("/")
    for line in gitignore.splitlines():
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        hit = False
        # A folder pattern ignores everything below a matching folder; a file pattern matches the path or a parent.
        candidates = ["/".join(parts[:i]) for i in range(1, len(parts))] + ([] if dir_only else [path])
        for candidate in candidates:
            if _matches(pattern, candidate):
                hit = True
                break
        if hit:
            ignored = not negate
    return ignored
