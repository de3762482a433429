"""Signed, expiring URLs for the storage ("CDN") origin.

The Hub redirects LFS downloads to a CDN and LFS uploads to object storage with pre-signed URLs: the client then
talks to that other origin *without* its token. The local Hub does the same with an HMAC over (action, oid, size,
expiry) under a per-process secret, so such a URL authorizes exactly one object for a limited time.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time

logger = logging.getLogger(__name__)


class UrlSigner:
    """Create and check signatures of storage URLs."""

    def __init__(self, secret: bytes | None = None, ttl_s: int = 3600):
        self.secret = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _mac(self, action: str, oid: str, size: int, expires: int) -> str:
        msg = f"{action}\n{oid}\n{size}\n{expires}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def sign(self, action: str, oid: str, size: int) -> dict[str, str]:
        """Query parameters (`size`, `expires`, `sig`) authorizing `action` on object `oid`."""
        expires = int(time.time()) + self.ttl_s
        return {"size": str(size), "expires": str(expires), "sig": self._mac(action, oid, size, expires)}

    def check(self, action: str, oid: str, params) -> int | None:
        """The signed size if `params` carry a valid, unexpired signature for (action, oid); None otherwise."""
        try:
            size = int(params.get("size", ""))
            expires = int(params.get("expires", ""))
        except ValueError:
            return None
        sig = params.get("sig") or ""
        if expires < time.time():
            return None
        if not hmac.compare_digest(sig.encode(), self._mac(action, oid, size, expires).encode()):
            return None
        return size
