"""End-to-end tests of the local Hub server with the real `huggingface_hub` client over real HTTP.

API calls run in-process through `HfApi(endpoint=url)` with offline mode off and Xet disabled on the client's
constants (conftest sets HF_HUB_OFFLINE=1 before the client is imported). Downloads through `hf_hub_download`,
`snapshot_download` and `transformers.from_pretrained` run in one subprocess whose environment sets
`HF_ENDPOINT` and `HF_HUB_DISABLE_XET=1` before anything is imported, as a real user would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import httpx2  # noqa: E402  (huggingface_hub's HTTP client)
import torch  # noqa: E402
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, WebhookPayload  # noqa: E402
from huggingface_hub.errors import (  # noqa: E402
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from bot_support import client_fixture  # noqa: E402
from conftest import hub_client_online  # noqa: E402
from hub_bot.local_hub import start_local_hub  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALICE, ALICE_READ, BOB, ADMIN = "hf_alice_write", "hf_alice_read", "hf_bob_write", "admin-secret"
SECRET = "webhook-s3cret"
IDS = [[1, 5, 9, 17, 33, 65, 127, 2]]


# -------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def client_online():
    """Let the in-process client talk HTTP (conftest sets HF_HUB_OFFLINE=1) and keep it off the Xet path."""
    with hub_client_online():
        yield


class Receiver:
    """A tiny webhook receiver recording (headers, JSON body); repo names in `fail_once` get one 500 first."""

    def __init__(self):
        self.events: list[tuple[dict, dict]] = []
        self.fail_once: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = body.get("repo", {}).get("name")
                if name in receiver.fail_once:
                    receiver.fail_once.discard(name)
                    self.send_response(500)
                else:
                    receiver.events.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/webhook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def for_repo(self, name: str) -> list[tuple[dict, dict]]:
        return [(h, b) for h, b in self.events if b["repo"]["name"] == name]


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.httpd.shutdown()


def hub_config(receiver_url: str | None = None) -> dict:
    config = {
        "admin_token": ADMIN,
        "users": {"alice": {"fullname": "Alice", "orgs": ["pruners"]}},
        "tokens": {ALICE: {"user": "alice", "role": "write"}, ALICE_READ: {"user": "alice", "role": "read"},
                   BOB: {"user": "bob", "role": "write"}},
        "search_page_size": 3,  # small pages: the client must follow Link rel="next"
        "tree_page_size": 4,
        "commits_page_size": 2,
        "webhook_backoff_s": 0.05,
    }
    if receiver_url:
        config["webhooks"] = [{"url": receiver_url, "secret": SECRET, "domains": ["repo", "discussion"],
                               "watched": [{"type": "user", "name": "alice"}, {"type": "org", "name": "pruners"}]}]
    return config


@pytest.fixture(scope="module")
def hub(tmp_path_factory, receiver):
    server = start_local_hub(tmp_path_factory.mktemp("hub-data"), hub_config(receiver.url))
    yield server
    server.stop()


alice = client_fixture(ALICE)
bob = client_fixture(BOB)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LlamaForCausalLM saved as safetensors, and its logits on IDS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=128)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- pruned\nbase_model: meta/llama\n---\n# Tiny\n")
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits
    torch.save(logits, folder.parent / "tiny-logits.pt")
    return folder, folder.parent / "tiny-logits.pt"


@pytest.fixture(scope="module")
def tiny_repo(alice, tiny):
    folder, _ = tiny
    url = alice.create_repo("alice/tiny-llama")
    commit = alice.upload_folder(repo_id="alice/tiny-llama", folder_path=folder, commit_message="Upload tiny llama")
    return url.repo_id, commit


DOWNLOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from transformers import AutoModelForCausalLM
    args = json.loads(sys.argv[1])
    out = {}
    model = AutoModelForCausalLM.from_pretrained(args["repo"])
    with torch.no_grad():
        logits = model(torch.tensor(args["ids"])).logits
    out["max_logit_diff"] = (logits - torch.load(args["logits"])).abs().max().item()
    path = hf_hub_download(args["repo"], "config.json", revision=args["first_sha"])
    out["revision_path"] = path
    out["revision_config"] = open(path).read()
    snap = snapshot_download(args["repo"], revision=args["first_sha"])
    out["snapshot_files"] = sorted(p.name for p in __import__("pathlib").Path(snap).iterdir())
    for name, repo, token in (("gated", args["gated"], args["bob"]), ("private", args["private"], args["bob"])):
        try:
            hf_hub_download(repo, "data.txt", token=token)
            out[name] = "downloaded"
        except (GatedRepoError, RepositoryNotFoundError) as e:
            out[name] = type(e).__name__
    out["gated_owner"] = open(hf_hub_download(args["gated"], "data.txt", token=args["alice"])).read()
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def download_run(hub, alice, tiny_repo, tiny, tmp_path_factory):
    """Start one client subprocess (HF_ENDPOINT + HF_HUB_DISABLE_XET set before import) doing every download
    check; it runs in the background while the in-process tests go on (see `downloads` for its result)."""
    repo_id, commit = tiny_repo
    # A later commit on main, so that downloading at the first commit means something.
    alice.upload_file(path_or_fileobj=b'{"changed": true}', path_in_repo="config.json", repo_id=repo_id,
                      commit_message="Break config on main")
    alice.create_commit(repo_id, [CommitOperationAdd("config.json", (tiny[0] / "config.json").read_bytes())],
                        commit_message="Restore config")
    alice.create_repo("alice/gated-data")
    alice.upload_file(path_or_fileobj=b"secret sauce", path_in_repo="data.txt", repo_id="alice/gated-data")
    alice.update_repo_settings("alice/gated-data", gated="manual")
    alice.create_repo("alice/private-data", private=True)
    alice.upload_file(path_or_fileobj=b"private", path_in_repo="data.txt", repo_id="alice/private-data")
    work = tmp_path_factory.mktemp("hf-client")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(work / "home"), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    args = {"repo": repo_id, "ids": IDS, "logits": str(tiny[1]), "first_sha": commit.oid,
            "gated": "alice/gated-data", "private": "alice/private-data", "bob": BOB, "alice": ALICE}
    with open(work / "stdout", "w") as out, open(work / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", DOWNLOAD_SCRIPT, json.dumps(args)], env=env, stdout=out,
                                stderr=err, text=True)
    yield proc, work, commit.oid
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def downloads(download_run):
    proc, work, first_sha = download_run
    proc.wait(timeout=240)
    assert proc.returncode == 0, (work / "stderr").read_text()[-4000:]
    line = next(ln for ln in (work / "stdout").read_text().splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) | {"first_sha": first_sha}


def raw(hub, method: str, path: str, token: str | None = None, **kwargs) -> httpx2.Response:
    headers = kwargs.pop("headers", {})
    if token:
        headers["authorization"] = f"Bearer {token}"
    return httpx2.request(method, hub.url + path, headers=headers, **kwargs)


# -------------------------------------------------------------------- accounts and repos
def test_whoami_and_bad_token(hub, alice, download_run):  # download_run: start the client subprocess early
    me = alice.whoami(cache=False)
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    assert [o["name"] for o in me["orgs"]] == ["pruners"]
    assert HfApi(endpoint=hub.url, token=ALICE_READ).whoami(cache=False)["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.url, token="hf_wrong").whoami(cache=False)
    assert err.value.response.status_code == 401
    r = raw(hub, "GET", "/api/models/alice/tiny-llama", token="hf_wrong")
    assert r.status_code == 401 and r.headers["x-error-message"] == "Invalid credentials in Authorization header"


def test_create_repo_conflict_org_and_delete(hub, alice, bob):
    url = alice.create_repo("pruners/variant-a", private=True)
    assert url.repo_id == "pruners/variant-a"
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_repo("pruners/variant-a")
    assert err.value.response.status_code == 409 and err.value.response.json()["url"].endswith("/pruners/variant-a")
    assert alice.create_repo("pruners/variant-a", exist_ok=True).repo_id == "pruners/variant-a"
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_repo("pruners/not-bobs")
    assert err.value.response.status_code == 403
    with pytest.raises(RepositoryNotFoundError):
        bob.delete_repo("pruners/variant-a")  # private: bob cannot even see it
    alice.delete_repo("pruners/variant-a")
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("pruners/variant-a")
    alice.delete_repo("pruners/variant-a", missing_ok=True)


def test_read_token_cannot_create_or_push(hub, tiny_repo):
    reader = HfApi(endpoint=hub.url, token=ALICE_READ)
    for attempt in (lambda: reader.create_repo("alice/from-read-token"),
                    lambda: reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=tiny_repo[0])):
        with pytest.raises(HfHubHTTPError) as err:
            attempt()
        assert err.value.response.status_code == 403
        assert "read" in err.value.response.headers["x-error-message"]
    assert reader.model_info(tiny_repo[0]).id == tiny_repo[0]  # reading is fine


def test_private_repo_invisible_to_others(hub, alice, bob):
    alice.create_repo("alice/hidden", private=True)
    assert alice.model_info("alice/hidden").private is True
    for client in (bob, HfApi(endpoint=hub.url, token=False)):
        with pytest.raises(RepositoryNotFoundError):
            client.model_info("alice/hidden")
        with pytest.raises(RepositoryNotFoundError):
            client.list_repo_files("alice/hidden")
    assert "alice/hidden" not in [m.id for m in bob.list_models(author="alice")]
    assert "alice/hidden" in [m.id for m in alice.list_models(author="alice")]


# -------------------------------------------------------------------- reading a model repo
def test_model_info_files_refs_commits(hub, alice, tiny_repo):
    repo_id, commit = tiny_repo
    info = alice.model_info(repo_id, revision=commit.oid, files_metadata=True)
    assert info.sha == commit.oid and info.private is False and info.gated is False
    assert info.card_data.license == "mit" and "pruned" in info.tags and "license:mit" in info.tags
    assert {"transformers", "safetensors", "llama", "base_model:meta/llama"} <= set(info.tags)
    assert info.last_modified is not None and info.safetensors.total > 0
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "config.json", "generation_config.json",
                             "model.safetensors"}
    weights = siblings["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.size == weights.size > 0 and len(weights.lfs.sha256) == 64
    assert siblings["config.json"].lfs is None and siblings["config.json"].size > 0
    assert alice.model_info(repo_id).siblings[0].size is None  # sizes only with files_metadata, like the Hub
    assert sorted(alice.list_repo_files(repo_id)) == sorted(siblings)
    refs = alice.list_repo_refs(repo_id)
    assert [b.name for b in refs.branches] == ["main"] and refs.pull_requests is None
    commits = alice.list_repo_commits(repo_id, revision=commit.oid)
    assert [c.title for c in commits] == ["Upload tiny llama", "initial commit"]
    assert commits[0].commit_id == commit.oid and commits[0].authors == ["alice"]
    with pytest.raises(RevisionNotFoundError):
        alice.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        alice.model_info("alice/no-such-repo")


def test_tree_folders_and_quoted_paths(hub, alice):
    alice.create_repo("alice/tree")
    alice.create_commit("alice/tree", [CommitOperationAdd("sub/dir/a.txt", b"a"),
                                       CommitOperationAdd("sub/b.bin", b"\0binary"),
                                       CommitOperationAdd("top.txt", b"t")], commit_message="files")
    top = {f.path: type(f).__name__ for f in alice.list_repo_tree("alice/tree")}
    assert top == {".gitattributes": "RepoFile", "sub": "RepoFolder", "top.txt": "RepoFile"}
    sub = {f.path: f for f in alice.list_repo_tree("alice/tree", path_in_repo="sub")}  # sent as sub (quoted)
    assert set(sub) == {"sub/dir", "sub/b.bin"} and sub["sub/b.bin"].lfs is not None  # binary -> LFS
    deep = sorted(f.path for f in alice.list_repo_tree("alice/tree", path_in_repo="sub/dir", recursive=True))
    assert deep == ["sub/dir/a.txt"]
    expanded = list(alice.list_repo_tree("alice/tree", path_in_repo="sub", expand=True))
    assert all(f.last_commit is not None and f.last_commit.title == "files" for f in expanded)
    with pytest.raises(RemoteEntryNotFoundError):
        list(alice.list_repo_tree("alice/tree", path_in_repo="missing"))
    page = raw(hub, "GET", "/api/models/alice/tree/tree/main", params={"recursive": "true"})
    assert len(page.json()) == 4 and 'rel="next"' in page.headers["link"]  # tree_page_size=4
    assert len(list(alice.list_repo_tree("alice/tree", recursive=True))) == 6
    infos = alice.get_paths_info("alice/tree", ["top.txt", "sub", "nope"])
    assert sorted(i.path for i in infos) == ["sub", "top.txt"]


def test_download_headers_lfs_redirect_and_range(hub, tiny_repo):
    repo_id, commit = tiny_repo
    r = raw(hub, "HEAD", f"/{repo_id}/resolve/{commit.oid}/config.json")
    assert r.status_code == 200 and r.headers["x-repo-commit"] == commit.oid
    size = int(r.headers["content-length"])
    assert len(r.headers["etag"].strip('"')) == 40
    r = raw(hub, "GET", f"/{repo_id}/resolve/main/config.json", headers={"Range": "bytes=2-9"})
    assert r.status_code == 206 and r.headers["content-range"] == f"bytes 2-9/{size}" and len(r.content) == 8
    assert raw(hub, "GET", f"/{repo_id}/resolve/main/config.json", headers={"Range": "bytes=-5"}).content \
        == raw(hub, "GET", f"/{repo_id}/resolve/main/config.json").content[-5:]
    assert raw(hub, "GET", f"/{repo_id}/resolve/main/config.json",
               headers={"Range": f"bytes={size}-"}).status_code == 416
    r = raw(hub, "HEAD", f"/{repo_id}/resolve/main/model.safetensors")
    assert r.status_code == 302 and r.headers["x-repo-commit"]
    sha256, lfs_size = r.headers["x-linked-etag"].strip('"'), int(r.headers["x-linked-size"])
    location = r.headers["location"]
    assert location.startswith(hub.storage_url) and not location.startswith(hub.url)  # another origin
    got = httpx2.get(location, headers={"Range": "bytes=0-7"})  # no token: the URL is signed
    assert got.status_code == 206 and got.headers["content-range"] == f"bytes 0-7/{lfs_size}"
    full = httpx2.get(location)
    assert len(full.content) == lfs_size and __import__("hashlib").sha256(full.content).hexdigest() == sha256
    assert httpx2.get(location.replace("sig=", "sig=0")).status_code == 403
    r = raw(hub, "HEAD", f"/{repo_id}/resolve/main/missing.txt")
    assert r.status_code == 404 and r.headers["x-error-code"] == "EntryNotFound" and r.headers["x-repo-commit"]
    assert raw(hub, "HEAD", f"/{repo_id}/resolve/nope/config.json").headers["x-error-code"] == "RevisionNotFound"
    assert raw(hub, "HEAD", "/alice/nothing-here/resolve/main/x").headers["x-error-code"] == "RepoNotFound"


def test_gated_access_grant(hub, alice, bob):
    alice.create_repo("alice/gated-grant")
    alice.upload_file(path_or_fileobj=b"ok", path_in_repo="f.txt", repo_id="alice/gated-grant")
    alice.update_repo_settings("alice/gated-grant", gated="auto")
    path = "/alice/gated-grant/resolve/main/f.txt"
    r = raw(hub, "GET", path, token=BOB)
    assert r.status_code == 403 and r.headers["x-error-code"] == "GatedRepo"
    assert raw(hub, "GET", path).status_code == 401  # anonymous
    with pytest.raises(GatedRepoError):
        bob.auth_check("alice/gated-grant")
    alice.grant_access("alice/gated-grant", "bob")
    assert raw(hub, "GET", path, token=BOB).content == b"ok"
    bob.auth_check("alice/gated-grant")
    with pytest.raises(HfHubHTTPError):
        bob.auth_check("alice/gated-grant", write=True)


# -------------------------------------------------------------------- writing
def test_stale_parent_commit_is_rejected(hub, alice):
    alice.create_repo("alice/concurrent")
    first = alice.upload_file(path_or_fileobj=b"1", path_in_repo="f.txt", repo_id="alice/concurrent")
    second = alice.create_commit("alice/concurrent", [CommitOperationAdd("f.txt", b"2")], commit_message="two",
                                 parent_commit=first.oid)
    with pytest.raises(HfHubHTTPError) as err:
        alice.create_commit("alice/concurrent", [CommitOperationAdd("f.txt", b"3")], commit_message="three",
                            parent_commit=first.oid)
    assert err.value.response.status_code == 412
    assert alice.model_info("alice/concurrent").sha == second.oid


def test_concurrent_commits_are_serialized(hub, alice):
    alice.create_repo("alice/race")
    parent = alice.model_info("alice/race").sha
    results = []

    def push(i):
        try:
            alice.create_commit("alice/race", [CommitOperationAdd(f"f{i}.txt", b"%d" % i)], commit_message=f"c{i}",
                                parent_commit=parent)
            results.append("ok")
        except HfHubHTTPError as e:
            results.append(e.response.status_code)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=str) == [412, 412, 412, "ok"]
    assert len(alice.list_repo_commits("alice/race")) == 2


def test_failed_commit_leaves_repo_consistent(hub, alice, monkeypatch):
    alice.create_repo("alice/crashy")
    before = alice.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id="alice/crashy")
    store = hub.hub.store

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated crash before the refs are written)")

    monkeypatch.setattr(store, "save_refs", crash)
    with pytest.raises(HfHubHTTPError) as err:
        alice.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id="alice/crashy")
    assert err.value.response.status_code == 500
    monkeypatch.undo()
    assert alice.model_info("alice/crashy").sha == before.oid  # the half-done commit is not visible
    assert raw(hub, "GET", "/alice/crashy/resolve/main/f.txt").content == b"v1"
    after = alice.upload_file(path_or_fileobj=b"v3", path_in_repo="f.txt", repo_id="alice/crashy")
    assert [c.commit_id for c in alice.list_repo_commits("alice/crashy")][:2] == [after.oid, before.oid]


def test_branches_and_tags(hub, alice, bob):
    alice.create_repo("alice/branchy")
    alice.create_branch("alice/branchy", branch="pruned/50pct")
    alice.create_branch("alice/branchy", branch="pruned/50pct", exist_ok=True)
    on_branch = alice.upload_file(path_or_fileobj=b"b", path_in_repo="b.txt", repo_id="alice/branchy",
                                  revision="pruned/50pct")
    alice.create_tag("alice/branchy", tag="v1", revision="pruned/50pct")
    refs = alice.list_repo_refs("alice/branchy")
    assert {b.name: b.target_commit for b in refs.branches}["pruned/50pct"] == on_branch.oid
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", on_branch.oid)]
    assert "b.txt" in alice.list_repo_files("alice/branchy", revision="v1")
    assert "b.txt" not in alice.list_repo_files("alice/branchy")
    with pytest.raises(HfHubHTTPError) as err:
        bob.create_branch("alice/branchy", branch="bobs")
    assert err.value.response.status_code == 403
    alice.delete_branch("alice/branchy", branch="pruned/50pct")
    with pytest.raises(RevisionNotFoundError):
        alice.list_repo_files("alice/branchy", revision="pruned/50pct")


def test_invalid_pushes(hub, alice):
    alice.create_repo("alice/strict")
    with pytest.raises(ValueError, match="Invalid metadata"):  # validate-yaml answers 400
        alice.upload_file(path_or_fileobj=b"---\ntags: [a\n---\n", path_in_repo="README.md", repo_id="alice/strict")
    with pytest.raises(RemoteEntryNotFoundError):
        alice.create_commit("alice/strict", [CommitOperationDelete("missing.txt")], commit_message="rm")
    with pytest.raises(RevisionNotFoundError):
        alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/strict", revision="nope")
    body = b'{"key":"header","value":{"summary":"s"}}\n{"key":"lfsFile","value":{"path":"w.bin","algo":"sha256",' \
           b'"oid":"' + b"a" * 64 + b'","size":3}}\n'
    r = raw(hub, "POST", "/api/models/alice/strict/commit/main", token=ALICE, content=body,
            headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]
    batch = raw(hub, "POST", "/alice/strict.git/info/lfs/objects/batch", token=ALICE,
                json={"operation": "upload", "objects": [{"oid": "b" * 64, "size": 4}], "hash_algo": "sha256"}).json()
    href = batch["objects"][0]["actions"]["upload"]["href"]
    assert httpx2.put(href, content=b"nope").status_code == 400  # sha256 mismatch
    yaml_check = raw(hub, "POST", "/api/validate-yaml", json={"content": "---\nlicense: 3\n---\n", "repoType": "model"})
    assert yaml_check.status_code == 400 and yaml_check.json()["errors"]


def test_pull_request_discussion_comment_merge(hub, alice, bob, receiver):
    alice.create_repo("alice/prs")
    alice.upload_file(path_or_fileobj=b"v1", path_in_repo="notes.txt", repo_id="alice/prs")
    with pytest.raises(HfHubHTTPError) as err:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/prs")
    assert err.value.response.status_code == 403
    pr = bob.create_commit("alice/prs", [CommitOperationAdd("pruned.txt", b"50% heads"),
                                          CommitOperationDelete("notes.txt")],
                           commit_message="Add pruned variant", commit_description="Made by the bot", create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1" and pr.pr_url.endswith("/alice/prs/discussions/1")
    assert "pruned.txt" not in alice.list_repo_files("alice/prs")
    assert "pruned.txt" in alice.list_repo_files("alice/prs", revision="refs/pr/1")
    refs = alice.list_repo_refs("alice/prs", include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", pr.oid)]
    assert raw(hub, "GET", "/api/models/alice/prs/tree/refs%2Fpr%2F1").status_code == 200
    discussions = list(alice.get_repo_discussions("alice/prs"))
    assert [(d.num, d.title, d.status, d.is_pull_request, d.author) for d in discussions] == \
        [(1, "Add pruned variant", "open", True, "bob")]
    bob.upload_file(path_or_fileobj=b"more", path_in_repo="extra.txt", repo_id="alice/prs", revision="refs/pr/1")
    comment = alice.comment_discussion("alice/prs", 1, "Looks good")
    assert comment.content == "Looks good" and comment.author == "alice"
    details = alice.get_discussion_details("alice/prs", 1)
    assert details.target_branch == "refs/heads/main" and details.conflicting_files == []
    assert [e.type for e in details.events] == ["comment", "commit", "commit", "comment"]
    assert details.events[0].content == "Made by the bot" and "+50% heads" in details.diff
    with pytest.raises(HfHubHTTPError) as err:
        bob.merge_pull_request("alice/prs", 1)
    assert err.value.response.status_code == 403
    alice.merge_pull_request("alice/prs", 1)
    merged = alice.get_discussion_details("alice/prs", 1)
    assert merged.status == "merged" and merged.merge_commit_oid == alice.model_info("alice/prs").sha
    assert sorted(alice.list_repo_files("alice/prs")) == [".gitattributes", "extra.txt", "pruned.txt"]
    second = bob.create_discussion("alice/prs", "A question", description="Why 50%?")
    closed = bob.change_discussion_status("alice/prs", second.num, "closed")
    assert second.num == 2 and not second.is_pull_request and closed.new_status == "closed"
    hub.hub.webhooks.flush(5)
    scopes = [(b["event"]["scope"], b["event"]["action"]) for _, b in receiver.for_repo("alice/prs")]
    assert ("discussion", "create") in scopes and ("discussion.comment", "create") in scopes
    opened = next(b for _, b in receiver.for_repo("alice/prs") if b["event"]["scope"] == "discussion")
    assert opened["discussion"]["isPullRequest"] and opened["discussion"]["changes"]["base"] == "refs/heads/main"


def test_conflicting_pull_request_cannot_merge(hub, alice, bob):
    alice.create_repo("alice/conflicts")
    alice.upload_file(path_or_fileobj=b"base", path_in_repo="f.txt", repo_id="alice/conflicts")
    pr = bob.create_commit("alice/conflicts", [CommitOperationAdd("f.txt", b"bob")], commit_message="bob edit",
                           create_pr=True)
    alice.upload_file(path_or_fileobj=b"alice", path_in_repo="f.txt", repo_id="alice/conflicts")
    assert alice.get_discussion_details("alice/conflicts", pr.pr_num).conflicting_files == ["f.txt"]
    with pytest.raises(HfHubHTTPError) as err:
        alice.merge_pull_request("alice/conflicts", pr.pr_num)
    assert err.value.response.status_code == 409


def test_pull_request_commits_honour_parent_commit(hub, alice, bob):
    """Like pushes to main: opening a PR starts from `parent_commit` (a commit of the base branch, else 412), and a
    push to refs/pr/N with a stale `parent_commit` is refused with 412."""
    alice.create_repo("alice/pr-parents")
    first = alice.upload_file(path_or_fileobj=b"1", path_in_repo="first.txt", repo_id="alice/pr-parents").oid
    alice.upload_file(path_or_fileobj=b"2", path_in_repo="second.txt", repo_id="alice/pr-parents")
    pr = bob.create_commit("alice/pr-parents", [CommitOperationAdd("pr.txt", b"p")], commit_message="from first",
                           create_pr=True, parent_commit=first)
    assert sorted(alice.list_repo_files("alice/pr-parents", revision=pr.pr_revision)) == [
        ".gitattributes", "first.txt", "pr.txt"]  # started at `first`, not at main's head
    assert alice.get_discussion_details("alice/pr-parents", pr.pr_num).conflicting_files == []
    alice.create_repo("alice/pr-parents-other")
    foreign = alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/pr-parents-other").oid
    for parent in (foreign, "0" * 40):  # not a commit of main
        with pytest.raises(HfHubHTTPError) as err:
            bob.create_commit("alice/pr-parents", [CommitOperationAdd("y.txt", b"y")], commit_message="bad parent",
                              create_pr=True, parent_commit=parent)
        assert err.value.response.status_code == 412
    head = bob.create_commit("alice/pr-parents", [CommitOperationAdd("pr2.txt", b"q")], commit_message="more",
                             revision=pr.pr_revision, parent_commit=pr.oid).oid
    with pytest.raises(HfHubHTTPError) as err:  # pr.oid is no longer the head of refs/pr/N
        bob.create_commit("alice/pr-parents", [CommitOperationAdd("pr3.txt", b"r")], commit_message="stale",
                          revision=pr.pr_revision, parent_commit=pr.oid)
    assert err.value.response.status_code == 412
    refs = alice.list_repo_refs("alice/pr-parents", include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [(pr.pr_revision, head)]
    assert len(list(alice.get_repo_discussions("alice/pr-parents"))) == 1  # the refused PRs were not opened


def test_repo_names_are_case_insensitive(hub, alice, bob):
    alice.create_repo("alice/CaseRepo")
    commit = bob.create_commit("ALICE/caserepo", [CommitOperationAdd("f.txt", b"c")], commit_message="pr",
                               create_pr=True)
    alice.upload_file(path_or_fileobj=b"main", path_in_repo="m.txt", repo_id="Alice/CASEREPO")
    for spelling in ("alice/CaseRepo", "ALICE/caserepo", "alice/caserepo"):
        info = bob.model_info(spelling)
        assert info.id == "alice/CaseRepo" and "m.txt" in [s.rfilename for s in info.siblings]
    assert raw(hub, "GET", "/ALICE/CASEREPO/resolve/main/m.txt").content == b"main"
    assert [c.title for c in bob.list_repo_commits("alice/caserepo")][0] == "Upload m.txt with huggingface_hub"
    assert "f.txt" in bob.list_repo_files("alice/caserepo", revision=commit.pr_revision)
    alice.create_repo("alice/hidden-case", private=True)
    with pytest.raises(RepositoryNotFoundError):
        bob.model_info("Alice/Hidden-Case")  # still private under another spelling
    assert alice.model_info("Alice/Hidden-Case").id == "alice/hidden-case"


def test_settings_change_visibility_and_gating(hub, alice, bob, receiver):
    alice.create_repo("alice/settings")
    card = (b"---\nlicense: other\nlicense_name: tiny-license\nextra_gated_prompt: Agree to the terms\n"
            b"extra_gated_fields:\n  Company: text\n  I agree: checkbox\n---\n# gated card\n")
    alice.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id="alice/settings")
    alice.update_repo_settings("alice/settings", private=True)
    with pytest.raises(RepositoryNotFoundError):
        bob.model_info("alice/settings")
    alice.update_repo_settings("alice/settings", visibility="public")
    alice.update_repo_settings("alice/settings", gated="auto")
    info = bob.model_info("alice/settings")
    assert (info.private, info.gated) == (False, "auto")
    assert info.card_data["extra_gated_fields"] == {"Company": "text", "I agree": "checkbox"}
    assert info.card_data["extra_gated_prompt"] == "Agree to the terms"
    with pytest.raises(GatedRepoError):
        bob.auth_check("alice/settings")
    alice.update_repo_settings("alice/settings", gated=False)
    assert bob.model_info("alice/settings").gated is False
    with pytest.raises(ValueError, match="extra_gated_fields"):
        alice.upload_file(path_or_fileobj=b"---\nextra_gated_fields: [Company]\n---\n", path_in_repo="README.md",
                          repo_id="alice/settings")
    assert hub.hub.webhooks.flush(10)
    changes = [b["repo"]["private"] for _, b in receiver.for_repo("alice/settings")
               if b["event"] == {"action": "update", "scope": "repo.config"}]
    assert changes == [True, False, False, False]


# -------------------------------------------------------------------- webhooks, faults, search
def test_webhook_delivered_with_secret_and_refs(hub, alice, receiver):
    alice.create_repo("pruners/hooked")
    assert hub.hub.webhooks.flush(10)  # the create event is delivered first: the planted failure is the push's
    receiver.fail_once.add("pruners/hooked")  # first delivery attempt fails: it must be retried
    commit = alice.upload_file(path_or_fileobj=b"w", path_in_repo="w.txt", repo_id="pruners/hooked")
    assert hub.hub.webhooks.flush(10)
    updates = [(h, b) for h, b in receiver.for_repo("pruners/hooked") if b["event"]["scope"] == "repo.content"]
    assert len(updates) == 1
    headers, body = updates[0]
    assert headers["x-webhook-secret"] == SECRET
    assert body["event"] == {"action": "update", "scope": "repo.content"}
    assert body["repo"]["headSha"] == commit.oid and body["repo"]["type"] == "model" and not body["repo"]["private"]
    (ref,) = body["updatedRefs"]
    assert ref["ref"] == "refs/heads/main" and ref["newSha"] == commit.oid and len(ref["oldSha"]) == 40
    assert body["webhook"]["version"] == 3 and body["webhook"]["id"]
    parsed = WebhookPayload.model_validate(body)  # the client's own model accepts it
    assert parsed.repo.name == "pruners/hooked" and parsed.updatedRefs[0].newSha == commit.oid
    attempts = [d for d in hub.hub.webhooks.deliveries() if d["repo"] == "pruners/hooked"]
    assert [d["ok"] for d in attempts if d["scope"] == "repo.content"] == [False, True]


def test_fault_injection_then_recovery(hub, alice):
    alice.create_repo("alice/faulty")
    assert raw(hub, "POST", "/_admin/faults", json={"pattern": "x"}).status_code == 403
    rule = raw(hub, "POST", "/_admin/faults", token=ADMIN,
               json={"pattern": "^GET /api/models/alice/faulty$", "status": 500, "count": 1}).json()
    assert rule["count"] == 1
    with pytest.raises(HfHubHTTPError) as err:
        alice.model_info("alice/faulty")
    assert err.value.response.status_code == 500
    assert alice.model_info("alice/faulty").id == "alice/faulty"
    hub.hub.faults.add("^GET /api/whoami-v2$", 429, count=1, headers={"Retry-After": "7"})
    r = raw(hub, "GET", "/api/whoami-v2", token=ALICE)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert raw(hub, "GET", "/api/whoami-v2", token=ALICE).status_code == 200
    assert raw(hub, "GET", "/_admin/faults", token=ADMIN).json()[0]["hits"] == 1
    slow = raw(hub, "POST", "/_admin/faults", token=ADMIN,  # status null: only slow, then answered as usual
               json={"pattern": "^GET /api/models/alice/faulty$", "status": None, "delay_s": 0.2, "count": 1}).json()
    assert alice.model_info("alice/faulty").id == "alice/faulty"
    assert [r["hits"] for r in raw(hub, "GET", "/_admin/faults", token=ADMIN).json() if r["id"] == slow["id"]] == [1]
    assert raw(hub, "POST", "/_admin/faults", token=ADMIN, json={"pattern": "x", "status": None}).status_code == 400


def test_search_by_author_with_pagination(hub, alice):
    for i in range(5):
        alice.create_repo(f"alice/search-{i}")
    alice.upload_file(path_or_fileobj=b"---\ntags: [search-tag]\n---\n# tagged\n", path_in_repo="README.md",
                      repo_id="alice/search-3")
    first = raw(hub, "GET", "/api/models", params={"author": "alice", "search": "search-"})
    assert len(first.json()) == 3 and 'rel="next"' in first.headers["link"]
    found = [m.id for m in alice.list_models(author="alice", search="search-")]
    assert sorted(found) == [f"alice/search-{i}" for i in range(5)]
    assert len(set(found)) == 5
    assert [m.id for m in alice.list_models(filter="search-tag", author="alice")] == ["alice/search-3"]
    assert list(alice.list_models(filter="search-tag", author="bob")) == []
    assert list(alice.list_models(author="nobody")) == []


# -------------------------------------------------------------------- persistence
def test_restart_keeps_everything(tmp_path):
    data = tmp_path / "data"
    server = start_local_hub(data, hub_config())
    try:
        api = HfApi(endpoint=server.url, token=ALICE)
        api.create_repo("alice/durable")
        api.create_repo("alice/durable-private", private=True)
        weights = os.urandom(3000)
        commit = api.create_commit("alice/durable", [CommitOperationAdd("w.safetensors", weights),
                                                     CommitOperationAdd("README.md", b"---\nlicense: mit\n---\n# durable\n")],
                                   commit_message="weights")
        pr = HfApi(endpoint=server.url, token=BOB).create_commit(
            "alice/durable", [CommitOperationAdd("pr.txt", b"pr")], commit_message="pr", create_pr=True)
        api.comment_discussion("alice/durable", pr.pr_num, "noted")
    finally:
        server.stop()
    server = start_local_hub(data, hub_config())
    try:
        api = HfApi(endpoint=server.url, token=ALICE)
        assert api.model_info("alice/durable").sha == commit.oid
        assert [c.title for c in api.list_repo_commits("alice/durable")] == ["weights", "initial commit"]
        assert api.list_repo_refs("alice/durable", include_pull_requests=True).pull_requests[0].target_commit \
            == pr.oid
        assert [e.type for e in api.get_discussion_details("alice/durable", pr.pr_num).events] == \
            ["comment", "commit", "comment"]
        r = httpx2.get(f"{server.url}/alice/durable/resolve/main/w.safetensors", follow_redirects=True)
        assert r.content == weights
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=server.url, token=BOB).model_info("alice/durable-private")
        assert api.model_info("alice/durable-private").private
    finally:
        server.stop()


def test_cli_serves_and_stops(tmp_path):
    """`python -m hub_bot.local_hub --data DIR --port 0 --tokens FILE` serves the API until terminated."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"tokens:\n  {ALICE}: {{user: alice, role: write}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "hub_bot.local_hub", "--data", str(tmp_path / "data"), "--port",
                             "0", "--tokens", str(tokens)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "serving http://" in line:
                url = line.split("serving ")[1].split()[0]
            elif not line and proc.poll() is not None:
                break
        assert url, "the CLI did not start"
        me = httpx2.get(f"{url}/api/whoami-v2", headers={"authorization": f"Bearer {ALICE}"}).json()
        assert me["name"] == "alice"
        assert (tmp_path / "data" / "repos").is_dir()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -------------------------------------------------------------------- downloads (client subprocess)
def test_from_pretrained_matches_local_model(downloads):
    assert downloads["max_logit_diff"] < 1e-5


def test_hf_hub_download_and_snapshot_at_revision(downloads):
    assert f"/snapshots/{downloads['first_sha']}/" in downloads["revision_path"]
    assert '"changed"' not in downloads["revision_config"] and "LlamaForCausalLM" in downloads["revision_config"]
    assert "model.safetensors" in downloads["snapshot_files"] and "config.json" in downloads["snapshot_files"]


def test_gated_and_private_downloads(downloads, bob):
    assert downloads["gated"] == "GatedRepoError"
    assert downloads["private"] == "RepositoryNotFoundError"
    assert downloads["gated_owner"] == "secret sauce"
    assert bob.model_info("alice/gated-data").gated == "manual"  # metadata stays visible, like the Hub
