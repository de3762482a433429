"""A local, Hub-compatible HTTP server for tests and offline demos.

The real `huggingface_hub` client and `transformers.from_pretrained` talk to it through `HF_ENDPOINT`:
repos with commit history, LFS uploads/downloads, pull requests and discussions, tokens with read/write roles,
private and gated repos, search, webhooks, and fault injection. See README.md in this folder.

    from hub_bot.local_hub import start_local_hub
    server = start_local_hub(tmp_path, {"tokens": {"hf_w": {"user": "alice", "role": "write"}}})
    ...  # HF_ENDPOINT=server.url
    server.stop()
"""
from .config import HubConfig
from .errors import HubError
from .faults import FaultInjector
from .hub import LocalHub
from .runner import LocalHubServer, start_local_hub
from .server import create_app
from .webhooks import Webhook

__all__ = ["HubConfig", "HubError", "FaultInjector", "LocalHub", "LocalHubServer", "Webhook", "create_app",
           "start_local_hub"]
