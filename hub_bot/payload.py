"""The webhook payload (the Hub's version 3), checked at the door.

`read_event(body)` turns the raw body into what the bot acts on: a `Push` to `refs/heads/main` of a model repo,
a `SettingsChange` of one (visibility, gating), or an `Ignored` event with its reason. A body that is not JSON,
does not have the payload's shape (checked with pydantic: `event` and `repo` objects, strings where the Hub sends
strings), names a repo that is not a valid Hub repo id (huggingface_hub's own validator) or a main commit that is
not a 40-hex sha raises `InvalidPayload` (answered 422, or 400 for non-JSON) with a short reason.

The client's `huggingface_hub.WebhookPayload` is not used: it drops `repo.headSha`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr, ValidationError

MAIN_REF = "refs/heads/main"
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Event(_Model):
    action: StrictStr
    scope: StrictStr


class _Repo(_Model):
    type: StrictStr
    name: StrictStr
    headSha: StrictStr | None = None
    private: StrictBool | None = None


class _Ref(_Model):
    ref: StrictStr
    oldSha: StrictStr | None = None
    newSha: StrictStr | None = None


class WebhookPayload(_Model):
    event: _Event
    repo: _Repo
    updatedRefs: list[_Ref] | None = None


@dataclass(frozen=True)
class Push:
    repo: str
    sha: str


@dataclass(frozen=True)
class SettingsChange:
    repo: str


@dataclass(frozen=True)
class Ignored:
    reason: str


class InvalidPayload(ValueError):
    def __init__(self, reason: str, status: int = 422):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _short(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    more = len(err.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def read_event(body: bytes) -> Push | SettingsChange | Ignored:
    """What a webhook body asks of the bot; InvalidPayload when it is malformed."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidPayload("the body is not JSON", status=400) from None
    try:
        payload = WebhookPayload.model_validate(data)
    except ValidationError as err:
        raise InvalidPayload(f"not a Hub webhook payload: {_short(err)}") from None
    repo = payload.repo
    if repo.type != "model":
        return Ignored(f"not a model repo ({repo.type})")
    try:
        validate_repo_id(repo.name)
    except HFValidationError as err:
        raise InvalidPayload(f"repo.name {repo.name[:100]!r} is not a valid repo id: {str(err).split('.')[0]}") \
            from None
    scope = payload.event.scope
    if scope == "repo.config":
        return SettingsChange(repo.name)
    if scope != "repo.content":
        return Ignored(f"scope {scope!r} is neither a push nor a settings change")
    if payload.updatedRefs is None:  # older payloads: the head of the default branch only
        sha = repo.headSha
        if sha is None:
            return Ignored("no updatedRefs and no headSha")
    else:
        main = [r for r in payload.updatedRefs if r.ref == MAIN_REF]
        if not main:
            return Ignored("no update of refs/heads/main (another branch, a tag or a pull request)")
        sha = main[0].newSha
        if sha is None:
            return Ignored("main was deleted")
    if not SHA_RE.match(sha):
        raise InvalidPayload(f"the new main commit {sha[:50]!r} is not a 40-hex commit id")
    return Push(repo.name, sha)
