"""Command line: `python -m hub_bot.local_hub --data DIR --port 8765 --tokens FILE`."""
from __future__ import annotations

import argparse
import logging

from .config import HubConfig
from .hub import LocalHub
from .runner import LocalHubServer

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hub_bot.local_hub", description=__doc__)
    parser.add_argument("--data", required=True, help="data directory (created if missing; state survives restarts)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="API port (what HF_ENDPOINT points to)")
    parser.add_argument("--storage-port", type=int, default=None,
                        help="port of the storage/CDN origin for LFS transfers (default: --port + 1)")
    parser.add_argument("--tokens", help="JSON/YAML config: tokens, users/orgs, webhooks, admin_token, page sizes")
    parser.add_argument("--public-url", help="URL clients use to reach the API, if not http://HOST:PORT")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = HubConfig.from_file(args.tokens) if args.tokens else HubConfig()
    if not config.tokens:
        logger.warning("no tokens configured: the hub is read-only for anonymous users")
    storage_port = args.storage_port if args.storage_port is not None else (args.port + 1 if args.port else 0)
    server = LocalHubServer(LocalHub(args.data, config), host=args.host, port=args.port, storage_port=storage_port,
                            public_url=args.public_url, log_level=args.log_level)
    server.serve_forever()


if __name__ == "__main__":
    main()
