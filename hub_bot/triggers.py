"""The two triggers: Hub webhooks (an HTTP endpoint) and polling (model_info / list_models at an interval).

Webhooks, checked in this order: the `X-Webhook-Secret` header (constant-time compare; 401), the body size
(`webhook.max_body_bytes`, also when the secret is right; 413), the payload (payload.py: 400 for non-JSON, 422
with a short reason for a wrong shape, an invalid repo name or sha). Only pushes to `refs/heads/main` and
settings changes of watched model repos act; everything else is answered `ignored` with the reason. When the Hub
cannot be asked (to spell the repo's name and read its access) the answer is 503, so that the Hub delivers again.
"""
from __future__ import annotations

import hmac
import logging
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .access import Access
from .config import BotConfig
from .errors import classify
from .payload import Ignored, InvalidPayload, Push, read_event
from .planner import Planner, Source

logger = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    pass


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def add_webhook_route(app: FastAPI, path: str, secret: str, planner: Planner, max_body_bytes: int) -> None:
    expected = secret.encode()

    def handle(event, trigger: str):
        if isinstance(event, Push):
            return planner.on_commit(event.repo, event.sha, trigger)
        return planner.on_settings(event.repo, trigger)

    @app.post(path)
    async def webhook(request: Request):
        given = request.headers.get("x-webhook-secret", "").encode()
        if not hmac.compare_digest(given, expected):
            logger.warning("webhook refused: missing or wrong X-Webhook-Secret")
            return JSONResponse({"error": "invalid X-Webhook-Secret"}, status_code=401)
        try:
            event = read_event(await _read_capped(request, max_body_bytes))
        except BodyTooLarge:
            logger.warning("webhook refused: body over %d bytes", max_body_bytes)
            return JSONResponse({"error": f"the body is larger than {max_body_bytes} bytes"}, status_code=413)
        except InvalidPayload as err:
            logger.warning("webhook refused: %s", err.reason)
            return JSONResponse({"error": "invalid webhook payload", "reason": err.reason}, status_code=err.status)
        if isinstance(event, Ignored):
            logger.debug("webhook ignored: %s", event.reason)
            return {"status": "ignored", "reason": event.reason}
        try:
            outcome = await run_in_threadpool(handle, event, "webhook")
        except Exception as err:  # the Hub could not be asked: let it deliver again later
            failure = classify(err)
            logger.warning("webhook not handled, answering 503: %s", failure.reason, extra={"repo": event.repo})
            return JSONResponse({"error": "the bot cannot reach the Hub now; deliver again later",
                                 "reason": failure.reason}, status_code=503)
        return outcome.doc()


class Poller:
    """Asks the Hub for the head of every watched repo (and every model of watched authors) at an interval."""

    def __init__(self, config: BotConfig, api, planner: Planner):
        self.config = config
        self.api = api
        self.planner = planner

    def _heads(self, entry) -> list[tuple[str, str, Source]]:
        names = [entry.repo] if entry.repo else [m.id for m in self.api.list_models(author=entry.author)]
        heads = []
        for name in names:
            info = self.api.model_info(name)
            if info.sha:
                heads.append((info.id, info.sha, Source(info.id, Access.of(info))))
        return heads

    def poll_once(self) -> int:
        """One round; returns how many new jobs were queued. Errors are logged, never raised."""
        queued = 0
        for entry in self.config.watch:
            try:
                heads = self._heads(entry)
            except Exception as err:  # the next round tries again
                logger.warning("polling %s failed: %s", entry.repo or entry.author, err)
                continue
            for repo_id, sha, source in heads:
                try:
                    outcome = self.planner.on_commit(repo_id, sha, "poll", source)
                except Exception as err:
                    logger.warning("polling %s failed: %s", repo_id, err)
                    continue
                queued += len(outcome.jobs) if outcome.status == "queued" else 0
        return queued

    def run(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.is_set():
            self.poll_once()
            stop.wait(interval_s)
