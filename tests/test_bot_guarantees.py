"""The bot never publishes what it should not (issue 10), end to end over real HTTP against the local Hub.

One bot with a webhook endpoint watches a set of sources (each test owns its own); the local Hub delivers its
events to it, and tests post forged or malformed ones themselves. Each test names the guarantee it checks (see
hub_bot/README.md, "Guarantees"). A few tests start a second bot on its own database, as a second operator or a
bot that lost its database would.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import httpx2  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import RepositoryNotFoundError  # noqa: E402

from bot_support import (CHEAP, bot_config, client_fixture, commits, drain, jobs_of, json_log_file,  # noqa: E402
                         online_on_one_thread, post_hook, push, source_fixture, webhook_payload)
from hub_bot.local_hub import start_local_hub  # noqa: E402
from hub_bot.service import Bot  # noqa: E402

ALICE = "hf_AliceGuardToken0123456789abcdefgh"
BOB = "hf_BobGuardToken0123456789abcdefghij"
OLGA = "hf_OlgaGuardToken0123456789abcdefghi"
DANA = "hf_DanaGuardToken0123456789abcdefghi"
BOT = "hf_BotGuardToken0123456789abcdefghij"
SECRET = "whsec-guard-0123456789"
OPERATOR = "status-operator-0123456789"
EVAL = {"max_tokens": 64, "max_length": 32, "speed": False}
LIMITS = {"backoff_s": 1.0, "max_attempts": 3, "retry_after_max_s": 1.0, "inline_wait_max_s": 0.5}
SOURCES = ["acme/private-src", "alice/gated-src", "acme/flip-src", "olga/order-src", "alice/main-src",
           "alice/empty-src", "alice/throttled-src", "alice/case-src", "alice/pickle-src", "alice/status-src"]


def variant(source: str) -> str:
    return f"pruners/{source.split('/')[1]}-maw-50pct"


@pytest.fixture(scope="module", autouse=True)
def client_online():
    with online_on_one_thread():
        yield


@pytest.fixture(scope="module")
def log_records(tmp_path_factory):
    """Every log record of the module as JSON lines (through the bot's redacting filter)."""
    with json_log_file(tmp_path_factory.mktemp("logs") / "bot.jsonl") as path:
        yield path


@pytest.fixture(scope="module")
def hub(tmp_path_factory, log_records):
    server = start_local_hub(tmp_path_factory.mktemp("hub"), {
        "users": {"pruning-bot": {"orgs": ["pruners", "acme"]}, "alice": {"orgs": ["acme"]}},
        "tokens": {ALICE: {"user": "alice", "role": "write"}, BOB: {"user": "bob", "role": "write"},
                   OLGA: {"user": "olga", "role": "write"}, DANA: {"user": "dana", "role": "write"},
                   BOT: {"user": "pruning-bot", "role": "write"}},
        "webhook_backoff_s": 0.05})
    yield server
    server.stop()


alice = client_fixture(ALICE)
bot_api = client_fixture(BOT)
anonymous = client_fixture(False)
source_dir = source_fixture("src-v1")


source_v2 = source_fixture("src-v2", seed=1, title="Tiny source, new weights")


def watch_entries() -> list:
    return [*({"repo": repo, "recipes": [CHEAP]} for repo in SOURCES),
            {"author": "dana", "recipes": [CHEAP]},  # with the PR entry below: two targets for one recipe
            {"repo": "dana/overlap", "publish": "pr", "recipes": [CHEAP]}]


@pytest.fixture(scope="module")
def bot(tmp_path_factory, hub, alice):
    cfg = bot_config(tmp_path_factory.mktemp("bot"), hub.url, watch_entries(), server={"port": 0}, webhook={},
                     polling=None, limits=LIMITS, evaluation=EVAL)
    b = Bot(cfg, token=BOT, webhook_secret=SECRET, status_token=OPERATOR).start()
    alice.create_webhook(url=f"{b.url}/webhook", watched=[{"type": "user", "name": "alice"},
                                                          {"type": "org", "name": "acme"},
                                                          {"type": "user", "name": "dana"}],
                         domains=["repo"], secret=SECRET)
    yield b
    b.stop()


@contextlib.contextmanager
def other_bot(tmp_path: Path, hub_url: str, watch: list, **changes):
    """A second bot on its own database, without polling (the test hands it events directly)."""
    cfg = bot_config(tmp_path, hub_url, watch, limits=LIMITS, evaluation=EVAL, server={"port": 0}, webhook={},
                     polling=None, **changes)
    b = Bot(cfg, token=BOT, webhook_secret=SECRET).start()
    try:
        yield b
    finally:
        b.stop()


def hook(bot: Bot, body, secret: str | None = SECRET) -> httpx2.Response:
    return post_hook(bot, body, secret)


def delivered(hub) -> None:
    assert hub.hub.webhooks.flush(15)


def recipe_sha(api: HfApi, repo: str, tmp: Path, revision: str | None = None) -> str:
    local = api.hf_hub_download(repo, "pruning_recipe.yaml", revision=revision, local_dir=tmp)
    return yaml.safe_load(Path(local).read_text())["result"]["source"]["sha"]


# -------------------------------------------------------------------- 1. visibility
@pytest.fixture(scope="module")
def private_job(bot, hub, alice, source_dir):
    """The job of a private source (acme/private-src), run."""
    alice.create_repo("acme/private-src", private=True)
    sha = push(alice, "acme/private-src", source_dir)
    delivered(hub)
    drain(bot)
    (job,) = jobs_of(bot, "acme/private-src")
    return sha, job


def test_private_source_gives_a_private_variant(private_job, hub, bot_api, anonymous):
    """Guarantee: a variant of a private source is private (anonymous and other users cannot see it)."""
    sha, job = private_job
    assert (job.state, job.source_sha, job.output_repo) == ("done", sha, variant("acme/private-src")), job.error
    assert bot_api.model_info(variant("acme/private-src")).private is True
    for outsider in (anonymous, HfApi(endpoint=hub.url, token=BOB)):
        with pytest.raises(RepositoryNotFoundError):
            outsider.model_info(variant("acme/private-src"))


def test_gated_source_gives_a_gated_variant_with_its_terms(bot, hub, alice, bot_api, source_dir, tmp_path):
    """Guarantee: a variant of a gated source is gated the same way (auto/manual) and its card carries the
    source's license and `extra_gated_*` fields."""
    folder = tmp_path / "gated"
    shutil.copytree(source_dir, folder)
    (folder / "README.md").write_text(
        "---\nlicense: other\nlicense_name: tiny-terms\nlicense_link: LICENSE\n"
        "extra_gated_prompt: You agree to the tiny terms.\nextra_gated_fields:\n  Company: text\n"
        "  I agree to the terms: checkbox\n---\n# Gated tiny source\n")
    alice.create_repo("alice/gated-src")
    alice.update_repo_settings("alice/gated-src", gated="manual")
    alice.grant_access("alice/gated-src", "pruning-bot")
    sha = push(alice, "alice/gated-src", folder)  # one commit: the card and the weights
    delivered(hub)
    drain(bot)
    (job,) = jobs_of(bot, "alice/gated-src")
    assert (job.state, job.source_sha) == ("done", sha), job.error
    info = bot_api.model_info(variant("alice/gated-src"))
    assert (info.private, info.gated) == (False, "manual")
    card = info.card_data.to_dict()
    assert (card["license"], card["license_name"], card["license_link"]) == ("other", "tiny-terms", "LICENSE")
    assert card["extra_gated_prompt"] == "You agree to the tiny terms."
    assert card["extra_gated_fields"] == {"Company": "text", "I agree to the terms": "checkbox"}
    files = f"{hub.url}/{variant('alice/gated-src')}/resolve/main/config.json"
    assert httpx2.get(files).headers.get("x-error-code") == "GatedRepo"  # anonymous
    bob = httpx2.get(files, headers={"authorization": f"Bearer {BOB}"})
    assert (bob.status_code, bob.headers.get("x-error-code")) == (403, "GatedRepo")


def test_variants_follow_a_change_of_the_source_settings(bot, hub, alice, bot_api, anonymous, source_dir):
    """Guarantee: when the source turns private or gated, its variants follow on the next event (here the
    settings change itself); when it opens again, they do too."""
    push(alice, "acme/flip-src", source_dir)
    delivered(hub)
    drain(bot)
    target = variant("acme/flip-src")
    assert anonymous.model_info(target).private is False
    alice.update_repo_settings("acme/flip-src", private=True)
    delivered(hub)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(target)
    alice.update_repo_settings("acme/flip-src", gated="auto")
    alice.update_repo_settings("acme/flip-src", private=False)
    delivered(hub)
    info = anonymous.model_info(target)
    assert (info.private, info.gated) == (False, "auto")
    assert [j.state for j in jobs_of(bot, "acme/flip-src")] == ["done"]  # followed without a new job


def test_config_can_refuse_private_sources(private_job, hub, bot_api, tmp_path):
    """Guarantee: with `visibility.private_sources: refuse`, no variant of a private source is made at all."""
    watch = [{"repo": "acme/private-src", "target_org": "acme", "recipes": [CHEAP]}]
    with other_bot(tmp_path, hub.url, watch, visibility={"private_sources": "refuse"}) as strict:
        assert strict.planner.on_commit("acme/private-src", private_job[0], "test").status == "queued"
        drain(strict)
        (job,) = strict.store.jobs()
    assert (job.state, job.permanent, job.attempts) == ("failed", True, 1) and "refuses" in job.error
    with pytest.raises(RepositoryNotFoundError):
        bot_api.model_info("acme/private-src-maw-50pct")


# -------------------------------------------------------------------- 2. order
def test_an_older_commit_never_overwrites_a_newer_variant(bot, hub, bot_api, source_dir, source_v2, tmp_path):
    """Guarantee: the source's commit history orders jobs, not their arrival: the job of an older commit created
    after the job of a newer one is superseded, and so is one from a bot that does not know the newer job."""
    olga = HfApi(endpoint=hub.url, token=OLGA)  # olga's repos have no webhook: the test delivers the events
    older = push(olga, "olga/order-src", source_dir, "v1")
    newer = push(olga, "olga/order-src", source_v2, "v2")
    first = hook(bot, webhook_payload("olga/order-src", newer)).json()
    second = hook(bot, webhook_payload("olga/order-src", older)).json()
    assert first["status"] == second["status"] == "queued" and second["jobs"][0] > first["jobs"][0]
    drain(bot)
    jobs = {j.source_sha: j for j in jobs_of(bot, "olga/order-src")}
    assert jobs[newer].state == jobs[older].state == "done"
    assert jobs[older].results["note"].startswith(f"superseded by job {jobs[newer].id}")
    target = variant("olga/order-src")
    assert recipe_sha(bot_api, target, tmp_path / "a") == newer
    assert commits(bot_api, target) == [f"maw-50pct of olga/order-src@{newer[:10]}", "initial commit"]
    with other_bot(tmp_path / "fresh", hub.url, [{"repo": "olga/order-src", "recipes": [CHEAP]}]) as fresh:
        fresh.planner.on_commit("olga/order-src", older, "test")  # a bot without the newer job in its table
        drain(fresh)
        (job,) = fresh.store.jobs()
    assert job.state == "done" and job.results["note"].startswith(f"superseded: {target}")
    assert recipe_sha(bot_api, target, tmp_path / "b") == newer
    assert len(commits(bot_api, target)) == 2


# -------------------------------------------------------------------- 3. source shas
def test_only_commits_of_main_are_published(bot, hub, alice, bot_api, source_dir, source_v2, tmp_path):
    """Guarantee: a sha named in an authenticated webhook is built only if it is main's head or an ancestor;
    the head of an unmerged pull request claimed as refs/heads/main fails for good, and PR refs are ignored."""
    main = push(alice, "alice/main-src", source_dir)
    delivered(hub)
    drain(bot)
    bob = HfApi(endpoint=hub.url, token=BOB)
    pr = bob.upload_folder(repo_id="alice/main-src", folder_path=source_v2, commit_message="bob's weights",
                           create_pr=True)
    delivered(hub)
    assert not [j for j in jobs_of(bot, "alice/main-src") if j.source_sha == pr.oid]  # refs/pr/N: no job
    forged = hook(bot, webhook_payload("alice/main-src", pr.oid)).json()  # the secret is right; the claim is not
    assert forged["status"] == "queued"
    drain(bot)
    job = bot.store.get(forged["jobs"][0])
    assert (job.state, job.permanent, job.attempts) == ("failed", True, 1) and "not on the main branch" in job.error
    target = variant("alice/main-src")
    assert recipe_sha(bot_api, target, tmp_path) == main
    assert commits(bot_api, target) == [f"maw-50pct of alice/main-src@{main[:10]}", "initial commit"]


# -------------------------------------------------------------------- 4. no empty repos
def test_a_failing_upload_leaves_no_repo_behind(bot, hub, alice, bot_api, anonymous, source_dir):
    """Guarantee: the variant repo is created private and opened only after its commit landed; a job that fails
    for good deletes the repo it created."""
    target = variant("alice/empty-src")
    rule = hub.hub.faults.add(rf"^POST /api/models/{target}/commit/", 503, count=None)
    try:
        push(alice, "alice/empty-src", source_dir)
        delivered(hub)
        bot.run_pending()
        (job,) = jobs_of(bot, "alice/empty-src")
        if job.state == "queued":  # between two attempts: the repo exists, private and empty
            assert bot_api.model_info(target).private is True and commits(bot_api, target) == ["initial commit"]
            with pytest.raises(RepositoryNotFoundError):
                anonymous.model_info(target)
        drain(bot)
    finally:
        hub.hub.faults.clear()
    job = bot.store.get(job.id)
    assert (job.state, job.attempts) == ("failed", 3) and "503" in job.error and rule.hits >= 3
    with pytest.raises(RepositoryNotFoundError):
        bot_api.model_info(target)


# -------------------------------------------------------------------- 5. Retry-After
def test_retry_after_is_capped_and_never_slept_on(bot, hub, alice, bot_api, source_dir):
    """Guarantee: a Retry-After of an hour (from a call the client retries itself, and from the commit) sends the
    job back to the queue, due after limits.retry_after_max_s; the worker does not sleep on it."""
    target = variant("alice/throttled-src")
    faults = hub.hub.faults
    faults.add(rf"^POST /api/models/{target}/preupload/", 429, count=1, headers={"Retry-After": "3600"})
    faults.add(rf"^POST /api/models/{target}/commit/", 429, count=1, headers={"Retry-After": "3600"})
    push(alice, "alice/throttled-src", source_dir)
    delivered(hub)

    def run_in_thread(fn) -> None:
        runner = threading.Thread(target=fn, daemon=True)
        runner.start()
        runner.join(timeout=180)
        assert not runner.is_alive(), "the worker is sleeping on the Hub's Retry-After"

    run_in_thread(bot.run_pending)
    (job,) = jobs_of(bot, "alice/throttled-src")
    assert job.state == "queued" and "Retry-After: 3600" in job.error
    wait = job.next_attempt_at - job.updated_at
    assert wait <= max(LIMITS["backoff_s"], LIMITS["retry_after_max_s"]) + 0.5  # capped, not an hour
    run_in_thread(lambda: drain(bot))
    job = bot.store.get(job.id)
    assert (job.state, job.attempts) == ("done", 3), job.error
    assert commits(bot_api, target) == [f"maw-50pct of alice/throttled-src@{job.source_sha[:10]}", "initial commit"]


# -------------------------------------------------------------------- 7. one job per (source, sha, recipe, target)
def test_overlapping_entries_publish_to_both_targets(bot, hub, bot_api, source_dir):
    """Guarantee: the job key includes the publication mode and target: `author: dana` (a new repo) and
    `repo: dana/overlap, publish: pr` with the same recipe make two jobs, and both publish."""
    dana = HfApi(endpoint=hub.url, token=DANA)
    sha = push(dana, "dana/overlap", source_dir)
    delivered(hub)
    jobs = jobs_of(bot, "dana/overlap")
    assert sorted((j.publish, j.target_repo) for j in jobs) == [("pr", "dana/overlap"),
                                                                ("repo", "pruners/overlap-maw-50pct")]
    drain(bot)
    assert all(bot.store.get(j.id).state == "done" for j in jobs)
    assert commits(bot_api, "pruners/overlap-maw-50pct")[0] == f"maw-50pct of dana/overlap@{sha[:10]}"
    prs = list(bot_api.get_repo_discussions("dana/overlap", discussion_type="pull_request"))
    assert [(p.author, p.status) for p in prs] == [("pruning-bot", "open")]


# -------------------------------------------------------------------- 8. status page
def test_status_page_hides_private_jobs_from_anonymous_viewers(bot, private_job, hub, alice, source_dir):
    """Guarantee: the anonymous status page (JSON and HTML) names no private source or variant; the operator's
    status token shows them; a wrong token is refused."""
    push(alice, "alice/status-src", source_dir)  # a public source: its job keeps its names
    delivered(hub)
    for path in ("/status", "/"):
        anonymous = httpx2.get(f"{bot.url}{path}")
        assert anonymous.status_code == 200 and "private-src" not in anonymous.text, path
        operator = httpx2.get(f"{bot.url}{path}", headers={"authorization": f"Bearer {OPERATOR}"})
        assert "acme/private-src" in operator.text and variant("acme/private-src") in operator.text, path
        assert httpx2.get(f"{bot.url}{path}", headers={"authorization": "Bearer nope"}).status_code == 401
    doc = httpx2.get(f"{bot.url}/status").json()
    hidden = next(j for j in doc["jobs"] if j["id"] == private_job[1].id)
    assert doc["redacted"] and hidden["source_repo"] == hidden["target_repo"] == "(private)"
    assert hidden["output_url"] is None and hidden["source_sha"] == "" and hidden["results"] is None
    assert "alice/status-src" in [j["source_repo"] for j in doc["jobs"]]


# -------------------------------------------------------------------- 9, 10. the door
def test_type_confused_payloads_get_422_as_json(bot, log_records):
    """Guarantee: a payload of the wrong shape is answered 422 with a short reason, as JSON, and logged as one
    JSON line (no traceback); nothing is queued."""
    before, logged = len(bot.store.jobs()), log_records.stat().st_size
    good = webhook_payload("alice/case-src", "a" * 40)
    bad = [dict(good, event="push"), dict(good, repo="alice/case-src"),
           dict(good, repo={"type": "model", "name": ["alice", "case-src"]}),
           dict(good, updatedRefs="refs/heads/main"), dict(good, updatedRefs=[{"ref": 3, "newSha": "a" * 40}]),
           [], 42, "text"]
    for body in bad:
        response = hook(bot, body)
        assert response.status_code == 422, (body, response.text)
        doc = response.json()
        assert doc["error"] == "invalid webhook payload" and 0 < len(doc["reason"]) < 400, doc
    assert hook(bot, b"{not json").status_code == 400
    assert len(bot.store.jobs()) == before
    with open(log_records, encoding="utf-8") as f:
        f.seek(logged)
        records = [json.loads(line) for line in f.read().splitlines()]
    refused = [r for r in records if r["msg"].startswith("webhook refused")]
    assert len(refused) == len(bad) + 1 and not [r for r in records if "exc" in r or r["level"] == "error"]


@pytest.mark.parametrize("name", ["dana/../../etc/passwd", "../dana/overlap", "dana/overlap/../x", "dana/..",
                                  "dana/a--b", "dana/x.git", "dana/" + "x" * 97])
def test_invalid_repo_names_are_refused_at_the_door(bot, name):
    """Guarantee: repo names are checked with huggingface_hub's validator before anything else (dana is watched
    by author, so these names would otherwise match)."""
    before = len(bot.store.jobs())
    response = hook(bot, webhook_payload(name, "b" * 40))
    assert response.status_code == 422 and "not a valid repo id" in response.json()["reason"]
    assert len(bot.store.jobs()) == before


def test_body_size_is_capped_even_with_the_right_secret(bot):
    """Guarantee: a body over webhook.max_body_bytes is refused (413) with the right secret too."""
    huge = json.dumps(webhook_payload("alice/case-src", "c" * 40) | {"padding": "x" * 2_000_000}).encode()
    assert hook(bot, huge).status_code == 413
    assert hook(bot, huge, secret="wrong").status_code == 401  # the secret is checked first


# -------------------------------------------------------------------- 11, 12. names, answers, ids
def test_repo_name_spellings_make_one_job_and_ids_do_not_jump(bot, hub, alice, source_dir, source_v2):
    """Guarantee: names are spelled as the Hub spells them before the job key is made (the Hub ignores case);
    duplicates are answered `known` with the job, unwatched repos `ignored` with the reason, and duplicates do
    not use up job ids."""
    sha = push(alice, "alice/case-src", source_dir)
    delivered(hub)
    (job,) = jobs_of(bot, "alice/case-src")
    for spelling in ("ALICE/Case-Src", "Alice/CASE-SRC", "alice/case-src", "alice/case-src"):
        assert hook(bot, webhook_payload(spelling, sha)).json() == {"status": "known", "jobs": [job.id]}
    assert [(j.source_repo, j.source_sha) for j in bot.store.jobs() if j.source_repo.lower() == "alice/case-src"] \
        == [("alice/case-src", sha)]
    assert hook(bot, webhook_payload("carol/unwatched", sha)).json() == {"status": "ignored", "jobs": [],
                                                                         "reason": "not watched"}
    ignored = hook(bot, webhook_payload("alice/case-src", sha, ref="refs/pr/1")).json()
    assert ignored["status"] == "ignored" and "pull request" in ignored["reason"]
    last = max(j.id for j in bot.store.jobs())
    push(alice, "alice/case-src", source_v2, "v2")
    delivered(hub)
    assert max(j.id for j in bot.store.jobs()) == last + 1
    drain(bot)


def test_a_pickle_named_safetensors_fails_for_good(bot, hub, alice, source_dir, tmp_path):
    """Guarantee: a file named *.safetensors that is not one is a permanent "not a safetensors file" failure,
    never loaded and never retried."""
    folder = tmp_path / "pickle"
    folder.mkdir()
    shutil.copy(source_dir / "config.json", folder / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, folder / "model.safetensors")
    push(alice, "alice/pickle-src", folder)
    delivered(hub)
    drain(bot)
    (job,) = jobs_of(bot, "alice/pickle-src")
    assert (job.state, job.permanent, job.attempts) == ("failed", True, 1)
    assert "not a safetensors file" in job.error


def test_a_recipe_with_recovery_publishes_the_recovered_variant(hub, alice, bot_api, source_dir, tmp_path):
    """A recipe's `recover:` section (a step budget) runs in the bot's job after pruning; the published recipe and
    card record the recovery, and the variant reloads."""
    recover = {"steps": 4, "batch_size": 2, "seq_len": 32, "eval_every": 2, "data_tokens": 5_000, "warmup": 1}
    recipe = {"method": "maw", "target": {"ratio": 0.5}, "name": "maw-50pct-kd", "recover": recover}
    sha = push(alice, "alice/kd-src", source_dir)
    with other_bot(tmp_path / "kd", hub.url, [{"repo": "alice/kd-src", "recipes": [recipe]}]) as b:
        b.planner.on_commit("alice/kd-src", sha, "test")
        drain(b)
        (job,) = b.store.jobs()
    assert job.state == "done", job.error
    (repo,) = [m.id for m in bot_api.list_models(author="pruners") if "kd-src" in m.id]
    folder = Path(bot_api.snapshot_download(repo, local_dir=tmp_path / "variant"))
    doc = yaml.safe_load((folder / "pruning_recipe.yaml").read_text())
    assert doc["recover"]["steps"] == 4 and doc["result"]["recovery"]["steps"] == 4
    assert len(doc["result"]["recovery"]["loss_curve"]) == 3  # steps 0, 2 and 4
    assert "## Recovery training" in (folder / "README.md").read_text()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder).config.intermediate_size == 48
