"""Start configuration of the local Hub: tokens, users/orgs, webhooks, admin token, page sizes.

Read from a JSON or YAML file (`--tokens FILE`) or given as keyword arguments. File shape::

    admin_token: admin-secret            # enables /_admin/* (fault injection, grants, deliveries)
    users:                               # optional: fullname and organizations of users
      alice: {fullname: Alice, orgs: [pruners]}
    tokens:                              # token -> user, role (read|write), extra orgs
      hf_alice_write: {user: alice, role: write}
      hf_alice_read: {user: alice, role: read}
    webhooks:                            # optional
      - {url: "http://127.0.0.1:9000/webhook", secret: s3cret, watched: [{type: user, name: alice}],
         domains: [repo, discussion]}
    search_page_size: 1000               # optional page sizes (Link rel="next" pagination)
    tree_page_size: 1000
    commits_page_size: 50

A file holding only a mapping `token -> {user, role}` (no `tokens` key) is read as the tokens table.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)


@dataclass
class HubConfig:
    tokens: dict[str, dict] = field(default_factory=dict)
    users: dict[str, dict] = field(default_factory=dict)
    webhooks: list[dict] = field(default_factory=list)
    admin_token: str | None = None
    search_page_size: int = 1000
    tree_page_size: int = 1000
    commits_page_size: int = 50
    webhook_max_attempts: int = 4
    webhook_backoff_s: float = 0.5

    @classmethod
    def from_dict(cls, data: dict) -> "HubConfig":
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        if "tokens" not in data and data and all(isinstance(v, dict) and "user" in v for v in data.values()):
            data = {"tokens": data}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown local hub config keys: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> "HubConfig":
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.from_dict(data or {})
