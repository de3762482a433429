"""The two triggers: Hub webhooks (an HTTP endpoint) and polling (model_info / list_models at an interval).

Webhooks: the `X-Webhook-Secret` header is compared in constant time; the raw JSON body is read (the client's
`WebhookPayload` model drops `repo.headSha`). Only pushes to `refs/heads/main` of model repos make jobs: other
branches, PR refs (`refs/pr/N`, where the bot itself pushes), tags, discussions and settings are ignored.
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .config import BotConfig

logger = logging.getLogger(__name__)

MAIN_REF = "refs/heads/main"
OnCommit = Callable[[str, str, str], list]


def parse_event(payload: dict) -> tuple[str, str] | str:
    """(repo id, new main sha) of a push to main of a model repo; otherwise why the event is ignored."""
    if not isinstance(payload, dict):
        return "not a JSON object"
    event, repo = payload.get("event") or {}, payload.get("repo") or {}
    if event.get("scope") != "repo.content":
        return f"scope {event.get('scope')!r} is not a push"
    if repo.get("type") != "model" or not repo.get("name"):
        return f"not a model repo ({repo.get('type')!r})"
    refs = payload.get("updatedRefs")
    if refs is None:  # older payloads: the head of the default branch only
        return (repo["name"], repo["headSha"]) if repo.get("headSha") else "no headSha"
    for ref in refs:
        if isinstance(ref, dict) and ref.get("ref") == MAIN_REF:
            return (repo["name"], ref["newSha"]) if ref.get("newSha") else "main was deleted"
    return "no update of refs/heads/main (another branch or a pull request)"


def add_webhook_route(app: FastAPI, path: str, secret: str, on_commit: OnCommit) -> None:
    expected = secret.encode()

    @app.post(path)
    async def webhook(request: Request):
        given = request.headers.get("x-webhook-secret", "").encode()
        if not hmac.compare_digest(given, expected):
            logger.warning("webhook refused: missing or wrong X-Webhook-Secret")
            return JSONResponse({"error": "invalid X-Webhook-Secret"}, status_code=401)
        try:
            payload = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        parsed = parse_event(payload)
        if isinstance(parsed, str):
            logger.debug("webhook ignored: %s", parsed)
            return {"status": "ignored", "reason": parsed}
        repo, sha = parsed
        jobs = await run_in_threadpool(on_commit, repo, sha, "webhook")
        return {"status": "queued" if jobs else "known", "jobs": jobs}


class Poller:
    """Asks the Hub for the head of every watched repo (and every model of watched authors) at an interval."""

    def __init__(self, config: BotConfig, api, on_commit: OnCommit):
        self.config = config
        self.api = api
        self.on_commit = on_commit

    def poll_once(self) -> int:
        """One round; returns how many new jobs were queued. Errors are logged, never raised."""
        queued = 0
        for entry in self.config.watch:
            try:
                if entry.repo:
                    heads = [(entry.repo, self.api.model_info(entry.repo).sha)]
                else:
                    heads = [(m.id, m.sha or self.api.model_info(m.id).sha)
                             for m in self.api.list_models(author=entry.author)]
            except Exception as err:  # the next round tries again
                logger.warning("polling %s failed: %s", entry.repo or entry.author, err)
                continue
            for repo_id, sha in heads:
                if sha:
                    queued += len(self.on_commit(repo_id, sha, "poll"))
        return queued

    def run(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.is_set():
            self.poll_once()
            stop.wait(interval_s)
