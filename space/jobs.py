"""One job at a time, live events from the worker thread, and finished results kept on disk (and cleaned up).

Gradio's queue (`concurrency_limit=1`, bounded `max_size`) serialises jobs and the button's `trigger_mode='once'`
ignores clicks while a job is pending; `JobSlot` is the guard behind both, for any other caller (the API, a job
still finishing after its page went away).
"""
from __future__ import annotations

import itertools
import logging
import queue
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import SpaceError, friendly

logger = logging.getLogger(__name__)

LOGGERS = ("core", "space")


class Busy(SpaceError):
    pass


class JobSlot:
    """At most one job runs; a second one is refused at once (never queued behind the lock)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def acquire(self) -> int:
        if not self._lock.acquire(blocking=False):
            raise Busy("A pruning job is already running. Wait for it to finish, then try again.")
        return next(self._ids)

    def release(self) -> None:
        self._lock.release()

    @property
    def busy(self) -> bool:
        return self._lock.locked()


@dataclass
class Stored:
    session: str
    folder: Path
    value: Any


class ResultStore:
    """The last `keep` finished jobs (their folders on disk); older ones, failed ones and those of closed sessions
    are deleted. Everything is removed by `close()` (at exit)."""

    def __init__(self, keep: int = 2, root: Path | None = None) -> None:
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="prune-space-", dir=root))
        self.keep = keep
        self._items: OrderedDict[int, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def new_folder(self, job_id: int) -> Path:
        folder = self.root / f"job-{job_id}"
        folder.mkdir()
        return folder

    def put(self, job_id: int, session: str, folder: Path, value: Any) -> None:
        with self._lock:
            self._items[job_id] = Stored(session, folder, value)
            while len(self._items) > self.keep:
                _, old = self._items.popitem(last=False)
                self.discard(old.folder)

    def get(self, job_id: int | None, session: str) -> Any:
        with self._lock:
            item = self._items.get(job_id) if job_id is not None else None
        if item is None or item.session != session:
            raise SpaceError("No pruned model to use: run a job first (results are kept for the last "
                             f"{self.keep} jobs only).")
        return item.value

    def drop_session(self, session: str) -> None:
        with self._lock:
            for job_id in [k for k, v in self._items.items() if v.session == session]:
                self.discard(self._items.pop(job_id).folder)

    def discard(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            self._items.clear()
        shutil.rmtree(self.root, ignore_errors=True)


class _QueueHandler(logging.Handler):
    """Forwards the log records of one thread to the event queue."""

    def __init__(self, events: queue.Queue, thread_id: int) -> None:
        super().__init__(logging.INFO)
        self.events, self.thread_id = events, thread_id
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:  # first line only: the page's log is a summary, the server log has all
            self.events.put(("log", (self.format(record).strip().splitlines() or [""])[0]))


class Reporter:
    """Handed to the job function: `progress(fraction, text)`; log lines come from the `core`/`space` loggers."""

    def __init__(self, events: queue.Queue) -> None:
        self.events = events

    def progress(self, fraction: float, text: str) -> None:
        self.events.put(("progress", min(max(fraction, 0.0), 1.0), text))


def stream(fn: Callable[[Reporter], Any], poll: float = 0.25) -> Iterator[tuple]:
    """Run `fn(reporter)` in a worker thread and yield its events: ('progress', f, text), ('log', line), then
    ('done', value) or ('error', message). The worker finishes even if the caller stops iterating."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        handler = _QueueHandler(events, threading.get_ident())
        loggers = [logging.getLogger(name) for name in LOGGERS]
        saved = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(handler)
            if lg.getEffectiveLevel() > logging.INFO:
                lg.setLevel(logging.INFO)
        try:
            events.put(("done", fn(Reporter(events))))
        except BaseException as err:  # every failure becomes a message; unexpected ones are logged by friendly()
            events.put(("error", friendly(err)))
        finally:
            for lg, level in zip(loggers, saved):
                lg.removeHandler(handler)
                lg.setLevel(level)

    threading.Thread(target=work, name="prune-job", daemon=True).start()
    while True:
        try:
            event = events.get(timeout=poll)
        except queue.Empty:
            yield ("tick",)
            continue
        yield event
        if event[0] in ("done", "error"):
            return
