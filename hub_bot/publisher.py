"""Publishing a variant folder in ONE commit, idempotently.

- `repo` mode: `{target_org}/{model}-{method}-{pct}pct`, created if needed; the whole folder replaces the
  previous version (files it no longer has are deleted in the same commit).
- `pr` mode: the variant goes to `pruned/{recipe name}/` in a pull request on the source repo. The bot keeps a
  single open PR per source repo: it pushes to its own open PR (`refs/pr/N`) instead of opening a second one.

Before pushing, the target's pruning_recipe.yaml is read: when it already holds this source commit (or the
same model files) and recipe hash, nothing is pushed. Commits carry `parent_commit`, so a concurrent or
duplicate push fails with 412 (retried, then found published) instead of publishing twice. Transient Hub errors
while publishing are retried here a few times (check and push again from the top), so a 502 does not cost a
whole new download and pruning; what still fails goes to the job's own retry with backoff.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from .errors import classify
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
    def __init__(self, api: HfApi, bot_user: str, attempts: int = 3, delay_s: float = 2.0):
        self.api = api
        self.bot_user = bot_user
        self.attempts = attempts
        self.delay_s = delay_s

    # ---------------------------------------------------------------- public
    def find(self, job: Job, content: str | None) -> Publication | None:
        """The existing publication of this job's variant (same recipe, same source commit or model files)."""
        for revision, commit, url in self._candidates(job):
            doc = self._read_recipe(job.target_repo, commit, self.path_in_repo(job, RECIPE_FILE))
            if doc is not None and _matches(doc, job, content):
                return Publication(job.target_repo, revision, commit, url, new=False)
        return None

    def publish(self, job: Job, folder: Path, content: str | None, message: str, description: str) -> Publication:
        for attempt in range(1, self.attempts + 1):
            try:
                return self._publish_once(job, folder, content, message, description)
            except Exception as err:
                failure = classify(err)
                if failure.permanent or attempt == self.attempts:
                    raise
                delay = max(self.delay_s * 2 ** (attempt - 1), failure.retry_after_s or 0.0)
                logger.warning("publishing failed (%s), again in %.1fs", failure.reason, delay,
                               extra={"job": job.id, "repo": job.target_repo})
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _publish_once(self, job: Job, folder: Path, content: str | None, message: str,
                      description: str) -> Publication:
        existing = self.find(job, content)
        if existing is not None:
            logger.info("already published, nothing pushed", extra={"job": job.id, "repo": existing.repo})
            return existing
        if job.publish == "repo":
            return self._publish_repo(job, folder, message, description)
        return self._publish_pr(job, folder, message, description)

    @staticmethod
    def path_in_repo(job: Job, name: str) -> str:
        return name if job.publish == "repo" else f"{PR_FOLDER}/{job.recipe_name}/{name}"

    def web_url(self, repo: str) -> str:
        return f"{self.api.endpoint.rstrip('/')}/{repo}"

    # ---------------------------------------------------------------- repo mode
    def _publish_repo(self, job: Job, folder: Path, message: str, description: str) -> Publication:
        self.api.create_repo(job.target_repo, private=job.private, exist_ok=True)
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
    if source.get("recipe_hash") != job.recipe_hash or source.get("repo") != job.source_repo:
        return False
    return source.get("sha") == job.source_sha or (content is not None and source.get("content") == content)
