"""No worker sleeps on the Hub's Retry-After: a throttled answer ends the job's attempt instead.

`huggingface_hub` retries some calls by itself (preupload, the LFS batch API, listings) and sleeps for the whole
`Retry-After` the Hub sends, uninterruptibly: a `Retry-After: 3600` would park the bot for an hour. While a bot
runs, a response hook on the client's shared HTTP session turns any 429 or 5xx answer whose Retry-After exceeds
the bot's inline limit into `HubThrottled`, which the client does not catch: the job goes back to the queue, due
after min(Retry-After, limits.retry_after_max_s), and the worker moves on or stops when told to.

The hook is installed for the process (the client has one shared session) and is inert while no bot runs in it.
"""
from __future__ import annotations

import logging
import threading

import httpx2
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import set_client_factory

from .errors import HubThrottled

logger = logging.getLogger(__name__)

_LOCK = threading.Lock()
_LIMITS: list[float] = []  # inline limits of the bots running in this process (the strictest applies)
_INSTALLED = False


def _retry_after(response: httpx2.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: treat as "a while"
        return float("inf")


def _check(response: httpx2.Response) -> None:
    with _LOCK:
        limit = min(_LIMITS) if _LIMITS else None
    if limit is None or not (response.status_code == 429 or response.status_code >= 500):
        return
    wait = _retry_after(response)
    if wait is not None and wait > limit:
        raise HubThrottled(response.status_code, wait, f"{response.request.method} {response.request.url.path}")


def _wrap(factory):
    def client() -> httpx2.Client:
        """The session the client would make, plus the throttle check on every response."""
        session = factory()
        hooks = session.event_hooks
        hooks["response"] = [*hooks.get("response", []), _check]
        session.event_hooks = hooks
        return session

    return client


def install(inline_wait_max_s: float) -> None:
    """While the bot runs: Retry-After above `inline_wait_max_s` raises HubThrottled instead of sleeping."""
    global _INSTALLED
    with _LOCK:
        _LIMITS.append(float(inline_wait_max_s))
        first = not _INSTALLED
        _INSTALLED = True
    if first:
        set_client_factory(_wrap(getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", hf_http.default_client_factory)))


def uninstall(inline_wait_max_s: float) -> None:
    with _LOCK:
        if float(inline_wait_max_s) in _LIMITS:
            _LIMITS.remove(float(inline_wait_max_s))
