"""Webhooks: which are configured, which events they watch, and their asynchronous delivery.

A webhook has a `url`, an optional `secret` (sent as `X-Webhook-Secret`), `watched` items
(`{"type": "user"|"org", "name": namespace}` or `{"type": "model"|"dataset"|"space", "name": repo_id}`) and
`domains` (`repo`: scopes `repo`, `repo.content`, `repo.config`; `discussion`: `discussion`,
`discussion.comment`). Webhooks come from the start configuration or from `/api/settings/webhooks` (those are
persisted in the data dir and only see repos their owner can read).

Delivery never blocks the request that caused the event: payloads go to a queue served by a background thread,
which POSTs them as JSON and retries failures (non-2xx or network error) a few times with exponential backoff,
logging each failure. `deliveries()` keeps a log of attempts for tests and the admin endpoint.
"""
from __future__ import annotations

import heapq
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .objects import atomic_write_json, read_json
from .storage import new_object_id

logger = logging.getLogger(__name__)

DOMAINS = ("repo", "discussion")
WATCH_TYPES = ("user", "org", "model", "dataset", "space")


@dataclass
class Webhook:
    """One webhook subscription."""

    url: str
    watched: list[dict] = field(default_factory=list)
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    secret: str | None = None
    id: str = field(default_factory=new_object_id)
    disabled: bool = False
    owner: str | None = None  # user who created it through the API; None for configured ones

    def __post_init__(self):
        for item in self.watched:
            if not isinstance(item, dict) or item.get("type") not in WATCH_TYPES or not item.get("name"):
                raise ValueError(f"invalid watched item {item!r}: expected {{type: {'|'.join(WATCH_TYPES)}, name}}")
        for d in self.domains:
            if d not in DOMAINS:
                raise ValueError(f"invalid webhook domain {d!r}: expected one of {DOMAINS}")

    def matches(self, scope: str, repo_type: str, repo_id: str) -> bool:
        """Whether an event of `scope` on repo (type, id) is for this webhook."""
        if self.disabled or scope.split(".")[0] not in self.domains:
            return False
        namespace = repo_id.split("/")[0].lower()
        for item in self.watched:
            if item["type"] in ("user", "org") and item["name"].lower() == namespace:
                return True
            if item["type"] == repo_type and item["name"].lower() == repo_id.lower():
                return True
        return False

    def public(self) -> dict:
        """The API shape of the webhook (`/api/settings/webhooks`)."""
        return {"id": self.id, "url": self.url, "watched": self.watched, "domains": self.domains,
                "secret": self.secret, "disabled": self.disabled, "job": None}


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    webhook: Webhook = field(compare=False)
    payload: dict = field(compare=False)
    attempt: int = field(compare=False, default=0)


class WebhookDispatcher:
    """Registry of webhooks + background delivery with retries."""

    def __init__(self, state_file: Path | None = None, *, max_attempts: int = 4, backoff_s: float = 0.5,
                 timeout_s: float = 5.0):
        self.state_file = Path(state_file) if state_file else None
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._configured: list[Webhook] = []
        self._api: list[Webhook] = []
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._stopped = False
        self._log: deque = deque(maxlen=1000)
        if self.state_file and self.state_file.exists():
            self._api = [Webhook(**w) for w in read_json(self.state_file)]
        self._thread = threading.Thread(target=self._run, name="local-hub-webhooks", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- registry
    def configure(self, specs: list[dict]) -> None:
        """Set the webhooks of the start configuration (not persisted)."""
        self._configured = [Webhook(**{k: v for k, v in s.items() if k != "owner"}) for s in specs]

    def all(self) -> list[Webhook]:
        return self._configured + self._api

    def get(self, webhook_id: str) -> Webhook | None:
        return next((w for w in self.all() if w.id == webhook_id), None)

    def add(self, webhook: Webhook) -> Webhook:
        with self._cond:
            self._api.append(webhook)
            self._persist()
        return webhook

    def remove(self, webhook_id: str) -> bool:
        with self._cond:
            before = len(self._api)
            self._api = [w for w in self._api if w.id != webhook_id]
            self._persist()
            return len(self._api) != before

    def save(self) -> None:
        with self._cond:
            self._persist()

    def _persist(self) -> None:
        if self.state_file:
            atomic_write_json(self.state_file, [asdict(w) for w in self._api])

    # ---------------------------------------------------------------- delivery
    def emit(self, payload_for, scope: str, repo_type: str, repo_id: str, can_read=None) -> int:
        """Queue `payload_for(webhook)` to every matching webhook; returns how many were queued.

        `can_read(user)` tells whether an API webhook's owner may see the repo (private repos)."""
        queued = 0
        for webhook in self.all():
            if not webhook.matches(scope, repo_type, repo_id):
                continue
            if webhook.owner is not None and can_read is not None and not can_read(webhook.owner):
                continue
            with self._cond:
                heapq.heappush(self._heap, _Delivery(time.monotonic(), next(self._seq), webhook,
                                                     payload_for(webhook)))
                self._cond.notify()
            queued += 1
        return queued

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._heap or self._heap[0].due > time.monotonic()):
                    timeout = None if not self._heap else max(0.0, self._heap[0].due - time.monotonic())
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                delivery = heapq.heappop(self._heap)
                self._in_flight += 1
            try:
                self._attempt(delivery)
            finally:
                with self._cond:
                    self._in_flight -= 1
                    self._cond.notify_all()

    def _attempt(self, d: _Delivery) -> None:
        d.attempt += 1
        body = json.dumps(d.payload).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "local-hub-webhooks/1.0"}
        if d.webhook.secret:
            headers["X-Webhook-Secret"] = d.webhook.secret
        status, error = None, None
        try:
            req = urllib.request.Request(d.webhook.url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                status = resp.status
                resp.read()
        except urllib.error.HTTPError as e:
            status, error = e.code, f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            error = str(getattr(e, "reason", e))
        ok = status is not None and 200 <= status < 300
        event = d.payload.get("event", {})
        self._log.append({"webhook": d.webhook.id, "url": d.webhook.url, "scope": event.get("scope"),
                          "action": event.get("action"), "repo": d.payload.get("repo", {}).get("name"),
                          "attempt": d.attempt, "status": status, "ok": ok, "error": error,
                          "at": time.time()})
        if ok:
            logger.debug("webhook %s delivered (%s %s)", d.webhook.id, event.get("action"), event.get("scope"))
            return
        if d.attempt < self.max_attempts:
            delay = self.backoff_s * 2 ** (d.attempt - 1)
            logger.warning("webhook %s delivery to %s failed (%s), retry %d/%d in %.1fs", d.webhook.id,
                           d.webhook.url, error, d.attempt, self.max_attempts - 1, delay)
            with self._cond:
                d.due = time.monotonic() + delay
                heapq.heappush(self._heap, d)
                self._cond.notify()
        else:
            logger.error("webhook %s delivery to %s failed after %d attempts (%s); giving up", d.webhook.id,
                         d.webhook.url, d.attempt, error)

    def deliveries(self) -> list[dict]:
        """Log of delivery attempts, oldest first (bounded)."""
        return list(self._log)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until nothing is queued or being delivered; True if that happened within `timeout`."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._in_flight:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Give pending deliveries up to `timeout` seconds, then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
