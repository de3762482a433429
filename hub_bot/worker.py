"""Running jobs, one at a time: check the source, download it at the exact commit (safetensors and JSON only,
never code), prune, evaluate, write the variant with its card, publish, and record the outcome.

A job that fails is classified (errors.classify): transient failures go back to the queue with exponential
backoff (the Hub's Retry-After is honoured), permanent ones end in `failed` with their reason.
"""
from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import core
from core import LoadOptions, Recipe
from core.model_io import can_stream
from core.streaming import is_streamed

from . import card
from .config import BotConfig
from .errors import PermanentJobError, classify
from .evaluation import Evaluator
from .publisher import PR_FOLDER, Publication, Publisher
from .source import ALLOW_PATTERNS, IGNORE_PATTERNS, check_download, check_source, content_key, publish_dtype
from .store import Job, JobStore

logger = logging.getLogger(__name__)

Hook = Callable[[Job], None]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class Worker:
    def __init__(self, config: BotConfig, store: JobStore, api, publisher: Publisher,
                 hooks: dict[str, Hook] | None = None):
        self.config = config
        self.store = store
        self.api = api
        self.publisher = publisher
        self.evaluator = Evaluator(config.evaluation)
        self.hooks = hooks or {}
        self.read_only = False  # set from whoami: a read-only token fails jobs before any work

    # ---------------------------------------------------------------- loop
    def run_pending(self, stop: threading.Event | None = None) -> int:
        """Run due jobs until none is left (or `stop` is set); returns how many ran."""
        ran = 0
        while not (stop and stop.is_set()):
            job = self.store.claim()
            if job is None:
                return ran
            self.process(job)
            ran += 1
        return ran

    def process(self, job: Job) -> str:
        """Run one claimed job and record its outcome; returns the new state."""
        fields = job.log_fields
        logger.info("job started (attempt %d)", job.attempts, extra=fields)
        self._hook("claimed", job)
        started = time.monotonic()
        try:
            publication, results = self._execute(job)
        except Exception as err:  # KeyboardInterrupt/SystemExit leave the job running: recovered at restart
            return self._failed(job, err)
        results["seconds"] = round(time.monotonic() - started, 2)
        self.store.finish(job.id, publication.repo, publication.commit or None, publication.url or None, results)
        logger.info("job done: %s %s", "published" if publication.new else results.get("note", "nothing to push"),
                    publication.url, extra=fields | {"state": "done", "output": publication.repo,
                                                     "commit": publication.commit[:12]})
        return "done"

    def _failed(self, job: Job, err: Exception) -> str:
        failure = classify(err)
        limits = self.config.limits
        retry_at = None
        if not failure.permanent and job.attempts < limits.max_attempts:
            delay = min(limits.backoff_max_s, limits.backoff_s * 2 ** (job.attempts - 1))
            retry_at = time.time() + max(delay, failure.retry_after_s or 0.0)
        reason = failure.reason
        if not failure.permanent and retry_at is None:
            reason = f"gave up after {job.attempts} attempts: {reason}"
        state = self.store.fail(job.id, reason, failure.permanent, retry_at)
        extra = job.log_fields | {"state": state, "permanent": failure.permanent}
        if state == "queued":
            logger.warning("job failed, retry in %.1fs: %s", retry_at - time.time(), reason, extra=extra)
        else:
            logger.error("job failed: %s", reason, extra=extra, exc_info=not failure.permanent)
        return state

    def _hook(self, stage: str, job: Job) -> None:
        hook = self.hooks.get(stage)
        if hook is not None:
            hook(job)

    # ---------------------------------------------------------------- one job
    def _execute(self, job: Job) -> tuple[Publication, dict]:
        if self.read_only:
            raise PermanentJobError("The bot's token is read-only: it cannot create repos or push. Give the bot a "
                                    "token with the write role, then requeue the job.")
        newer = self.store.newer_job(job)
        if newer is not None:  # e.g. a retry that comes after the next commit: never publish older weights
            return (Publication(job.target_repo, "main", "", "", new=False),
                    {"note": f"superseded by job {newer.id} (commit {newer.source_sha[:10]})"})
        info = self.api.model_info(job.source_repo, revision=job.source_sha, files_metadata=True)
        check_source(info, self.config.limits.max_params)
        if info.gated:
            self.api.auth_check(job.source_repo)  # GatedRepoError without access: permanent
        content = content_key(info)
        existing = self.publisher.find(job, content)
        if existing is not None:  # e.g. the bot stopped after publishing, before recording it
            return existing, {"note": "already published"}
        work = self.config.work_dir
        if work:
            work.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"hub-bot-job{job.id}-", dir=work))
        try:
            return self._build_and_publish(job, tmp, content)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            gc.collect()  # the model's memory is back before the next job loads one

    def _build_and_publish(self, job: Job, tmp: Path, content: str) -> tuple[Publication, dict]:
        src = Path(self.api.snapshot_download(job.source_repo, revision=job.source_sha, local_dir=tmp / "source",
                                              allow_patterns=ALLOW_PATTERNS, ignore_patterns=IGNORE_PATTERNS))
        source_config = check_download(src)
        fields = job.log_fields
        logger.info("downloaded the source at its commit", extra=fields)
        self._hook("downloaded", job)
        recipe = Recipe.from_yaml(job.recipe_yaml)
        opts = LoadOptions(dtype=recipe.load.dtype, device=self.config.device, local_files_only=True)
        # streamed (one decoder block in memory at a time, see core.streaming) whenever the source allows it
        model, tokenizer = core.load_model(str(src), replace(opts, stream=can_stream(str(src), opts)))
        if is_streamed(model):  # changed blocks wait in the job's folder, deleted with it
            model.core_stream.use_work_folder(tmp / "blocks")
        base = self.evaluator.base((job.source_repo, job.source_sha, recipe.load.dtype), model, tokenizer)
        result = core.prune(model, tokenizer, recipe, base_model=str(src))
        logger.info("pruned: %s -> %s parameters", f"{result.params_before['total']:,}",
                    f"{result.params_after['total']:,}", extra=fields)
        self._hook("pruned", job)
        comparison = self.evaluator.compare(base, result.model, tokenizer)
        dtype = publish_dtype(self.config.publish_dtype, source_config)
        if dtype is not None:  # measured in the working dtype, published like the source (no bigger on disk)
            result.model.source_dtype = dtype  # save_pruned writes it in this dtype
        source = card.Source(repo=job.source_repo, sha=job.source_sha, content=content,
                             url=f"{self.api.endpoint.rstrip('/')}/{job.source_repo}/commit/{job.source_sha}",
                             recipe_hash=job.recipe_hash, recipe_name=job.recipe_name)
        name = job.target_repo if job.publish == "repo" else f"{job.target_repo} ({PR_FOLDER}/{job.recipe_name})"
        files = {"README.md": card.variant_card(result, source, name, comparison, card.source_license(src),
                                                self._snippet(job, result)),
                 "pruning_recipe.yaml": card.recipe_file(result, source, comparison)}
        out = core.save_pruned(result, tmp / "variant", repo_name=name, extra_files=files)
        self._hook("saved", job)
        summary = result.summary()
        del model, result
        message = f"{job.recipe_name} of {job.source_repo}@{job.source_sha[:10]}"
        ppl = f"{comparison.base.perplexity:.3f} -> {comparison.pruned.perplexity:.3f}" \
            if comparison.pruned.perplexity is not None else "not measured"
        description = (f"Pruned from {source.url} with recipe `{job.recipe_name}` (hash {job.recipe_hash}): "
                       f"{summary['params_before']:,} -> {summary['params_after']:,} parameters, perplexity {ppl}.")
        publication = self.publisher.publish(job, out, content, message, description)
        self._hook("published", job)
        results = {"params_before": summary["params_before"], "params_after": summary["params_after"],
                   "removed_fraction": summary["params_removed_fraction"], "uniform": summary["uniform"],
                   "perplexity_base": _round(comparison.base.perplexity),
                   "perplexity_pruned": _round(comparison.pruned.perplexity),
                   "speed_ratios": {k: round(v, 4) for k, v in comparison.ratios.items() if "speedup" in k},
                   "lm_eval": comparison.pruned.lm_eval}
        return publication, results

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
