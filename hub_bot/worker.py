"""Running jobs, one at a time: check the source, download it at the exact commit (safetensors and JSON only,
never code), prune, evaluate, write the variant with its card, publish, and record the outcome.

Each job is held under an exclusive lease (store.py) that a heartbeat renews while the job runs. The three
stages are separate: `check` (read-only Hub calls: the commit is on main, no newer commit of the same variant is
published or queued, the source is acceptable), `build` (download, prune, measure, write the folder; no Hub
writes, so it could run elsewhere) and `publish` (idempotent, see publisher.py). Between stages (and between the
layers of pruning) the worker looks at its stop flag and its lease: when told to stop, or when the lease was
lost, it gives the job back unfinished (released, the attempt not counted) instead of publishing.

A job that fails is classified (errors.classify): transient failures go back to the queue with exponential
backoff (the Hub's Retry-After is honoured, up to `limits.retry_after_max_s`), permanent ones end in `failed`
with their reason. A repo the job created is deleted when the job fails for good.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import core
from core import LoadOptions, Recipe
from core.prune import should_stream
from core.streaming import is_streamed

from . import card
from .access import Access, AccessSync
from .config import BotConfig
from .errors import Failure, Interrupted, PermanentJobError, Superseded, classify
from .evaluation import Evaluator
from .lineage import Lineage
from .publisher import PR_FOLDER, Publication, Publisher
from .source import ALLOW_PATTERNS, IGNORE_PATTERNS, check_download, check_source, content_key, publish_dtype
from .store import LOCAL_OWNER, Job, JobStore

logger = logging.getLogger(__name__)

Hook = Callable[[Job], None]
PROGRESS_EVERY_S = 1.0  # progress within a stage reaches the store at most this often


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def local_owner() -> str:
    """A lease owner id for this process's worker (unique across restarts)."""
    return f"{LOCAL_OWNER}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Ready:
    """The checks passed: what the build and the publication need to know."""

    access: Access  # the source's, at this commit
    content: str  # hash of the source's model files


@dataclass
class Built:
    """A variant written to `folder`, ready to publish."""

    folder: Path
    message: str
    description: str
    results: dict


class Heartbeat:
    """Renews a job's lease every third of its length until stopped; sets `lost` when the store refuses."""

    def __init__(self, store: JobStore, job_id: int, owner: str, lease_s: float):
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"hub-bot-lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.lease_s / 3):
            if not self.store.renew(self.job_id, self.owner, self.lease_s):
                logger.error("lost the lease of job %d: it will not be published by this worker", self.job_id)
                self.lost.set()
                return

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class Worker:
    def __init__(self, config: BotConfig, store: JobStore, api, publisher: Publisher, access: AccessSync,
                 lineage: Lineage, hooks: dict[str, Hook] | None = None, stop: threading.Event | None = None,
                 owner: str | None = None):
        self.config = config
        self.store = store
        self.api = api
        self.publisher = publisher
        self.access = access
        self.lineage = lineage
        self.evaluator = Evaluator(config.evaluation)
        self.hooks = hooks or {}
        self.stop = stop or threading.Event()
        self.owner = owner or local_owner()
        self.read_only = False  # set from whoami: a read-only token fails jobs before any work
        self.idle = threading.Event()  # set while no job is held
        self.idle.set()
        self.thread: int | None = None  # the thread running the current job
        self._heartbeat: Heartbeat | None = None
        self._job: Job | None = None
        self._last_report = 0.0

    # ---------------------------------------------------------------- loop
    def run_pending(self) -> int:
        """Run due jobs until none is left (or the worker is told to stop); returns how many ran."""
        ran = 0
        while not self.stop.is_set():
            self.idle.clear()
            try:
                job = self.store.claim(self.owner, self.config.limits.lease_s)
                if job is None:
                    return ran
                self.process(job)
            finally:
                self.idle.set()
            ran += 1
        return ran

    def process(self, job: Job) -> str:
        """Run one claimed job and record its outcome; returns the new state."""
        logger.info("job started (attempt %d)", job.attempts, extra=job.log_fields)
        self.thread = threading.get_ident()
        started = time.monotonic()
        try:
            with Heartbeat(self.store, job.id, self.owner, self.config.limits.lease_s) as heartbeat:
                self._heartbeat, self._job = heartbeat, job
                self._report(job, runner=self.runner_info())
                self._hook("claimed", job)
                publication, results = self._execute(job)
        except Interrupted as why:
            return self.record_interrupted(job, self.owner, str(why))
        except Exception as err:  # KeyboardInterrupt/SystemExit leave the job running: recovered at restart
            failure = classify(err)
            return self.record_failure(job, self.owner, failure, exc_info=err if not failure.permanent else None)
        finally:
            self.thread, self._heartbeat, self._job = None, None, None
        results["seconds"] = round(time.monotonic() - started, 2)
        return self.record_done(job, self.owner, publication, results)

    def runner_info(self) -> dict:
        """Where this worker runs jobs (shown on the status page)."""
        return {"executor": "local", "node": socket.gethostname(), "pid": os.getpid(), "device": self.config.device}

    # ---------------------------------------------------------------- outcomes (only the lease holder's count)
    def record_done(self, job: Job, owner: str, publication: Publication, results: dict) -> str:
        fields = job.log_fields
        if not self.store.finish(job.id, owner, publication.repo, publication.commit or None,
                                 publication.url or None, results):
            logger.error("job finished but its lease was lost: not recorded here", extra=fields)
            return "lost"
        note = "published" if publication.new else results.get("note", "nothing to push")
        logger.info("job done: %s %s", note, publication.url, extra=fields | {
            "state": "done", "output": publication.repo, "commit": publication.commit[:12]})
        return "done"

    def record_interrupted(self, job: Job, owner: str, why: str) -> str:
        """The job is given back unfinished (stop request, or its lease was lost): queued, attempt not counted."""
        released = self.store.release(job.id, owner, f"released unfinished: {why}")
        logger.warning("job given back unfinished: %s", why, extra=job.log_fields | {
            "state": "queued" if released else "lost"})
        return "queued" if released else "lost"

    def record_failure(self, job: Job, owner: str, failure: Failure, exc_info: BaseException | None = None) -> str:
        """Transient: back to the queue with exponential backoff (at least the Hub's capped Retry-After), until
        `max_attempts`; permanent: `failed` with the reason, and a repo the job created is deleted."""
        limits = self.config.limits
        retry_at = None
        if not failure.permanent and job.attempts < limits.max_attempts:
            delay = min(limits.backoff_max_s, limits.backoff_s * 2 ** (job.attempts - 1))
            retry_at = time.time() + max(delay, min(failure.retry_after_s or 0.0, limits.retry_after_max_s))
        reason = failure.reason
        if not failure.permanent and retry_at is None:
            reason = f"gave up after {job.attempts} attempts: {reason}"
        state = self.store.fail(job.id, owner, reason, failure.permanent, retry_at)
        extra = job.log_fields | {"state": state or "lost", "permanent": failure.permanent}
        if state == "queued":
            logger.warning("job failed, retry in %.1fs: %s", retry_at - time.time(), reason, extra=extra)
        elif state == "failed":
            logger.error("job failed: %s", reason, extra=extra, exc_info=exc_info)
            self._clean_up(job)
        else:
            logger.error("job failed but its lease was lost: not recorded here (%s)", reason, extra=extra)
        return state or "lost"

    def _clean_up(self, job: Job) -> None:
        """A repo the bot created for this variant that no other job publishes (or will publish) to is deleted:
        no empty repo is left behind."""
        if job.publish != "repo" or not self.store.created_target(job.target_repo) \
                or self.store.target_in_use(job.target_repo, job.id):
            return
        try:
            self.publisher.delete_created(job)
        except Exception as err:  # it stays private (created so): log it for the operator
            logger.error("could not delete %s (private, created by this failed job): %s", job.target_repo,
                         classify(err).reason, extra=job.log_fields)

    def _hook(self, stage: str, job: Job) -> None:
        hook = self.hooks.get(stage)
        if hook is not None:
            hook(job)

    def _interrupt_if_asked(self, where: str) -> None:
        if self.stop.is_set():
            raise Interrupted(f"the bot is stopping ({where})")
        if self._heartbeat is not None and self._heartbeat.lost.is_set():
            raise Interrupted(f"the job's lease was lost ({where})")

    def _ensure_held(self, job: Job, where: str) -> None:
        """Right before a push: the job is still this worker's (asked now, not at the last heartbeat)."""
        if self.stop.is_set():
            raise Interrupted(f"the bot is stopping ({where})")
        if not self.store.holds(job.id, self.owner):
            raise Interrupted(f"the job's lease was lost ({where})")

    def _report(self, job: Job, runner: dict | None = None, progress: dict | None = None) -> None:
        """Where the job runs and how far it is, for the status page (best effort)."""
        self.store.report(job.id, self.owner, runner=runner, progress=progress)

    def _mark_created(self, job: Job) -> None:
        """This job created its target repo (a permanent failure deletes it again)."""
        self.store.mark_created_target(job.id)

    def _checkpoint(self, stage: str, job: Job) -> None:
        """Between stages: give the job back when told to stop or when the lease is gone; then the test hooks."""
        self._interrupt_if_asked(f"after {stage}")
        self._report(job, progress={"stage": stage, "at": time.time()})
        self._hook(stage, job)

    def _progress(self, stage: str, done: int, total: int) -> None:
        """core.prune's progress callback: pruning a big model stops between layers too."""
        self._interrupt_if_asked(f"{stage} {done}/{total}")
        now = time.monotonic()
        if self._job is not None and (done == total or now - self._last_report >= PROGRESS_EVERY_S):
            self._last_report = now
            self._report(self._job, progress={"stage": stage, "done": done, "total": total, "at": time.time()})

    # ---------------------------------------------------------------- one job
    def _execute(self, job: Job) -> tuple[Publication, dict]:
        ready = self.check(job)
        if not isinstance(ready, Ready):
            return ready  # superseded, or already published
        self._checkpoint("checked", job)
        return self.build_and_publish(job, ready)

    def build_and_publish(self, job: Job, ready: Ready) -> tuple[Publication, dict]:
        """The stages after the checks, in a temp folder removed at the end (what a Ray task runs)."""
        work = self.config.work_dir
        if work:
            work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"hub-bot-job{job.id}-", dir=work))
        try:
            built = self.build(job, tmp, ready.content)
            self._checkpoint("saved", job)
            return self.publish(job, built, ready)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()  # the model's memory is back before the next job loads one

    def check(self, job: Job) -> Ready | tuple[Publication, dict]:
        """Read-only checks before any work: Ready to go on, or the job's outcome when there is nothing to do."""
        if self.read_only:
            raise PermanentJobError("The bot's token is read-only: it cannot create repos or push. Give the bot a "
                                    "token with the write role, then requeue the job.")
        info = self.api.model_info(job.source_repo, revision=job.source_sha, files_metadata=True)
        access = Access.of(info)
        self.store.set_source_private(job.source_repo, access.private)
        self._check_policy(job, access)
        if not self.lineage.on_branch(job.source_repo, job.source_sha):
            raise PermanentJobError(f"Commit {job.source_sha} is not on the main branch of {job.source_repo} (the head "
                                    "of a pull request or of another branch?): the bot only prunes commits of main.")
        for other in self.store.same_variant(job):  # order by the source's history, never by arrival
            if self.lineage.is_ancestor(job.source_repo, job.source_sha, other.source_sha):
                return self._settled(job, Publication(job.target_repo, "main", "", "", new=False),
                                     f"superseded by job {other.id} (commit {other.source_sha[:10]}, a descendant)")
        check_source(info, self.config.limits.max_params)
        if info.gated:
            self.api.auth_check(job.source_repo)  # GatedRepoError without access: permanent
        content = content_key(info)
        existing = self.publisher.find(job, content)
        if existing is not None:  # e.g. the bot stopped after publishing, before recording it
            return self._settled(job, existing, "already published")
        try:
            self.publisher.check_not_newer(job)
        except Superseded as why:
            return self._settled(job, Publication(job.target_repo, "main", "", "", new=False), str(why))
        return Ready(access, content)

    def _check_policy(self, job: Job, access: Access) -> None:
        if job.publish != "repo":
            return  # a pull request on the source is exactly as visible as the source
        policy = self.config.visibility
        if access.private and policy.private_sources == "refuse":
            raise PermanentJobError(f"{job.source_repo} is private and the config refuses variants of private sources "
                                    "(visibility.private_sources: refuse).")
        if access.gated and policy.gated_sources == "refuse":
            raise PermanentJobError(f"{job.source_repo} is gated and the config refuses variants of gated sources "
                                    "(visibility.gated_sources: refuse).")

    def _settled(self, job: Job, publication: Publication, note: str) -> tuple[Publication, dict]:
        """A job with nothing to build: its variant repo still follows the source's access."""
        if job.publish == "repo":
            self.access.sync_target(job.target_repo, job.source_repo, job.private)
        return publication, {"note": note}

    def build(self, job: Job, tmp: Path, content: str) -> Built:
        """Download the source at its commit, prune, measure and write the variant folder (no Hub writes)."""
        src = Path(self.api.snapshot_download(job.source_repo, revision=job.source_sha, local_dir=tmp / "source",
                                              allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
        source_config = check_download(src)
        fields = job.log_fields
        logger.info("downloaded the source at its commit", extra=fields)
        self._checkpoint("downloaded", job)
        recipe = Recipe.from_yaml(job.recipe_yaml)
        opts = LoadOptions(dtype=recipe.load.dtype, device=self.config.device, local_files_only=True)
        # streamed (one decoder block in memory at a time, see core.streaming) whenever the source and the recipe
        # allow it (recovery training and whole-model gradients need the model in memory)
        model, tokenizer = core.load_model(str(src), replace(opts, stream=should_stream(recipe, str(src), opts)))
        if is_streamed(model):  # changed blocks wait in the job's folder, deleted with it
            model.core_stream.use_work_folder(tmp / "blocks")
            logger.info("streaming the source from disk, one decoder block at a time", extra=fields)
        base = self.evaluator.base((job.source_repo, job.source_sha, recipe.load.dtype), model, tokenizer)
        result = core.prune(model, tokenizer, recipe, progress=self._progress, base_model=str(src))
        logger.info("pruned: %s -> %s parameters", f"{result.params_before['total']:,}",
                    f"{result.params_after['total']:,}", extra=fields)
        self._checkpoint("pruned", job)
        comparison = self.evaluator.compare(base, result.model, tokenizer)
        dtype = publish_dtype(self.config.publish_dtype, source_config)
        if dtype is not None:  # measured in the working dtype, published like the source (no bigger on disk)
            result.model.source_dtype = dtype  # save_pruned writes it in this dtype
        source = card.Source(repo=job.source_repo, sha=job.source_sha, content=content,
                             url=f"{self.api.endpoint.rstrip('/')}/{job.source_repo}/commit/{job.source_sha}",
                             recipe_hash=job.recipe_hash, recipe_name=job.recipe_name)
        name = job.target_repo if job.publish == "repo" else f"{job.target_repo} ({PR_FOLDER}/{job.recipe_name})"
        files = {"README.md": card.variant_card(result, source, name, comparison, card.source_terms(src),
                                                self._snippet(job, result)),
                 "pruning_recipe.yaml": card.recipe_file(result, source, comparison)}
        out = core.save_pruned(result, tmp / "variant", repo_name=name, extra_files=files)
        summary = result.summary()
        del model, result
        ppl = f"{comparison.base.perplexity:.3f} -> {comparison.pruned.perplexity:.3f}" \
            if comparison.pruned.perplexity is not None else "not measured"
        description = (f"Pruned from {source.url} with recipe `{job.recipe_name}` (hash {job.recipe_hash}): "
                       f"{summary['params_before']:,} -> {summary['params_after']:,} parameters, perplexity {ppl}.")
        results = {"params_before": summary["params_before"], "params_after": summary["params_after"],
                   "removed_fraction": summary["params_removed_fraction"], "uniform": summary["uniform"],
                   "perplexity_base": _round(comparison.base.perplexity),
                   "perplexity_pruned": _round(comparison.pruned.perplexity),
                   "speed_ratios": {k: round(v, 4) for k, v in comparison.ratios.items() if "speedup" in k},
                   "lm_eval": comparison.pruned.lm_eval,
                   **({"sparsity": summary["sparsity"]["sparsity"]} if "sparsity" in summary else {})}
        return Built(Path(out), f"{job.recipe_name} of {job.source_repo}@{job.source_sha[:10]}", description, results)

    def publish(self, job: Job, built: Built, ready: Ready) -> tuple[Publication, dict]:
        """Push the built folder (idempotent), then give the variant repo the source's access."""
        try:
            publication = self.publisher.publish(job, built.folder, ready.content, built.message, built.description,
                                                 ready.access.for_variant(job.private),
                                                 on_created=lambda: self._mark_created(job),
                                                 guard=lambda: self._ensure_held(job, "before the push"))
        except Superseded as why:  # a newer commit landed while this one was built
            return self._settled(job, Publication(job.target_repo, "main", "", "", new=False), str(why))
        self._hook("published", job)
        if job.publish == "repo":
            self.access.sync_target(job.target_repo, job.source_repo, job.private)
        return publication, dict(built.results) if publication.new else {"note": "already published"}

    def _snippet(self, job: Job, result) -> str | None:
        if job.publish == "repo":
            return None  # the core's snippet for the target repo
        folder = f"{PR_FOLDER}/{job.recipe_name}"
        if result.uniform:
            return ("from transformers import AutoModelForCausalLM\n"
                    f"model = AutoModelForCausalLM.from_pretrained({job.target_repo!r}, subfolder={folder!r})"
                    "  # before the merge: revision='refs/pr/N'")
        return ("# per-layer sizes: load with the pruning tool\n"
                "import core\n"
                f"model = core.load_pruned({job.target_repo!r}, subfolder={folder!r})"
                "  # before the merge: revision='refs/pr/N'")
