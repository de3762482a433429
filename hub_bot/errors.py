"""The bot's errors and how a failed job is classified: transient (retry with backoff) or permanent (record the
reason, never retry).

Transient: the Hub answering 429, 5xx, 408 or 412 (someone pushed in between), connection errors and timeouts.
Permanent: an unsupported architecture, a gated repo without access, a source that is too big, has no
safetensors or needs custom code, a repo or revision that does not exist, a token that may not write, and any
recipe that cannot apply to the model. Anything else is unexpected: retried, but only `max_attempts` times.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import PruningError

TRANSIENT_STATUS = {408, 412, 429}


class BotError(Exception):
    """Base class of the bot's own errors."""


class ConfigError(BotError, ValueError):
    """The bot's configuration is invalid; the message says which key and what to put there."""


class PermanentJobError(BotError):
    """A job can never succeed as configured (the reason is recorded and the job is not retried)."""


class TransientJobError(BotError):
    """A job failed for a reason that may go away (retried with backoff)."""

    retry_after_s: float | None = None


class HubThrottled(TransientJobError):
    """The Hub asked to come back later (429/5xx with a Retry-After longer than the bot waits inline): the job goes
    back to the queue, due after the (capped) delay, instead of a worker sleeping on it."""

    def __init__(self, status: int, retry_after_s: float, url: str):
        super().__init__(f"Hub answered {status} with Retry-After: {retry_after_s:g}s ({url})")
        self.retry_after_s = retry_after_s


class Interrupted(BotError):
    """The worker was told to stop (or lost its lease on the job) before the job finished: the job is given back
    to the queue unfinished, its attempt not counted."""


class Superseded(BotError):
    """The target already holds a variant of a newer commit of the source: publishing this one would go back."""


@dataclass(frozen=True)
class Failure:
    permanent: bool
    reason: str
    retry_after_s: float | None = None  # the Hub's Retry-After, when it sent one


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _retry_after(err: BaseException) -> float | None:
    response = getattr(err, "response", None)
    try:
        return float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _is_connection_error(err: BaseException) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    try:
        import httpx2

        if isinstance(err, httpx2.TransportError):
            return True
    except ImportError:  # pragma: no cover - huggingface_hub's client ships it
        pass
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(err, LocalEntryNotFoundError)  # a download that could not reach the Hub


def classify(err: BaseException) -> Failure:
    """Whether a job that raised `err` should be retried, and the reason to record."""
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    if isinstance(err, PermanentJobError):
        return Failure(True, str(err))
    if isinstance(err, TransientJobError):
        return Failure(False, str(err), err.retry_after_s)
    if isinstance(err, GatedRepoError):
        return Failure(True, f"The source repo is gated and the bot's account has no access ({_first_line(err)}). "
                             "Request access for the bot's user, or stop watching the repo.")
    if isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)):
        return Failure(True, f"Not found on the Hub ({_first_line(err)}): the repo or commit was deleted, made "
                             "private, or the bot's token cannot see it.")
    if isinstance(err, PruningError):
        return Failure(True, _first_line(err))
    if isinstance(err, HfHubHTTPError):
        status = _status(err)
        if status is not None and (status >= 500 or status in TRANSIENT_STATUS):
            return Failure(False, f"Hub answered {status}: {_first_line(err)}", _retry_after(err))
        if status in (401, 403):
            server = getattr(err, "server_message", None) or ""
            return Failure(True, f"Hub refused the bot's token ({status}): {server or _first_line(err)}. Check "
                                 "that the token has the write role and belongs to a member of the target "
                                 "organization.")
        return Failure(True, f"Hub answered {status}: {_first_line(err)}")
    if _is_connection_error(err):
        return Failure(False, f"Could not reach the Hub: {_first_line(err)}")
    return Failure(False, f"Unexpected error: {_first_line(err)}")
