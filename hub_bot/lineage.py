"""The order of a source's commits, from the Hub (never from the order in which events arrived).

A job may only publish a commit of the watched branch (`main`): its head or an ancestor of it, so a sha named
in a webhook that is the head of an unmerged pull request, of another branch, or of nothing at all is refused.
Between two commits of the same variant, the descendant wins: a job whose commit is an ancestor of a commit
that another job publishes (or that the target already holds) is superseded and never overwrites it.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

logger = logging.getLogger(__name__)

BRANCH = "main"


class Lineage:
    def __init__(self, api, cache_size: int = 256):
        self.api = api
        self._cache: OrderedDict[tuple[str, str], frozenset[str]] = OrderedDict()
        self._size = cache_size

    def ancestors(self, repo: str, sha: str) -> frozenset[str]:
        """Every commit reachable from `sha`, itself included (the history of a commit never changes: cached)."""
        key = (repo.lower(), sha)
        if key not in self._cache:
            self._cache[key] = frozenset(c.commit_id for c in self.api.list_repo_commits(repo, revision=sha))
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def on_branch(self, repo: str, sha: str, branch: str = BRANCH) -> bool:
        """Whether `sha` is the head of `branch` or one of its ancestors (read from the Hub now)."""
        head = self.api.list_repo_refs(repo)
        heads = {b.name: b.target_commit for b in head.branches}
        if branch not in heads:
            return False
        return sha == heads[branch] or sha in self.ancestors(repo, heads[branch])

    def is_ancestor(self, repo: str, older: str, newer: str) -> bool:
        """Whether `older` is a strict ancestor of `newer` (False when `newer` is no commit of the repo, any more)."""
        if older == newer:
            return False
        try:
            return older in self.ancestors(repo, newer)
        except (RevisionNotFoundError, RepositoryNotFoundError):
            return False
