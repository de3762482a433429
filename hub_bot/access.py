"""A variant is never more visible than its source.

A source's access is its visibility (public/private) and its gating (False, "auto" or "manual"), read from the
Hub. A variant repo gets the same (private also when its watch entry says `private: true`): a private source
makes a private variant, a gated source a gated variant with the same approval mode (the card carries the
license and the `extra_gated_*` fields, see card.py). The bot creates variant repos private, pushes, and only
then opens them as far as the source allows; a source that the bot can no longer see counts as private.

Changes of the source are followed on its next event (a push or a settings change): `sync_source` applies the
source's current access to every variant repo published from it. Settings are read and written under one lock,
so a job finishing and a settings event never interleave into a stale, wider setting.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from huggingface_hub.errors import RepositoryNotFoundError

from .store import JobStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Access:
    private: bool
    gated: str | bool = False  # False, "auto" or "manual"

    @classmethod
    def of(cls, info) -> "Access":
        """The access of a repo from its model_info."""
        return cls(private=bool(info.private), gated=info.gated or False)

    def for_variant(self, forced_private: bool) -> "Access":
        return Access(private=self.private or forced_private, gated=self.gated)


HIDDEN = Access(private=True)  # a source the bot cannot see (deleted, or made private to others)


class AccessSync:
    def __init__(self, api, store: JobStore):
        self.api = api
        self.store = store
        self._lock = threading.RLock()

    def source_access(self, repo_id: str) -> Access:
        try:
            return Access.of(self.api.model_info(repo_id))
        except RepositoryNotFoundError:
            return HIDDEN

    def restrict(self, target: str, wanted: Access) -> None:
        """Before pushing to an existing variant repo: close it at least as far as `wanted` (never opens)."""
        with self._lock:
            self._apply(target, wanted, widen=False)

    def sync_target(self, target: str, source_repo: str, forced_private: bool) -> Access:
        """Give `target` the source's current access (read now); returns what was applied."""
        with self._lock:
            wanted = self.source_access(source_repo).for_variant(forced_private)
            self._apply(target, wanted, widen=True)
            return wanted

    def sync_source(self, source_repo: str, access: Access | None = None) -> list[str]:
        """Apply the source's access (`access`, else read now) to every variant repo published from it."""
        with self._lock:
            access = access or self.source_access(source_repo)
            self.store.set_source_private(source_repo, access.private)
            changed = []
            for target, forced_private in self.store.published_targets(source_repo):
                if self._apply(target, access.for_variant(forced_private), widen=True):
                    changed.append(target)
        if changed:
            logger.info("variants of %s now follow its access (private=%s, gated=%s): %s", source_repo,
                        access.private, access.gated, ", ".join(changed), extra={"repo": source_repo})
        return changed

    def _apply(self, target: str, wanted: Access, widen: bool) -> bool:
        """Make `target` private first when it must be, then set its gating, and make it public last: no moment
        where it is more visible than `wanted`. Without `widen`, only what closes it is done."""
        try:
            current = Access.of(self.api.model_info(target))
        except RepositoryNotFoundError:
            return False  # nothing published there (or deleted meanwhile): nothing to protect
        steps = []
        if wanted.private and not current.private:
            steps.append({"private": True})
        if wanted.gated != current.gated and (widen or wanted.gated):
            steps.append({"gated": wanted.gated})
        if widen and current.private and not wanted.private:
            steps.append({"private": False})
        for step in steps:
            self.api.update_repo_settings(target, **step)
        return bool(steps)
