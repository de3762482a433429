"""The write path: preupload, the LFS batch API and object uploads, and commits (incl. `create_pr=1`).

Who may push where (like the Hub):

* a branch: write-role token of the repo's owner or of a member of the owning organization;
* `create_pr=1` against a branch: any write-role token that can read the repo (this opens PR `refs/pr/N`);
* an existing `refs/pr/N`: its author or anyone who may push to branches, while the PR is open or draft.

A read-role token gets 403 for all of these. `parentCommit` (full sha or a prefix of 5+ hex digits) must be the
current head of the target (412 otherwise); with `create_pr=1` it is the commit the PR starts from.
"""
from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from urllib.parse import urlencode

from . import cards, errors, uploads
from .auth import Principal, require_write_role
from .commits import apply_operations, parse_ndjson, validate_path
from .discussions import add_event
from .objects import SHA256_RE
from .storage import RepoKey

logger = logging.getLogger(__name__)

MAX_LFS_OBJECT_SIZE = 50 * 1024 ** 3


@dataclass
class PushTarget:
    """Where a push goes: a branch, an existing PR, or a PR to open against a branch."""

    kind: str  # "branch" | "pr" | "new-pr"
    name: str  # branch name, or PR number as a string
    head: str  # current head commit (of the branch / PR / base branch)

    @property
    def ref(self) -> str:
        return f"refs/heads/{self.name}" if self.kind != "pr" else f"refs/pr/{self.name}"


class Pushes:
    """Preupload, LFS and commit endpoints of a :class:`~.hub.LocalHub`."""

    def __init__(self, hub):
        self.hub = hub
        self.store = hub.store

    # ---------------------------------------------------------------- permissions
    def target(self, principal: Principal, key: RepoKey, revision: str, create_pr: bool) -> PushTarget:
        """Check the principal may push to `revision` (or open a PR against it) and return the target."""
        require_write_role(principal, "push to repos")
        refs = self.store.get_refs(key)
        branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
        if create_pr:
            if branch not in refs["heads"]:
                raise errors.revision_not_found(revision)
            return PushTarget("new-pr", branch, refs["heads"][branch])
        if revision.startswith("refs/pr/"):
            num = revision[len("refs/pr/"):]
            if num not in refs["pr"]:
                raise errors.revision_not_found(revision)
            doc = self.hub.discussions.get(key, int(num))
            if doc is None or doc["status"] not in ("open", "draft"):
                raise errors.forbidden(f"Pull request #{num} is not open: it cannot receive commits")
            if not (principal.can_write_namespace(key.namespace) or doc["author"] == principal.user):
                raise errors.forbidden(f"You don't have the rights to push to pull request #{num} of {key.repo_id}")
            return PushTarget("pr", num, refs["pr"][num])
        if branch not in refs["heads"]:
            if revision in refs["tags"] or self.store.resolve(key, revision):
                raise errors.bad_request(f"Invalid rev id: {revision} is not a branch")
            raise errors.revision_not_found(revision)
        if not principal.can_write_namespace(key.namespace):
            raise errors.forbidden(f"You don't have the rights to push to {key.repo_id}: you are not a member of "
                                   f"'{key.namespace}'. Open a pull request instead (create_pr=1).")
        return PushTarget("branch", branch, refs["heads"][branch])

    # ---------------------------------------------------------------- preupload
    def preupload(self, principal: Principal, repo_type: str, repo_id: str, revision: str, body: dict,
                  create_pr: bool) -> dict:
        key, _ = self.hub.repo(principal, repo_type, repo_id)
        target = self.target(principal, key, revision, create_pr)
        files = body.get("files")
        if not isinstance(files, list):
            raise errors.bad_request("'files' must be a list of {path, sample, size}")
        entries = self.store.read_tree(key, target.head)
        gitattributes = self.hub._file_bytes(key, entries, ".gitattributes") or b""
        gitignore = body.get("gitIgnore")
        if gitignore is None:
            gitignore = (self.hub._file_bytes(key, entries, ".gitignore") or b"").decode("utf-8", "replace")
        out = []
        for f in files:
            if not isinstance(f, dict):
                raise errors.bad_request("Invalid file item")
            path = validate_path(f.get("path"))
            size = f.get("size")
            if not isinstance(size, int) or size < 0:
                raise errors.bad_request(f"Invalid size for {path!r}")
            try:
                sample = base64.b64decode(f.get("sample") or "", validate=True)
            except (binascii.Error, ValueError):
                raise errors.bad_request(f"Invalid base64 sample for {path!r}") from None
            mode = uploads.upload_mode(path, size, sample, gitattributes.decode("utf-8", "replace"))
            item = {"path": path, "uploadMode": mode, "shouldIgnore": uploads.is_ignored(path, gitignore)}
            existing = entries.get(path)
            if existing is not None:
                item["oid"] = existing["lfs"]["oid"] if existing.get("lfs") else existing["oid"]
            out.append(item)
        return {"files": out, "commitOid": target.head}

    # ---------------------------------------------------------------- LFS batch / upload / verify
    def lfs_batch(self, principal: Principal, repo_type: str, repo_id: str, body: dict, base: str) -> dict:
        key, meta = self.hub.repo(principal, repo_type, repo_id)
        operation = body.get("operation")
        if operation not in ("upload", "download"):
            raise errors.HubError(422, f"Invalid LFS operation: {operation!r}")
        if operation == "upload":
            require_write_role(principal, "upload files")
            ref = (body.get("ref") or {}).get("name")
            if ref and ref.startswith("refs/pr/"):
                self.target(principal, key, ref, create_pr=False)
        else:
            self.hub.require_gated_access(principal, key, meta)
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise errors.HubError(422, "'objects' must be a list")
        storage = self.hub.storage_base(base)
        out = []
        for obj in objects:
            oid, size = (obj or {}).get("oid"), (obj or {}).get("size")
            if not isinstance(oid, str) or not SHA256_RE.match(oid):
                out.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "Invalid oid: expected a sha256 hex digest"}})
                continue
            if not isinstance(size, int) or size < 0 or size > MAX_LFS_OBJECT_SIZE:
                out.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "Invalid object size"}})
                continue
            stored = self.store.objects.lfs_size(oid)
            item = {"oid": oid, "size": size, "authenticated": True}
            if operation == "download":
                if stored is None:
                    item["error"] = {"code": 404, "message": "Object does not exist"}
                else:
                    item["actions"] = {"download": {"href": self.hub.signed_download_url(oid, stored, oid, "", base)}}
            elif stored is not None:
                if stored != size:
                    item["error"] = {"code": 422, "message": f"Size mismatch: the stored object has {stored} bytes"}
            else:
                query = urlencode(self.hub.signer.sign("upload", oid, size))
                item["actions"] = {
                    "upload": {"href": f"{storage}/_storage/upload/{oid}?{query}", "expires_in": 3600},
                    "verify": {"href": f"{self.hub.base(base)}/{key.url_prefix}{key.repo_id}.git/info/lfs/objects/"
                                       f"verify", "expires_in": 3600},
                }
            out.append(item)
        return {"transfer": "basic", "objects": out, "hash_algo": "sha256"}

    async def lfs_receive(self, oid: str, params, chunks) -> None:
        """Store an uploaded LFS object from an async iterator of byte chunks (signed URL, no token)."""
        size = self.hub.signer.check("upload", oid, params)
        if size is None or not SHA256_RE.match(oid):
            raise errors.forbidden("Invalid or expired upload URL")
        if self.store.objects.has_lfs(oid):
            async for _ in chunks:  # drain: the object is already there
                pass
            return
        try:
            with self.store.objects.lfs_writer(oid, size) as writer:
                async for chunk in chunks:
                    writer.write(chunk)
        except ValueError as e:
            raise errors.bad_request(f"Upload rejected: {e}") from None
        logger.info("received LFS object %s (%d bytes)", oid, size)

    def lfs_verify(self, principal: Principal, repo_type: str, repo_id: str, body: dict) -> dict:
        key, _ = self.hub.repo(principal, repo_type, repo_id)
        require_write_role(principal, "upload files")
        oid, size = body.get("oid"), body.get("size")
        stored = self.store.objects.lfs_size(oid) if isinstance(oid, str) else None
        if stored is None:
            raise errors.not_found(f"Object {oid} does not exist")
        if stored != size:
            raise errors.HubError(422, f"Object {oid} has size {stored}, not {size}")
        return {}

    # ---------------------------------------------------------------- commit
    def _resolve_parent(self, key: RepoKey, parent: str, target: PushTarget) -> str:
        if not all(c in "0123456789abcdef" for c in parent) or len(parent) < 5:
            raise errors.bad_request(f"Invalid parentCommit: {parent!r}")
        if target.kind != "new-pr":
            if not target.head.startswith(parent):
                raise errors.HubError(412, "A commit has happened since. Please refresh and try again. "
                                           f"(parentCommit {parent} is not the head of {target.ref}: "
                                           f"{target.head})")
            return target.head
        matches = [c["id"] for c in self.store.history(key, target.head) if c["id"].startswith(parent)]
        if len(matches) != 1:
            raise errors.HubError(412, f"parentCommit {parent} is not a commit of {target.ref}")
        return matches[0]

    def commit(self, principal: Principal, repo_type: str, repo_id: str, revision: str, body: bytes,
               create_pr: bool, base: str) -> dict:
        key, meta = self.hub.repo(principal, repo_type, repo_id)
        require_write_role(principal, "push to repos")
        request = parse_ndjson(body)
        base = self.hub.base(base)
        events = []
        with self.store.lock(key):
            target = self.target(principal, key, revision, create_pr)
            start = self._resolve_parent(key, request.parent_commit, target) if request.parent_commit \
                else target.head
            entries = self.store.read_tree(key, start)
            new_entries, changed = apply_operations(entries, request, self.store.objects)
            if "README.md" in changed and "README.md" in new_entries:
                cards.check_readme(self.store.read_file(new_entries["README.md"]))
            sha = self.store.write_commit(key, new_entries, parents=[start], author=principal.user,
                                          title=request.summary, message=request.description)
            refs = self.store.get_refs(key)
            pr_num = None
            if target.kind == "branch":
                old = refs["heads"][target.name]
                refs["heads"][target.name] = sha
                self.store.save_refs(key, refs)
                events.append(("repo.content", "update",
                               {"updated_refs": [{"ref": target.ref, "oldSha": old, "newSha": sha}]}))
            elif target.kind == "pr":
                pr_num = int(target.name)
                old = refs["pr"][target.name]
                refs["pr"][target.name] = sha
                self.store.save_refs(key, refs)
                doc = self.hub.discussions.get(key, pr_num)
                add_event(doc, "commit", principal.user, {"subject": request.summary, "oid": sha})
                self.hub.discussions.save(key, doc)
                events.append(("repo.content", "update",
                               {"updated_refs": [{"ref": target.ref, "oldSha": old, "newSha": sha}]}))
            else:
                pr_num = self.hub.discussions.next_num(key)
                refs["pr"][str(pr_num)] = sha  # ref first: a crash leaves a ref, never a PR without one
                self.store.save_refs(key, refs)
                doc = self.hub.discussions.new(key, pr_num, title=request.summary, author=principal.user,
                                               description=request.description or request.summary, is_pr=True,
                                               status="open", base_ref=f"refs/heads/{target.name}",
                                               base_commit=start)
                add_event(doc, "commit", principal.user, {"subject": request.summary, "oid": sha})
                self.hub.discussions.save(key, doc)
                events.append(("repo.content", "update",
                               {"updated_refs": [{"ref": f"refs/pr/{pr_num}", "oldSha": None, "newSha": sha}]}))
                events.append(("discussion", "create",
                               {"discussion": self.hub.community.webhook_discussion(key, doc, base)}))
        logger.info("commit %s on %s %s by %s (%d operation(s))", sha[:10], key.repo_id,
                    f"refs/pr/{pr_num}" if pr_num else target.ref, principal.user, len(request.operations))
        for scope, action, extra in events:
            self.hub.emit(key, meta, scope, action, base, **extra)
        prefix = f"{base}/{key.url_prefix}{key.repo_id}"
        return {"success": True, "commitOid": sha, "commitUrl": f"{prefix}/commit/{sha}",
                "pullRequestUrl": f"{prefix}/discussions/{pr_num}" if target.kind == "new-pr" else None,
                "hookOutput": ""}
