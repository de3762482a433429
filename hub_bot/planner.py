"""From "repo X is now at commit S" (a webhook or a poll) to queued jobs: one per matching recipe.

Idempotent by construction: the job table has one row per (repo, sha, recipe), so a webhook storm, a poll that
sees the same head again or a restart never queues a job twice. Repos the bot publishes to are never sources.
"""
from __future__ import annotations

import logging
import re
from typing import Callable

from .config import BotConfig, WatchEntry
from .recipes import RecipeEntry
from .store import JobStore, NewJob

logger = logging.getLogger(__name__)

SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def target_repo(config: BotConfig, entry: WatchEntry, recipe: RecipeEntry, source_repo: str) -> str:
    """`{target_org}/{model}-{method}-{pct}pct` for new repos; the source repo itself for PRs."""
    if entry.publish == "pr":
        return source_repo
    return f"{entry.target_org or config.target_org}/{source_repo.split('/', 1)[1]}-{recipe.name}"


class Planner:
    def __init__(self, config: BotConfig, store: JobStore, wake: Callable[[], None] = lambda: None):
        self.config = config
        self.store = store
        self.wake = wake

    def on_commit(self, repo_id: str, sha: str, trigger: str) -> list[int]:
        """Queue the jobs for `repo_id` at `sha`; returns the ids of the jobs that are new."""
        fields = {"repo": repo_id, "sha": sha[:12], "trigger": trigger}
        if not SHA_RE.match(sha or ""):
            logger.warning("ignoring an event without a commit sha", extra=fields)
            return []
        entries = self.config.entries_for(repo_id)
        if not entries:
            logger.debug("not watched", extra=fields)
            return []
        if self.store.is_target(repo_id):
            logger.info("ignoring a commit on one of the bot's own publications", extra=fields)
            return []
        created = []
        for entry in entries:
            for recipe in entry.recipes:
                job_id = self.store.enqueue(NewJob(
                    source_repo=repo_id, source_sha=sha, recipe_hash=recipe.hash, recipe_name=recipe.name,
                    recipe_yaml=recipe.as_yaml(), publish=entry.publish,
                    target_repo=target_repo(self.config, entry, recipe, repo_id), private=entry.private,
                    trigger=trigger))
                if job_id is not None:
                    created.append(job_id)
                    logger.info("job queued", extra=fields | {"job": job_id, "recipe": recipe.name, "state": "queued"})
        if created:
            self.wake()
        else:
            logger.debug("no new job: already known", extra=fields)
        return created
