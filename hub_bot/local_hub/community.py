"""Discussions and pull requests: list, details (events, `changes.base`, diff, conflicts), comment, status,
title, and merge.

Anyone with a write-role token who can read a repo may open discussions/PRs and comment; the author or a
namespace writer may close/reopen or rename; only namespace writers merge. Merging a PR applies what the PR
changed since its base commit onto the current head of the base branch, as a merge commit with two parents;
a file changed differently on both sides is a conflict (409, `filesWithConflicts`).
"""
from __future__ import annotations

import difflib
import logging

from . import errors
from .auth import Principal, account_id, require_write_role
from .discussions import PAGE_SIZE, add_event, summary
from .storage import RepoKey

logger = logging.getLogger(__name__)


def _changes(old: dict, new: dict) -> dict[str, dict | None]:
    """path -> new entry (None if deleted) for every path that differs between two trees."""
    out = {}
    for path in set(old) | set(new):
        if old.get(path, {}).get("oid") != new.get(path, {}).get("oid"):
            out[path] = new.get(path)
    return out


class Community:
    """Discussion/PR endpoints of a :class:`~.hub.LocalHub`."""

    def __init__(self, hub):
        self.hub = hub
        self.store = hub.store
        self.docs = hub.discussions

    # ---------------------------------------------------------------- helpers
    def _doc(self, key: RepoKey, num) -> dict:
        try:
            num = int(num)
        except (TypeError, ValueError):
            raise errors.not_found("Discussion not found") from None
        doc = self.docs.get(key, num)
        if doc is None:
            raise errors.not_found(f"Discussion #{num} not found")
        return doc

    def webhook_discussion(self, key: RepoKey, doc: dict, base: str) -> dict:
        """The `discussion` object of webhook payloads."""
        web = f"{self.hub.web_url(key, base)}/discussions/{doc['num']}"
        out = {"id": doc["id"], "num": doc["num"], "author": {"id": account_id(doc["author"])},
               "url": {"web": web, "api": f"{base}/api/{key.type}s/{key.repo_id}/discussions/{doc['num']}"},
               "title": doc["title"], "isPullRequest": doc["isPullRequest"], "status": doc["status"],
               "pinned": doc.get("pinned", False)}
        if doc["isPullRequest"]:
            out["changes"] = {"base": doc["changes"]["base"]}
            if doc["changes"].get("mergeCommitId"):
                out["changes"]["mergeCommitId"] = doc["changes"]["mergeCommitId"]
        return out

    def _webhook_comment(self, key: RepoKey, doc: dict, event: dict, base: str) -> dict:
        web = f"{self.hub.web_url(key, base)}/discussions/{doc['num']}#{event['id']}"
        return {"id": event["id"], "author": {"id": account_id(event["author"]["name"])}, "hidden": False,
                "content": event["data"]["latest"]["raw"], "url": {"web": web}}

    def _emit(self, key, meta, doc, action, base, comment_event=None):
        base = self.hub.base(base)
        discussion = self.webhook_discussion(key, doc, base)
        if comment_event is not None:
            self.hub.emit(key, meta, "discussion.comment", "create", base, discussion=discussion,
                          comment=self._webhook_comment(key, doc, comment_event, base))
        else:
            self.hub.emit(key, meta, "discussion", action, base, discussion=discussion)

    def _pr_trees(self, key: RepoKey, doc: dict) -> tuple[str, dict, dict, dict, str]:
        """(base branch, tree at PR start, tree at PR head, tree at base head, base head sha)."""
        refs = self.store.get_refs(key)
        branch = doc["changes"]["base"].removeprefix("refs/heads/")
        base_head = refs["heads"].get(branch)
        if base_head is None:
            raise errors.revision_not_found(doc["changes"]["base"])
        pr_head = refs["pr"][str(doc["num"])]
        start = self.store.read_tree(key, doc["baseCommit"])
        return branch, start, self.store.read_tree(key, pr_head), self.store.read_tree(key, base_head), base_head

    def _conflicts(self, start: dict, pr_tree: dict, base_tree: dict) -> list[str]:
        pr_changes, base_changes = _changes(start, pr_tree), _changes(start, base_tree)
        return sorted(p for p, e in pr_changes.items()
                      if p in base_changes and (base_changes[p] or {}).get("oid") != (e or {}).get("oid"))

    def _diff(self, start: dict, pr_tree: dict) -> str:
        chunks = []
        for path in sorted(_changes(start, pr_tree)):
            old, new = start.get(path), pr_tree.get(path)
            chunks.append(f"diff --git a/{path} b/{path}\n")
            texts = []
            for entry in (old, new):
                if entry is None:
                    texts.append([])
                elif entry.get("lfs"):
                    texts.append(["version https://git-lfs.github.com/spec/v1\n",
                                  f"oid sha256:{entry['lfs']['oid']}\n", f"size {entry['size']}\n"])
                else:
                    texts.append(self.store.read_file(entry).decode("utf-8", "replace").splitlines(keepends=True))
            chunks.extend(difflib.unified_diff(texts[0], texts[1], f"a/{path}" if old else "/dev/null",
                                               f"b/{path}" if new else "/dev/null"))
        return "".join(c if c.endswith("\n") else c + "\n" for c in chunks)

    # ---------------------------------------------------------------- read
    def list(self, principal: Principal, repo_type: str, repo_id: str, params) -> dict:
        key, _ = self.hub.repo(principal, repo_type, repo_id)
        docs = self.docs.list(key)
        kind = params.get("type", "all")
        if kind not in ("all", "discussion", "pull_request"):
            raise errors.bad_request(f"Invalid discussion type: {kind!r}")
        status = params.get("status", "all")
        if status not in ("all", "open", "closed"):
            raise errors.bad_request(f"Invalid discussion status: {status!r}")
        if kind != "all":
            docs = [d for d in docs if d["isPullRequest"] == (kind == "pull_request")]
        if status == "open":
            docs = [d for d in docs if d["status"] in ("open", "draft")]
        elif status == "closed":
            docs = [d for d in docs if d["status"] in ("closed", "merged")]
        if params.get("author"):
            docs = [d for d in docs if d["author"].lower() == params["author"].lower()]
        try:
            page = int(params.get("p", 0))
        except ValueError:
            raise errors.bad_request("Invalid page") from None
        start = page * PAGE_SIZE
        return {"discussions": [summary(d, key) for d in docs[start:start + PAGE_SIZE]], "count": len(docs),
                "start": start, "numClosedDiscussions": sum(d["status"] in ("closed", "merged") for d in docs)}

    def details(self, principal: Principal, repo_type: str, repo_id: str, num, with_diff: bool) -> dict:
        key, _ = self.hub.repo(principal, repo_type, repo_id)
        doc = self._doc(key, num)
        out = summary(doc, key)
        out.update(id=doc["id"], events=doc["events"], locked=doc.get("locked", False), collection="discussions")
        if doc["isPullRequest"]:
            out["changes"] = dict(doc["changes"])
            conflicts, diff = [], None
            try:
                _, start, pr_tree, base_tree, _ = self._pr_trees(key, doc)
                if doc["status"] in ("open", "draft"):
                    conflicts = self._conflicts(start, pr_tree, base_tree)
                if with_diff:
                    diff = self._diff(start, pr_tree)
            except errors.HubError:
                pass  # base branch deleted: no conflicts/diff to show
            out["filesWithConflicts"] = conflicts
            if with_diff:
                out["diff"] = diff
        return out

    # ---------------------------------------------------------------- write
    def create(self, principal: Principal, repo_type: str, repo_id: str, body: dict, base: str) -> dict:
        key, meta = self.hub.repo(principal, repo_type, repo_id)
        require_write_role(principal, "open discussions")
        title = (body.get("title") or "").strip()
        if not 3 <= len(title) <= 200:
            raise errors.bad_request("The title must be between 3 and 200 characters long")
        description = body.get("description") or ""
        is_pr = bool(body.get("pullRequest"))
        with self.store.lock(key):
            num = self.docs.next_num(key)
            base_commit = None
            if is_pr:
                refs = self.store.get_refs(key)
                base_commit = refs["heads"]["main"]
                refs["pr"][str(num)] = base_commit
                self.store.save_refs(key, refs)
            doc = self.docs.new(key, num, title=title, author=principal.user, description=description, is_pr=is_pr,
                                status="draft" if is_pr else "open", base_ref="refs/heads/main" if is_pr else None,
                                base_commit=base_commit)
            self.docs.save(key, doc)
        self._emit(key, meta, doc, "create", base)
        out = summary(doc, key)
        out["url"] = f"{self.hub.web_url(key, self.hub.base(base))}/discussions/{num}"
        return out

    def comment(self, principal: Principal, repo_type: str, repo_id: str, num, body: dict, base: str) -> dict:
        key, meta = self.hub.repo(principal, repo_type, repo_id)
        require_write_role(principal, "comment")
        text = body.get("comment")
        if not isinstance(text, str) or not text.strip():
            raise errors.bad_request("The comment cannot be empty")
        with self.store.lock(key):
            doc = self._doc(key, num)
            if doc.get("locked"):
                raise errors.forbidden("This discussion is locked")
            event = add_event(doc, "comment", principal.user, text)
            self.docs.save(key, doc)
        self._emit(key, meta, doc, "create", base, comment_event=event)
        return {"newMessage": event}

    def _require_author_or_writer(self, principal: Principal, key: RepoKey, doc: dict, action: str) -> None:
        require_write_role(principal, action)
        if not (principal.can_write_namespace(key.namespace) or doc["author"] == principal.user):
            raise errors.forbidden(f"Only the author of #{doc['num']} or members of '{key.namespace}' can {action}")

    def change_status(self, principal: Principal, repo_type: str, repo_id: str, num, body: dict,
                      base: str) -> dict:
        key, meta = self.hub.repo(principal, repo_type, repo_id)
        new_status = body.get("status")
        if new_status not in ("open", "closed"):
            raise errors.bad_request("Invalid status: expected 'open' or 'closed'")
        with self.store.lock(key):
            doc = self._doc(key, num)
            self._require_author_or_writer(principal, key, doc, "change its status")
            if doc["status"] == "merged":
                raise errors.bad_request("A merged pull request cannot change status")
            if doc["status"] == new_status:
                raise errors.bad_request(f"#{doc['num']} is already {new_status}")
            if body.get("comment"):
                add_event(doc, "comment", principal.user, body["comment"])
            doc["status"] = new_status
            event = add_event(doc, "status-change", principal.user, new_status)
            self.docs.save(key, doc)
        self._emit(key, meta, doc, "update", base)
        return {"newStatus": event}

    def rename(self, principal: Principal, repo_type: str, repo_id: str, num, body: dict, base: str) -> dict:
        key, meta = self.hub.repo(principal, repo_type, repo_id)
        title = (body.get("title") or "").strip()
        if not 3 <= len(title) <= 200:
            raise errors.bad_request("The title must be between 3 and 200 characters long")
        with self.store.lock(key):
            doc = self._doc(key, num)
            self._require_author_or_writer(principal, key, doc, "rename it")
            event = add_event(doc, "title-change", principal.user, (doc["title"], title))
            doc["title"] = title
            self.docs.save(key, doc)
        self._emit(key, meta, doc, "update", base)
        return {"newTitle": event}

    def merge(self, principal: Principal, repo_type: str, repo_id: str, num, body: dict, base: str) -> dict:
        key, meta = self.hub.repo(principal, repo_type, repo_id)
        self.hub.require_namespace_write(principal, key, "merge pull requests")
        with self.store.lock(key):
            doc = self._doc(key, num)
            if not doc["isPullRequest"]:
                raise errors.bad_request(f"#{doc['num']} is a discussion, not a pull request")
            if doc["status"] not in ("open", "draft"):
                raise errors.bad_request(f"Pull request #{doc['num']} is {doc['status']}: it cannot be merged")
            branch, start, pr_tree, base_tree, base_head = self._pr_trees(key, doc)
            conflicts = self._conflicts(start, pr_tree, base_tree)
            if conflicts:
                raise errors.conflict(f"Pull request #{doc['num']} has conflicts with {branch}: "
                                      f"{', '.join(conflicts)}", filesWithConflicts=conflicts)
            merged = dict(base_tree)
            for path, entry in _changes(start, pr_tree).items():
                if entry is None:
                    merged.pop(path, None)
                else:
                    merged[path] = entry
            pr_head = self.store.get_refs(key)["pr"][str(doc["num"])]
            sha = self.store.write_commit(key, merged, parents=[base_head, pr_head], author=principal.user,
                                          title=doc["title"], message=f"Merge refs/pr/{doc['num']} into {branch}")
            refs = self.store.get_refs(key)
            refs["heads"][branch] = sha
            self.store.save_refs(key, refs)
            if body and body.get("comment"):
                add_event(doc, "comment", principal.user, body["comment"])
            doc["status"] = "merged"
            doc["changes"]["mergeCommitId"] = sha
            add_event(doc, "status-change", principal.user, "merged")
            self.docs.save(key, doc)
        logger.info("merged %s#%d into %s as %s", key.repo_id, doc["num"], branch, sha[:10])
        self.hub.emit(key, meta, "repo.content", "update", base,
                      updated_refs=[{"ref": f"refs/heads/{branch}", "oldSha": base_head, "newSha": sha}])
        self._emit(key, meta, doc, "update", base)
        return {}
