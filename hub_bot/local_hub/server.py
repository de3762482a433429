"""HTTP layer of the local Hub (FastAPI): routes, request parsing and response shaping.

Fixed routes (`/api/whoami-v2`, `/api/repos/create`, search, webhooks settings, storage and admin routes) are
declared with FastAPI; everything repo-scoped goes through one catch-all that routes on the *raw* request path,
because revisions and paths arrive URL-quoted (`/api/models/a/b/tree/refs%2Fpr%2F1/sub%2Fdir`) and must be split
on real '/' before unquoting. Blocking work runs in the threadpool. Errors are :class:`~.errors.HubError` turned
into JSON `{"error": ...}` with `X-Error-Code` / `X-Error-Message` headers, as the client expects.
"""
from __future__ import annotations

import hmac
import json
import logging
import mimetypes
import re
import time
from urllib.parse import parse_qs, quote, unquote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import errors
from .errors import HubError
from .faults import FaultMiddleware
from .hub import LocalHub, truthy

logger = logging.getLogger(__name__)

REPO_TYPE_SEGMENTS = {"models": "model", "datasets": "dataset", "spaces": "space"}
RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")
CHUNK = 1024 * 1024


# -------------------------------------------------------------------- helpers
def _json(content, status: int = 200, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers=headers)


def _error_response(err: HubError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.response_headers())


def _parse_json_body(body: bytes) -> dict:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise errors.bad_request("Invalid JSON body") from None
    if not isinstance(data, dict):
        raise errors.bad_request("Expected a JSON object")
    return data


def _link(next_url: str | None) -> dict:
    return {"Link": f'<{next_url}>; rel="next"'} if next_url else {}


def _take_revision(rest: list[str], i: int) -> tuple[str, int]:
    """The revision at rest[i] (quoted segment), or an unquoted `refs/{pr,heads,tags}/x` spanning 3 segments."""
    if i >= len(rest) or not rest[i]:
        raise errors.not_found()
    first = unquote(rest[i])
    if first == "refs" and i + 2 < len(rest) and unquote(rest[i + 1]) in ("pr", "heads", "tags", "convert"):
        return "/".join(unquote(s) for s in rest[i:i + 3]), i + 3
    return first, i + 1


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) of a single-range header; None = whole file; 'invalid' = unsatisfiable."""
    if not header:
        return None
    m = RANGE_RE.match(header.strip().replace(" ", ""))
    if not m:
        return None  # multiple or malformed ranges: serve the whole file (allowed by RFC 9110)
    start_s, end_s = m.groups()
    if not start_s and not end_s:
        return None
    if not start_s:
        length = int(end_s)
        if length == 0:
            return "invalid"
        return max(0, size - length), size - 1
    start = int(start_s)
    end = min(int(end_s), size - 1) if end_s else size - 1
    if start >= size or start > end:
        return "invalid"
    return start, end


def file_response(request: Request, path, size: int, headers: dict[str, str], content_type: str) -> Response:
    """200/206/416 for a file on disk with Range support; HEAD gets the headers only."""
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": content_type}
    rng = _parse_range(request.headers.get("range"), size)
    if rng == "invalid":
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}",
                                                  "Content-Length": "0"})
    status, start, end = (200, 0, size - 1) if rng is None else (206, rng[0], rng[1])
    length = max(0, end - start + 1)
    headers["Content-Length"] = str(length)
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)

    def body():
        with open(path, "rb") as f:
            f.seek(start)
            left = length
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    return StreamingResponse(body(), status_code=status, headers=headers)


def _content_type(path: str) -> str:
    guessed, _ = mimetypes.guess_type(path)
    if guessed is None:
        return "text/plain; charset=utf-8" if path.endswith((".md", ".txt", ".json", ".yaml", ".yml")) \
            else "application/octet-stream"
    return guessed + ("; charset=utf-8" if guessed.startswith("text/") or guessed == "application/json" else "")


class InternalErrorMiddleware:
    """An unexpected exception becomes a 500 JSON response inside the app. (Starlette's outermost error middleware
    would send the same response and then re-raise; uvicorn then drops the connection, and a client that reuses it
    for its next request gets 'Connection reset by peer', where the real Hub keeps serving.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = [False]

        async def send_wrapper(message):
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as err:
            if started[0]:  # too late for an error response: let the server end the connection
                raise
            logger.exception("unexpected error on %s %s", scope["method"], scope["path"])
            await _error_response(HubError(500, f"Internal error: {type(err).__name__}"))(scope, receive, send)


class AccessLogMiddleware:
    """Debug log of method, path (no query string, no headers: never tokens), status and duration."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [0]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            logger.debug("%s %s -> %d (%.1f ms)", scope["method"], scope["path"], status[0],
                         1000 * (time.perf_counter() - started))


# -------------------------------------------------------------------- app
def create_app(hub: LocalHub) -> FastAPI:
    """The FastAPI application serving `hub`."""
    app = FastAPI(title="Local Hub", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hub = hub

    @app.exception_handler(HubError)
    async def _hub_error(request: Request, err: HubError):
        return _error_response(err)

    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(FaultMiddleware, injector=hub.faults)
    app.add_middleware(AccessLogMiddleware)

    def base(request: Request) -> str:
        return hub.base(str(request.base_url))

    def principal(request: Request):
        return hub.principal(request.headers.get("authorization"))

    async def call(fn, *args, **kwargs):
        return await run_in_threadpool(fn, *args, **kwargs)

    # ---------------------------------------------------------------- account, repos
    @app.get("/api/whoami-v2")
    async def whoami(request: Request):
        return _json(hub.whoami(principal(request)))

    @app.post("/api/repos/create")
    async def create_repo(request: Request):
        body = _parse_json_body(await request.body())
        return _json(await call(hub.create_repo, principal(request), body, base(request)))

    @app.delete("/api/repos/delete")
    async def delete_repo(request: Request):
        body = _parse_json_body(await request.body())
        return _json(await call(hub.delete_repo, principal(request), body, base(request)))

    @app.post("/api/validate-yaml")
    async def validate_yaml(request: Request):
        status, content = hub.validate_yaml(_parse_json_body(await request.body()))
        return _json(content, status)

    for segment, repo_type in REPO_TYPE_SEGMENTS.items():
        def make_search(repo_type=repo_type):
            async def search(request: Request):
                items, next_url = await call(hub.search, principal(request), repo_type, request.query_params,
                                             base(request))
                return _json(items, headers=_link(next_url))
            return search

        app.add_api_route(f"/api/{segment}", make_search(), methods=["GET"])

    # ---------------------------------------------------------------- webhooks settings
    @app.get("/api/settings/webhooks")
    async def list_webhooks(request: Request):
        return _json(hub.list_webhooks(principal(request)))

    @app.post("/api/settings/webhooks")
    async def create_webhook(request: Request):
        return _json(hub.create_webhook(principal(request), _parse_json_body(await request.body())))

    @app.get("/api/settings/webhooks/{webhook_id}")
    async def get_webhook(request: Request, webhook_id: str):
        return _json(hub.get_webhook(principal(request), webhook_id))

    @app.post("/api/settings/webhooks/{webhook_id}")
    async def update_webhook(request: Request, webhook_id: str):
        return _json(hub.update_webhook(principal(request), webhook_id, _parse_json_body(await request.body())))

    @app.post("/api/settings/webhooks/{webhook_id}/{action}")
    async def toggle_webhook(request: Request, webhook_id: str, action: str):
        if action not in ("enable", "disable"):
            raise errors.not_found()
        return _json(hub.set_webhook_disabled(principal(request), webhook_id, action == "disable"))

    @app.delete("/api/settings/webhooks/{webhook_id}")
    async def delete_webhook(request: Request, webhook_id: str):
        return _json(hub.delete_webhook(principal(request), webhook_id))

    # ---------------------------------------------------------------- storage origin (no token, signed URLs)
    @app.api_route("/_storage/lfs/{oid}", methods=["GET", "HEAD"])
    async def storage_download(request: Request, oid: str):
        size = hub.signer.check("download", oid, request.query_params)
        if size is None or hub.store.objects.lfs_size(oid) != size:
            raise errors.forbidden("Access denied: invalid or expired signature")
        filename = request.query_params.get("filename") or oid
        headers = {"ETag": f'"{oid}"',
                   "Content-Disposition": f"attachment; filename*=UTF-8''{quote(filename)}; "
                                          f'filename="{filename.encode("ascii", "replace").decode()}"'}
        if request.query_params.get("commit"):
            headers["X-Repo-Commit"] = request.query_params["commit"]
        return file_response(request, hub.store.objects.lfs_path(oid), size, headers, "application/octet-stream")

    @app.put("/_storage/upload/{oid}")
    async def storage_upload(request: Request, oid: str):
        await hub.pushes.lfs_receive(oid, request.query_params, request.stream())
        return Response(status_code=200, headers={"ETag": f'"{oid}"'})

    # ---------------------------------------------------------------- admin
    def admin(request: Request) -> None:
        token = hub.config.admin_token
        if not token:
            raise errors.not_found("Admin API disabled (no admin_token configured)")
        given = (request.headers.get("authorization") or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise errors.forbidden("Admin token required")

    @app.get("/_admin/faults")
    async def list_faults(request: Request):
        admin(request)
        return _json([r.public() for r in hub.faults.rules()])

    @app.post("/_admin/faults")
    async def add_fault(request: Request):
        admin(request)
        body = _parse_json_body(await request.body())
        if not isinstance(body.get("pattern"), str):
            raise errors.bad_request("'pattern' (a regex over 'METHOD /path') is required")
        try:
            status = body.get("status", 500)
            rule = hub.faults.add(body["pattern"], None if status is None else int(status), body.get("count", 1),
                                  headers=body.get("headers"), message=body.get("message", "Injected fault"),
                                  error_code=body.get("error_code"), delay_s=float(body.get("delay_s", 0)))
        except (ValueError, re.error) as e:
            raise errors.bad_request(f"Invalid fault rule: {e}") from None
        return _json(rule.public())

    @app.delete("/_admin/faults")
    async def clear_faults(request: Request):
        admin(request)
        hub.faults.clear()
        return _json({})

    @app.get("/_admin/webhooks/deliveries")
    async def deliveries(request: Request):
        admin(request)
        if truthy(request.query_params.get("flush")):
            await call(hub.webhooks.flush, 10.0)
        return _json(hub.webhooks.deliveries())

    @app.post("/_admin/grant")
    async def admin_grant(request: Request):
        admin(request)
        body = _parse_json_body(await request.body())
        return _json(await call(hub.grant_access, None, body.get("repo_type", "model"), body.get("repo_id", ""),
                                body.get("user")))

    # ---------------------------------------------------------------- repo-scoped catch-all
    @app.api_route("/{full_path:path}", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
    async def repo_routes(request: Request, full_path: str):
        raw = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        segs = raw.split("/")[1:]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        if len(segs) >= 2 and segs[0] == "api" and segs[1] in REPO_TYPE_SEGMENTS:
            repo_type = REPO_TYPE_SEGMENTS[segs[1]]
            if len(segs) < 4 or not segs[2] or not segs[3]:
                raise errors.repo_not_found("/".join(segs[2:]), authenticated=principal(request).authenticated)
            repo_id = f"{unquote(segs[2])}/{unquote(segs[3])}"
            return await api_repo_route(request, repo_type, repo_id, segs[4:])
        repo_type, offset = ("model", 0)
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type, offset = REPO_TYPE_SEGMENTS[segs[0]], 1
        rest = segs[offset:]
        if len(rest) >= 4 and rest[2] == "resolve" and request.method in ("GET", "HEAD"):
            repo_id = f"{unquote(rest[0])}/{unquote(rest[1])}"
            revision, i = _take_revision(rest, 3)
            path = unquote("/".join(rest[i:]))
            return await resolve(request, repo_type, repo_id, revision, path)
        if len(rest) == 6 and rest[1].endswith(".git") and rest[2:5] == ["info", "lfs", "objects"] \
                and request.method == "POST":
            repo_id = f"{unquote(rest[0])}/{unquote(rest[1])[:-4]}"
            body = _parse_json_body(await request.body())
            if rest[5] == "batch":
                result = await call(hub.pushes.lfs_batch, principal(request), repo_type, repo_id, body,
                                    base(request))
                return _json(result, headers={"Content-Type": "application/vnd.git-lfs+json"})
            if rest[5] == "verify":
                return _json(await call(hub.pushes.lfs_verify, principal(request), repo_type, repo_id, body))
        raise errors.not_found()

    async def resolve(request: Request, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        key, sha, entry = await call(hub.resolve_file, principal(request), repo_type, repo_id, revision, path)
        if entry.get("lfs"):
            oid, size = entry["lfs"]["oid"], entry["lfs"]["size"]
            return Response(status_code=302, headers={
                "Location": hub.signed_download_url(oid, size, path, sha, base(request)),
                "X-Repo-Commit": sha, "ETag": f'"{entry["oid"]}"', "X-Linked-Etag": f'"{oid}"',
                "X-Linked-Size": str(size)})
        headers = {"ETag": f'"{entry["oid"]}"', "X-Repo-Commit": sha}
        return file_response(request, hub.store.file_path(entry), entry["size"], headers, _content_type(path))

    async def api_repo_route(request: Request, repo_type: str, repo_id: str, rest: list[str]) -> Response:
        method = request.method
        who = principal(request)
        b = base(request)
        q = request.query_params
        head = unquote(rest[0]) if rest else None
        if not rest and method == "GET":
            return _json(await call(hub.repo_info, who, repo_type, repo_id, None, truthy(q.get("blobs")),
                                    q.getlist("expand") + q.getlist("expand[]")))
        if head == "revision" and method == "GET" and len(rest) >= 2:
            revision, i = _take_revision(rest, 1)
            if i == len(rest):
                return _json(await call(hub.repo_info, who, repo_type, repo_id, revision, truthy(q.get("blobs")),
                                        q.getlist("expand") + q.getlist("expand[]")))
        if head == "tree" and method == "GET" and len(rest) >= 2:
            revision, i = _take_revision(rest, 1)
            path = unquote("/".join(rest[i:]))
            items, next_url = await call(hub.tree, who, repo_type, repo_id, revision, path,
                                         truthy(q.get("recursive")), truthy(q.get("expand")), q.get("cursor"), b)
            return _json(items, headers=_link(next_url))
        if head == "paths-info" and method == "POST" and len(rest) >= 2:
            revision, _ = _take_revision(rest, 1)
            body = await request.body()
            if request.headers.get("content-type", "").startswith("application/json"):
                data = _parse_json_body(body)
                paths, expand = data.get("paths") or [], truthy(data.get("expand"))
            else:
                form = parse_qs(body.decode("utf-8", "replace"))
                paths, expand = form.get("paths", []), truthy((form.get("expand") or ["false"])[0])
            return _json(await call(hub.paths_info, who, repo_type, repo_id, revision, paths, expand))
        if head == "refs" and method == "GET" and len(rest) == 1:
            return _json(await call(hub.refs, who, repo_type, repo_id, truthy(q.get("include_prs"))))
        if head == "commits" and method == "GET" and len(rest) >= 2:
            revision, _ = _take_revision(rest, 1)
            try:
                page = int(q.get("p", 0))
            except ValueError:
                raise errors.bad_request("Invalid page") from None
            formatted = "formatted" in (q.getlist("expand[]") + q.getlist("expand"))
            items, next_url = await call(hub.commits, who, repo_type, repo_id, revision, page, formatted, b)
            return _json(items, headers=_link(next_url))
        if head == "preupload" and method == "POST" and len(rest) >= 2:
            revision, _ = _take_revision(rest, 1)
            body = _parse_json_body(await request.body())
            return _json(await call(hub.pushes.preupload, who, repo_type, repo_id, revision, body,
                                    truthy(q.get("create_pr"))))
        if head == "commit" and method == "POST" and len(rest) >= 2:
            revision, _ = _take_revision(rest, 1)
            body = await request.body()
            return _json(await call(hub.pushes.commit, who, repo_type, repo_id, revision, body,
                                    truthy(q.get("create_pr")), b))
        if head == "settings" and method == "PUT" and len(rest) == 1:
            body = _parse_json_body(await request.body())
            return _json(await call(hub.update_settings, who, repo_type, repo_id, body, b))
        if head == "auth-check" and method == "GET" and rest[1:] in ([], ["write"]):
            return _json(await call(hub.auth_check, who, repo_type, repo_id, rest[1:] == ["write"]))
        if head == "user-access-request" and method == "POST" and rest[1:] == ["grant"]:
            body = _parse_json_body(await request.body())
            return _json(await call(hub.grant_access, who, repo_type, repo_id, body.get("user")))
        if head == "branch" and len(rest) >= 2 and method in ("POST", "DELETE"):
            branch = unquote("/".join(rest[1:]))
            if method == "POST":
                body = _parse_json_body(await request.body())
                return _json(await call(hub.create_branch, who, repo_type, repo_id, branch, body, b))
            return _json(await call(hub.delete_branch, who, repo_type, repo_id, branch, b))
        if head == "tag" and len(rest) >= 2 and method in ("POST", "DELETE"):
            name = unquote("/".join(rest[1:]))
            if method == "POST":
                body = _parse_json_body(await request.body())
                return _json(await call(hub.create_tag, who, repo_type, repo_id, name, body, b))
            return _json(await call(hub.delete_tag, who, repo_type, repo_id, name, b))
        if head == "discussions":
            return await discussion_route(request, who, repo_type, repo_id, rest[1:], b)
        # Unknown sub-route of an existing repo: plain 404; of a missing/hidden repo: RepoNotFound.
        await call(hub.repo, who, repo_type, repo_id)
        raise errors.not_found()

    async def discussion_route(request: Request, who, repo_type: str, repo_id: str, rest: list[str],
                               b: str) -> Response:
        method = request.method
        community = hub.community
        if not rest:
            if method == "GET":
                return _json(await call(community.list, who, repo_type, repo_id, request.query_params))
            if method == "POST":
                body = _parse_json_body(await request.body())
                return _json(await call(community.create, who, repo_type, repo_id, body, b))
        elif len(rest) == 1 and method == "GET":
            return _json(await call(community.details, who, repo_type, repo_id, rest[0],
                                    truthy(request.query_params.get("diff"))))
        elif len(rest) == 2 and method == "POST":
            body = _parse_json_body(await request.body())
            action = {"comment": community.comment, "status": community.change_status, "title": community.rename,
                      "merge": community.merge}.get(rest[1])
            if action is not None:
                return _json(await call(action, who, repo_type, repo_id, rest[0], body, b))
        await call(hub.repo, who, repo_type, repo_id)
        raise errors.not_found()

    return app
