"""From "repo X is now at commit S" (a webhook or a poll) to queued jobs: one per matching recipe and target.

Idempotent by construction: the job table has one row per (repo, sha, recipe, publication mode, target), so a
webhook storm, a poll that sees the same head again or a restart never queues a job twice, while two watch
entries that publish the same recipe in two ways (a new repo and a pull request) make two jobs. Repo names are
spelled as the Hub spells them (`model_info`) before the key is made: the Hub's names ignore case. Repos the bot
publishes to are never sources. Every event of a watched source also brings its variants' access in line with
the source's current one (see access.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from huggingface_hub.errors import RepositoryNotFoundError

from .access import Access, AccessSync
from .config import BotConfig, WatchEntry
from .payload import SHA_RE
from .recipes import RecipeEntry
from .store import JobStore, NewJob

logger = logging.getLogger(__name__)


def target_repo(config: BotConfig, entry: WatchEntry, recipe: RecipeEntry, source_repo: str) -> str:
    """`{target_org}/{model}-{method}-{pct}pct` for new repos; the source repo itself for PRs."""
    if entry.publish == "pr":
        return source_repo
    return f"{entry.target_org or config.target_org}/{source_repo.split('/', 1)[1]}-{recipe.name}"


@dataclass(frozen=True)
class Source:
    """A source repo as the Hub knows it: its canonical name and access."""

    repo: str
    access: Access


@dataclass
class Outcome:
    """What the bot did with an event (the webhook's answer)."""

    status: str  # queued | known | ignored | synced
    jobs: list[int] = field(default_factory=list)
    reason: str | None = None

    def doc(self) -> dict:
        out = {"status": self.status, "jobs": self.jobs}
        if self.reason:
            out["reason"] = self.reason
        return out


class Planner:
    def __init__(self, config: BotConfig, store: JobStore, api=None, access: AccessSync | None = None,
                 wake: Callable[[], None] = lambda: None):
        self.config = config
        self.store = store
        self.api = api
        self.access = access
        self.wake = wake
        self._seen: dict[str, Access] = {}  # the access each source had at its last event

    def source(self, repo_id: str) -> Source | None:
        """The canonical name and access of `repo_id` (None when the bot cannot see it). Hub errors other than
        not-found propagate (the webhook answers 503 so that the Hub delivers again)."""
        try:
            info = self.api.model_info(repo_id)
        except RepositoryNotFoundError:
            return None
        return Source(info.id, Access.of(info))

    def _watched(self, repo_id: str, source: Source | None) -> tuple[Source | None, str | None]:
        if not self.config.entries_for(repo_id):
            return None, "not watched"
        source = source or self.source(repo_id)
        if source is None:
            return None, "not found on the Hub, or not visible to the bot's account"
        if self.store.is_target(source.repo):
            return None, "one of the bot's own publications"
        return source, None

    def on_commit(self, repo_id: str, sha: str, trigger: str, source: Source | None = None) -> Outcome:
        """Queue the jobs for `repo_id` at `sha` (`source`: its canonical name and access, when known)."""
        fields = {"repo": repo_id, "sha": (sha or "")[:12], "trigger": trigger}
        if not SHA_RE.match(sha or ""):
            logger.warning("ignoring an event without a commit sha", extra=fields)
            return Outcome("ignored", reason="no commit sha")
        source, why = self._watched(repo_id, source)
        if source is None:
            logger.debug("event ignored: %s", why, extra=fields)
            return Outcome("ignored", reason=why)
        fields["repo"] = source.repo
        created, known = [], []
        for entry in self.config.entries_for(source.repo):
            for recipe in entry.recipes:
                job_id, new = self.store.enqueue(NewJob(
                    source_repo=source.repo, source_sha=sha, recipe_hash=recipe.hash, recipe_name=recipe.name,
                    recipe_yaml=recipe.as_yaml(), publish=entry.publish,
                    target_repo=target_repo(self.config, entry, recipe, source.repo), private=entry.private,
                    source_private=source.access.private, trigger=trigger))
                (created if new else known).append(job_id)
                if new:
                    logger.info("job queued", extra=fields | {"job": job_id, "recipe": recipe.name, "state": "queued"})
        try:
            self._follow_access(source)
        except Exception as err:  # the jobs are queued; the next event tries again
            logger.warning("could not update the access of the variants of %s: %s", source.repo, err, extra=fields)
        if created:
            self.wake()
            return Outcome("queued", created)
        logger.debug("no new job: already known", extra=fields)
        return Outcome("known", known)

    def on_settings(self, repo_id: str, trigger: str) -> Outcome:
        """A watched source's settings changed: its variants follow its visibility and gating now."""
        source, why = self._watched(repo_id, None)
        if source is None and why == "not found on the Hub, or not visible to the bot's account":
            source = Source(repo_id, Access(private=True))  # the bot lost sight of it: hide its variants
        if source is None:
            return Outcome("ignored", reason=why)
        self._follow_access(source, force=True)
        return Outcome("synced")

    def _follow_access(self, source: Source, force: bool = False) -> None:
        key = source.repo.lower()
        if self.access is None or (not force and self._seen.get(key) == source.access):
            return
        self.access.sync_source(source.repo, source.access)
        self._seen[key] = source.access
