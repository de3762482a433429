"""The job table in an embedded SQLite database (WAL): one job per (source repo, source commit, recipe, publication
mode, target).

States: queued -> running -> done | failed. A job is claimed with an exclusive, renewable lease (owner + expiry):
only the lease holder may renew, finish, fail or release it, so a worker that lost its lease (it stalled past the
expiry and someone recovered the job) can no longer record anything. A transient failure puts the job back to
`queued` with `next_attempt_at` in the future (exponential backoff); a permanent one, or too many attempts, ends in
`failed` with the reason. A worker that is told to stop mid-job releases it (back to `queued`, the attempt not
counted). Every transition is one transaction. `recover()` puts running jobs whose holder is gone back to `queued`
(their attempt counted), or fails them when they keep dying.

The in-process worker's owners start with `local:`; one bot per database (its lock file), so at start every
`local:` lease belongs to a dead process. Leases of other executors are recovered when they expire.

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
SCHEMA_VERSION = 2
LOCAL_OWNER = "local:"

_COLUMNS = """
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source_repo TEXT NOT NULL,
    source_sha TEXT NOT NULL,
    recipe_hash TEXT NOT NULL,
    recipe_name TEXT NOT NULL,
    recipe_yaml TEXT NOT NULL,
    publish TEXT NOT NULL CHECK (publish IN ('repo', 'pr')),
    target_repo TEXT NOT NULL,
    private INTEGER NOT NULL DEFAULT 0,
    source_private INTEGER,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_expires REAL,
    created_target INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    permanent INTEGER NOT NULL DEFAULT 0,
    trigger TEXT,
    output_repo TEXT,
    output_commit TEXT,
    output_url TEXT,
    results TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
"""
# The job key: repo names compare ignoring case, as on the Hub.
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs (lower(source_repo), source_sha, recipe_hash, publish,
                                                    lower(target_repo));
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, next_attempt_at);
"""
# Columns of schema 1 (unique on source repo, sha and recipe only), copied over when an old database is opened.
_V1_COLUMNS = ("id", "source_repo", "source_sha", "recipe_hash", "recipe_name", "recipe_yaml", "publish",
               "target_repo", "private", "state", "attempts", "next_attempt_at", "error", "permanent", "trigger",
               "output_repo", "output_commit", "output_url", "results", "created_at", "updated_at")


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
    private: bool  # the watch entry asks for private variants
    source_private: bool | None  # the source's visibility when last seen (None: not known)
    state: str
    attempts: int
    next_attempt_at: float
    lease_owner: str | None
    lease_expires: float | None
    created_target: bool  # this job created its target repo (deleted again if the job fails for good)
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
        for key in ("private", "permanent", "created_target"):
            data[key] = bool(data[key])
        data["source_private"] = None if data["source_private"] is None else bool(data["source_private"])
        data["results"] = json.loads(data["results"]) if data["results"] else None
        return cls(**data)

    @property
    def log_fields(self) -> dict:
        return {"job": self.id, "repo": self.source_repo, "sha": self.source_sha[:12], "recipe": self.recipe_name,
                "state": self.state}

    @property
    def confidential(self) -> bool:
        """Whether the job's names must stay hidden from anonymous viewers (private, or not known to be public)."""
        return self.private or self.source_private is not False

    def public(self) -> dict:
        """What the status endpoint shows an operator."""
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
    source_private: bool | None = None
    trigger: str | None = None

    @property
    def key(self) -> tuple:
        """What makes two jobs the same job."""
        return (self.source_repo.lower(), self.source_sha, self.recipe_hash, self.publish, self.target_repo.lower())


class JobStore:
    """Thread- and process-safe access to the job table (one short-lived connection per operation)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._read() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        with self._tx() as conn:
            self._migrate(conn)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
        if exists and version < SCHEMA_VERSION:  # schema 1: rebuild the table with the wider job key
            conn.execute(f"CREATE TABLE jobs_v2 ({_COLUMNS})")
            columns = ", ".join(_V1_COLUMNS)
            conn.execute(f"INSERT INTO jobs_v2 ({columns}) SELECT {columns} FROM jobs")
            conn.execute("DROP TABLE jobs")
            conn.execute("ALTER TABLE jobs_v2 RENAME TO jobs")
            logger.info("job table upgraded to schema %d", SCHEMA_VERSION)
        elif not exists:
            conn.execute(f"CREATE TABLE jobs ({_COLUMNS})")
        for statement in _INDEXES.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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

    @staticmethod
    def _row(conn: sqlite3.Connection, job_id: int) -> Job:
        return Job.from_row(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    # ---------------------------------------------------------------- writes
    def enqueue(self, job: NewJob) -> tuple[int, bool]:
        """(id, True) for a new queued job; (id of the existing one, False) when its key is known (idempotent).
        The existence check comes first, so that duplicates do not use up job ids."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT id FROM jobs WHERE lower(source_repo) = ? AND source_sha = ? AND recipe_hash = ?"
                               " AND publish = ? AND lower(target_repo) = ?", job.key).fetchone()
            if row is not None:
                return row["id"], False
            cur = conn.execute(
                "INSERT INTO jobs (source_repo, source_sha, recipe_hash, recipe_name, recipe_yaml, publish,"
                " target_repo, private, source_private, state, next_attempt_at, trigger, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                (job.source_repo, job.source_sha, job.recipe_hash, job.recipe_name, job.recipe_yaml, job.publish,
                 job.target_repo, int(job.private), None if job.source_private is None else int(job.source_private),
                 now, job.trigger, now, now))
            return cur.lastrowid, True

    def claim(self, owner: str, lease_s: float, now: float | None = None) -> Job | None:
        """Give the oldest due queued job to `owner` for `lease_s` seconds (`running`, the attempt counted)."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute("SELECT id FROM jobs WHERE state = 'queued' AND next_attempt_at <= ? "
                               "ORDER BY next_attempt_at, id LIMIT 1", (now,)).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, "
                         "lease_expires = ?, updated_at = ? WHERE id = ?", (owner, now + lease_s, now, row["id"]))
            return self._row(conn, row["id"])

    def renew(self, job_id: int, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease; False when it does not hold the job any more (the lease was lost)."""
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute("UPDATE jobs SET lease_expires = ? WHERE id = ? AND state = 'running' AND "
                               "lease_owner = ? AND lease_expires >= ?", (now + lease_s, job_id, owner, now))
            return bool(cur.rowcount)

    def holds(self, job_id: int, owner: str) -> bool:
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM jobs WHERE id = ? AND state = 'running' AND lease_owner = ? AND "
                               "lease_expires >= ?", (job_id, owner, time.time())).fetchone()
        return row is not None

    def finish(self, job_id: int, owner: str, output_repo: str, output_commit: str | None, output_url: str | None,
               results: dict | None) -> bool:
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'done', error = NULL, output_repo = ?, output_commit = ?, output_url = ?, "
                "results = ?, lease_owner = NULL, lease_expires = NULL, updated_at = ? "
                "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                (output_repo, output_commit, output_url, json.dumps(results) if results else None, time.time(),
                 job_id, owner))
            return bool(cur.rowcount)

    def fail(self, job_id: int, owner: str, error: str, permanent: bool, retry_at: float | None) -> str | None:
        """Record a failure: back to `queued` at `retry_at`, or `failed` when `retry_at` is None. Returns the new
        state, or None when `owner` does not hold the job (nothing recorded)."""
        state = "failed" if retry_at is None else "queued"
        with self._tx() as conn:
            cur = conn.execute("UPDATE jobs SET state = ?, error = ?, permanent = ?, next_attempt_at = ?, "
                               "lease_owner = NULL, lease_expires = NULL, updated_at = ? "
                               "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                               (state, redact(error)[:2000], int(permanent), retry_at or 0.0, time.time(), job_id,
                                owner))
        return state if cur.rowcount else None

    def release(self, job_id: int, owner: str, note: str) -> bool:
        """Give a job back unfinished (the worker stops): `queued`, due now, this attempt not counted."""
        now = time.time()
        with self._tx() as conn:
            cur = conn.execute("UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), error = ?, "
                               "next_attempt_at = ?, lease_owner = NULL, lease_expires = NULL, updated_at = ? "
                               "WHERE id = ? AND state = 'running' AND lease_owner = ?",
                               (note, now, now, job_id, owner))
            return bool(cur.rowcount)

    def recover(self, max_attempts: int, dead_owner_prefix: str | None = None, now: float | None = None) -> list[int]:
        """Running jobs whose holder is gone (lease expired, or owner starting with `dead_owner_prefix`): back to
        `queued`, or `failed` after `max_attempts` attempts."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            rows = conn.execute("SELECT id, attempts, lease_owner, lease_expires FROM jobs WHERE state = 'running'"
                                ).fetchall()
            gone = [r for r in rows if r["lease_expires"] is None or r["lease_expires"] < now
                    or (dead_owner_prefix and (r["lease_owner"] or "").startswith(dead_owner_prefix))]
            for row in gone:
                if row["attempts"] >= max_attempts:
                    conn.execute("UPDATE jobs SET state = 'failed', error = ?, lease_owner = NULL, "
                                 "lease_expires = NULL, updated_at = ? WHERE id = ?",
                                 (f"The bot stopped during this job {row['attempts']} times; giving up.", now,
                                  row["id"]))
                else:
                    conn.execute("UPDATE jobs SET state = 'queued', next_attempt_at = ?, updated_at = ?, "
                                 "lease_owner = NULL, lease_expires = NULL, "
                                 "error = 'interrupted: the bot stopped during this job' WHERE id = ?",
                                 (now, now, row["id"]))
        return [row["id"] for row in gone]

    def requeue(self, job_id: int) -> bool:
        """Queue a failed job again from scratch (an operator's decision, e.g. after granting access)."""
        with self._tx() as conn:
            cur = conn.execute("UPDATE jobs SET state = 'queued', attempts = 0, permanent = 0, next_attempt_at = ?, "
                               "updated_at = ? WHERE id = ? AND state = 'failed'", (time.time(), time.time(), job_id))
            return bool(cur.rowcount)

    def mark_created_target(self, job_id: int) -> None:
        """This job created its target repo (so a permanent failure deletes it again)."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET created_target = 1 WHERE id = ?", (job_id,))

    def set_source_private(self, source_repo: str, private: bool | None) -> None:
        """Record the source's visibility on all its jobs (the status page hides private ones)."""
        with self._tx() as conn:
            conn.execute("UPDATE jobs SET source_private = ? WHERE lower(source_repo) = lower(?)",
                         (None if private is None else int(private), source_repo))

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

    def same_variant(self, job: Job) -> list[Job]:
        """The other jobs that publish the same variant (same source, recipe, mode and target), not failed:
        the commits they are for decide which one may publish (see worker)."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM jobs WHERE lower(source_repo) = lower(?) AND recipe_hash = ? AND "
                                "publish = ? AND lower(target_repo) = lower(?) AND id != ? AND source_sha != ? AND "
                                "state != 'failed' ORDER BY id", (job.source_repo, job.recipe_hash, job.publish,
                                                                   job.target_repo, job.id, job.source_sha)).fetchall()
        return [Job.from_row(r) for r in rows]

    def published_targets(self, source_repo: str) -> list[tuple[str, bool]]:
        """(target repo, private by config) of every variant repo published from `source_repo`."""
        with self._read() as conn:
            rows = conn.execute("SELECT output_repo, MAX(private) AS private FROM jobs WHERE publish = 'repo' AND "
                                "state = 'done' AND output_repo IS NOT NULL AND lower(source_repo) = lower(?) "
                                "GROUP BY lower(output_repo)", (source_repo,)).fetchall()
        return [(r["output_repo"], bool(r["private"])) for r in rows]

    def created_target(self, target_repo: str) -> bool:
        """Whether one of the bot's jobs created `target_repo` (and may delete it when nothing ends up there)."""
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM jobs WHERE created_target = 1 AND lower(target_repo) = lower(?) LIMIT 1",
                               (target_repo,)).fetchone()
        return row is not None

    def target_in_use(self, target_repo: str, except_job: int) -> bool:
        """Whether another job published (or is about to publish) into `target_repo`."""
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM jobs WHERE id != ? AND (lower(output_repo) = lower(?) OR "
                               "(lower(target_repo) = lower(?) AND state IN ('queued', 'running'))) LIMIT 1",
                               (except_job, target_repo, target_repo)).fetchone()
        return row is not None

    def is_target(self, repo_id: str) -> bool:
        """Whether `repo_id` is a repo the bot publishes to (its own output: never a source)."""
        with self._read() as conn:
            row = conn.execute("SELECT 1 FROM jobs WHERE publish = 'repo' AND (lower(target_repo) = lower(?) "
                               "OR lower(output_repo) = lower(?)) LIMIT 1", (repo_id, repo_id)).fetchone()
        return row is not None
