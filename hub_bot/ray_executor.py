"""The Ray executor: the bot process stays the head (webhooks, polling, the job store, ordering, the status page)
and runs each job's build and publication as a Ray task on a worker of the cluster.

    executor = RayExecutor(config, store, worker, api, bot_user, hooks, stop).start()   # connects, or says why not
    executor.run_pending()     # dispatch due jobs (at most max_concurrent), record their outcomes, until idle
    executor.close()

Per job, the head claims it under a lease of its own (owner `ray:...`, one per claim), runs the read-only checks
itself (worker.Worker.check: commit on main, order, source acceptable, already published?), sizes the job from
the source's config.json (resources.py; a job that fits no worker fails for good with the reason) and submits
one task (ray_task.run_job) asking for those resources, with `max_retries=0`: retries go through the job store
with backoff, like a Hub 5xx, so attempts are counted once. No two running jobs share a target repo.

While tasks run, the head renews their leases in the store and tells the desk (desk.py) which ones it holds;
tasks ask the desk at every checkpoint and right before they push, so a task whose lease was lost or whose head
is gone never pushes. The head records every outcome (done, failed, given back); a task that died (its worker
process or node, Ray's memory monitor) counts as a transient failure. When the head dies, Ray ends its tasks and
its desk with it; the next head takes the jobs of `ray:` owners back at once and runs them again, and the
publisher finds a variant that was already pushed instead of pushing it twice.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray

from .config import BotConfig
from .errors import BotError, Failure, classify
from .publisher import Publication
from .ray_task import Secret, TaskSpec, run_job
from .resources import GIB, Resources, build_memory, plan
from .store import RAY_OWNER, Job, JobStore
from .worker import Hook, Ready, Worker

logger = logging.getLogger(__name__)

TICK_S = 0.5  # how often the head looks at its tasks, the desk and the queue
TASK_STAGES = ("downloaded", "pruned", "saved", "published")  # hooks that run inside the task (picklable ones)
DESK_TIMEOUT_S = 30.0


def ray_owner() -> str:
    """A lease owner for one claim of this head (a second claim of the same job gets another)."""
    return f"{RAY_OWNER}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Flight:
    """A job whose Ray task runs (or waits for a worker)."""

    job: Job
    owner: str
    resources: Resources
    expires: float  # the lease's expiry (time.time()), as last renewed
    ref: ray.ObjectRef | None = None
    started: bool = False  # the task reported from its worker
    lost: bool = False


class RayExecutor:
    def __init__(self, config: BotConfig, store: JobStore, worker: Worker, api, bot_user: str,
                 hooks: dict[str, Hook] | None, stop: threading.Event):
        self.config, self.settings = config, config.ray
        self.store, self.worker, self.api, self.bot_user = store, worker, api, bot_user
        self.hooks = dict(hooks or {})
        self.stop = stop
        self.idle = threading.Event()
        self.idle.set()
        self.thread: int | None = None
        self.desk = None
        self._flights: dict[str, Flight] = {}  # by lease owner
        self._own_ray = False
        self._renewed_at = 0.0
        self._stop_sent = False
        self._task = ray.remote(max_retries=0)(run_job)
        self._task_hooks = {k: v for k, v in self.hooks.items() if k in TASK_STAGES}

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "RayExecutor":
        self._connect()
        self._new_desk()
        nodes = _live_nodes()
        logger.info("Ray executor ready: %d node(s), %s CPU, %s GPU; each job asks for %g CPU and %g GPU, at most "
                    "%d at a time", len(nodes), _total(nodes, "CPU"), _total(nodes, "GPU"), self.settings.num_cpus,
                    self.settings.num_gpus, self.settings.max_concurrent)
        return self

    def _new_desk(self) -> None:
        from .desk import Desk

        self.desk = Desk.options(scheduling_strategy=_head_node_strategy()).remote()
        ray.get(self.desk.set_leases.remote({}), timeout=DESK_TIMEOUT_S)

    def close(self) -> None:
        """After run_pending returned (no task in flight): let go of the desk, and of Ray if the bot started it."""
        if self.desk is not None and ray.is_initialized():
            ray.kill(self.desk)
            self.desk = None
        if self._own_ray and ray.is_initialized():
            ray.shutdown()
            self._own_ray = False

    def _connect(self) -> None:
        settings = self.settings
        address = settings.address
        if address not in ("auto", "local"):
            _probe(address, settings.connect_timeout_s)  # a clear error at start, not minutes of Ray retrying
        if ray.is_initialized():  # e.g. a test or an embedding application connected this process already
            logger.info("using the Ray connection this process already has")
            return
        common = dict(log_to_driver=False, configure_logging=False, namespace="hub_bot",
                      runtime_env=settings.runtime_env or None)
        if address == "local":
            cpus = max(1, math.ceil(settings.max_concurrent * settings.num_cpus))
            ray.init(address="local", num_cpus=cpus, num_gpus=0, include_dashboard=False, **common)
            logger.info("started a local Ray instance with %d CPUs", cpus)
        else:
            try:
                ray.init(address=address, **common)
            except Exception as err:  # ConnectionError, AuthenticationError, a missing ray[client], ...
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise BotError(f"Cannot connect to the Ray cluster at {address!r}: {first[:300]} Start it "
                               "(`ray start --head` on the head node) or fix executor.ray.address in the config; "
                               "`executor: local` runs jobs in the bot process instead.") from None
            logger.info("connected to the Ray cluster at %s", address)
        self._own_ray = True

    @property
    def in_flight(self) -> int:
        """Tasks submitted (or about to be) whose outcome the head has not recorded yet."""
        return len(self._flights)

    # ---------------------------------------------------------------- the loop
    def run_pending(self) -> int:
        """Dispatch due jobs as capacity allows and record outcomes until nothing is due or in flight (or, after
        a stop request, until every task gave its job back). Returns how many jobs ended here."""
        self.idle.clear()
        self.thread = threading.get_ident()
        ended = 0
        try:
            while True:
                self._tend()
                while not self.stop.is_set() and len(self._flights) < self.settings.max_concurrent:
                    job = self.store.claim(owner := ray_owner(), self.config.limits.lease_s, one_per_target=True)
                    if job is None:
                        break
                    for stale in self._flights.values():  # this job's earlier task lost its lease: never its push
                        stale.lost = stale.lost or stale.job.id == job.id
                    ended += self._dispatch(job, owner)
                if not self._flights:
                    return ended
                ended += self._collect(TICK_S)
        finally:
            self.thread = None
            self.idle.set()

    def _dispatch(self, job: Job, owner: str) -> int:
        """Check and size a claimed job on the head, then submit its task; 1 when it ended here already."""
        logger.info("job claimed (attempt %d)", job.attempts, extra=job.log_fields)
        try:
            self.worker._hook("claimed", job)
            ready = self.worker.check(job)
            if not isinstance(ready, Ready):  # superseded, or already published: nothing to build
                self.worker.record_done(job, owner, *ready)
                return 1
            self.worker._hook("checked", job)
            resources = self.size(job)
        except Exception as err:
            failure = classify(err)
            self.worker.record_failure(job, owner, failure, exc_info=None if failure.permanent else err)
            return 1
        self._flights[owner] = flight = Flight(job, owner, resources, time.time() + self.config.limits.lease_s)
        try:
            self._tell_desk(wait=True)  # the task's first question finds its lease
            spec = TaskSpec(config=self.config, token=Secret(self.api.token), bot_user=self.bot_user, job=job,
                            owner=owner, ready=ready, desk=self.desk, hooks=self._task_hooks)
            flight.ref = self._task.options(**resources.options(), name=f"hub-bot-job-{job.id}").remote(spec)
        except Exception as err:  # the desk or the cluster went away: back to the queue with backoff
            del self._flights[owner]
            self.worker.record_failure(job, owner, Failure(False, f"Could not submit the job to Ray: "
                                                                  f"{_first_line(err)}"))
            return 1
        self.store.report(job.id, owner, runner={"executor": "ray", "node": None, "asked": resources.to_dict()},
                          progress={"stage": "waiting for a worker", "at": time.time()})
        logger.info("job submitted to Ray: %s", resources.needs.describe(), extra=job.log_fields)
        return 0

    def size(self, job: Job) -> Resources:
        """The job's resources from the source's config.json at its commit (PermanentJobError: fits no worker)."""
        from transformers import AutoConfig

        from core import Recipe

        with tempfile.TemporaryDirectory(prefix="hub-bot-config-") as tmp:
            path = self.api.hf_hub_download(job.source_repo, "config.json", revision=job.source_sha, local_dir=tmp)
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        needs = build_memory(config, Recipe.from_yaml(job.recipe_yaml), self.config.device,
                             self.config.evaluation.max_length)
        return plan(needs, self.settings, None if self.settings.autoscaling else _live_nodes())

    def _tend(self) -> None:
        """Renew the leases of running tasks (every third of the lease), tell the desk, record its reports."""
        lease_s = self.config.limits.lease_s
        now = time.time()
        if now - self._renewed_at >= lease_s / 3:
            self._renewed_at = now
            for flight in self._flights.values():
                if flight.lost:
                    continue
                if self.store.renew(flight.job.id, flight.owner, lease_s):
                    flight.expires = now + lease_s
                else:
                    flight.lost = True
                    logger.error("lost the lease of job %d: its Ray task stops at its next checkpoint and does not "
                                 "publish", flight.job.id, extra=flight.job.log_fields)
        try:
            if self.stop.is_set() and not self._stop_sent and self._flights:
                self._stop_tasks()
            self._tell_desk()
            self._record_reports()
        except ray.exceptions.RayActorError as err:  # its node died: tasks that held the old desk stop and retry
            logger.error("the bot's desk actor died (%s): starting another", _first_line(err))
            self._new_desk()

    def _stop_tasks(self) -> None:
        """A stop request: running tasks give their jobs back at their next checkpoint; waiting ones are
        cancelled (recorded as given back)."""
        self.desk.stop.remote()
        self._stop_sent = True
        waiting = [f for f in self._flights.values() if not f.started and f.ref is not None]
        for flight in waiting:
            ray.cancel(flight.ref)
        logger.info("stopping: %d Ray task(s) give their jobs back at their next checkpoint, %d waiting ones are "
                    "cancelled", len(self._flights) - len(waiting), len(waiting))

    def _tell_desk(self, wait: bool = False) -> None:
        margin = min(10.0, 0.1 * self.config.limits.lease_s)
        now = time.time()
        leases = {f.job.id: (f.owner, max(0.0, f.expires - now - margin)) for f in self._flights.values()
                  if not f.lost}
        call = self.desk.set_leases.remote(leases)
        if wait:
            ray.get(call, timeout=DESK_TIMEOUT_S)

    def _record_reports(self) -> None:
        reports, created = ray.get(self.desk.collect.remote(), timeout=DESK_TIMEOUT_S)
        for job_id, owner in created:
            self.store.mark_created_target(job_id)
        for job_id, entry in reports.items():
            runner, flight = entry.get("runner"), self._flights.get(entry["owner"])
            if runner is not None and flight is not None:
                flight.started = True
                runner = runner | {"asked": flight.resources.to_dict()}
            self.store.report(job_id, entry["owner"], runner=runner, progress=entry.get("progress"))

    def _collect(self, timeout: float) -> int:
        by_ref = {f.ref: f for f in self._flights.values()}
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout)
        if not ready:
            return 0
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        self._record_reports()  # created-repo notes before the outcomes
        for ref in ready:
            self._record(self._flights.pop(by_ref[ref].owner))
        return len(ready)

    def _record(self, flight: Flight) -> str:
        job, owner = flight.job, flight.owner
        try:
            outcome = ray.get(flight.ref)
        except ray.exceptions.TaskCancelledError:
            return self.worker.record_interrupted(job, owner, "its Ray task was cancelled")
        except ray.exceptions.RayError as err:
            failure = classify_ray(err, flight.resources)
            return self.worker.record_failure(job, owner, failure)
        if outcome["kind"] == "done":
            return self.worker.record_done(job, owner, Publication(**outcome["publication"]), outcome["results"])
        if outcome["kind"] == "interrupted":
            return self.worker.record_interrupted(job, owner, outcome["reason"])
        return self.worker.record_failure(job, owner, Failure(outcome["permanent"], outcome["reason"],
                                                              outcome.get("retry_after_s")))


def classify_ray(err: BaseException, resources: Resources | None = None) -> Failure:
    """A task that did not return: its worker process or node died, or Ray's memory monitor killed it (transient:
    retried through the store with backoff); its code could not run there (the cause, classified)."""
    exceptions = ray.exceptions
    if isinstance(err, exceptions.OutOfMemoryError):
        asked = f" (it asked for {resources.memory / GIB:,.1f} GiB of RAM)" if resources else ""
        return Failure(False, f"The Ray task ran out of memory and was killed by Ray's memory monitor{asked}; "
                              "retried. If it keeps happening, give the jobs bigger workers.")
    if isinstance(err, (exceptions.RuntimeEnvSetupError, exceptions.TaskUnschedulableError)):
        return Failure(True, f"Ray cannot run the job: {_first_line(err)}. Check executor.ray (runtime_env, "
                             "resources).")
    if isinstance(err, exceptions.RayTaskError) and err.cause is not None:
        return classify(err.cause)
    if isinstance(err, (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.LocalRayletDiedError,
                        exceptions.OwnerDiedError, exceptions.ObjectLostError, exceptions.RaySystemError)):
        return Failure(False, f"The Ray worker running the job died ({type(err).__name__}); retried.")
    return Failure(False, f"The Ray task failed: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _probe(address: str, timeout: float) -> None:
    """A quick TCP connection to HOST:PORT: Ray itself would wait for minutes on an address nobody answers."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise BotError(f"Cannot reach the Ray cluster at {address!r} ({why}). Start it (`ray start --head` on the "
                       "head node), check the host and port in executor.ray.address, or use `executor: local` to "
                       "run jobs in the bot process.") from None


def _live_nodes() -> list[dict]:
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _total(nodes: list[dict], key: str) -> str:
    return f"{sum(node.get(key, 0) for node in nodes):g}"


def _head_node_strategy():
    """The desk prefers the cluster's head node (the one that lives as long as the cluster)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=True)
    return "DEFAULT"
