"""Structured logs (JSON lines, or key=value text) with job id, repo, sha and state as fields, and a redaction
filter that removes anything token-like as a second line of defence (the bot never logs its token on purpose).

    logger.info("job done", extra={"job": 3, "repo": "alice/llama", "sha": "ab12...", "state": "done"})
"""
from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time

_SECRETS: set[str] = set()
_LOCK = threading.Lock()
# Hub user tokens (hf_...), OAuth/API tokens (api_...), Authorization headers and token= query parameters
_PATTERNS = (
    re.compile(r"\b(?:hf|api|hf_oauth)_[A-Za-z0-9]{20,}"),
    re.compile(r"(?i)(bearer\s+)[^\s'\",]+"),
    re.compile(r"(?i)((?:token|secret|authorization)[\"']?\s*[=:]\s*[\"']?)[^\s'\",&]+"),
)
MASK = "***"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def register_secret(value: str | None) -> None:
    """Make `value` (a token, a webhook secret) be masked wherever it would appear in logs or stored errors."""
    if value and len(value) >= 4:
        with _LOCK:
            _SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with registered secrets and token-like strings replaced by ***."""
    if not text:
        return text
    with _LOCK:
        secrets = sorted(_SECRETS, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + MASK, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and string extras) with `redact`; attach it to handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None  # formatted (and redacted) above
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        doc.update(_extras(record))
        if record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, default=str)


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname.lower():7s} {record.name}: {record.getMessage()}"
        line = f"{line} {fields}" if fields else line
        return f"{line}\n{record.exc_text}" if record.exc_text else line


def setup_logging(level: str | int = "INFO", fmt: str = "json", stream=None, path=None) -> logging.Handler:
    """Configure the root logger for the bot's entry points: one handler, redacting, JSON or key=value."""
    handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_hub_bot", False)]:
        root.removeHandler(old)
    handler._hub_bot = True
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _route_libraries()
    return handler


def _route_libraries() -> None:
    """Libraries that print on their own (transformers' handler, Python warnings) go through this handler too,
    so that every line the bot writes is one of its log lines (JSON for `run`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    for name in ("transformers", "huggingface_hub", "uvicorn", "uvicorn.error"):
        library = logging.getLogger(name)
        for old in [h for h in library.handlers if not getattr(h, "_hub_bot", False)]:
            library.removeHandler(old)
        library.propagate = True
    logging.captureWarnings(True)
