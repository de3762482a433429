"""Errors raised by the local Hub, carrying what the real Hub sends back.

The `huggingface_hub` client maps errors from the `X-Error-Code` / `X-Error-Message` headers (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo) and shows the JSON body's `error` field to the user, so every error
the server returns goes through :class:`HubError` and carries both.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class HubError(Exception):
    """An HTTP error response: status, user-facing message, optional Hub error code and extra headers/body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def response_headers(self) -> dict[str, str]:
        """Headers of the error response: X-Error-Code (when set), X-Error-Message, plus any extra ones."""
        headers = dict(self.headers)
        if self.code:
            headers["X-Error-Code"] = self.code
        # Header values must be latin-1 and single-line.
        headers["X-Error-Message"] = " ".join(self.message.split()).encode("latin-1", "replace").decode("latin-1")
        return headers

    def body(self) -> dict:
        """JSON body of the error response (`{"error": message, ...extra}`)."""
        return {"error": self.message, **self.extra}


def repo_not_found(repo_id: str, *, authenticated: bool = True) -> HubError:
    """404 RepoNotFound (401 for anonymous callers, like the Hub: both read as not-found by the client)."""
    return HubError(404 if authenticated else 401, "Repository not found", code="RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


def entry_not_found(path: str, *, commit: str | None = None, message: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit} if commit else {}
    return HubError(404, message or f"Entry not found: {path}", code="EntryNotFound", headers=headers)


def gated(repo_id: str, *, authenticated: bool = True) -> HubError:
    if authenticated:
        message = (f"Access to model {repo_id} is restricted and you are not in the authorized list. "
                   f"Visit the repo page to ask for access.")
    else:
        message = (f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to "
                   f"access it. Please log in.")
    return HubError(403 if authenticated else 401, message, code="GatedRepo")


def bad_request(message: str, **extra) -> HubError:
    return HubError(400, message, extra=extra)


def forbidden(message: str) -> HubError:
    return HubError(403, message)


def unauthorized(message: str = "Invalid username or password.") -> HubError:
    return HubError(401, message)


def conflict(message: str, **extra) -> HubError:
    return HubError(409, message, extra=extra)


def not_found(message: str = "Not Found") -> HubError:
    return HubError(404, message)
