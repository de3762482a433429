"""Pushing a pruned folder to the Hub, and which token to use.

Tokens: the signed-in user's OAuth token; in local runs (not on a Space) the user's stored token as a fallback.
On a Space the Space's own token is never used for users, so nobody acts with the owner's rights. Tokens are never
logged or shown.
"""
from __future__ import annotations

import logging
import re

from .errors import SpaceError, friendly
from .settings import Settings

logger = logging.getLogger(__name__)

NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def read_token(oauth_token: str | None, settings: Settings) -> str | bool | None:
    """For reading models: the user's token; None (the client's stored token) locally; False (anonymous) on a Space."""
    if oauth_token:
        return oauth_token
    return False if settings.on_space else None


def write_token(oauth_token: str | None, settings: Settings) -> str:
    if oauth_token:
        return oauth_token
    if settings.on_space:
        raise SpaceError("Sign in with Hugging Face (button at the top of the page) to push, or download the zip.")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise SpaceError("No Hugging Face token found on this machine: run `hf auth login` (or set HF_TOKEN) and "
                         "restart the app, or download the zip instead.")
    return token


def username(token: str | bool | None, settings: Settings) -> str | None:
    """The token's user name, or None (no token, offline, ...)."""
    if token is False:
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=settings.endpoint).whoami(token=token)["name"]
    except Exception as err:  # only used for a suggestion
        logger.info("whoami failed: %s", type(err).__name__)
        return None


def suggest_repo_id(user: str | None, model: str, method: str, removed_fraction: float) -> str:
    """`{user}/{model}-{method}-{pct}pct` with the measured share of parameters removed."""
    name = NAME_CHARS.sub("-", f"{model}-{method}-{round(100 * removed_fraction)}pct").strip("-.")[:96]
    return f"{user}/{name}" if user else name


def check_repo_id(repo_id: str, token: str, settings: Settings) -> str:
    repo_id = (repo_id or "").strip().strip("/")
    if not repo_id:
        raise SpaceError("Give the repository a name, e.g. `your-name/model-pruned`.")
    if "/" not in repo_id:
        user = username(token, settings)
        if not user:
            raise SpaceError("Write the repository as `namespace/name` (the token's user could not be read).")
        repo_id = f"{user}/{repo_id}"
    namespace, _, name = repo_id.partition("/")
    if "/" in name or not namespace or not name or NAME_CHARS.search(namespace + name) or len(name) > 96:
        raise SpaceError(f"{repo_id!r} is not a valid repository id: use `namespace/name` with letters, digits, "
                         "'-', '_' and '.' (at most 96 characters).")
    return repo_id


def push_folder(folder, repo_id: str, token: str, private: bool, settings: Settings,
                message: str = "Upload pruned model") -> str:
    """Create `repo_id` and upload `folder` in one commit; returns the repo URL.

    If anything fails after the repo was created, the repo is deleted again so no empty repo remains.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=settings.endpoint, token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=False)
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code == 409:
            raise SpaceError(f"{repo_id} already exists. Edit the repository name and push again.") from None
        raise SpaceError(f"Could not create {repo_id}: {friendly(err)}") from None
    try:
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except BaseException as err:
        try:
            api.delete_repo(repo_id)
            logger.info("deleted %s after a failed upload", repo_id)
        except Exception as cleanup:  # report the upload error; the leftover is logged
            logger.error("could not delete %s after a failed upload: %s", repo_id, type(cleanup).__name__)
        if isinstance(err, Exception):
            raise SpaceError(f"The upload to {repo_id} failed, so the new repository was deleted again: "
                             f"{friendly(err)}") from None
        raise
    return str(url)
