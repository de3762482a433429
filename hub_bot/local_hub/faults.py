"""Fault injection: make the next N requests matching a pattern fail with a chosen status.

For the bot's resilience tests. A rule has a regex `pattern` searched in `"METHOD /raw/path"` (e.g.
`"^POST /api/models/.*/commit/"` or just `"/resolve/"`), a `status`, a `count` (None = until cleared), optional
extra `headers` (e.g. `{"Retry-After": "1"}`), a `message` and an optional `delay_s` before answering. Rules are
checked in order; the first match with count left answers instead of the server. A rule with `status: None` only
delays: after `delay_s` the server answers as usual (a slow Hub). `/_admin/...` is never faulted.

Use it from Python (`hub.faults.add(...)`) or over HTTP with the admin token (`POST /_admin/faults`).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import threading
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class FaultRule:
    pattern: str
    status: int | None = 500  # None: delay, then let the server answer
    count: int | None = 1
    headers: dict[str, str] = field(default_factory=dict)
    message: str = "Injected fault"
    error_code: str | None = None
    delay_s: float = 0.0
    id: int = 0
    hits: int = 0

    def __post_init__(self):
        self._regex = re.compile(self.pattern)
        if self.status is not None and not 100 <= int(self.status) <= 599:
            raise ValueError(f"invalid status {self.status}")
        if self.status is None and self.delay_s <= 0:
            raise ValueError("a rule without a status only delays: give it delay_s > 0")

    def public(self) -> dict:
        return {"id": self.id, "pattern": self.pattern, "status": self.status, "count": self.count,
                "headers": self.headers, "message": self.message, "error_code": self.error_code,
                "delay_s": self.delay_s, "hits": self.hits}


class FaultInjector:
    """Thread-safe list of fault rules."""

    def __init__(self):
        self._rules: list[FaultRule] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def add(self, pattern: str, status: int | None = 500, count: int | None = 1, *, headers: dict | None = None,
            message: str = "Injected fault", error_code: str | None = None, delay_s: float = 0.0) -> FaultRule:
        """Make the next `count` requests whose "METHOD /path" matches `pattern` answer `status` (None: only
        wait `delay_s`, then serve them)."""
        rule = FaultRule(pattern=pattern, status=None if status is None else int(status), count=count,
                         headers=dict(headers or {}), message=message, error_code=error_code, delay_s=float(delay_s),
                         id=next(self._ids))
        with self._lock:
            self._rules.append(rule)
        logger.info("fault rule %d: %r -> %s (count=%s)", rule.id, pattern, status or f"a {delay_s}s delay", count)
        return rule

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def rules(self) -> list[FaultRule]:
        with self._lock:
            return list(self._rules)

    def take(self, method: str, path: str) -> FaultRule | None:
        """The rule answering this request (its count decremented), or None."""
        target = f"{method} {path}"
        with self._lock:
            for rule in self._rules:
                if rule.count is not None and rule.count <= 0:
                    continue
                if rule._regex.search(target):
                    rule.hits += 1
                    if rule.count is not None:
                        rule.count -= 1
                    return rule
        return None


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class FaultMiddleware:
    """ASGI middleware answering requests that match a fault rule."""

    def __init__(self, app, injector: FaultInjector):
        self.app = app
        self.injector = injector

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.decode("latin-1")
        rule = None if path.startswith("/_admin") else self.injector.take(scope["method"], path)
        if rule is None:
            return await self.app(scope, receive, send)
        logger.info("fault rule %d answers %s %s with %s", rule.id, scope["method"], path, rule.status or "a delay")
        if rule.delay_s:
            await asyncio.sleep(rule.delay_s)
        if rule.status is None:
            return await self.app(scope, receive, send)
        await _drain(receive)  # read the request body first, as a server does: closing with unread bytes resets
        body = json.dumps({"error": rule.message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-error-message", rule.message.encode("latin-1", "replace"))]
        if rule.error_code:
            headers.append((b"x-error-code", rule.error_code.encode()))
        headers += [(k.lower().encode(), str(v).encode()) for k, v in rule.headers.items()]
        await send({"type": "http.response.start", "status": rule.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
