"""The stage list a user watches while a job runs: which stages are done (and how long they took), the current one
with its progress, elapsed time and an estimate of the time left; and the line of a user who is waiting.

Estimates come from the previous jobs of this process (`History`, scaled by model size) and, for the current
stage, from its own progress. Without history they appear once the base model has been measured (the stages
after it are priced relative to it); until then the page says so instead of guessing.
"""
from __future__ import annotations

import html
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

STAGES = {
    "check": "Check the model and settings",
    "download": "Download the model",
    "load": "Load the model",
    "base": "Measure the base model",
    "prune": "Prune",
    "recover": "Recovery training (distillation)",
    "pruned": "Measure the pruned model",
    "speed": "Measure the speed of both models",
    "save": "Save the pruned model and zip it",
}
# relative to measuring the base model: the stages after it, before any job has finished (rough, labelled "about")
_PRIOR = {"prune": 1.5, "recover": 10.0, "pruned": 1.0, "speed": 4.0, "save": 0.5}


def fmt_duration(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Stage:
    key: str
    label: str
    state: str = "pending"  # pending, active, done, skipped
    part: float | None = None  # share done (None: the stage cannot tell)
    detail: str = ""
    started: float | None = None
    seconds: float | None = None


# how long pruning takes depends on the method and score (seconds for a weight score, much longer for Shapley
# values); the other stages depend on the model's size only
_BY_KIND = {"prune"}


class History:
    """Stage durations of the last finished jobs, per parameter of their model (for estimates)."""

    def __init__(self, keep: int = 8) -> None:
        self._jobs: deque[tuple[int, str, dict[str, float]]] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def record(self, board: "Board") -> None:
        if board.params:
            seconds = {s.key: s.seconds for s in board.stages if s.seconds is not None}
            with self._lock:
                self._jobs.append((board.params, board.kind, seconds))

    def expected(self, key: str, params: int | None, kind: str = "") -> float | None:
        """Seconds stage `key` should take for a model of `params` parameters pruned by `kind` (None: no data)."""
        with self._lock:
            rates = [seconds[key] / p for p, k, seconds in self._jobs
                     if key in seconds and (k == kind or key not in _BY_KIND)]
        if not rates or not params:
            return None
        return statistics.median(rates) * params

    def typical_total(self) -> float | None:
        with self._lock:
            totals = [sum(seconds.values()) for _, _, seconds in self._jobs]
        return statistics.median(totals) if totals else None


class Board:
    """The stages of one job and where it is. Updated by the job's consumer, read by waiting users' threads."""

    def __init__(self, keys: list[str], history: History | None = None, clock=time.monotonic, kind: str = "") -> None:
        self.stages = [Stage(k, STAGES[k]) for k in keys]
        self.history = history or History()
        self.clock = clock
        self.kind = kind  # the method and score: what the pruning stage's duration depends on
        self.params: int | None = None
        self.started: float | None = None
        self.ended: float | None = None

    def _get(self, key: str) -> Stage:
        return next(s for s in self.stages if s.key == key)

    @property
    def current(self) -> Stage | None:
        return next((s for s in self.stages if s.state == "active"), None)

    def start(self) -> None:
        self.started = self.clock()

    def update(self, key: str, part: float | None = None, detail: str = "") -> None:
        """Stage `key` is running with `part` done (None: unknown); the stages before it are finished (or were
        not needed)."""
        now = self.clock()
        if self.started is None:
            self.started = now
        stage = self._get(key)
        for s in self.stages:
            if s is stage:
                break
            self._close(s, now)
        if stage.state != "active":
            stage.state, stage.started = "active", now
        stage.part, stage.detail = part, detail

    def skip(self, key: str) -> None:
        stage = self._get(key)
        if stage.state == "pending":
            stage.state = "skipped"

    def finish(self) -> None:
        now = self.clock()
        for s in self.stages:
            self._close(s, now)
        self.ended = now

    @staticmethod
    def _close(stage: Stage, now: float) -> None:
        if stage.state == "active":
            stage.state, stage.seconds, stage.part = "done", now - stage.started, 1.0
        elif stage.state == "pending":
            stage.state = "skipped"

    def elapsed(self, now: float | None = None) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or (now if now is not None else self.clock())) - self.started

    def _expected(self, key: str, running: bool = False) -> float | None:
        known = self.history.expected(key, self.params, self.kind)
        if known is not None or (running and key in _BY_KIND):  # a running pruning stage: the method's history
            return known  # or its own progress, never the prior (Shapley values take 100x a weight score)
        base = self._get("base") if any(s.key == "base" for s in self.stages) else None
        if base is not None and base.seconds is not None and key in _PRIOR:
            return _PRIOR[key] * base.seconds
        return None

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left (None: no basis for an estimate yet)."""
        if self.ended is not None:
            return 0.0
        now = now if now is not None else self.clock()
        total = 0.0
        for s in self.stages:
            if s.state in ("done", "skipped"):
                continue
            expected = self._expected(s.key, running=s.state == "active")
            if s.state == "active":
                spent = now - s.started
                if s.part is not None and s.part >= 0.01:  # its own progress says best how long it takes
                    expected = spent / s.part
                elif expected is None or spent > expected:  # no basis, or it overran the estimate
                    return None
                total += max(expected - spent, 0.0)
            elif expected is None:
                return None
            else:
                total += expected
        return total


# -- rendering -------------------------------------------------------------------------------------------------------

_STYLE = """<style>
.stages{font-size:14px;line-height:1.45}
.stages .head{font-weight:600;margin-bottom:4px}
.stages ol{list-style:none;margin:0;padding:0}
.stages li{display:flex;flex-wrap:wrap;gap:2px 8px;align-items:baseline;padding:2px 0}
.stages li .mark{width:1.3em;text-align:center;flex:none}
.stages li .what{flex:1 1 12em;min-width:0}
.stages li .time{opacity:.7;font-variant-numeric:tabular-nums}
.stages li[data-state=pending],.stages li[data-state=skipped]{opacity:.55}
.stages li[data-state=active] .what{font-weight:600}
.stages .bar{flex:1 1 100%;height:8px;border-radius:4px;background:rgba(127,127,127,.2);overflow:hidden;
  margin:2px 0 2px 2.1em}
.stages .bar div{height:100%;background:#6366f1;transition:width .3s}
.stages .bar.busy div{width:30%;animation:stages-busy 1.6s ease-in-out infinite alternate}
@keyframes stages-busy{from{margin-left:0}to{margin-left:70%}}
.stages .detail{flex:1 1 100%;margin-left:2.1em;font-size:12px;opacity:.8;overflow-wrap:anywhere}
.queue-box{padding:10px 12px;border-radius:8px;border:1px solid #6366f1;background:rgba(99,102,241,.08)}
</style>"""
_MARKS = {"done": "✓", "active": "▶", "pending": "○", "skipped": "–"}


def render(board: Board, now: float | None = None, title: str = "Running") -> str:
    """The stage list as self-contained HTML (no scripts)."""
    now = now if now is not None else board.clock()
    left = board.remaining(now)
    if board.ended is not None:
        when = f"took {fmt_duration(board.elapsed(now))}"
    else:
        when = (f"elapsed {fmt_duration(board.elapsed(now))} · "
                + (f"about {fmt_duration(left)} left" if left is not None else "time left: estimating…"))
    items = []
    for s in board.stages:
        if s.state == "done":
            time_text = f"{s.seconds:.1f} s"
        elif s.state == "active":
            time_text = f"{now - s.started:.0f} s"
        elif s.state == "skipped":
            time_text = "not needed"
        else:
            time_text = ""
        extra = ""
        if s.state == "active" and s.part is not None:
            pct = 100 * s.part
            extra = (f'<div class="bar" role="progressbar" aria-valuenow="{pct:.0f}" aria-valuemin="0" '
                     f'aria-valuemax="100"><div style="width:{pct:.1f}%"></div></div>')
        elif s.state == "active":  # no measurable progress: a moving bar says it is alive
            extra = '<div class="bar busy" role="progressbar"><div></div></div>'
        if s.state == "active" and s.detail:
            extra += f'<div class="detail">{html.escape(s.detail)}</div>'
        items.append(f'<li data-stage="{s.key}" data-state="{s.state}"><span class="mark">{_MARKS[s.state]}</span>'
                     f'<span class="what">{html.escape(s.label)}</span><span class="time">{time_text}</span>'
                     f'{extra}</li>')
    return (f'{_STYLE}<div class="stages" data-running="{str(board.ended is None).lower()}">'
            f'<div class="head">{html.escape(title)} · {when}</div><ol>{"".join(items)}</ol></div>')


def render_wait(ahead: int, seconds: float | None) -> str:
    """What a waiting user sees: their place in the line and the expected wait."""
    jobs = "1 job is" if ahead == 1 else f"{ahead} jobs are"
    wait = (f"Expected wait: about <b>{fmt_duration(seconds)}</b>." if seconds is not None
            else "Expected wait: not known yet; it shows as soon as the jobs ahead have got far enough to tell.")
    return (f'{_STYLE}<div class="queue-box" id="queue-info" data-ahead="{ahead}"><b>Waiting in line: you are '
            f'number {ahead + 1}.</b> {jobs} ahead of you; one job runs at a time. {wait} '
            'Your job starts by itself; you can cancel it while it waits.</div>')
