"""One job at a time in a first-come-first-served line, live events from a worker thread, cancellation, and
finished results kept on disk (and cleaned up).

`JobQueue` is the Space's own line: every waiting user sees their position and the expected wait, and a job can be
cancelled while it waits or while it runs. A job runs in a worker thread (`stream`); cancelling sets a flag that the
job's next progress report turns into `Cancelled`, and closing the event stream does the same and waits for the
thread, so the job's folder can be deleted afterwards.
"""
from __future__ import annotations

import itertools
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import Redactor, SpaceError, friendly
from .stages import Board, History

logger = logging.getLogger(__name__)

LOGGERS = ("core", "space")
QUIET = ("core.card",)  # details that only confuse on the page (e.g. a base model without a license in its card)


class Cancelled(BaseException):
    """Raised inside a job that its user cancelled. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way (in the core or a library) swallows it."""


class QueueFull(SpaceError):
    pass


@dataclass(eq=False)
class Ticket:
    """One job's place in the line; `cancel` is set by the Cancel button (or when the page goes away)."""

    id: int
    session: str
    cancel: threading.Event = field(default_factory=threading.Event)
    board: Board | None = None  # set when the job starts running
    started: bool = False

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()


class JobQueue:
    """First come, first served: one job runs, at most `max_waiting` wait behind it."""

    def __init__(self, max_waiting: int = 8, history: History | None = None) -> None:
        self.max_waiting = max_waiting
        self.history = history or History()
        self._line: list[Ticket] = []
        self._ids = itertools.count(1)
        self._cond = threading.Condition()

    def join(self, session: str) -> Ticket:
        with self._cond:
            if len(self._line) > self.max_waiting:
                raise QueueFull(f"The queue is full ({self.max_waiting} jobs are waiting). Try again in a few "
                                "minutes.")
            ticket = Ticket(next(self._ids), session)
            self._line.append(ticket)
            return ticket

    def position(self, ticket: Ticket) -> int:
        """How many jobs are ahead of `ticket` (0: it runs, or runs next)."""
        with self._cond:
            return self._line.index(ticket) if ticket in self._line else 0

    def expected_wait(self, ticket: Ticket, now: float | None = None) -> float | None:
        """Seconds until `ticket` starts (None: not known yet, e.g. before the first job finished)."""
        with self._cond:
            ahead = self._line[:self._line.index(ticket)] if ticket in self._line else []
        total = 0.0
        for other in ahead:
            left = (other.board.remaining(now) if other.board is not None and other.started
                    else self.history.typical_total())
            if left is None:
                return None
            total += left
        return total

    def wait_turn(self, ticket: Ticket, poll: float = 0.5) -> Iterator[tuple]:
        """Yield ('wait', jobs ahead, expected seconds or None) until it is `ticket`'s turn; then it is running.
        Raises Cancelled when the ticket is cancelled while it waits."""
        while True:
            ticket.check()
            with self._cond:
                if self._line and self._line[0] is ticket:
                    ticket.started = True
                    return
            yield ("wait", self.position(ticket), self.expected_wait(ticket))
            with self._cond:
                self._cond.wait(poll)

    def leave(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket in self._line:
                self._line.remove(ticket)
            self._cond.notify_all()

    def cancel(self, session: str) -> bool:
        """Cancel the session's jobs (waiting or running). True if there was one."""
        with self._cond:
            mine = [t for t in self._line if t.session == session]
            for ticket in mine:
                ticket.cancel.set()
            self._cond.notify_all()
        return bool(mine)

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._line)

    def __len__(self) -> int:
        with self._cond:
            return len(self._line)


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


# -- a job in a worker thread ----------------------------------------------------------------------------------------

class _QueueHandler(logging.Handler):
    """Forwards the log records of one thread to the event queue, without server paths."""

    def __init__(self, events: queue.Queue, thread_id: int, redact: Callable[[str], str]) -> None:
        super().__init__(logging.INFO)
        self.events, self.thread_id, self.redact = events, thread_id, redact
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        # first line only: the page's log is a summary, the server log has all
        if record.thread == self.thread_id and record.name not in QUIET:
            self.events.put(("log", self.redact((self.format(record).strip().splitlines() or [""])[0])))


class Reporter:
    """Handed to the job function: `stage(name, part, detail)` reports progress and is where a cancelled job
    stops (it raises `Cancelled`); log lines come from the `core`/`space` loggers."""

    def __init__(self, events: queue.Queue, cancel: threading.Event) -> None:
        self.events, self.cancel = events, cancel

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def stage(self, name: str, part: float | None = None, detail: str = "") -> None:
        """Stage `name` is running, `part` of it done (None: it cannot tell); `detail` says what it does now."""
        self.check()
        self.events.put(("progress", name, None if part is None else min(max(part, 0.0), 1.0), detail))


def stream(fn: Callable[[Reporter], Any], poll: float = 0.25, redact: Callable[[str], str] = Redactor()
           ) -> Iterator[tuple]:
    """Run `fn(reporter)` in a worker thread and yield its events: ('tick',) every `poll` seconds,
    ('progress', stage, part, detail), ('log', line), then ('done', value), ('error', message) or ('cancelled',).

    Closing the generator before the end cancels the job and waits for its thread: when `close()` returns, the
    job no longer touches its files or memory.
    """
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def work() -> None:
        handler = _QueueHandler(events, threading.get_ident(), redact)
        loggers = [logging.getLogger(name) for name in LOGGERS]
        saved = [lg.level for lg in loggers]
        for lg in loggers:
            lg.addHandler(handler)
            if lg.getEffectiveLevel() > logging.INFO:
                lg.setLevel(logging.INFO)
        try:
            events.put(("done", fn(Reporter(events, cancel))))
        except Cancelled:
            events.put(("cancelled",))
        except BaseException as err:  # every failure becomes a message; unexpected ones are logged by friendly()
            events.put(("error", redact(friendly(err))))
        finally:
            for lg, level in zip(loggers, saved):
                lg.removeHandler(handler)
                lg.setLevel(level)

    thread = threading.Thread(target=work, name="prune-job", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            try:
                event = events.get(timeout=poll)
            except queue.Empty:
                yield ("tick",)
                continue
            finished = event[0] in ("done", "error", "cancelled")
            yield event
            if finished:
                return
    finally:
        if not finished:
            cancel.set()
            started = time.monotonic()
            thread.join()
            logger.info("job thread stopped %.1f s after it was cancelled", time.monotonic() - started)
