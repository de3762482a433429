"""Read-only status: `GET /status` (JSON: counts per state and the latest jobs) and `GET /` (a small HTML
table with links to sources and variants). Nothing here changes state, and nothing secret is shown (the job
table holds none).

Jobs whose source is private (or not known to be public) or whose variant is private by config are shown to
anonymous viewers without names: no source repo, commit, target, URL, error or results. An operator sees
everything with `Authorization: Bearer <status token>` (the token from `server.status_token_env`); a wrong token
is answered 401.
"""
from __future__ import annotations

import hmac
import html
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from .store import JobStore

HIDDEN_NAME = "(private)"


def _redacted(doc: dict) -> dict:
    out = dict(doc, source_repo=HIDDEN_NAME, source_sha="", target_repo=HIDDEN_NAME, recipe_hash="",
               output_repo=None, output_commit=None, output_url=None, source_url=None, results=None)
    out["error"] = "(hidden)" if doc.get("error") else None
    return out


def status_document(store: JobStore, hub_url: str, limit: int = 200, operator: bool = True) -> dict:
    jobs = []
    for job in store.jobs(limit=limit):
        doc = job.public()
        doc["source_url"] = f"{hub_url}/{job.source_repo}/commit/{job.source_sha}"
        jobs.append(doc if operator or not job.confidential else _redacted(doc))
    return {"hub": hub_url, "counts": store.counts(), "jobs": jobs, "generated_at": time.time(),
            "redacted": not operator}


def _link(url: str | None, text: str) -> str:
    return f'<a href="{html.escape(url)}">{html.escape(text)}</a>' if url else html.escape(text)


def status_html(doc: dict) -> str:
    rows = []
    for j in doc["jobs"]:
        ppl = (j.get("results") or {}).get("perplexity_pruned")
        rows.append(
            "<tr>" + "".join(f"<td>{c}</td>" for c in (
                j["id"], _link(j["source_url"], f"{j['source_repo']}@{j['source_sha'][:10]}"),
                html.escape(j["recipe_name"]), f'<span class="{j["state"]}">{j["state"]}</span>', j["attempts"],
                _link(j["output_url"], j["output_repo"] or j["target_repo"]), "" if ppl is None else f"{ppl:.2f}",
                html.escape(j["error"] or ""))) + "</tr>")
    counts = ", ".join(f"{k}: {v}" for k, v in doc["counts"].items())
    note = " &mdash; private jobs shown without names" if doc.get("redacted") else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Pruning bot</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left}}.done{{color:green}}.failed{{color:#b00}}.running{{color:#06c}}</style></head>
<body><h1>Pruning bot</h1><p>Hub: {html.escape(doc['hub'])} &mdash; {counts} &mdash; <a href="status">JSON</a>{note}</p>
<table><tr><th>job</th><th>source</th><th>recipe</th><th>state</th><th>attempts</th><th>variant</th>
<th>perplexity</th><th>error</th></tr>
{''.join(rows)}
</table></body></html>"""


def add_status_routes(app: FastAPI, store: JobStore, hub_url: str, token: str | None) -> None:
    hub_url = hub_url.rstrip("/")

    def operator(request: Request) -> bool | None:
        """True for the operator's token, False for anonymous viewers, None for a wrong token."""
        header = request.headers.get("authorization")
        if not header:
            return False
        given = header.removeprefix("Bearer ").strip().encode()
        return bool(token) and hmac.compare_digest(given, token.encode()) or None

    def refused() -> JSONResponse:
        return JSONResponse({"error": "invalid status token"}, status_code=401)

    @app.get("/status")
    async def status(request: Request):
        who = operator(request)
        if who is None:
            return refused()
        return await run_in_threadpool(status_document, store, hub_url, 200, who)

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request):
        who = operator(request)
        if who is None:
            return refused()
        return status_html(await run_in_threadpool(status_document, store, hub_url, 200, who))

    @app.get("/healthz")
    async def health():
        return {"ok": True}
