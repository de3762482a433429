"""Repositories on disk: metadata, refs, commits and trees, git-like and crash-safe.

Layout under the data directory::

    objects/                       shared blob / LFS store (see objects.py)
    repos/{models|datasets|spaces}/{namespace}/{name}/
        repo.json                  metadata: id, private, gated, grants, createdAt, ...
        refs.json                  {"heads": {branch: sha}, "tags": {tag: sha}, "pr": {"N": sha}}
        trees/{id}.json            path -> entry (oid, size, lfs?) for every file of one commit
        commits/{sha}.json         {tree, parents, author, date, title, message}
        discussions/{num}.json     discussions and pull requests (see discussions.py)

A commit id is the sha1 over the commit's canonical JSON (tree id, parents, author, date, title, message); a tree
id is the sha1 over the tree's canonical JSON. A commit is written in order blobs -> tree -> commit -> refs, each
atomically, so a crash leaves at worst an unreferenced object; the refs file is the single point of truth. Writers
of one repo are serialized by a per-repo lock (:meth:`RepoStore.lock`).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from .objects import SHA1_RE, ObjectStore, atomic_write_json, canonical_json, lfs_pointer, git_blob_sha1, read_json

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")

# The .gitattributes the Hub puts in every new model repo: what it tracks decides "lfs" vs "regular" uploads.
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*", "*.mlmodel",
    "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt",
    "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz",
    "*.zip", "*.zst", "*tfevents*"))


def now_iso(after: str | None = None) -> str:
    """UTC timestamp as the Hub writes it (`2024-01-31T12:00:00.000Z`), strictly later than `after` if given."""
    now = dt.datetime.now(dt.timezone.utc)
    if after:
        prev = parse_iso(after) + dt.timedelta(milliseconds=1)
        now = max(now, prev)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def parse_iso(value: str) -> dt.datetime:
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)


def new_object_id() -> str:
    """A 24-hex id like the Hub's MongoDB ObjectIds (repo, discussion, event, webhook ids)."""
    return secrets.token_hex(12)


@dataclass(frozen=True)
class RepoKey:
    """Identity of a repo: type (model/dataset/space), namespace, name."""

    type: str
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url_prefix(self) -> str:
        """Prefix of web URLs: '' for models, 'datasets/' or 'spaces/' otherwise."""
        return "" if self.type == "model" else f"{self.type}s/"

    @classmethod
    def parse(cls, repo_type: str, repo_id: str) -> "RepoKey":
        namespace, _, name = repo_id.partition("/")
        return cls(repo_type, namespace, name)


def file_entry(data: bytes, blob_oid: str) -> dict:
    return {"oid": blob_oid, "size": len(data), "lfs": None}


def lfs_entry(sha256: str, size: int) -> dict:
    pointer = lfs_pointer(sha256, size)
    return {"oid": git_blob_sha1(pointer), "size": size,
            "lfs": {"oid": sha256, "size": size, "pointerSize": len(pointer)}}


class RepoStore:
    """All repos of a data directory (metadata, refs, commits, trees) on top of a shared :class:`ObjectStore`."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.objects = ObjectStore(self.data_dir / "objects")
        self.repos_root = self.data_dir / "repos"
        self.repos_root.mkdir(parents=True, exist_ok=True)
        self._trash = self.data_dir / "trash"
        shutil.rmtree(self._trash, ignore_errors=True)
        self._locks: dict[RepoKey, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self.global_lock = threading.RLock()  # repo creation / deletion

    # ---------------------------------------------------------------- repos
    def repo_dir(self, key: RepoKey) -> Path:
        return self.repos_root / f"{key.type}s" / key.namespace / key.name

    def lock(self, key: RepoKey) -> threading.RLock:
        """The lock serializing every write (commits, refs, discussions) of one repo."""
        with self._locks_guard:
            return self._locks.setdefault(key, threading.RLock())

    def get_meta(self, key: RepoKey) -> dict | None:
        if key.type not in REPO_TYPES or not NAME_RE.match(key.namespace or "") or not NAME_RE.match(key.name or ""):
            return None
        path = self.repo_dir(key) / "repo.json"
        try:
            return read_json(path)
        except FileNotFoundError:
            return None

    def save_meta(self, key: RepoKey, meta: dict) -> None:
        atomic_write_json(self.repo_dir(key) / "repo.json", meta)

    def find_case_insensitive(self, key: RepoKey) -> RepoKey | None:
        """An existing repo whose id equals `key`'s ignoring case (the Hub treats those as the same repo)."""
        base = self.repos_root / f"{key.type}s"
        if not base.is_dir():
            return None
        for ns in base.iterdir():
            if ns.name.lower() != key.namespace.lower():
                continue
            for repo in ns.iterdir():
                if repo.name.lower() == key.name.lower() and (repo / "repo.json").exists():
                    return RepoKey(key.type, ns.name, repo.name)
        return None

    def canonical(self, key: RepoKey) -> RepoKey:
        """`key` spelled as the repo was created (the Hub resolves names ignoring case); `key` itself when no repo
        matches."""
        if key.type not in REPO_TYPES or not NAME_RE.match(key.namespace or "") or not NAME_RE.match(key.name or ""):
            return key
        if (self.repo_dir(key) / "repo.json").exists():
            return key
        return self.find_case_insensitive(key) or key

    def create(self, key: RepoKey, *, private: bool, author: str, extra_meta: dict | None = None,
               initial_files: dict[str, bytes] | None = None) -> dict:
        """Create the repo with an initial commit on `main` holding `initial_files` (regular files)."""
        with self.global_lock:
            if self.find_case_insensitive(key) is not None:
                raise FileExistsError(key.repo_id)
            created = now_iso()
            meta = {"id": new_object_id(), "type": key.type, "namespace": key.namespace, "name": key.name,
                    "private": bool(private), "gated": False, "gatedGrants": [], "createdAt": created,
                    **(extra_meta or {})}
            repo_dir = self.repo_dir(key)
            staging = self.data_dir / "trash" / f"new-{new_object_id()}"
            staging.mkdir(parents=True)
            # Build the repo in a staging folder, then move it in with one rename: never half-created.
            entries = {}
            for path, data in (initial_files or {}).items():
                entries[path] = file_entry(data, self.objects.put_blob(data))
            tree_id = self._write_tree_to(staging, entries)
            commit = {"tree": tree_id, "parents": [], "author": author, "date": created,
                      "title": "initial commit", "message": ""}
            sha = self._write_commit_to(staging, commit)
            atomic_write_json(staging / "refs.json", {"heads": {"main": sha}, "tags": {}, "pr": {}})
            atomic_write_json(staging / "repo.json", meta)
            repo_dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, repo_dir)
            logger.info("created %s repo %s (private=%s)", key.type, key.repo_id, private)
            return meta

    def delete(self, key: RepoKey) -> None:
        with self.global_lock, self.lock(key):
            repo_dir = self.repo_dir(key)
            self._trash.mkdir(parents=True, exist_ok=True)
            target = self._trash / f"del-{new_object_id()}"
            os.replace(repo_dir, target)  # one rename: the repo disappears at once
            shutil.rmtree(target, ignore_errors=True)
            logger.info("deleted %s repo %s", key.type, key.repo_id)

    def list_repos(self, repo_type: str) -> list[tuple[RepoKey, dict]]:
        base = self.repos_root / f"{repo_type}s"
        out = []
        if not base.is_dir():
            return out
        for ns in sorted(base.iterdir()):
            for repo in sorted(ns.iterdir()) if ns.is_dir() else []:
                key = RepoKey(repo_type, ns.name, repo.name)
                meta = self.get_meta(key)
                if meta is not None:
                    out.append((key, meta))
        return out

    # ---------------------------------------------------------------- refs
    def get_refs(self, key: RepoKey) -> dict:
        refs = read_json(self.repo_dir(key) / "refs.json")
        refs.setdefault("heads", {})
        refs.setdefault("tags", {})
        refs.setdefault("pr", {})
        return refs

    def save_refs(self, key: RepoKey, refs: dict) -> None:
        atomic_write_json(self.repo_dir(key) / "refs.json", refs)

    def resolve(self, key: RepoKey, revision: str) -> str | None:
        """Commit sha of a revision: branch, tag, `refs/heads|tags|pr/...` or a full commit sha of this repo."""
        refs = self.get_refs(key)
        if revision in refs["heads"]:
            return refs["heads"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        for prefix, table in (("refs/heads/", "heads"), ("refs/tags/", "tags"), ("refs/pr/", "pr")):
            if revision.startswith(prefix):
                return refs[table].get(revision[len(prefix):])
        if SHA1_RE.match(revision) and (self.repo_dir(key) / "commits" / f"{revision}.json").exists():
            return revision
        return None

    # ---------------------------------------------------------------- commits and trees
    def _write_tree_to(self, repo_dir: Path, entries: dict) -> str:
        data = canonical_json(entries)
        tree_id = hashlib.sha1(b"tree\0" + data).hexdigest()
        path = repo_dir / "trees" / f"{tree_id}.json"
        if not path.exists():
            atomic_write_json(path, entries)
        return tree_id

    def _write_commit_to(self, repo_dir: Path, commit: dict) -> str:
        sha = hashlib.sha1(b"commit\0" + canonical_json(commit)).hexdigest()
        path = repo_dir / "commits" / f"{sha}.json"
        if not path.exists():
            atomic_write_json(path, commit)
        return sha

    def write_commit(self, key: RepoKey, entries: dict, *, parents: list[str], author: str, title: str,
                     message: str) -> str:
        """Write tree + commit objects (no ref moves); returns the new commit sha."""
        repo_dir = self.repo_dir(key)
        tree_id = self._write_tree_to(repo_dir, entries)
        last = max((self.read_commit(key, p)["date"] for p in parents), default=None)
        commit = {"tree": tree_id, "parents": list(parents), "author": author, "date": now_iso(after=last),
                  "title": title, "message": message}
        return self._write_commit_to(repo_dir, commit)

    def read_commit(self, key: RepoKey, sha: str) -> dict:
        commit = read_json(self.repo_dir(key) / "commits" / f"{sha}.json")
        commit["id"] = sha
        return commit

    def read_tree(self, key: RepoKey, sha: str) -> dict:
        """path -> entry of every file at commit `sha`."""
        commit = self.read_commit(key, sha)
        return read_json(self.repo_dir(key) / "trees" / f"{commit['tree']}.json")

    def history(self, key: RepoKey, sha: str) -> list[dict]:
        """Every commit reachable from `sha`, newest first (dates strictly increase along parent links)."""
        seen, stack, out = set(), [sha], []
        while stack:
            cur = stack.pop()
            if cur in seen:
                continue
            seen.add(cur)
            commit = self.read_commit(key, cur)
            out.append(commit)
            stack.extend(commit["parents"])
        out.sort(key=lambda c: (c["date"], c["id"]), reverse=True)
        return out

    def is_ancestor(self, key: RepoKey, ancestor: str, sha: str) -> bool:
        return any(c["id"] == ancestor for c in self.history(key, sha))

    def read_file(self, entry: dict) -> bytes:
        """Content of a tree entry (regular or LFS)."""
        if entry.get("lfs"):
            return self.objects.lfs_path(entry["lfs"]["oid"]).read_bytes()
        return self.objects.read_blob(entry["oid"])

    def file_path(self, entry: dict) -> Path:
        if entry.get("lfs"):
            return self.objects.lfs_path(entry["lfs"]["oid"])
        return self.objects.blob_path(entry["oid"])
