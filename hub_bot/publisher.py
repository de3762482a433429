"""Publishing a variant folder in ONE commit, idempotently, and never backwards.

- `repo` mode: `{target_org}/{model}-{method}-{pct}pct`. A missing repo is created private; the worker opens it
  (as far as the source allows, access.py) only after the commit landed, so a crash or a failed upload never
  leaves an empty public repo. An existing repo is first closed at least as far as the source is. The whole
  folder replaces the previous version (files it no longer has are deleted in the same commit).
- `pr` mode: the variant goes to `pruned/{recipe name}/` in a pull request on the source repo. The bot keeps a
  single open PR per source repo: it pushes to its own open PR (`refs/pr/N`) instead of opening a second one.

Before pushing, the target's pruning_recipe.yaml is read. When it already holds this source commit (or the same
model files) and recipe hash, nothing is pushed (`find`). When it holds a commit that descends from this job's
commit, pushing would go back in the source's history: `Superseded` is raised. Commits carry `parent_commit`, so
a concurrent or duplicate push fails with 412 (retried, then found published) instead of publishing twice.
Transient Hub errors while publishing are retried here a few times, waiting at most `inline_wait_max_s` and
never past a stop request; a longer Retry-After sends the job back to the queue instead.

Publishing is separate from pruning: `publish(job, folder, ...)` needs only the folder the build wrote.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from .access import Access, AccessSync
from .errors import Interrupted, Superseded, classify
from .lineage import Lineage
from .store import Job

logger = logging.getLogger(__name__)

RECIPE_FILE = "pruning_recipe.yaml"
PR_TITLE = "Add structurally pruned variants (pruning bot)"
PR_FOLDER = "pruned"


@dataclass(frozen=True)
class Publication:
    repo: str
    revision: str  # 'main' or 'refs/pr/N'
    commit: str
    url: str
    new: bool  # False when the variant was already there


class Publisher:
    def __init__(self, api: HfApi, bot_user: str, access: AccessSync, lineage: Lineage, attempts: int = 3,
                 delay_s: float = 2.0, inline_wait_max_s: float = 10.0, stop: threading.Event | None = None):
        self.api = api
        self.bot_user = bot_user
        self.access = access
        self.lineage = lineage
        self.attempts = attempts
        self.delay_s = delay_s
        self.inline_wait_max_s = inline_wait_max_s
        self.stop = stop or threading.Event()

    # ---------------------------------------------------------------- public
    def find(self, job: Job, content: str | None) -> Publication | None:
        """The existing publication of this job's variant (same recipe, same source commit or model files)."""
        for publication, doc in self._published(job):
            if _matches(doc, job, content):
                return publication
        return None

    def check_not_newer(self, job: Job) -> None:
        """Superseded when the target holds a variant of a descendant of this job's commit."""
        for publication, doc in self._published(job):
            source = (doc.get("result") or {}).get("source") or {}
            held = source.get("sha")
            if (str(source.get("repo", "")).lower() == job.source_repo.lower() and isinstance(held, str)
                    and self.lineage.is_ancestor(job.source_repo, job.source_sha, held)):
                raise Superseded(f"superseded: {publication.repo} ({publication.revision}) holds commit {held[:10]}, "
                                 f"which descends from {job.source_sha[:10]}")

    def publish(self, job: Job, folder: Path, content: str | None, message: str, description: str,
                access: Access, on_created: Callable[[], None] = lambda: None) -> Publication:
        for attempt in range(1, self.attempts + 1):
            try:
                return self._publish_once(job, folder, content, message, description, access, on_created)
            except (Superseded, Interrupted):
                raise
            except Exception as err:
                failure = classify(err)
                delay = max(self.delay_s * 2 ** (attempt - 1), failure.retry_after_s or 0.0)
                if failure.permanent or attempt == self.attempts or delay > self.inline_wait_max_s:
                    raise
                logger.warning("publishing failed (%s), again in %.1fs", failure.reason, delay,
                               extra={"job": job.id, "repo": job.target_repo})
                if self.stop.wait(delay):
                    raise Interrupted("the bot is stopping") from err
        raise AssertionError("unreachable")

    def delete_created(self, job: Job) -> None:
        """Delete the target repo this job created (its job failed for good: no empty repo is left behind)."""
        self.api.delete_repo(job.target_repo, missing_ok=True)
        logger.info("deleted %s, created by this job, which failed", job.target_repo,
                    extra={"job": job.id, "repo": job.target_repo})

    def _publish_once(self, job: Job, folder: Path, content: str | None, message: str, description: str,
                      access: Access, on_created: Callable[[], None]) -> Publication:
        existing = self.find(job, content)
        if existing is not None:
            logger.info("already published, nothing pushed", extra={"job": job.id, "repo": existing.repo})
            return existing
        self.check_not_newer(job)
        if job.publish == "repo":
            return self._publish_repo(job, folder, message, description, access, on_created)
        return self._publish_pr(job, folder, message, description)

    @staticmethod
    def path_in_repo(job: Job, name: str) -> str:
        return name if job.publish == "repo" else f"{PR_FOLDER}/{job.recipe_name}/{name}"

    def web_url(self, repo: str) -> str:
        return f"{self.api.endpoint.rstrip('/')}/{repo}"

    # ---------------------------------------------------------------- repo mode
    def _create_private(self, repo: str) -> bool:
        """Create `repo` private; False when it exists already."""
        try:
            self.api.create_repo(repo, private=True, exist_ok=False)
        except HfHubHTTPError as err:
            if getattr(err.response, "status_code", None) == 409:
                return False
            raise
        return True

    def _publish_repo(self, job: Job, folder: Path, message: str, description: str, access: Access,
                      on_created: Callable[[], None]) -> Publication:
        if self._create_private(job.target_repo):
            on_created()
            logger.info("created %s (private until the variant is in)", job.target_repo,
                        extra={"job": job.id, "repo": job.target_repo})
        else:
            self.access.restrict(job.target_repo, access)
        head = self.api.model_info(job.target_repo).sha
        ops = self._operations(folder, "", self.api.list_repo_files(job.target_repo, revision=head))
        info = self.api.create_commit(job.target_repo, ops, commit_message=message, commit_description=description,
                                      parent_commit=head)
        return Publication(job.target_repo, "main", info.oid, self.web_url(job.target_repo), new=True)

    # ---------------------------------------------------------------- PR mode
    def _open_pr(self, repo: str) -> tuple[int, str] | None:
        """(number, head commit) of the bot's own open PR on `repo`."""
        for d in self.api.get_repo_discussions(repo, author=self.bot_user, discussion_type="pull_request",
                                               discussion_status="open"):
            if d.title == PR_TITLE and d.author == self.bot_user:
                refs = self.api.list_repo_refs(repo, include_pull_requests=True)
                heads = {r.ref: r.target_commit for r in refs.pull_requests or []}
                if d.git_reference in heads:
                    return d.num, heads[d.git_reference]
        return None

    def _publish_pr(self, job: Job, folder: Path, message: str, description: str) -> Publication:
        prefix = f"{PR_FOLDER}/{job.recipe_name}/"
        pr = self._open_pr(job.target_repo)
        if pr is None:
            ops = self._operations(folder, prefix, [])
            info = self.api.create_commit(job.target_repo, ops, commit_message=PR_TITLE,
                                          commit_description=description, create_pr=True,
                                          parent_commit=job.source_sha)
            num = info.pr_num
            logger.info("opened PR #%s", num, extra={"job": job.id, "repo": job.target_repo})
        else:
            num, head = pr
            existing = self.api.list_repo_files(job.target_repo, revision=head)
            ops = self._operations(folder, prefix, existing)
            info = self.api.create_commit(job.target_repo, ops, commit_message=message,
                                          commit_description=description, revision=f"refs/pr/{num}",
                                          parent_commit=head)
            logger.info("updated PR #%s", num, extra={"job": job.id, "repo": job.target_repo})
        return Publication(job.target_repo, f"refs/pr/{num}", info.oid,
                           f"{self.web_url(job.target_repo)}/discussions/{num}", new=True)

    # ---------------------------------------------------------------- helpers
    def _candidates(self, job: Job) -> list[tuple[str, str, str]]:
        """(revision, commit, url) where this job's variant may already be."""
        try:
            if job.publish == "repo":
                return [("main", self.api.model_info(job.target_repo).sha, self.web_url(job.target_repo))]
            out = []
            pr = self._open_pr(job.target_repo)
            if pr is not None:
                out.append((f"refs/pr/{pr[0]}", pr[1], f"{self.web_url(job.target_repo)}/discussions/{pr[0]}"))
            main = self.api.model_info(job.target_repo).sha  # a merged PR: the variant is on main
            return out + [("main", main, self.web_url(job.target_repo))]
        except RepositoryNotFoundError:
            return []

    def _published(self, job: Job) -> list[tuple[Publication, dict]]:
        """What the target holds for this job's variant path: (where, its pruning_recipe.yaml)."""
        out = []
        for revision, commit, url in self._candidates(job):
            doc = self._read_recipe(job.target_repo, commit, self.path_in_repo(job, RECIPE_FILE))
            if doc is not None:
                out.append((Publication(job.target_repo, revision, commit, url, new=False), doc))
        return out

    def _read_recipe(self, repo: str, commit: str, path: str) -> dict | None:
        with tempfile.TemporaryDirectory(prefix="hub-bot-check-") as tmp:
            try:
                local = self.api.hf_hub_download(repo, path, revision=commit, local_dir=tmp)
            except (RemoteEntryNotFoundError, RevisionNotFoundError, RepositoryNotFoundError):
                return None
            try:
                doc = yaml.safe_load(Path(local).read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                return None
        return doc if isinstance(doc, dict) else None

    @staticmethod
    def _operations(folder: Path, prefix: str, existing: list[str]) -> list:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        adds = [CommitOperationAdd(path_in_repo=prefix + p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                for p in files]
        new = {op.path_in_repo for op in adds}
        stale = [CommitOperationDelete(path) for path in existing
                 if path.startswith(prefix) and path not in new and not path.startswith(".")
                 and (prefix or "/" not in path)]
        return adds + stale


def _matches(doc: dict, job: Job, content: str | None) -> bool:
    source = (doc.get("result") or {}).get("source") or {}
    if source.get("recipe_hash") != job.recipe_hash or str(source.get("repo", "")).lower() != job.source_repo.lower():
        return False
    return source.get("sha") == job.source_sha or (content is not None and source.get("content") == content)
