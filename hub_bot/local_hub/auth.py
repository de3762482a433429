"""Users, organizations and access tokens, and who may read or write what.

Tokens are configured at start (see config.py): `token -> {user, role: read|write, orgs?}`, plus optional
`users: {name: {fullname, orgs}}`. A token's user may read public repos, and read or write (write-role tokens
only) the repos of their own namespace and of their organizations. Private repos are invisible to everyone else;
gated repos serve file contents only to owners, org members and users granted access. Tokens are compared in
constant time and never logged (only the user name is).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field

from . import errors

logger = logging.getLogger(__name__)

ROLES = ("read", "write")


@dataclass(frozen=True)
class Principal:
    """The caller of a request: a user with a token role, or anonymous (user None)."""

    user: str | None = None
    role: str | None = None
    orgs: tuple[str, ...] = ()
    fullname: str | None = None
    token_name: str | None = None

    @property
    def authenticated(self) -> bool:
        return self.user is not None

    def is_member(self, namespace: str) -> bool:
        """Owner of the namespace or member of the organization (case-insensitive like the Hub)."""
        if self.user is None:
            return False
        ns = namespace.lower()
        return ns == self.user.lower() or ns in {o.lower() for o in self.orgs}

    def can_read(self, meta: dict) -> bool:
        return not meta.get("private") or self.is_member(meta["namespace"])

    def can_write_namespace(self, namespace: str) -> bool:
        return self.role == "write" and self.is_member(namespace)

    def has_gated_access(self, meta: dict) -> bool:
        if not meta.get("gated"):
            return True
        if self.is_member(meta["namespace"]):
            return True
        return self.user is not None and self.user.lower() in {u.lower() for u in meta.get("gatedGrants", [])}


ANONYMOUS = Principal()


@dataclass
class TokenRegistry:
    """Token -> principal, and user -> orgs/fullname. Built from the config (see :meth:`from_config`)."""

    tokens: dict[str, dict] = field(default_factory=dict)
    users: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def from_config(cls, tokens: dict | None, users: dict | None = None) -> "TokenRegistry":
        registry = cls(users={k: dict(v or {}) for k, v in (users or {}).items()})
        for token, spec in (tokens or {}).items():
            registry.add_token(token, **spec)
        return registry

    def add_token(self, token: str, user: str, role: str = "write", orgs: list[str] | None = None,
                  fullname: str | None = None, name: str | None = None) -> None:
        """Register a token of `user` with `role` ('read' or 'write'); `orgs` are added to the user's orgs."""
        if role not in ROLES:
            raise ValueError(f"token role must be one of {ROLES}, got {role!r}")
        if not token or not user:
            raise ValueError("a token needs a non-empty value and user")
        info = self.users.setdefault(user, {})
        info.setdefault("orgs", [])
        for org in orgs or []:
            if org not in info["orgs"]:
                info["orgs"].append(org)
        if fullname:
            info["fullname"] = fullname
        self.tokens[token] = {"user": user, "role": role, "name": name or f"{user}-{role}"}
        logger.debug("registered a %s token for user %s", role, user)

    def add_user_to_org(self, user: str, org: str) -> None:
        info = self.users.setdefault(user, {"orgs": []})
        info.setdefault("orgs", [])
        if org not in info["orgs"]:
            info["orgs"].append(org)

    def org_names(self) -> set[str]:
        return {o for info in self.users.values() for o in info.get("orgs", [])}

    def lookup(self, token: str) -> Principal | None:
        """The principal of a token, or None for an unknown token (constant-time comparison)."""
        found = None
        for known, spec in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = spec
        if found is None:
            return None
        info = self.users.get(found["user"], {})
        return Principal(user=found["user"], role=found["role"], orgs=tuple(info.get("orgs", [])),
                         fullname=info.get("fullname") or found["user"], token_name=found["name"])

    def principal_from_header(self, authorization: str | None) -> Principal:
        """Principal of an `Authorization: Bearer <token>` header; 401 for a malformed header or unknown token."""
        if not authorization:
            return ANONYMOUS
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.unauthorized("Invalid credentials in Authorization header")
        principal = self.lookup(token)
        if principal is None:
            raise errors.unauthorized("Invalid credentials in Authorization header")
        return principal

    def whoami(self, principal: Principal) -> dict:
        """The `/api/whoami-v2` document of an authenticated principal."""
        orgs = [{"type": "org", "id": account_id(o), "name": o, "fullname": o, "roleInOrg": "write",
                 "isEnterprise": False, "avatarUrl": f"/avatars/{o}.svg"} for o in principal.orgs]
        return {
            "type": "user",
            "id": account_id(principal.user),
            "name": principal.user,
            "fullname": principal.fullname or principal.user,
            "email": None,
            "emailVerified": False,
            "canPay": False,
            "isPro": False,
            "periodEnd": None,
            "avatarUrl": f"/avatars/{principal.user}.svg",
            "orgs": orgs,
            "auth": {"type": "access_token",
                     "accessToken": {"displayName": principal.token_name, "role": principal.role}},
        }


def account_id(name: str) -> str:
    """Stable 24-hex id of a user or organization (`owner.id`, `author.id` in payloads)."""
    return hashlib.sha1(f"account:{name.lower()}".encode()).hexdigest()[:24]


def require_auth(principal: Principal, action: str = "do this") -> None:
    if not principal.authenticated:
        raise errors.unauthorized(f"You must be authenticated to {action}.")


def require_write_role(principal: Principal, action: str) -> None:
    """401 when anonymous, 403 (with a clear message) for a read-only token."""
    require_auth(principal, action)
    if principal.role != "write":
        raise errors.forbidden(
            f"Your token has the 'read' role: it cannot {action}. Use a token with the 'write' role.")
