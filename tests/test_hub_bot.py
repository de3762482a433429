"""End-to-end tests of the pruning bot against the local Hub, over real HTTP.

The bot runs in-process with explicit endpoint/token objects (conftest sets HF_HUB_OFFLINE=1, so the client's
constants are switched online and Xet off for this module). Its webhook endpoint is a real HTTP server the local
Hub delivers to. Two things run in subprocesses, started early so they overlap the in-process tests:
loading the variants by name (`core.load_pruned`, `from_pretrained`), which reads HF_ENDPOINT at import time,
and a bot that is SIGKILLed mid-job to test the restart.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import httpx2  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import RepositoryNotFoundError  # noqa: E402

import core  # noqa: E402
from bot_support import (CHEAP, client_fixture, commits, drain, jobs_of, json_log_file,  # noqa: E402
                         online_on_one_thread, push, source_fixture, subprocess_env, webhook_payload)
from bot_support import bot_config as config  # noqa: E402
from bot_support import post_hook as _post_hook  # noqa: E402
from conftest import save_tiny, tiny_model  # noqa: E402
from hub_bot.config import BotConfig  # noqa: E402
from hub_bot.local_hub import start_local_hub  # noqa: E402
from hub_bot.service import Bot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALICE = "hf_AliceWriteToken0123456789abcdefgh"
CAROL = "hf_CarolWriteToken0123456789abcdefgh"
BOT = "hf_BotWriteToken0123456789abcdefghij"
BOT_READ = "hf_BotReadOnlyToken0123456789abcdefg"
SECRET = "whsec-test-0123456789"
SOURCE = "alice/tiny-src"
RECIPES = [{"method": "maw_range", "target": {"ratio": 0.3}},
           {"method": "slimllm", "target": {"ratio": 0.25}, "calibration": {"n_samples": 4, "seq_len": 32}}]
VARIANTS = {"maw_range-30pct": "pruners/tiny-src-maw_range-30pct", "slimllm-25pct": "pruners/tiny-src-slimllm-25pct"}
IDS = [[5, 17, 33, 120, 7, 300, 41, 2, 9, 64]]


# -------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def client_online():
    with online_on_one_thread():
        yield


@pytest.fixture(scope="module")
def log_file(tmp_path_factory):
    """Every log record of the module as JSON lines (through the bot's redacting filter)."""
    with json_log_file(tmp_path_factory.mktemp("logs") / "bot.jsonl") as path:
        yield path


@pytest.fixture(scope="module")
def hub(tmp_path_factory, log_file):
    server = start_local_hub(tmp_path_factory.mktemp("hub"), {
        "users": {"pruning-bot": {"orgs": ["pruners"]}},
        "tokens": {ALICE: {"user": "alice", "role": "write"}, CAROL: {"user": "carol", "role": "write"},
                   BOT: {"user": "pruning-bot", "role": "write"}, BOT_READ: {"user": "pruning-bot", "role": "read"}},
        "webhook_backoff_s": 0.05})
    yield server
    server.stop()


alice = client_fixture(ALICE)
reader = client_fixture(BOT_READ)
source_dir = source_fixture("tiny-src")


@pytest.fixture(scope="module")
def bot(tmp_path_factory, hub, alice):
    """The webhook bot: watches the e2e source (two recipes), a few single-recipe sources, a PR-mode source and
    (a misconfiguration it must survive) one of its own outputs."""
    watch = [{"repo": SOURCE, "recipes": RECIPES},
             *({"repo": f"alice/{name}", "recipes": [CHEAP]} for name in ("flaky-src", "storm-src", "gpt2-src",
                                                                          "pickle-src", "custom-src", "gated-src")),
             {"repo": "alice/pr-src", "publish": "pr", "recipes": [CHEAP]},
             {"repo": VARIANTS["maw_range-30pct"], "recipes": [CHEAP]}]  # its own output: must not loop
    cfg = config(tmp_path_factory.mktemp("bot"), hub.url, watch, server={"port": 0}, webhook={}, polling=None)
    b = Bot(cfg, token=BOT, webhook_secret=SECRET).start()
    alice.create_webhook(url=f"{b.url}/webhook", watched=[{"type": "user", "name": "alice"},
                                                          {"type": "org", "name": "pruners"}],
                         domains=["repo", "discussion"], secret=SECRET)
    yield b
    b.stop()


CRASH_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    from hub_bot.config import BotConfig
    from hub_bot.service import Bot
    args = json.loads(sys.argv[1])
    kill = lambda job: os.kill(os.getpid(), signal.SIGKILL)  # after the push, before the job is recorded done
    bot = Bot(BotConfig.from_dict(args["config"]), hooks={"published": kill}).start()
    bot.planner.on_commit(args["repo"], args["sha"], "test")
    bot.run_pending()
    print("NOT KILLED")
""")


@pytest.fixture(scope="module")
def crash_run(tmp_path_factory, hub, alice, source_dir):
    """A bot subprocess killed with SIGKILL right after it published (started early, checked later)."""
    work = tmp_path_factory.mktemp("crash")
    sha = push(alice, "alice/crash-src", source_dir)
    data = {"hub": {"endpoint": hub.url, "disable_xet": True, "token_env": "CRASH_BOT_TOKEN"},
            "target_org": "pruners", "database": str(work / "bot.sqlite"), "polling": {"interval_s": 3600},
            "evaluation": {"max_tokens": 200, "max_length": 64, "speed": False},
            "watch": [{"repo": "alice/crash-src", "recipes": [CHEAP]}]}
    out = open(work / "output", "w")
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, json.dumps({"config": data, "repo": "alice/crash-src",
                                                                           "sha": sha})],
                            env=subprocess_env(hub.url, work / "home", CRASH_BOT_TOKEN=BOT), stdout=out,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    yield proc, work, data, sha
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    out.close()


@pytest.fixture(scope="module")
def published(bot, hub, alice, source_dir, crash_run):  # crash_run: start that subprocess early
    sha = push(alice, SOURCE, source_dir)
    assert hub.hub.webhooks.flush(10)
    queued = bot.store.jobs("queued")
    drain(bot)
    return sha, queued


LOAD_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import core
    from transformers import AutoModelForCausalLM
    args = json.loads(sys.argv[1])
    ids, out = torch.tensor(args["ids"]), {}
    with torch.no_grad():
        for repo in args["repos"]:
            out[repo] = core.load_pruned(repo, device="cpu")(ids).logits
            if repo in args["plain"]:
                out[repo + ":plain"] = AutoModelForCausalLM.from_pretrained(repo)(ids).logits
    torch.save(out, args["out"])
""")


@pytest.fixture(scope="module")
def loader_run(published, hub, tmp_path_factory):
    """Load the published variants by name in a client subprocess (HF_ENDPOINT set before import)."""
    work = tmp_path_factory.mktemp("loader")
    args = {"repos": list(VARIANTS.values()), "plain": [VARIANTS["maw_range-30pct"]], "ids": IDS,
            "out": str(work / "logits.pt")}
    log = open(work / "output", "w")
    proc = subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, json.dumps(args)], env=subprocess_env(
        hub.url, work / "home"), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    yield proc, work
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


def read_repo_file(api: HfApi, repo: str, path: str, tmp: Path, revision: str | None = None) -> str:
    return Path(api.hf_hub_download(repo, path, revision=revision, local_dir=tmp)).read_text(encoding="utf-8")


# -------------------------------------------------------------------- the main path
def test_push_webhook_job_variant(published, bot, alice, tmp_path, loader_run):
    sha, queued = published
    assert sorted(j.recipe_name for j in queued) == sorted(VARIANTS)  # the webhook queued one job per recipe
    jobs = {j.recipe_name: j for j in bot.store.jobs() if j.source_repo == SOURCE}
    for name, repo in VARIANTS.items():
        job = jobs[name]
        assert (job.state, job.attempts, job.source_sha, job.output_repo) == ("done", 1, sha, repo), job.error
        assert job.output_commit == alice.model_info(repo).sha
        assert commits(alice, repo) == [f"{name} of {SOURCE}@{sha[:10]}", "initial commit"]  # one commit
        files = set(alice.list_repo_files(repo))
        assert {"README.md", "config.json", "model.safetensors", "pruning_recipe.yaml", "tokenizer.json"} <= files
        card = alice.model_info(repo).card_data.to_dict()
        assert card["base_model"] == SOURCE and card["base_model_relation"] == "finetune"
        assert card["license"] == "apache-2.0" and {"pruned", "structured-pruning", "pruning-bot"} <= set(card["tags"])
        metrics = {m["type"]: m["value"] for r in card["model-index"][0]["results"] for m in r["metrics"]}
        assert metrics["perplexity"] == pytest.approx(job.results["perplexity_pruned"])
        assert not {"prefill_speedup", "decode_speedup_batch1"} & set(metrics)  # one timed round: no speed claim
        text = read_repo_file(alice, repo, "README.md", tmp_path / name)
        assert "not measurable here" in text
        assert sha in text and "## Measured results" in text
        recipe = yaml.safe_load(read_repo_file(alice, repo, "pruning_recipe.yaml", tmp_path / name))
        assert (recipe["model"], recipe["revision"]) == (SOURCE, sha)
        assert recipe["result"]["source"]["sha"] == sha and recipe["result"]["source"]["recipe_hash"] == job.recipe_hash
    assert jobs["maw_range-30pct"].results["uniform"] and not jobs["slimllm-25pct"].results["uniform"]


def test_own_publications_are_not_sources(published, bot, hub):
    assert hub.hub.webhooks.flush(10)  # the bot's own pushes to pruners/* were delivered too
    assert not [j for j in bot.store.jobs() if j.source_repo.startswith("pruners/")]


def test_status_endpoint_and_page(published, bot):
    doc = httpx2.get(f"{bot.url}/status").json()
    assert doc["counts"]["done"] >= 2
    job = next(j for j in doc["jobs"] if j["output_repo"] == VARIANTS["maw_range-30pct"])
    assert job["output_url"].endswith(VARIANTS["maw_range-30pct"]) and job["source_url"].endswith(job["source_sha"])
    page = httpx2.get(f"{bot.url}/")
    assert page.status_code == 200 and VARIANTS["slimllm-25pct"] in page.text
    assert httpx2.post(f"{bot.url}/status").status_code == 405  # read-only


# -------------------------------------------------------------------- triggers
def post_hook(bot: Bot, body, secret: str | None = SECRET) -> httpx2.Response:
    return _post_hook(bot, body, secret)


def test_bad_secret_is_refused(published, bot):
    before = len(jobs_of(bot, SOURCE, "alice/storm-src"))
    body = webhook_payload("alice/storm-src", "c" * 40)
    assert post_hook(bot, body, secret="wrong").status_code == 401
    assert post_hook(bot, body, secret=None).status_code == 401
    assert post_hook(bot, body, secret=SECRET[:-1]).status_code == 401
    assert post_hook(bot, b"not json").status_code == 400
    ignored = post_hook(bot, webhook_payload(SOURCE, "d" * 40, ref="refs/pr/3"))
    assert ignored.status_code == 200 and ignored.json()["status"] == "ignored"
    assert len(jobs_of(bot, SOURCE, "alice/storm-src")) == before


def test_duplicate_webhooks_make_one_job_and_one_upload(published, bot, hub, alice, source_dir):
    sha, _ = published
    before = len(jobs_of(bot, SOURCE, "alice/storm-src"))
    storm = [webhook_payload(SOURCE, sha)] * 6  # replays of an event already processed
    new_sha = push(alice, "alice/storm-src", source_dir)
    storm += [webhook_payload("alice/storm-src", new_sha)] * 6  # plus the Hub's own delivery of this one
    threads = [threading.Thread(target=post_hook, args=(bot, body)) for body in storm]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hub.hub.webhooks.flush(10)
    assert len(jobs_of(bot, SOURCE, "alice/storm-src")) == before + 1
    drain(bot)
    assert bot.run_pending() == 0
    assert commits(alice, "pruners/storm-src-maw-50pct") == [f"maw-50pct of alice/storm-src@{new_sha[:10]}",
                                                             "initial commit"]


def test_hub_errors_then_200_are_retried(bot, hub, alice, source_dir):
    sha = push(alice, "alice/flaky-src", source_dir)
    faults = hub.hub.faults
    early = faults.add(rf"^GET /api/models/alice/flaky-src/revision/{sha}", 500, count=1)  # the job's first call
    push_fault = faults.add(r"^POST /api/models/pruners/flaky-src-maw-50pct/commit/", 503, count=1,
                            headers={"Retry-After": "0"})
    assert hub.hub.webhooks.flush(10)
    drain(bot)
    (job,) = jobs_of(bot, "alice/flaky-src")
    assert (job.state, job.attempts, job.error) == ("done", 2, None)  # the 500 cost a job retry (with backoff)
    assert (early.hits, push_fault.hits) == (1, 1)  # the 503 at push time was retried by the publisher
    assert commits(alice, "pruners/flaky-src-maw-50pct") == [f"maw-50pct of alice/flaky-src@{sha[:10]}",
                                                             "initial commit"]


def test_permanent_failures_are_recorded_not_retried(bot, hub, alice, tmp_path, source_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(gpt2)
    push(alice, "alice/gpt2-src", gpt2)
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    (pickle / "pytorch_model.bin").write_bytes(b"\0" * 64)
    push(alice, "alice/pickle-src", pickle)
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text('{"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "m.M"}}')
    (custom / "model.safetensors").write_bytes((gpt2 / "model.safetensors").read_bytes())
    push(alice, "alice/custom-src", custom)
    alice.create_repo("alice/gated-src")
    alice.update_repo_settings("alice/gated-src", gated="manual")
    push(alice, "alice/gated-src", source_dir)  # a fine model, but the bot's account has no access
    assert hub.hub.webhooks.flush(10)
    drain(bot)
    errors = {j.source_repo: j for j in jobs_of(bot, "alice/gpt2-src", "alice/pickle-src", "alice/custom-src",
                                                "alice/gated-src")}
    expected = {"alice/gpt2-src": "not supported", "alice/pickle-src": "only pickle",
                "alice/custom-src": "custom modeling code", "alice/gated-src": "gated"}
    for repo, needle in expected.items():
        job = errors[repo]
        assert (job.state, job.attempts, job.permanent) == ("failed", 1, True), (repo, job.error)
        assert needle in job.error, (repo, job.error)
    assert not [m.id for m in alice.list_models(author="pruners") if m.id.startswith(
        ("pruners/gpt2-src", "pruners/pickle-src", "pruners/custom-src", "pruners/gated-src"))]


def test_pr_mode_keeps_one_open_pr(bot, hub, alice, source_dir, tmp_path):
    def edit_card(text: str) -> None:
        alice.upload_file(path_or_fileobj=f"---\nlicense: apache-2.0\n---\n# {text}\n".encode(),
                          path_in_repo="README.md", repo_id="alice/pr-src")

    first = push(alice, "alice/pr-src", source_dir)
    assert hub.hub.webhooks.flush(10)
    drain(bot)
    edit_card("edited card")  # then new weights right after: the card-only commit's job is superseded
    second = push(alice, "alice/pr-src", save_tiny(tiny_model("llama", seed=1), tmp_path / "v2"), "New weights")
    assert hub.hub.webhooks.flush(10)
    drain(bot)
    edit_card("edited again")  # same weights as the published ones: nothing to push
    assert hub.hub.webhooks.flush(10)
    drain(bot)
    jobs = sorted(jobs_of(bot, "alice/pr-src"), key=lambda j: j.id)
    assert [j.state for j in jobs] == ["done"] * 4
    assert [j.results.get("note", "published")[:13] for j in jobs] == ["published", "superseded by", "published",
                                                                       "already publi"]
    prs = list(alice.get_repo_discussions("alice/pr-src", discussion_type="pull_request"))
    assert [(p.num, p.author, p.status) for p in prs] == [(1, "pruning-bot", "open")]
    assert {j.output_url for j in jobs if "superseded" not in j.results.get("note", "")} == {
        f"{hub.url}/alice/pr-src/discussions/1"}
    assert len(commits(alice, "alice/pr-src", "refs/pr/1")) == len(commits(alice, "alice/pr-src", first)) + 2
    recipe = yaml.safe_load(read_repo_file(alice, "alice/pr-src", "pruned/maw-50pct/pruning_recipe.yaml", tmp_path,
                                           revision="refs/pr/1"))
    assert recipe["result"]["source"]["sha"] == second
    assert "pruned/maw-50pct/model.safetensors" not in alice.list_repo_files("alice/pr-src")  # main untouched


# -------------------------------------------------------------------- other bots: polling, read-only, restart
def test_polling_mode(hub, tmp_path, source_dir):
    carol = HfApi(endpoint=hub.url, token=CAROL)
    sha = push(carol, "carol/polled", source_dir)
    with Bot(config(tmp_path, hub.url, [{"author": "carol", "recipes": [CHEAP]}]), token=BOT) as polling:
        polling.poller.poll_once()  # the polling thread may have been first: either way one job
        assert [(j.source_repo, j.source_sha, j.trigger) for j in polling.store.jobs()] == [("carol/polled", sha,
                                                                                            "poll")]
        drain(polling)
        assert polling.store.jobs()[0].state == "done"
        assert polling.poller.poll_once() == 0  # nothing new
        carol.upload_file(path_or_fileobj=b"---\nlicense: mit\n---\n# card\n", path_in_repo="README.md",
                          repo_id="carol/polled")
        assert polling.poller.poll_once() == 1
    assert "pruning_recipe.yaml" in carol.list_repo_files("pruners/polled-maw-50pct")


def test_read_only_token_fails_permanently(hub, tmp_path, reader, published):
    with Bot(config(tmp_path, hub.url, [{"repo": SOURCE, "recipes": [CHEAP]}]), token=BOT_READ) as ro:
        ro.poller.poll_once()
        drain(ro)
        (job,) = ro.store.jobs()
    assert (job.state, job.attempts, job.permanent) == ("failed", 1, True) and "read-only" in job.error
    with pytest.raises(RepositoryNotFoundError):
        reader.model_info("pruners/tiny-src-maw-50pct")


def test_restart_mid_job(crash_run, hub, alice, tmp_path):
    proc, work, data, sha = crash_run
    assert proc.wait(timeout=240) == -9, (work / "output").read_text()[-3000:]
    variant = "pruners/crash-src-maw-50pct"
    bot_api = HfApi(endpoint=hub.url, token=BOT)
    assert commits(bot_api, variant) == [f"maw-50pct of alice/crash-src@{sha[:10]}", "initial commit"]
    with pytest.raises(RepositoryNotFoundError):  # pushed, but private until the job is recorded done
        alice.model_info(variant)
    os.environ["CRASH_BOT_TOKEN"] = BOT
    try:
        with Bot(BotConfig.from_dict(data)) as restarted:
            (job,) = restarted.store.jobs()
            assert (job.state, job.attempts) == ("queued", 1)  # recovered from 'running'
            drain(restarted)
            job = restarted.store.get(job.id)
    finally:
        del os.environ["CRASH_BOT_TOKEN"]
    assert (job.state, job.attempts, job.output_repo) == ("done", 2, variant)
    assert commits(alice, variant) == [f"maw-50pct of alice/crash-src@{sha[:10]}", "initial commit"]  # no 2nd push


# -------------------------------------------------------------------- pull by name, secrets
def test_variants_load_by_name_with_equal_logits(loader_run, published, source_dir):
    proc, work = loader_run
    assert proc.wait(timeout=240) == 0, (work / "output").read_text()[-3000:]
    hub_logits = torch.load(work / "logits.pt")
    ids = torch.tensor(IDS)
    for recipe in RECIPES:
        model, tokenizer = core.load_model(str(source_dir), core.LoadOptions(device="cpu"))
        result = core.prune(model, tokenizer, core.Recipe.from_dict(recipe), base_model=str(source_dir))
        name = f"{recipe['method']}-{round(recipe['target']['ratio'] * 100)}pct"
        with torch.no_grad():
            local = result.model(ids).logits
        torch.testing.assert_close(hub_logits[VARIANTS[name]], local, rtol=1e-5, atol=1e-5)
    plain = VARIANTS["maw_range-30pct"]
    torch.testing.assert_close(hub_logits[plain + ":plain"], hub_logits[plain], rtol=1e-6, atol=1e-6)


def test_tokens_never_in_logs_db_or_cards(published, bot, alice, log_file, tmp_path):
    logs = log_file.read_text(encoding="utf-8")
    records = [json.loads(line) for line in logs.splitlines()]
    done = [r for r in records if r["msg"].startswith("job done")]
    assert done and all({"job", "repo", "sha", "state"} <= set(r) for r in done)
    streamed = {r["job"] for r in records if r["msg"].startswith("streaming the source from disk")}
    published_jobs = {r["job"] for r in done if r["msg"].startswith("job done: published")}
    assert published_jobs and published_jobs <= streamed  # every source was pruned one decoder block at a time
    stored = b"".join(p.read_bytes() for p in bot.config.database.parent.glob("bot.sqlite*"))
    repo = VARIANTS["slimllm-25pct"]
    folder = Path(alice.snapshot_download(repo, local_dir=tmp_path / "variant"))
    published_text = "".join(p.read_text(errors="replace") for p in folder.glob("*") if p.is_file())
    for secret in (BOT, BOT_READ, ALICE, CAROL, SECRET):
        assert secret not in logs and secret.encode() not in stored and secret not in published_text
