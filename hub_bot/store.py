"""The job table in an embedded SQLite database (WAL): one job per (source repo, source commit, recipe).

States: queued -> running -> done | failed. A transient failure puts the job back to `queued` with
`next_attempt_at` in the future (exponential backoff); a permanent one, or too many attempts, ends in `failed`
with the reason. Every transition is one transaction. A bot that dies mid-job leaves its job `running`;
`recover()` at the next start puts it back to `queued` (its attempt counted), or fails it when it keeps dying.

The table holds no secret: tokens never reach it (error texts are redacted before they are stored).
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .logs import redact

logger = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_repo TEXT NOT NULL,
    source_sha TEXT NOT NULL,
    recipe_hash TEXT NOT NULL,
    recipe_name TEXT NOT NULL,
    recipe_yaml TEXT NOT NULL,
    publish TEXT NOT NULL CHECK (publish IN ('repo', 'pr')),
    target_repo TEXT NOT NULL,
    private INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    error TEXT,
    permanent INTEGER NOT NULL DEFAULT 0,
    trigger TEXT,
    output_repo TEXT,
    output_commit TEXT,
    output_url TEXT,
    results TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (source_repo, source_sha, recipe_hash)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at);
"""


@dataclass(frozen=True)
class Job:
    id: int
    source_repo: str
    source_sha: str
    recipe_hash: str
    recipe_name: str
    recipe_yaml: str
    publish: str
    target_repo: str
    private: bool
    state: str
    attempts: int
    next_attempt_at: float
    error: str | None
    permanent: bool
    trigger: str | None
    output_repo: str | None
    output_commit: str | None
    output_url: str | None
    results: dict | None
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        data = dict(row)
        data["private"] = bool(data["private"])
        data["permanent"] = bool(data["permanent"])
        data["results"] = json.loads(data["results"]) if data["results"] else None
        return cls(**data)

    @property
    def log_fields(self) -> dict:
        return {"job": self.id, "repo": self.source_repo, "sha": self.source_sha[:12], "recipe": self.recipe_name,
                "state": self.state}

    def public(self) -> dict:
        """What the status endpoint shows."""
        out = {k: getattr(self, k) for k in ("id", "source_repo", "source_sha", "recipe_name", "recipe_hash",
                                             "publish", "target_repo", "state", "attempts", "error", "permanent",
                                             "trigger", "output_repo", "output_commit", "output_url", "results",
                                             "created_at", "updated_at")}
        out["next_attempt_at"] = self.next_attempt_at if self.state == "queued" else None
        return out


@dataclass(frozen=True)
class NewJob:
    source_repo: str
    source_sha: str
    recipe_hash: str
    recipe_name: str
    recipe_yaml: str
    publish: str
    target_repo: str
    private: bool = False
    trigger: str | None = None


class JobStore:
    """Thread-safe access to the job table (one short-lived connection per operation)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._read() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # explicit transactions below
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    # ---------------------------------------------------------------- writes
    def enqueue(self, job: NewJob) -> int | None:
        """Insert a queued job; None when this (repo, sha, recipe) already has one (idempotent)."""
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO jobs (source_repo, source_sha, recipe_hash, recipe_name, recipe_yaml, publish,"
                " target_repo, private, state, next_attempt_at, trigger, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job.source_repo, job.source_sha, job.recipe_hash, job.recipe_name, job.recipe_yaml, job.publish,
                 job.target_repo, int(job.private), now, job.trigger, now, now))
            return cur.lastrowid if cur.rowcount else None

    def claim(self, now: float | None = None) -> Job | None:
        """Move the oldest due queued job to `running` (counting the attempt) and return it."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute("SELECT id FROM jobs WHERE state = 'queued' AND next_attempt_at <= ? "
                               "ORDER BY next_attempt_at, id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ? WHERE id = ?",
                         (now, row["id"]))
            return Job.from_row(conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def finish(self, job_id: int, output_repo: str, output_commit: str | None, output_url: str | None,
               results: dict | None) -> None:
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET state = 'done', error = NULL, output_repo = ?, output_commit = ?, "
                         "output_url = ?, results = ?, updated_at = ? WHERE id = ? AND state = 'running'",
                         (output_repo, output_commit, output_url, json.dumps(results) if results else None,
                          time.time(), job_id))

    def fail(self, job_id: int, error: str, permanent: bool, retry_at: float | None) -> str:
        """Record a failure: back to `queued` at `retry_at`, or `failed` when `retry_at` is None. Returns the state."""
        state = "failed" if retry_at is None else "queued"
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET state = ?, error = ?, permanent = ?, next_attempt_at = ?, updated_at = ? "
                         "WHERE id = ? AND state = 'running'",
                         (state, redact(error)[:2000], int(permanent), retry_at or 0.0, time.time(), job_id))
        return state

    def recover(self, max_attempts: int) -> list[int]:
        """Jobs left `running` by a bot that died: back to `queued`, or `failed` after `max_attempts` attempts."""
        now = time.time()
        with self._tx() as conn:
            rows = conn.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            for row in rows:
                if row["attempts"] >= max_attempts:
                    conn.execute("UPDATE jobs SET state = 'failed', error = ?, updated_at = ? WHERE id = ?",
                                 (f"The bot stopped during this job {row['attempts']} times; giving up.", now,
                                  row["id"]))
                else:
                    conn.execute("UPDATE jobs SET state = 'queued', next_attempt_at = ?, updated_at = ?, "
                                 "error = 'interrupted: the bot stopped during this job' WHERE id = ?",
                                 (now, now, row["id"]))
        return [row["id"] for row in rows]

    def requeue(self, job_id: int) -> bool:
        """Queue a failed job again from scratch (an operator's decision, e.g. after granting access)."""
        with self._tx() as conn:
            cur = conn.execute("UPDATE jobs SET state = 'queued', attempts = 0, permanent = 0, next_attempt_at = ?, "
                               "updated_at = ? WHERE id = ? AND state = 'failed'", (time.time(), time.time(), job_id))
            return bool(cur.rowcount)

    # ---------------------------------------------------------------- reads
    def get(self, job_id: int) -> Job | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def jobs(self, state: str | None = None, limit: int = 500) -> list[Job]:
        query, args = "SELECT * FROM jobs", []
        if state:
            query, args = query + " WHERE state = ?", [state]
        with self._read() as conn:
            rows = conn.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._read() as conn:
            rows = conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {r["state"]: r["n"] for r in rows}

    def next_due(self) -> float | None:
        """When the next queued job becomes due (None when nothing is queued)."""
        with self._read() as conn:
            row = conn.execute("SELECT MIN(next_attempt_at) AS t FROM jobs WHERE state = 'queued'").fetchone()
        return row["t"]

    def newer_job(self, job: Job) -> Job | None:
        """A later job (a later commit) for the same variant that is not failed: it makes `job` obsolete."""
        with self._read() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE source_repo = ? AND recipe_hash = ? AND target_repo = ? "
                               "AND id > ? AND state != 'failed' ORDER BY id DESC LIMIT 1",
                               (job.source_repo, job.recipe_hash, job.target_repo, job.id)).fetchone()
        return Job.from_row(row) if row else None

    def is_target(self, repo_id: str) -> bool:
        """Whether `repo_id` is a repo the bot publishes to (its own output: never a source)."""
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM jobs WHERE publish = 'repo' AND (lower(target_repo) = lower(?) "
                               "OR lower(output_repo) = lower(?)) LIMIT 1", (repo_id, repo_id)).fetchone()
        return row is not None
