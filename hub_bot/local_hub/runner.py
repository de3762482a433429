"""Running the local Hub: in a background thread for tests, or in the foreground for the CLI.

The server listens on two sockets of the same app: the API origin (`url`, what `HF_ENDPOINT` points to) and a
storage origin (`storage_url`, another port) that plays the Hub's CDN / object storage. LFS downloads redirect
there and LFS uploads go there with signed URLs, so — exactly as with the real Hub — the client treats them as
another host: it stops at the redirect for metadata and sends no token there.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn

from .config import HubConfig
from .hub import LocalHub
from .server import create_app

logger = logging.getLogger(__name__)

KEEP_ALIVE_S = 65.0


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class LocalHubServer:
    """A :class:`LocalHub` served over HTTP by uvicorn (API socket + storage socket)."""

    def __init__(self, hub: LocalHub, *, host: str = "127.0.0.1", port: int = 0, storage_port: int = 0,
                 public_url: str | None = None, log_level: str = "warning"):
        self.hub = hub
        self.host = host
        self._api_sock = _bind(host, port)
        self._storage_sock = _bind(host, storage_port)
        url_host = f"[{host}]" if ":" in host else host
        self.port = self._api_sock.getsockname()[1]
        self.storage_port = self._storage_sock.getsockname()[1]
        self.url = (public_url or f"http://{url_host}:{self.port}").rstrip("/")
        self.storage_url = f"http://{url_host}:{self.storage_port}"
        hub.public_url = hub.public_url or self.url
        hub.cdn_url = hub.cdn_url or self.storage_url
        # idle keep-alive connections stay open longer than clients keep them (httpx: 5 s, uvicorn's default too):
        # with equal timeouts a client may reuse a connection the server is closing ('Connection reset by peer')
        config = uvicorn.Config(create_app(hub), log_level=log_level, lifespan="off", access_log=False,
                                timeout_graceful_shutdown=2, timeout_keep_alive=KEEP_ALIVE_S)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> str:
        """Serve in a daemon thread; returns the API URL once the server accepts connections."""
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._api_sock, self._storage_sock]},
                                        name="local-hub", daemon=True)
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("local hub failed to start")
            time.sleep(0.01)
        logger.info("local hub serving %s (storage %s) from %s", self.url, self.storage_url, self.hub.data_dir)
        return self.url

    def serve_forever(self) -> None:
        """Serve in the current thread until interrupted (Ctrl-C / SIGTERM)."""
        logger.info("local hub serving %s (storage %s) from %s", self.url, self.storage_url, self.hub.data_dir)
        try:
            self._server.run(sockets=[self._api_sock, self._storage_sock])
        finally:
            self._close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving, flush pending webhook deliveries briefly, close sockets."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(2.0)
        self._close()

    def _close(self) -> None:
        self.hub.close()
        for sock in (self._api_sock, self._storage_sock):
            try:
                sock.close()
            except OSError:
                pass

    def __enter__(self) -> "LocalHubServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_hub(data_dir: str | Path, config: HubConfig | dict | None = None, *, host: str = "127.0.0.1",
                    port: int = 0, storage_port: int = 0, log_level: str = "warning") -> LocalHubServer:
    """Start a local Hub on `data_dir` in a background thread (free ports by default); call `.stop()` after.

    `config` is a :class:`HubConfig` or the same dict as a config file (tokens, users, webhooks, admin_token...).
    """
    if isinstance(config, dict):
        config = HubConfig.from_dict(config)
    server = LocalHubServer(LocalHub(data_dir, config), host=host, port=port, storage_port=storage_port,
                            log_level=log_level)
    server.start()
    return server
