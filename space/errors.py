"""Every failure becomes one readable sentence for the page: no stack traces, no tokens, no server paths, and the
page's words instead of the command line's flags."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from core.errors import (CalibrationError, InvalidTargetError, ModelLoadError, PruningError, RecipeError,
                         UnknownNameError, UnsupportedArchitectureError)

logger = logging.getLogger(__name__)


class SpaceError(Exception):
    """A problem with what the user asked for; the message is shown as is."""


_CORE_PREFIX = (
    (UnsupportedArchitectureError, "Unsupported model"),
    (InvalidTargetError, "Target cannot be met"),
    (CalibrationError, "Calibration data problem"),
    (ModelLoadError, "Could not load the model"),
    (RecipeError, "Invalid setting"),
    (UnknownNameError, "Invalid setting"),
)

OOM_HINT = ("Out of memory: the model and its activations do not fit on this machine. Try a smaller model, fewer "
            "or shorter calibration samples, or a weights-only score (no calibration).")


def _hub_message(err) -> str:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    server = getattr(err, "server_message", None) or ""
    server = server.strip().splitlines()[0] if server.strip() else ""
    if isinstance(err, GatedRepoError):
        return ("This model is gated: request access on its Hub page, wait until it is granted, then sign in with "
                "that account so the Space can use your token.")
    if isinstance(err, RepositoryNotFoundError):
        return ("Repository not found: check the id. If it is private, sign in with an account that can read it.")
    if isinstance(err, RevisionNotFoundError):
        return "That revision does not exist in the repository."
    status = err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    if status == 401:
        return "The Hub did not accept your token (expired or revoked?). Sign in again."
    if status == 403:
        return f"The Hub refused the request: {server or 'your token lacks the permission for it'}."
    if status == 409:
        return f"Conflict on the Hub: {server or 'the repository already exists'}."
    if status == 429:
        return "The Hub is rate-limiting requests; wait a minute and try again."
    return f"Hub error{f' {status}' if status else ''}: {server or str(err).splitlines()[0]}"


# the core's messages name command-line flags; the page has fields with other names
_UI_WORDS = (
    (re.compile(r"\s*\(recipe: [\w.]+\)"), ""),
    (re.compile(r"; set the text field name \(--calib-text-field\) to the one your file uses"),
     '; each line must be a JSON object with a "text" field'),
    (re.compile(r"--calib-seq-len"), "“Tokens per sample” (Calibration data)"),
    (re.compile(r"--calib-samples"), "“Samples” (Calibration data)"),
    (re.compile(r"\s*or a task folder of your own \(--task-dir\)"), ""),
    (re.compile(r",? or pass --allow-pickle if you trust the source"), ""),
    (re.compile(r"\s*Pass --allow-pickle to accept pickle weights from a source you trust\."), ""),
    (re.compile(r"It is not run unless you pass --trust-remote-code \(only for repositories you trust\)\."),
     "The Space does not run a repository's code."),
    (re.compile(r"--round-to"), "“Round widths to”"),
    (re.compile(r"--protect-(first|last)"), lambda m: f"“Keep {m.group(1)} N layers”"),
)


def ui_words(text: str) -> str:
    for pattern, repl in _UI_WORDS:
        text = pattern.sub(repl, text)
    return text.strip()


def as_markdown(text: str) -> str:
    """Plain text for a Markdown component: `<stream end>` stays visible instead of vanishing as an HTML tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Redactor:
    """Replaces server paths in text shown to users (log lines, messages) by short names.

    `paths`: {absolute path: what to show instead}; the longest match wins. Any other absolute path under a
    system folder becomes `…/<last part>`.
    """

    _OTHER = re.compile(r"(?<![\w:/.])/(?:tmp|root|home|var|usr|opt|data|work|mnt|srv|app)(?:/[\w.@+-]+)+")

    def __init__(self, paths: dict[str, str] | None = None) -> None:
        self.paths = sorted(((str(Path(k)), v) for k, v in (paths or {}).items()), key=lambda kv: -len(kv[0]))

    def __call__(self, text: str) -> str:
        for path, name in self.paths:
            text = text.replace(path, name)
        return self._OTHER.sub(lambda m: "…/" + m.group(0).rsplit("/", 1)[-1], text)


def friendly(err: BaseException) -> str:
    """The message shown in the page for `err`; unexpected errors are logged with their traceback."""
    import torch
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(err, SpaceError):
        return str(err)
    for cls, prefix in _CORE_PREFIX:
        if isinstance(err, cls):
            return f"{prefix}: {ui_words(str(err))}"
    if isinstance(err, PruningError):
        return ui_words(str(err))
    if isinstance(err, HfHubHTTPError):
        return _hub_message(err)
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(err):
        return OOM_HINT
    if isinstance(err, (ConnectionError, TimeoutError)) or type(err).__name__ in ("ConnectError", "ConnectTimeout"):
        return "Could not reach the Hub (network problem). Try again in a moment."
    logger.error("unexpected error", exc_info=err)
    return (f"Unexpected error ({type(err).__name__}): {str(err).splitlines()[0] if str(err) else 'no message'}. "
            "The details are in the Space's log.")
