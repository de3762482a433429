"""The bot process: one job store, one worker loop, and the triggers (HTTP server with the webhook endpoint and
the status page; a polling thread).

    bot = Bot(BotConfig.from_file("bot.yaml"))       # token from the env variable named in the config
    bot.start()                                       # lock, recover, whoami, serve, poll
    bot.run_forever()                                 # until request_stop() (SIGTERM) or stop()
    bot.stop()                                        # waits for the worker, then releases the lock

One bot per database: a lock file next to it refuses a second one. The lock is held until the worker has
stopped: `request_stop()` (what SIGTERM does) only asks; the worker finishes or gives back its current job at its
next checkpoint, `run_forever` returns, and `stop()` releases the lock last. Every wait of the bot (between jobs,
between polls, before a publishing retry) ends at once on a stop request.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from huggingface_hub import HfApi, constants

from . import throttle
from .access import AccessSync
from .config import BotConfig
from .errors import BotError, classify
from .lineage import Lineage
from .logs import register_secret
from .planner import Planner
from .publisher import Publisher
from .status import add_status_routes
from .store import LOCAL_OWNER, JobStore
from .triggers import Poller, add_webhook_route
from .worker import Hook, Worker

logger = logging.getLogger(__name__)


def make_api(config: BotConfig, token: str) -> HfApi:
    """A Hub client bound to the configured endpoint and the bot's token (no global HF_ENDPOINT needed)."""
    if config.hub.disable_xet:
        constants.HF_HUB_DISABLE_XET = True  # Hub-compatible servers without Xet storage (the local Hub)
    return HfApi(endpoint=config.hub.endpoint, token=token, library_name="hub_bot")


class Bot:
    def __init__(self, config: BotConfig, token: str | None = None, webhook_secret: str | None = None,
                 hooks: dict[str, Hook] | None = None, status_token: str | None = None):
        self.config = config
        token = token or config.hub.token()
        register_secret(token)
        self._secret = None
        if config.webhook:
            self._secret = webhook_secret or config.webhook.secret()
            register_secret(self._secret)
        self._status_token = status_token or (config.server.status_token() if config.server else None)
        register_secret(self._status_token)
        self.api = make_api(config, token)
        self.store = JobStore(config.database)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.access = AccessSync(self.api, self.store)
        self.lineage = Lineage(self.api)
        self.planner = Planner(config, self.store, self.api, self.access, self.wake.set)
        self.poller = Poller(config, self.api, self.planner)
        self.hooks = hooks
        self.worker: Worker | None = None
        self.user: str | None = None
        self.url: str | None = None  # base URL of the HTTP server, once started
        self._server: uvicorn.Server | None = None
        self._threads: list[threading.Thread] = []
        self._lock_file = None
        self._throttled = False

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> "Bot":
        self._lock()
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _whoami(self) -> dict:
        try:
            return self.api.whoami()
        except Exception as err:  # a wrong token, or the Hub is unreachable
            raise BotError(f"Cannot identify the bot on {self.config.hub.endpoint}: {classify(err).reason} (token "
                           f"from ${self.config.hub.token_env}).") from err

    def _start(self) -> "Bot":
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(self.config.torch_threads)
        me = self._whoami()
        self.user = me["name"]
        role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            logger.warning("the bot's token is read-only: every job fails at once; give the bot a write token")
        limits = self.config.limits
        throttle.install(limits.inline_wait_max_s)
        self._throttled = True
        publisher = Publisher(self.api, self.user, self.access, self.lineage,
                              delay_s=min(limits.backoff_s, limits.inline_wait_max_s),
                              inline_wait_max_s=limits.inline_wait_max_s, stop=self.stopping)
        self.worker = Worker(self.config, self.store, self.api, publisher, self.access, self.lineage, self.hooks,
                             stop=self.stopping)
        self.worker.read_only = role == "read"
        # One bot per database (the lock): the in-process leases of earlier bots belong to dead processes.
        recovered = self.store.recover(limits.max_attempts, dead_owner_prefix=LOCAL_OWNER)
        if recovered:
            logger.warning("recovered %d job(s) interrupted by a previous stop: %s", len(recovered), recovered)
        if self.config.server:
            self._serve()
        if self.config.poll_interval_s:
            self._thread("hub-bot-poll", self.poller.run, self.stopping, self.config.poll_interval_s)
        logger.info("bot started as %s on %s (%d watch entries)", self.user, self.config.hub.endpoint,
                    len(self.config.watch))
        return self

    def run_forever(self) -> None:
        """Run jobs as they come until a stop request; sleeps between them (woken by new jobs or the request).
        Jobs of other executors whose lease expired are taken back on the way."""
        while not self.stopping.is_set():
            self.store.recover(self.config.limits.max_attempts)
            self.run_pending()
            due = self.store.next_due()
            timeout = 30.0 if due is None else min(30.0, max(0.05, due - time.time()))
            self.wake.wait(timeout)
            self.wake.clear()

    def run_pending(self) -> int:
        if self.worker is None:
            raise BotError("Bot.start() first.")
        return self.worker.run_pending()

    def request_stop(self) -> None:
        """Ask the bot to stop (safe in a signal handler): no new job, the current one is finished or given back
        at its next checkpoint, every wait ends. `stop()` then releases the lock."""
        self.stopping.set()
        self.wake.set()

    def stop(self) -> None:
        """Stop serving and polling, wait for the worker to stop, then release the database lock."""
        self.request_stop()
        worker = self.worker
        if worker is not None and worker.thread == threading.get_ident():
            return  # called from inside the job (e.g. a hook): the worker loop returns first, then stop() again
        if worker is not None:
            worker.idle.wait()
        if self._server is not None:
            self._server.should_exit = True
        for t in self._threads:
            t.join(timeout=10)
        if self._throttled:
            throttle.uninstall(self.config.limits.inline_wait_max_s)
            self._throttled = False
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "Bot":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- internals
    def _lock(self) -> None:
        path = self.config.database.with_suffix(self.config.database.suffix + ".lock")
        self._lock_file = open(path, "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise BotError(f"Another bot is running on {self.config.database} (lock {path}); stop it first or give "
                           "this one another database.") from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

    def _thread(self, name: str, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def app(self) -> FastAPI:
        app = FastAPI(title="Pruning bot", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(Exception)
        async def unexpected(request, err: Exception):  # logged as JSON like the rest, answered as JSON
            logger.error("unexpected error on %s %s: %s", request.method, request.url.path, classify(err).reason,
                         exc_info=err)
            return JSONResponse({"error": "internal error"}, status_code=500)

        if self.config.webhook:
            add_webhook_route(app, self.config.webhook.path, self._secret, self.planner,
                              self.config.webhook.max_body_bytes)
        add_status_routes(app, self.store, self.config.hub.endpoint, self._status_token)
        return app

    def _serve(self) -> None:
        settings = self.config.server
        sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
        sock.listen(128)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, log_config=None)  # uvicorn logs through ours
        self._server = uvicorn.Server(config)
        self._thread("hub-bot-http", self._server.run, [sock])
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline:
                raise BotError(f"The bot's HTTP server did not start on {self.url}.")
            time.sleep(0.02)
        hooks = f"; webhooks at {self.url}{self.config.webhook.path}" if self.config.webhook else ""
        logger.info("serving the status page at %s/%s", self.url, hooks)
