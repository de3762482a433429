"""The worker side of the Ray executor: one Ray task per job builds the variant and publishes it.

The head ran the checks and holds the job's lease; the task gets the job, the checks' result, the config, the
token (inside a `Secret`, which never prints) and a handle on the head's desk (desk.py). It downloads the source
at its commit, prunes, measures and writes the variant exactly as the bot's own worker does (worker.Worker, whose
stages it reuses), asking the desk at every checkpoint whether the job is still its own and, without fail, right
before the target repo is created and before every push. It never writes the job store: it returns its outcome
(done with the publication, failed with the classified reason, or given back) and the head records it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray

from . import throttle
from .access import AccessSync
from .config import BotConfig
from .errors import Interrupted, classify
from .evaluation import Evaluator
from .lineage import Lineage
from .logs import register_secret, setup_logging
from .publisher import Publisher
from .store import Job
from .worker import Hook, Ready, Worker

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0  # between layers, the desk is asked at most this often
DESK_TIMEOUT_S = 30.0  # a desk that does not answer in this time counts as gone
_PROCESS: dict = {}  # per worker process: the set-up done, evaluators by settings


class Secret:
    """A token in transit to a Ray task: its repr and str never show it."""

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


@dataclass(frozen=True)
class TaskSpec:
    config: BotConfig
    token: Secret
    bot_user: str
    job: Job
    owner: str  # this claim's lease owner
    ready: Ready
    desk: Any  # the head's Desk actor handle
    hooks: dict[str, Hook]  # test hooks by stage (picklable), as for the local worker


def run_job(spec: TaskSpec) -> dict:
    """The body of the Ray task: {'kind': 'done', 'publication', 'results'} | {'kind': 'failed', 'permanent',
    'reason', 'retry_after_s'} | {'kind': 'interrupted', 'reason'}."""
    _set_up_process(spec.config)
    from .service import make_api

    token = spec.token.reveal()
    register_secret(token)
    api = make_api(spec.config, token)
    access = AccessSync(api, store=None)  # only the variant's own settings: the head records the rest
    lineage = Lineage(api)
    stop = threading.Event()
    limits = spec.config.limits
    publisher = Publisher(api, spec.bot_user, access, lineage, delay_s=min(limits.backoff_s, limits.inline_wait_max_s),
                          inline_wait_max_s=limits.inline_wait_max_s, stop=stop)
    return RemoteWorker(spec, api, publisher, access, lineage, stop).run(spec.job, spec.ready)


def _set_up_process(config: BotConfig) -> None:
    """Once per Ray worker process: the bot's redacting JSON log lines (in Ray's worker log files), the Hub
    client online, and the throttle on Retry-After."""
    if _PROCESS.get("ready"):
        return
    from huggingface_hub import constants

    setup_logging("INFO", "json")
    constants.HF_HUB_OFFLINE = False  # the task talks to the configured endpoint, whatever the node's env says
    throttle.install(config.limits.inline_wait_max_s)
    if config.torch_threads:
        import torch

        torch.set_num_threads(config.torch_threads)
    _PROCESS["ready"] = True


def _evaluator(config: BotConfig) -> Evaluator:
    """One evaluator per process and settings: the base model's measurement is reused by the next recipe of the
    same commit that lands on this worker."""
    return _PROCESS.setdefault(("evaluator", config.evaluation), Evaluator(config.evaluation))


class RemoteWorker(Worker):
    """worker.Worker's build and publish stages, with the lease, the progress and the created-repo note going
    through the head's desk instead of the job store."""

    def __init__(self, spec: TaskSpec, api, publisher: Publisher, access: AccessSync, lineage: Lineage,
                 stop: threading.Event):
        super().__init__(spec.config, None, api, publisher, access, lineage, spec.hooks, stop, owner=spec.owner)
        self.evaluator = _evaluator(spec.config)
        self.desk = spec.desk
        self._asked_at = 0.0

    def run(self, job: Job, ready: Ready) -> dict:
        started = time.monotonic()
        self._job = job
        fields = job.log_fields
        try:
            self._report(job, runner=self.runner_info())
            self._ensure_held(job, "at the start")
            logger.info("job running on %s (attempt %d)", socket.gethostname(), job.attempts, extra=fields)
            publication, results = self.build_and_publish(job, ready)
        except Interrupted as why:
            logger.warning("job given back: %s", why, extra=fields)
            return {"kind": "interrupted", "reason": str(why)}
        except Exception as err:
            failure = classify(err)
            logger.error("job failed: %s", failure.reason, extra=fields, exc_info=None if failure.permanent else err)
            return {"kind": "failed", "permanent": failure.permanent, "reason": failure.reason,
                    "retry_after_s": failure.retry_after_s}
        results["seconds"] = round(time.monotonic() - started, 2)
        return {"kind": "done", "publication": dataclasses.asdict(publication), "results": results}

    def runner_info(self) -> dict:
        context = ray.get_runtime_context()
        gpus = [str(g) for g in context.get_accelerator_ids().get("GPU", [])]
        return {"executor": "ray", "node": ray.util.get_node_ip_address(), "node_id": context.get_node_id()[:12],
                "host": socket.gethostname(), "pid": os.getpid(), "gpu": ",".join(gpus) or None,
                "device": self.config.device}

    def _ask(self, job_id: int) -> str | None:
        try:
            return ray.get(self.desk.check.remote(job_id, self.owner), timeout=DESK_TIMEOUT_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
            return f"the bot's head is gone ({type(err).__name__})"

    def _interrupt_if_asked(self, where: str) -> None:
        now = time.monotonic()
        if self.stop.is_set():
            raise Interrupted(f"the bot is stopping ({where})")
        if self._job is None or now - self._asked_at < CHECK_EVERY_S:
            return
        self._asked_at = now
        self._ensure_held(self._job, where)

    def _ensure_held(self, job: Job, where: str) -> None:
        why = self._ask(job.id)
        if why is not None:
            if "stopping" in why:
                self.stop.set()  # the publisher's retry waits end too
            raise Interrupted(f"{why} ({where})")

    def _report(self, job: Job, runner: dict | None = None, progress: dict | None = None) -> None:
        self.desk.report.remote(job.id, self.owner, runner, progress)  # fire and forget

    def _mark_created(self, job: Job) -> None:
        try:  # on the head's books before anything is pushed into the repo
            ray.get(self.desk.created.remote(job.id, self.owner), timeout=DESK_TIMEOUT_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
            raise Interrupted(f"the bot's head is gone ({type(err).__name__}) after creating the repo") from err
