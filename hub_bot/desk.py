"""The head's voice in the Ray cluster: one actor, owned by the bot process, so that it dies with it.

Ray tasks ask it at every checkpoint and right before they push "is this job still mine, and is the bot not
stopping?", and tell it where they run and how far they are. Only the head writes the job store: after renewing
its leases in the store it tells the desk which ones it holds and for how long they stay valid (the time left
on the lease, measured on the desk's own clock, so clocks of different machines never meet), and it collects the
tasks' reports. A task whose head died finds no desk to ask, and one whose head stalls finds its lease timed
out: either way it stops without pushing.
"""
from __future__ import annotations

import time

import ray


@ray.remote(num_cpus=0, max_restarts=0)
class Desk:
    def __init__(self):
        self._leases: dict[int, tuple[str, float]] = {}  # job id -> (owner, deadline on this actor's clock)
        self._stopping = False
        self._reports: dict[int, dict] = {}  # job id -> {"owner", "runner", "progress"} (the latest)
        self._created: list[tuple[int, str]] = []

    # ---------------------------------------------------------------- the head
    def set_leases(self, leases: dict[int, tuple[str, float]]) -> None:
        """The leases the head holds now: job id -> (owner, seconds they stay valid from now)."""
        now = time.monotonic()
        self._leases = {job: (owner, now + valid) for job, (owner, valid) in leases.items()}

    def stop(self) -> None:
        """The bot is stopping: every task gives its job back at its next checkpoint."""
        self._stopping = True

    def collect(self) -> tuple[dict[int, dict], list[tuple[int, str]]]:
        """The reports and the created-repo notes since the last call."""
        reports, created = self._reports, self._created
        self._reports, self._created = {}, []
        return reports, created

    # ---------------------------------------------------------------- the tasks
    def check(self, job_id: int, owner: str) -> str | None:
        """None while the job is `owner`'s and the bot goes on; else why the task must stop now."""
        if self._stopping:
            return "the bot is stopping"
        held = self._leases.get(job_id)
        if held is None or held[0] != owner:
            return "the job's lease was lost (the bot took the job back)"
        if time.monotonic() > held[1]:
            return "the job's lease ran out (the bot did not renew it in time)"
        return None

    def report(self, job_id: int, owner: str, runner: dict | None = None, progress: dict | None = None) -> None:
        entry = self._reports.setdefault(job_id, {"owner": owner})
        if entry["owner"] != owner:
            entry.clear()
            entry["owner"] = owner
        if runner is not None:
            entry["runner"] = runner
        if progress is not None:
            entry["progress"] = progress

    def created(self, job_id: int, owner: str) -> bool:
        """The task created its target repo (recorded by the head, so that a permanent failure deletes it)."""
        self._created.append((job_id, owner))
        return True
