"""Discussions and pull requests of a repo, with their events, stored one JSON file per discussion.

Discussions and PRs share one numbering per repo. A PR `N` owns the ref `refs/pr/N`; its document records the
base branch (`changes.base`, e.g. `refs/heads/main`), the base commit it started from (`baseCommit`, used to
find what the PR changed when merging) and, once merged, `changes.mergeCommitId`. Events are what
`huggingface_hub.community.deserialize_event` reads: `comment`, `status-change`, `commit`, `title-change`.
Callers hold the repo lock (:meth:`RepoStore.lock`) around read-modify-write sequences.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .auth import account_id
from .objects import atomic_write_json, read_json
from .storage import RepoKey, RepoStore, new_object_id, now_iso

logger = logging.getLogger(__name__)

PAGE_SIZE = 50


def author_obj(user: str) -> dict:
    return {"_id": account_id(user), "name": user, "fullname": user, "avatarUrl": f"/avatars/{user}.svg",
            "type": "user", "isPro": False, "isHf": False, "isMod": False, "isOwner": False}


class DiscussionStore:
    """Discussions/PRs of every repo of a :class:`RepoStore`."""

    def __init__(self, repos: RepoStore):
        self.repos = repos

    def _dir(self, key: RepoKey) -> Path:
        return self.repos.repo_dir(key) / "discussions"

    def _path(self, key: RepoKey, num: int) -> Path:
        return self._dir(key) / f"{int(num)}.json"

    def next_num(self, key: RepoKey) -> int:
        """Next free number: after every discussion and every `refs/pr/N` (a crash may leave a ref alone)."""
        nums = [int(p.stem) for p in self._dir(key).glob("*.json") if p.stem.isdigit()]
        nums += [int(n) for n in self.repos.get_refs(key)["pr"]]
        return max(nums, default=0) + 1

    def get(self, key: RepoKey, num: int) -> dict | None:
        try:
            return read_json(self._path(key, num))
        except (FileNotFoundError, ValueError):
            return None

    def save(self, key: RepoKey, doc: dict) -> None:
        atomic_write_json(self._path(key, doc["num"]), doc)

    def list(self, key: RepoKey) -> list[dict]:
        docs = []
        for p in self._dir(key).glob("*.json"):
            if p.stem.isdigit():
                docs.append(read_json(p))
        return sorted(docs, key=lambda d: d["num"], reverse=True)

    def new(self, key: RepoKey, num: int, *, title: str, author: str, description: str, is_pr: bool,
            status: str, base_ref: str | None = None, base_commit: str | None = None) -> dict:
        """A new discussion document (not yet saved) whose first event is the description comment."""
        doc = {"id": new_object_id(), "num": num, "title": title, "status": status, "isPullRequest": is_pr,
               "author": author, "createdAt": now_iso(), "pinned": False, "locked": False, "events": []}
        if is_pr:
            doc["changes"] = {"base": base_ref}
            doc["baseCommit"] = base_commit
        add_event(doc, "comment", author, description)
        return doc


def add_event(doc: dict, kind: str, author: str, payload) -> dict:
    """Append an event to a discussion document and return it (in the Hub's event shape)."""
    created = now_iso()
    event = {"id": new_object_id(), "type": kind, "createdAt": created, "author": author_obj(author)}
    if kind == "comment":
        event["data"] = {"edited": False, "hidden": False, "numEdits": 0, "editors": [author], "reactions": [],
                         "isReport": False,
                         "latest": {"raw": payload, "html": f"<p>{payload}</p>", "updatedAt": created,
                                    "author": author_obj(author)}}
    elif kind == "status-change":
        event["data"] = {"status": payload}
    elif kind == "commit":
        event["data"] = {"subject": payload["subject"], "oid": payload["oid"]}
    elif kind == "title-change":
        event["data"] = {"from": payload[0], "to": payload[1]}
    else:
        raise ValueError(kind)
    doc["events"].append(event)
    return event


def summary(doc: dict, key: RepoKey) -> dict:
    """The list-view shape of a discussion (`/api/.../discussions`)."""
    return {
        "num": doc["num"], "title": doc["title"], "status": doc["status"], "createdAt": doc["createdAt"],
        "isPullRequest": doc["isPullRequest"], "author": author_obj(doc["author"]),
        "repo": {"name": key.repo_id, "type": key.type},
        "numComments": sum(1 for e in doc["events"] if e["type"] == "comment"),
        "pinned": doc.get("pinned", False), "topReactions": [],
        "repoOwner": {"name": key.namespace, "type": "user", "isParticipating": False},
    }
