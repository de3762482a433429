"""The local Hub service: repos, access control, read APIs and events, independent of HTTP.

:class:`LocalHub` owns the storage, the token registry, the webhook dispatcher, the fault injector and the URL
signer. Its methods take the calling :class:`~.auth.Principal` and plain values, return JSON-ready dicts and raise
:class:`~.errors.HubError` for anything the Hub would refuse; server.py only translates HTTP to these calls.
The write path (preupload, LFS, commits) lives in pushes.py and discussions/PRs in community.py.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import secrets
from pathlib import Path
from urllib.parse import quote, urlencode

from . import cards, errors
from .auth import Principal, TokenRegistry, account_id, require_auth, require_write_role
from .community import Community
from .config import HubConfig
from .discussions import DiscussionStore
from .faults import FaultInjector
from .objects import atomic_write_bytes
from .pushes import Pushes
from .signing import UrlSigner
from .storage import BRANCH_RE, DEFAULT_GITATTRIBUTES, NAME_RE, REPO_TYPES, RepoKey, RepoStore
from .webhooks import Webhook, WebhookDispatcher

logger = logging.getLogger(__name__)

def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset}).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        offset = int(json.loads(base64.urlsafe_b64decode(padded))["o"])
    except (ValueError, KeyError, TypeError):
        raise errors.bad_request("Invalid cursor") from None
    if offset < 0:
        raise errors.bad_request("Invalid cursor")
    return offset


def truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


class LocalHub:
    """A Hub-compatible service on a data directory (state survives restarts)."""

    def __init__(self, data_dir: str | Path, config: HubConfig | None = None, *, public_url: str | None = None,
                 cdn_url: str | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = config or HubConfig()
        self.store = RepoStore(self.data_dir)
        self.discussions = DiscussionStore(self.store)
        self.auth = TokenRegistry.from_config(self.config.tokens, self.config.users)
        self.faults = FaultInjector()
        self.signer = UrlSigner(self._secret())
        self.webhooks = WebhookDispatcher(self.data_dir / "webhooks.json",
                                          max_attempts=self.config.webhook_max_attempts,
                                          backoff_s=self.config.webhook_backoff_s)
        self.webhooks.configure(self.config.webhooks)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.cdn_url = cdn_url.rstrip("/") if cdn_url else None
        self.pushes = Pushes(self)
        self.community = Community(self)
        self._params_cache: dict[str, dict] = {}

    def _secret(self) -> bytes:
        """Per-data-dir signing secret (kept across restarts so issued URLs stay valid)."""
        path = self.data_dir / "secret.key"
        if not path.exists():
            atomic_write_bytes(path, secrets.token_bytes(32))
        return path.read_bytes()

    def close(self) -> None:
        self.webhooks.close()

    # ---------------------------------------------------------------- URLs
    def base(self, request_base: str | None = None) -> str:
        return (self.public_url or request_base or "http://localhost").rstrip("/")

    def storage_base(self, request_base: str | None = None) -> str:
        return (self.cdn_url or self.base(request_base)).rstrip("/")

    def web_url(self, key: RepoKey, base: str) -> str:
        return f"{base}/{key.url_prefix}{key.repo_id}"

    # ---------------------------------------------------------------- access helpers
    def principal(self, authorization: str | None) -> Principal:
        return self.auth.principal_from_header(authorization)

    def principal_of_user(self, user: str) -> Principal:
        info = self.auth.users.get(user, {})
        return Principal(user=user, role="read", orgs=tuple(info.get("orgs", [])))

    def repo(self, principal: Principal, repo_type: str, repo_id: str) -> tuple[RepoKey, dict]:
        """Key and metadata of a repo the principal may see; RepoNotFound otherwise (private repos included)."""
        if repo_type not in REPO_TYPES:
            raise errors.not_found()
        key = self.store.canonical(RepoKey.parse(repo_type, repo_id))  # names are case-insensitive, as on the Hub
        meta = self.store.get_meta(key)
        if meta is None or not principal.can_read(meta):
            raise errors.repo_not_found(repo_id, authenticated=principal.authenticated)
        return key, meta

    def revision(self, key: RepoKey, revision: str) -> str:
        sha = self.store.resolve(key, revision)
        if sha is None:
            raise errors.revision_not_found(revision)
        return sha

    def require_gated_access(self, principal: Principal, key: RepoKey, meta: dict) -> None:
        if not principal.has_gated_access(meta):
            raise errors.gated(key.repo_id, authenticated=principal.authenticated)

    def require_namespace_write(self, principal: Principal, key: RepoKey, action: str) -> None:
        require_write_role(principal, action)
        if not principal.can_write_namespace(key.namespace):
            raise errors.forbidden(f"You don't have the rights to {action} in {key.repo_id}: "
                                   f"you are not a member of '{key.namespace}'.")

    def head(self, key: RepoKey, branch: str = "main") -> str | None:
        return self.store.get_refs(key)["heads"].get(branch)

    # ---------------------------------------------------------------- account
    def whoami(self, principal: Principal) -> dict:
        if not principal.authenticated:
            raise errors.unauthorized("Invalid username or password.")
        return self.auth.whoami(principal)

    # ---------------------------------------------------------------- repo lifecycle
    def create_repo(self, principal: Principal, body: dict, base: str) -> dict:
        repo_type = body.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise errors.bad_request(f"Invalid repo type: {repo_type!r}")
        require_write_role(principal, "create repos")
        name = body.get("name")
        namespace = body.get("organization") or principal.user
        if not isinstance(name, str) or not NAME_RE.match(name) or "--" in name or ".." in name \
                or name.endswith((".", "-", ".git")):
            raise errors.bad_request(f"Invalid repo name: {name!r}. Use letters, digits, '-', '_' and '.' "
                                     f"(96 characters at most, not starting or ending with '-' or '.').")
        if not isinstance(namespace, str) or not principal.can_write_namespace(namespace):
            raise errors.forbidden(f'You don\'t have the rights to create a {repo_type} under the namespace '
                                   f'"{namespace}"')
        visibility = body.get("visibility")
        if visibility is not None and visibility not in ("public", "private", "protected"):
            raise errors.bad_request(f"Invalid visibility: {visibility!r}")
        private = visibility in ("private", "protected") if visibility is not None else bool(body.get("private"))
        if repo_type == "space" and not body.get("sdk"):
            raise errors.bad_request("A Space needs an sdk (gradio, docker or static)")
        key = RepoKey(repo_type, namespace, name)
        url = self.web_url(key, base)
        extra = {"sdk": body["sdk"]} if repo_type == "space" else {}
        try:
            meta = self.store.create(key, private=private, author=principal.user, extra_meta=extra,
                                     initial_files={".gitattributes": DEFAULT_GITATTRIBUTES.encode()})
        except FileExistsError:
            existing = self.store.find_case_insensitive(key) or key
            raise errors.conflict(f"You already created this {repo_type} repo",
                                  url=self.web_url(existing, base)) from None
        self.emit(key, meta, "repo", "create", base)
        return {"url": url, "name": key.repo_id, "id": meta["id"]}

    def delete_repo(self, principal: Principal, body: dict, base: str) -> dict:
        repo_type = body.get("type") or "model"
        require_write_role(principal, "delete repos")
        namespace = body.get("organization") or principal.user
        key, meta = self.repo(principal, repo_type, f"{namespace}/{body.get('name')}")
        self.require_namespace_write(principal, key, "delete repos")
        payload = self._payload_builder(key, meta, "repo", "delete", base)
        self.store.delete(key)
        self.webhooks.emit(payload, "repo", key.type, key.repo_id, can_read=self._reader_check(meta))
        return {}

    def update_settings(self, principal: Principal, repo_type: str, repo_id: str, body: dict, base: str) -> dict:
        key, meta = self.repo(principal, repo_type, repo_id)
        self.require_namespace_write(principal, key, "change settings")
        with self.store.lock(key):
            meta = self.store.get_meta(key)
            if "gated" in body:
                if body["gated"] not in ("auto", "manual", False):
                    raise errors.bad_request(f"Invalid gated value: {body['gated']!r}")
                meta["gated"] = body["gated"]
            if "visibility" in body:
                if body["visibility"] not in ("public", "private", "protected"):
                    raise errors.bad_request(f"Invalid visibility: {body['visibility']!r}")
                meta["private"] = body["visibility"] != "public"
            elif "private" in body:
                meta["private"] = bool(body["private"])
            self.store.save_meta(key, meta)
        self.emit(key, meta, "repo.config", "update", base)
        return {}

    def grant_access(self, principal: Principal | None, repo_type: str, repo_id: str, user: str) -> dict:
        """Give `user` access to a gated repo (`principal` None = administrator)."""
        key = self.store.canonical(RepoKey.parse(repo_type, repo_id))
        if principal is not None:
            key, meta = self.repo(principal, repo_type, repo_id)
            self.require_namespace_write(principal, key, "manage access requests")
        with self.store.lock(key):
            meta = self.store.get_meta(key)
            if meta is None:
                raise errors.repo_not_found(repo_id)
            if not meta.get("gated"):
                raise errors.bad_request(f"{repo_id} is not a gated repo")
            if not isinstance(user, str) or not user:
                raise errors.bad_request("A user name is required")
            if user not in meta["gatedGrants"]:
                meta["gatedGrants"].append(user)
            self.store.save_meta(key, meta)
        return {}

    # ---------------------------------------------------------------- repo info and search
    def _file_bytes(self, key: RepoKey, entries: dict, path: str) -> bytes | None:
        entry = entries.get(path)
        if entry is None or entry.get("lfs"):
            return None
        return self.store.read_file(entry)

    def _parameters(self, key: RepoKey, entries: dict) -> dict | None:
        total: dict[str, int] = {}
        found = False
        for path, entry in entries.items():
            if "/" in path or not path.endswith(".safetensors") or not entry.get("lfs"):
                continue
            oid = entry["lfs"]["oid"]
            if oid not in self._params_cache:
                self._params_cache[oid] = cards.safetensors_parameters(self.store.objects.lfs_path(oid)) or {}
            for dtype, n in self._params_cache[oid].items():
                total[dtype] = total.get(dtype, 0) + n
                found = True
        return {"parameters": total, "total": sum(total.values())} if found else None

    def info_doc(self, key: RepoKey, meta: dict, sha: str, *, blobs: bool = False) -> dict:
        """The full `/api/{type}s/{repo}` document of a repo at commit `sha`."""
        entries = self.store.read_tree(key, sha)
        commit = self.store.read_commit(key, sha)
        card = cards.card_data(self._file_bytes(key, entries, "README.md"))
        config = cards.model_config(self._file_bytes(key, entries, "config.json")) if key.type == "model" else None
        derived = cards.derived_info(sorted(entries), card, config)
        siblings = []
        for path in sorted(entries):
            sib = {"rfilename": path}
            if blobs:
                entry = entries[path]
                sib.update(size=entry["size"], blobId=entry["oid"])
                if entry.get("lfs"):
                    sib["lfs"] = {"size": entry["lfs"]["size"], "sha256": entry["lfs"]["oid"],
                                  "pointerSize": entry["lfs"]["pointerSize"]}
            siblings.append(sib)
        doc = {"_id": meta["id"], "id": key.repo_id, "author": key.namespace, "sha": sha,
               "lastModified": commit["date"], "createdAt": meta["createdAt"], "private": meta["private"],
               "gated": meta.get("gated", False), "disabled": False, "downloads": 0, "likes": 0,
               "tags": derived["tags"], "siblings": siblings, "spaces": [],
               "usedStorage": sum(e["size"] for e in entries.values())}
        if card is not None:
            doc["cardData"] = card
        if key.type == "model":
            doc["modelId"] = key.repo_id
            doc["library_name"] = derived["library_name"]
            doc["pipeline_tag"] = derived["pipeline_tag"]
            if config:
                doc["config"] = config
            if "transformersInfo" in derived:
                doc["transformersInfo"] = derived["transformersInfo"]
            params = self._parameters(key, entries)
            if params:
                doc["safetensors"] = params
        elif key.type == "space":
            doc["sdk"] = meta.get("sdk")
            doc["runtime"] = {"stage": "NO_APP_FILE", "hardware": {"current": None, "requested": None}}
        return doc

    def repo_info(self, principal: Principal, repo_type: str, repo_id: str, revision: str | None = None,
                  blobs: bool = False, expand: list[str] | None = None) -> dict:
        key, meta = self.repo(principal, repo_type, repo_id)
        sha = self.revision(key, revision or "main")
        doc = self.info_doc(key, meta, sha, blobs=blobs)
        if expand:
            doc = {k: v for k, v in doc.items() if k in set(expand) | {"_id", "id"}}
        return doc

    def search(self, principal: Principal, repo_type: str, params, base: str) -> tuple[list[dict], str | None]:
        """`/api/{type}s` listing: author, search, filter (tags), gated, sort/direction, limit, cursor pages."""
        author = params.get("author")
        query = (params.get("search") or "").lower()
        filters = [f for f in params.getlist("filter") for f in f.split(",") if f]
        full = truthy(params.get("full"))
        with_card = truthy(params.get("cardData"))
        expand = params.getlist("expand") + params.getlist("expand[]")
        rows = []
        for key, meta in self.store.list_repos(repo_type):
            if not principal.can_read(meta):
                continue
            if author and key.namespace.lower() != author.lower():
                continue
            if query and query not in key.repo_id.lower():
                continue
            if "gated" in params and truthy(params["gated"]) != bool(meta.get("gated")):
                continue
            sha = self.head(key)
            if sha is None:
                continue
            doc = self.info_doc(key, meta, sha)
            if filters and not all(f in doc["tags"] or f == key.repo_id for f in filters):
                continue
            rows.append(doc)
        sort = params.get("sort") or "createdAt"
        if sort not in ("createdAt", "lastModified", "id", "likes", "downloads", "trendingScore"):
            raise errors.bad_request(f"Invalid sort: {sort!r}")
        descending = str(params.get("direction", "-1")) != "1"
        rows.sort(key=lambda d: (d.get(sort, 0) or 0, d["id"]), reverse=descending)
        page_size = self.config.search_page_size
        if params.get("limit"):
            try:
                page_size = max(1, min(page_size, int(params["limit"])))
            except ValueError:
                raise errors.bad_request("Invalid limit") from None
        offset = decode_cursor(params.get("cursor"))
        page = rows[offset:offset + page_size]
        items = [self._list_item(doc, repo_type, full=full, with_card=with_card, expand=expand) for doc in page]
        next_url = None
        if offset + page_size < len(rows):
            query_items = [(k, v) for k, v in params.multi_items() if k != "cursor"]
            query_items.append(("cursor", encode_cursor(offset + page_size)))
            next_url = f"{base}/api/{repo_type}s?{urlencode(query_items)}"
        return items, next_url

    @staticmethod
    def _list_item(doc: dict, repo_type: str, *, full: bool, with_card: bool, expand: list[str]) -> dict:
        if expand:
            return {k: v for k, v in doc.items() if k in set(expand) | {"_id", "id"}}
        keys = ["_id", "id", "likes", "downloads", "private", "tags", "createdAt"]
        if repo_type == "model":
            keys += ["modelId", "pipeline_tag", "library_name"]
        if full:
            keys += ["author", "sha", "lastModified", "gated", "disabled"]
        item = {k: doc.get(k) for k in keys}
        item["trendingScore"] = 0
        if full:
            item["siblings"] = [{"rfilename": s["rfilename"]} for s in doc["siblings"]]
        if with_card and "cardData" in doc:
            item["cardData"] = doc["cardData"]
        return item

    # ---------------------------------------------------------------- tree, refs, commits
    @staticmethod
    def _dir_oid(entries: dict, prefix: str) -> str:
        sub = {p[len(prefix):]: e["oid"] for p, e in entries.items() if p.startswith(prefix)}
        return hashlib.sha1(json.dumps(sub, sort_keys=True).encode()).hexdigest()

    @staticmethod
    def _file_item(path: str, entry: dict) -> dict:
        item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
        if entry.get("lfs"):
            item["lfs"] = dict(entry["lfs"])
        return item

    def _last_commits(self, key: RepoKey, sha: str, paths: list[str], entries: dict) -> dict[str, dict]:
        """path -> last commit (id, title, date) that changed it (file or folder), walking history newest first."""
        out: dict[str, dict] = {}
        wanted = set(paths)

        def signature(tree: dict, path: str):
            if path in tree:
                return tree[path]["oid"]
            prefix = path + "/"
            return tuple(sorted((p, e["oid"]) for p, e in tree.items() if p.startswith(prefix))) or None

        for commit in self.store.history(key, sha):
            if not wanted:
                break
            tree = self.store.read_tree(key, commit["id"])
            parent = self.store.read_tree(key, commit["parents"][0]) if commit["parents"] else {}
            for path in list(wanted):
                if signature(tree, path) != signature(parent, path):
                    out[path] = {"id": commit["id"], "title": commit["title"], "date": commit["date"]}
                    wanted.discard(path)
        return out

    def tree(self, principal: Principal, repo_type: str, repo_id: str, revision: str, path: str,
             recursive: bool, expand: bool, cursor: str | None, base: str) -> tuple[list[dict], str | None]:
        key, _ = self.repo(principal, repo_type, repo_id)
        sha = self.revision(key, revision)
        entries = self.store.read_tree(key, sha)
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        if path and not any(p.startswith(prefix) for p in entries):
            raise errors.entry_not_found(path, commit=sha, message=f"{path} does not exist on {revision}"
                                         if path not in entries else f"{path} is not a folder")
        items: dict[str, dict] = {}
        for file_path, entry in entries.items():
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix):].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts) - 1) + 1):
                dir_path = prefix + "/".join(parts[:i])
                if dir_path not in items:
                    items[dir_path] = {"type": "directory", "oid": self._dir_oid(entries, dir_path + "/"),
                                       "size": 0, "path": dir_path}
            if recursive or len(parts) == 1:
                items[file_path] = self._file_item(file_path, entry)
        ordered = [items[p] for p in sorted(items)]
        page_size = self.config.tree_page_size
        offset = decode_cursor(cursor)
        page = ordered[offset:offset + page_size]
        if expand:
            last = self._last_commits(key, sha, [i["path"] for i in page], entries)
            for item in page:
                if item["path"] in last:
                    item["lastCommit"] = last[item["path"]]
        next_url = None
        if offset + page_size < len(ordered):
            query = urlencode({"recursive": str(recursive).lower(), "expand": str(expand).lower(),
                               "cursor": encode_cursor(offset + page_size)})
            suffix = "/" + quote(path, safe="") if path else ""
            next_url = f"{base}/api/{repo_type}s/{key.repo_id}/tree/{quote(revision, safe='')}{suffix}?{query}"
        return page, next_url

    def paths_info(self, principal: Principal, repo_type: str, repo_id: str, revision: str, paths: list[str],
                   expand: bool) -> list[dict]:
        key, _ = self.repo(principal, repo_type, repo_id)
        sha = self.revision(key, revision)
        entries = self.store.read_tree(key, sha)
        out = []
        for path in dict.fromkeys(p.strip("/") for p in paths):
            if path in entries:
                out.append(self._file_item(path, entries[path]))
            elif path and any(p.startswith(path + "/") for p in entries):
                out.append({"type": "directory", "oid": self._dir_oid(entries, path + "/"), "size": 0,
                            "path": path})
        if expand and out:
            last = self._last_commits(key, sha, [i["path"] for i in out], entries)
            for item in out:
                if item["path"] in last:
                    item["lastCommit"] = last[item["path"]]
        return out

    def refs(self, principal: Principal, repo_type: str, repo_id: str, include_prs: bool) -> dict:
        key, _ = self.repo(principal, repo_type, repo_id)
        refs = self.store.get_refs(key)
        doc = {"branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s}
                            for n, s in sorted(refs["heads"].items())],
               "converts": [],
               "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s}
                        for n, s in sorted(refs["tags"].items())]}
        if include_prs:
            doc["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                                   for n, s in sorted(refs["pr"].items(), key=lambda kv: int(kv[0]))]
        return doc

    def commits(self, principal: Principal, repo_type: str, repo_id: str, revision: str, page: int,
                formatted: bool, base: str) -> tuple[list[dict], str | None]:
        key, _ = self.repo(principal, repo_type, repo_id)
        sha = self.revision(key, revision)
        history = self.store.history(key, sha)
        size = self.config.commits_page_size
        chunk = history[page * size:(page + 1) * size]
        items = []
        for c in chunk:
            item = {"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                    "authors": [{"user": c["author"], "avatar": f"/avatars/{c['author']}.svg"}]}
            if formatted:
                item["formatted"] = {"title": html.escape(c["title"]), "message": html.escape(c["message"])}
            items.append(item)
        next_url = None
        if (page + 1) * size < len(history):
            query = urlencode({"p": page + 1, **({"expand[]": "formatted"} if formatted else {})})
            next_url = f"{base}/api/{repo_type}s/{key.repo_id}/commits/{quote(revision, safe='')}?{query}"
        return items, next_url

    # ---------------------------------------------------------------- branches and tags
    def create_branch(self, principal: Principal, repo_type: str, repo_id: str, branch: str, body: dict,
                      base: str) -> dict:
        key, meta = self.repo(principal, repo_type, repo_id)
        self.require_namespace_write(principal, key, "create branches")
        if not BRANCH_RE.match(branch) or branch.startswith("refs/") or ".." in branch:
            raise errors.bad_request(f"Invalid branch name: {branch!r}")
        with self.store.lock(key):
            refs = self.store.get_refs(key)
            if branch in refs["heads"]:
                raise errors.conflict(f"Reference already exists: refs/heads/{branch}")
            start = self.revision(key, body.get("startingPoint") or "main")
            refs["heads"][branch] = start
            self.store.save_refs(key, refs)
        self.emit(key, meta, "repo.content", "update", base,
                  updated_refs=[{"ref": f"refs/heads/{branch}", "oldSha": None, "newSha": start}])
        return {}

    def delete_branch(self, principal: Principal, repo_type: str, repo_id: str, branch: str, base: str) -> dict:
        key, meta = self.repo(principal, repo_type, repo_id)
        self.require_namespace_write(principal, key, "delete branches")
        if branch == "main":
            raise errors.forbidden("The default branch cannot be deleted")
        with self.store.lock(key):
            refs = self.store.get_refs(key)
            old = refs["heads"].pop(branch, None)
            if old is None:
                raise errors.revision_not_found(branch)
            self.store.save_refs(key, refs)
        self.emit(key, meta, "repo.content", "update", base,
                  updated_refs=[{"ref": f"refs/heads/{branch}", "oldSha": old, "newSha": None}])
        return {}

    def create_tag(self, principal: Principal, repo_type: str, repo_id: str, revision: str, body: dict,
                   base: str) -> dict:
        key, meta = self.repo(principal, repo_type, repo_id)
        self.require_namespace_write(principal, key, "create tags")
        tag = body.get("tag")
        if not isinstance(tag, str) or not BRANCH_RE.match(tag) or tag.startswith("refs/"):
            raise errors.bad_request(f"Invalid tag name: {tag!r}")
        with self.store.lock(key):
            refs = self.store.get_refs(key)
            if tag in refs["tags"]:
                raise errors.conflict(f"Reference already exists: refs/tags/{tag}")
            refs["tags"][tag] = self.revision(key, revision)
            self.store.save_refs(key, refs)
        self.emit(key, meta, "repo.content", "update", base,
                  updated_refs=[{"ref": f"refs/tags/{tag}", "oldSha": None, "newSha": refs["tags"][tag]}])
        return {}

    def delete_tag(self, principal: Principal, repo_type: str, repo_id: str, tag: str, base: str) -> dict:
        key, meta = self.repo(principal, repo_type, repo_id)
        self.require_namespace_write(principal, key, "delete tags")
        with self.store.lock(key):
            refs = self.store.get_refs(key)
            old = refs["tags"].pop(tag, None)
            if old is None:
                raise errors.revision_not_found(tag)
            self.store.save_refs(key, refs)
        self.emit(key, meta, "repo.content", "update", base,
                  updated_refs=[{"ref": f"refs/tags/{tag}", "oldSha": old, "newSha": None}])
        return {}

    def auth_check(self, principal: Principal, repo_type: str, repo_id: str, write: bool) -> dict:
        """`/api/{type}s/{repo}/auth-check[/write]`: may the caller read (gated included) / write the repo."""
        key, meta = self.repo(principal, repo_type, repo_id)
        if write:
            self.require_namespace_write(principal, key, "write")
        else:
            self.require_gated_access(principal, key, meta)
        return {}

    # ---------------------------------------------------------------- downloads
    def resolve_file(self, principal: Principal, repo_type: str, repo_id: str, revision: str,
                     path: str) -> tuple[RepoKey, str, dict]:
        """(key, commit sha, tree entry) of a file to download; RepoNotFound/GatedRepo/RevisionNotFound/EntryNotFound."""
        key, meta = self.repo(principal, repo_type, repo_id)
        self.require_gated_access(principal, key, meta)
        sha = self.revision(key, revision)
        entry = self.store.read_tree(key, sha).get(path)
        if entry is None:
            raise errors.entry_not_found(path, commit=sha)
        return key, sha, entry

    def signed_download_url(self, oid: str, size: int, filename: str, commit: str, base: str) -> str:
        params = self.signer.sign("download", oid, size)
        params.update(filename=filename.rsplit("/", 1)[-1], commit=commit)
        return f"{self.storage_base(base)}/_storage/lfs/{oid}?{urlencode(params)}"

    # ---------------------------------------------------------------- validate-yaml
    @staticmethod
    def validate_yaml(body: dict) -> tuple[int, dict]:
        content = body.get("content")
        if not isinstance(content, str):
            raise errors.bad_request("'content' (the README text) is required")
        problems, warnings = cards.metadata_problems(content)
        return (400 if problems else 200), {"errors": problems, "warnings": warnings}

    # ---------------------------------------------------------------- webhooks
    def _reader_check(self, meta: dict):
        return lambda user: self.principal_of_user(user).can_read(meta)

    def _payload_builder(self, key: RepoKey, meta: dict, scope: str, action: str, base: str, *,
                         updated_refs: list[dict] | None = None, discussion: dict | None = None,
                         comment: dict | None = None):
        base = self.base(base)
        head = None
        try:
            head = self.head(key)
        except FileNotFoundError:
            pass
        repo = {"type": key.type, "name": key.repo_id, "id": meta["id"], "private": meta["private"],
                "headSha": head, "owner": {"id": account_id(key.namespace)},
                "url": {"web": self.web_url(key, base), "api": f"{base}/api/{key.type}s/{key.repo_id}"}}
        if key.type == "space":
            repo["subdomain"] = f"{key.namespace}-{key.name}".lower()

        def payload_for(webhook: Webhook) -> dict:
            payload = {"event": {"action": action, "scope": scope}, "repo": repo,
                       "webhook": {"id": webhook.id, "version": 3}}
            if updated_refs is not None:
                payload["updatedRefs"] = updated_refs
            if discussion is not None:
                payload["discussion"] = discussion
            if comment is not None:
                payload["comment"] = comment
            return payload

        return payload_for

    def emit(self, key: RepoKey, meta: dict, scope: str, action: str, base: str, **kwargs) -> None:
        """Queue the webhook deliveries of an event (never blocks on delivery)."""
        payload_for = self._payload_builder(key, meta, scope, action, base, **kwargs)
        self.webhooks.emit(payload_for, scope, key.type, key.repo_id, can_read=self._reader_check(meta))

    def list_webhooks(self, principal: Principal) -> list[dict]:
        require_auth(principal, "list webhooks")
        return [w.public() for w in self.webhooks.all() if w.owner == principal.user]

    def _own_webhook(self, principal: Principal, webhook_id: str) -> Webhook:
        require_auth(principal, "manage webhooks")
        webhook = self.webhooks.get(webhook_id)
        if webhook is None or webhook.owner != principal.user:
            raise errors.not_found("Webhook not found")
        return webhook

    def get_webhook(self, principal: Principal, webhook_id: str) -> dict:
        return {"webhook": self._own_webhook(principal, webhook_id).public()}

    def create_webhook(self, principal: Principal, body: dict) -> dict:
        require_write_role(principal, "create webhooks")
        if not body.get("url"):
            raise errors.bad_request("A webhook needs a url")
        try:
            webhook = Webhook(url=body["url"], watched=list(body.get("watched") or []),
                              domains=list(body.get("domains") or ["repo", "discussion"]),
                              secret=body.get("secret"), owner=principal.user)
        except ValueError as e:
            raise errors.bad_request(str(e)) from None
        if not webhook.watched:
            raise errors.bad_request("A webhook must watch at least one item")
        self.webhooks.add(webhook)
        return {"webhook": webhook.public()}

    def update_webhook(self, principal: Principal, webhook_id: str, body: dict) -> dict:
        webhook = self._own_webhook(principal, webhook_id)
        require_write_role(principal, "update webhooks")
        try:
            updated = Webhook(url=body.get("url", webhook.url), watched=list(body.get("watched", webhook.watched)),
                              domains=list(body.get("domains", webhook.domains)),
                              secret=body.get("secret", webhook.secret), id=webhook.id, disabled=webhook.disabled,
                              owner=webhook.owner)
        except ValueError as e:
            raise errors.bad_request(str(e)) from None
        webhook.url, webhook.watched, webhook.domains, webhook.secret = (updated.url, updated.watched,
                                                                          updated.domains, updated.secret)
        self.webhooks.save()
        return {"webhook": webhook.public()}

    def set_webhook_disabled(self, principal: Principal, webhook_id: str, disabled: bool) -> dict:
        webhook = self._own_webhook(principal, webhook_id)
        require_write_role(principal, "update webhooks")
        webhook.disabled = disabled
        self.webhooks.save()
        return {"webhook": webhook.public()}

    def delete_webhook(self, principal: Principal, webhook_id: str) -> dict:
        self._own_webhook(principal, webhook_id)
        require_write_role(principal, "delete webhooks")
        self.webhooks.remove(webhook_id)
        return {}
