"""Unit tests of the Hub bot's parts that need no Hub: config, webhook parsing, the job store's transitions,
failure classification, redaction, and the pre-download checks."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from core.errors import InvalidTargetError, UnsupportedArchitectureError
from hub_bot.config import BotConfig
from hub_bot.recipes import recipe_entry
from hub_bot.errors import ConfigError, PermanentJobError, classify
from hub_bot.logs import JsonFormatter, RedactingFilter, redact, register_secret
from hub_bot.store import JobStore, NewJob
from hub_bot.payload import Ignored, InvalidPayload, Push, SettingsChange, read_event
from hub_bot.source import check_source, content_key

SHA, SHA2 = "a" * 40, "b" * 40
OWNER = "local:test:1:abcd"


def minimal(**changes) -> dict:
    data = {"hub": {"endpoint": "http://127.0.0.1:1"}, "target_org": "pruners", "polling": {"interval_s": 60},
            "watch": [{"repo": "alice/llama", "recipes": [{"method": "maw_range", "target": {"ratio": 0.3}}]}]}
    data.update(changes)
    return data


# -------------------------------------------------------------------- config
def test_config_reads_recipes_and_names_variants(tmp_path):
    config = BotConfig.from_dict(minimal(watch=[
        {"repo": "alice/llama", "recipes": [{"method": "maw_range", "target": {"ratio": 0.3}},
                                            {"method": "slimllm", "target": {"param_ratio": 0.2}},
                                            {"name": "heads-small", "method": "attention_heads",
                                             "target": {"target_params": 1000}}]},
        {"author": "bob", "publish": "pr", "recipes": [{"method": "maw", "target": {"ratio": 0.5}}]}]),
        base_dir=tmp_path)
    names = [r.name for r in config.watch[0].recipes]
    assert names == ["maw_range-30pct", "slimllm-20pct", "heads-small"]
    assert config.database == tmp_path / "hub_bot.sqlite"
    assert [e.publish for e in config.entries_for("bob/anything")] == ["pr"]
    assert config.entries_for("alice/other") == []


def test_recipe_hash_ignores_spelling():
    short = recipe_entry({"method": "maw_range", "target": {"ratio": 0.3}})
    long = recipe_entry({"method": "mlp_width", "score": "maw_range", "target": {"ratio": 0.3}})
    other = recipe_entry({"method": "maw_range", "target": {"ratio": 0.31}})
    assert short.hash == long.hash != other.hash


@pytest.mark.parametrize("change, message", [
    ({"hub": {"endpoint": "x", "token": "hf_secret"}}, "token_env"),
    ({"polling": None}, "No trigger"),
    ({"webhook": {"path": "/hook"}}, "server"),
    ({"target_orgg": "x"}, "Did you mean 'target_org'"),
    ({"watch": [{"repo": "alice/llama", "recipes": [{"model": "x", "method": "maw", "target": {"ratio": 0.1}}]}]},
     "fills the model"),
    ({"watch": [{"repo": "alice/llama", "recipes": [{"method": "mawr", "target": {"ratio": 0.1}}]}]}, "Did you mean"),
    ({"watch": [{"repo": "alice/llama", "recipes": [{"method": "maw", "target": {"width": 64}}]}]}, "name:"),
    ({"watch": [{"repo": "alice", "recipes": [{"method": "maw", "target": {"ratio": 0.1}}]}]}, "owner/name"),
    ({"watch": []}, "watches nothing"),
    ({"watch": [{"repo": "alice/llama", "recipes": [{"method": "maw", "target": {"ratio": 0.1},
                                                     "load": {"trust_remote_code": True}}]}]}, "never runs"),
])
def test_config_errors_say_what_to_do(change, message):
    with pytest.raises(ConfigError, match=message):
        BotConfig.from_dict(minimal(**change))


def test_token_comes_from_the_environment(monkeypatch):
    config = BotConfig.from_dict(minimal(hub={"endpoint": "http://x", "token_env": "MY_BOT_TOKEN"}))
    monkeypatch.delenv("MY_BOT_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="MY_BOT_TOKEN"):
        config.hub.token()
    monkeypatch.setenv("MY_BOT_TOKEN", "hf_abc")
    assert config.hub.token() == "hf_abc"


# -------------------------------------------------------------------- webhook payloads
def payload(scope="repo.content", refs=((("refs/heads/main"), SHA),), repo_type="model", head=SHA2) -> dict:
    body = {"event": {"action": "update", "scope": scope},
            "repo": {"type": repo_type, "name": "alice/llama", "headSha": head}}
    if refs is not None:
        body["updatedRefs"] = [{"ref": r, "oldSha": None, "newSha": s} for r, s in refs]
    return body


def event(body) -> object:
    return read_event(json.dumps(body).encode())


def test_read_event():
    assert event(payload()) == Push("alice/llama", SHA)  # the main ref's newSha, not headSha
    assert event(payload(refs=None)) == Push("alice/llama", SHA2)
    assert event(payload(scope="repo.config")) == SettingsChange("alice/llama")
    for ignored in (payload(refs=[("refs/pr/1", SHA)]), payload(refs=[("refs/heads/dev", SHA)]),
                    payload(refs=[("refs/tags/v1", SHA)]), payload(refs=[("refs/heads/main", None)]),
                    payload(scope="repo"), payload(scope="discussion"), payload(repo_type="dataset")):
        assert isinstance(event(ignored), Ignored)
    for invalid in ([], None, {"event": "push"}, payload(refs=[("refs/heads/main", "not-a-sha")])):
        with pytest.raises(InvalidPayload):
            event(invalid)


# -------------------------------------------------------------------- job store
def new_job(sha=SHA, recipe="r1", publish="repo", target="pruners/llama-x") -> NewJob:
    return NewJob(source_repo="alice/llama", source_sha=sha, recipe_hash=recipe, recipe_name=recipe,
                  recipe_yaml="method: maw\n", publish=publish, target_repo=target)


def test_store_is_idempotent_and_transitions(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    first, new = store.enqueue(new_job())
    assert new and store.enqueue(new_job()) == (first, False)  # same (repo, sha, recipe, mode, target)
    assert store.enqueue(new_job(recipe="r2"))[1] and store.enqueue(new_job(sha=SHA2))[1]
    job = store.claim(OWNER, 60)
    assert (job.id, job.state, job.attempts, job.lease_owner) == (first, "running", 1, OWNER)
    assert store.fail(job.id, OWNER, "Hub answered 500", permanent=False, retry_at=time.time() + 60) == "queued"
    assert store.claim(OWNER, 60, now=time.time()).id != first  # not due yet: the others come first
    later = store.claim(OWNER, 600, now=time.time() + 61)
    assert later is not None
    assert store.claim(OWNER, 600, now=time.time() + 120).id == first  # now due
    assert not store.finish(first, "someone-else", "pruners/llama-x", None, None, None)  # not the lease holder
    assert store.finish(first, OWNER, "pruners/llama-x", "c" * 40, "http://hub/pruners/llama-x", {"ppl": 1.0})
    done = store.get(first)
    assert (done.state, done.attempts, done.error, done.results) == ("done", 2, None, {"ppl": 1.0})
    assert store.counts() == {"queued": 0, "running": 2, "done": 1, "failed": 0}
    assert store.is_target("Pruners/Llama-X") and not store.is_target("alice/llama")


def test_store_recovers_running_jobs_and_gives_up(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.enqueue(new_job())
    store.enqueue(new_job(recipe="r2"))
    a, b = store.claim(OWNER, 60), store.claim(OWNER, 60)
    store.fail(b.id, OWNER, "x", False, retry_at=0.0)  # due at once
    b = store.claim(OWNER, 60)  # attempt 2, then the process dies
    assert JobStore(tmp_path / "jobs.sqlite").recover(max_attempts=2) == []  # leases still valid
    assert sorted(JobStore(tmp_path / "jobs.sqlite").recover(max_attempts=2, dead_owner_prefix="local:")) == \
        sorted([a.id, b.id])
    assert store.get(a.id).state == "queued" and "interrupted" in store.get(a.id).error
    assert store.get(b.id).state == "failed" and "2 times" in store.get(b.id).error


def test_store_same_variant_lists_the_competing_commits(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    old = store.get(store.enqueue(new_job(sha=SHA))[0])
    assert store.same_variant(old) == []
    newer, _ = store.enqueue(new_job(sha=SHA2))
    assert [j.id for j in store.same_variant(old)] == [newer]
    store.enqueue(new_job(sha="c" * 40, recipe="other"))  # another variant does not count
    store.enqueue(new_job(sha="d" * 40, publish="pr", target="alice/llama"))  # nor another target
    job = store.claim(OWNER, 60, now=time.time() + 1)
    job = store.claim(OWNER, 60, now=time.time() + 1)
    assert job.id == newer and store.fail(newer, OWNER, "unsupported", True, None) == "failed"
    assert store.same_variant(old) == []  # a failed job does not compete


def test_store_permanent_failure_and_requeue(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.enqueue(new_job())
    job = store.claim(OWNER, 60)
    assert store.fail(job.id, OWNER, "unsupported", permanent=True, retry_at=None) == "failed"
    assert store.get(job.id).permanent and store.claim(OWNER, 60, now=time.time() + 1e6) is None
    assert store.requeue(job.id) and store.claim(OWNER, 60).attempts == 1


# -------------------------------------------------------------------- classification
def http_error(status: int, cls=HfHubHTTPError, headers=None):
    response = httpx2.Response(status, headers=headers or {}, request=httpx2.Request("GET", "http://hub/api/x"))
    return cls(f"{status} error", response=response)


def test_classify_transient_and_permanent():
    throttled = classify(http_error(429, headers={"Retry-After": "7"}))
    assert not throttled.permanent and throttled.retry_after_s == 7.0
    for transient in (http_error(500), http_error(503), http_error(412), ConnectionError("refused"),
                      TimeoutError(), RuntimeError("bug")):
        assert not classify(transient).permanent, transient
    for permanent in (http_error(403), http_error(401), http_error(403, GatedRepoError),
                      http_error(404, RepositoryNotFoundError), UnsupportedArchitectureError("gpt2"),
                      InvalidTargetError("too small"), PermanentJobError("too big")):
        assert classify(permanent).permanent, permanent
    assert "write role" in classify(http_error(403)).reason
    assert "gated" in classify(http_error(403, GatedRepoError)).reason


# -------------------------------------------------------------------- redaction
def test_redaction_in_text_and_log_records():
    token = "hf_" + "Q" * 34
    register_secret("my-webhook-secret")
    text = redact(f"Authorization: Bearer {token} and secret my-webhook-secret and {token}")
    assert token not in text and "my-webhook-secret" not in text and "***" in text
    assert redact("in hf_hub_download at line 3") == "in hf_hub_download at line 3"  # not a token
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "pushing with %s", (token,), None)
    record.repo = f"alice/llama?token={token}"
    RedactingFilter().filter(record)
    line = JsonFormatter().format(record)
    assert token not in line and '"repo"' in line


# -------------------------------------------------------------------- pre-download checks
def info(files=("config.json", "model.safetensors"), config=None, params=1000, sizes=None):
    siblings = [SimpleNamespace(rfilename=f, size=(sizes or {}).get(f), blob_id=f"blob-{f}", lfs=None)
                for f in files]
    return SimpleNamespace(id="alice/llama", siblings=siblings, config=config or {"model_type": "llama"},
                           safetensors=SimpleNamespace(total=params) if params is not None else None)


@pytest.mark.parametrize("kwargs, message", [
    ({"params": 5_000_000_000}, "more than the configured limit"),
    ({"params": None, "sizes": {"model.safetensors": 6_000_000_000}}, "more than the configured limit"),
    ({"files": ("config.json", "pytorch_model.bin")}, "only pickle"),
    ({"config": {"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}}, "custom modeling code"),
    ({"files": ("config.json", "model.safetensors", "pruning_recipe.yaml")}, "pruned variant"),
])
def test_check_source_refuses(kwargs, message):
    with pytest.raises(PermanentJobError, match=message):
        check_source(info(**kwargs), max_params=1e9)


def test_check_source_architecture_and_content_key():
    with pytest.raises(UnsupportedArchitectureError):
        check_source(info(config={"model_type": "gpt2"}), max_params=1e9)
    check_source(info(), max_params=1e9)
    base = content_key(info())
    assert content_key(info(files=("config.json", "model.safetensors", "README.md"))) == base  # card edits
    assert content_key(info(files=("config.json", "model.safetensors", "sub/model.safetensors"))) == base
    assert content_key(info(files=("config.json", "model-00001.safetensors"))) != base


# -------------------------------------------------------------------- command line
@contextlib.contextmanager
def logging_restored():
    """Undo what the bot's entry points do to logging (root handler and level, library handlers, warnings)."""
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    for handler in handlers:  # e.g. left by other tests: the bot process starts without any
        root.removeHandler(handler)
    logging.captureWarnings(False)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        hf_logging.enable_default_handler()
        hf_logging.disable_propagation()


def test_cli_status_requeue_and_errors(tmp_path, capsys, monkeypatch):
    import yaml
    from huggingface_hub import constants

    from hub_bot.__main__ import main

    path = tmp_path / "bot.yaml"
    path.write_text(yaml.safe_dump(minimal(hub={"endpoint": "http://127.0.0.1:1", "token_env": "NO_SUCH_TOKEN_VAR"})))
    store = JobStore(tmp_path / "hub_bot.sqlite")
    job = store.get(store.enqueue(new_job())[0])
    with logging_restored():
        assert main(["status", "--config", str(path)]) == 0
        assert "queued" in capsys.readouterr().out
        assert main(["requeue", "--config", str(path), str(job.id)]) == 1  # not failed
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
        assert main(["run", "--config", str(path), "--once"]) == 2
        assert "NO_SUCH_TOKEN_VAR" in capsys.readouterr().err


def test_example_config_parses():
    from pathlib import Path

    config = BotConfig.from_file(Path(__file__).resolve().parent.parent / "hub_bot" / "bot.example.yaml")
    assert config.webhook and config.poll_interval_s == 900 and [e.publish for e in config.watch] == ["repo", "pr"]
    assert config.watch[0].recipes[1].name == "slimllm-20pct"
    assert config.watch[0].recipes[2].recipe.recover.max_seconds == 3600  # recovery with a time budget


def test_bot_refuses_a_token_the_hub_rejects(tmp_path):
    from huggingface_hub import constants

    from hub_bot.errors import BotError
    from hub_bot.local_hub import start_local_hub
    from hub_bot.service import Bot

    hub = start_local_hub(tmp_path / "hub", {"tokens": {"hf_" + "x" * 34: {"user": "bot", "role": "write"}}})
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        config = BotConfig.from_dict(minimal(hub={"endpoint": hub.url}, database=str(tmp_path / "bot.sqlite")))
        with pytest.raises(BotError, match="Invalid credentials|401"):
            Bot(config, token="hf_" + "y" * 34).start()
        Bot(config, token="hf_" + "x" * 34).start().stop()  # the lock was released by the failed start
    finally:
        constants.HF_HUB_OFFLINE = saved
        hub.stop()


def test_source_license_is_inherited_with_its_name_and_link(tmp_path):
    from hub_bot.card import source_terms

    assert source_terms(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: psf-2.0\nlicense_link: "
                                        "https://docs.python.org/3/license.html\ntags: [x]\n"
                                        "extra_gated_prompt: Agree first\nextra_gated_fields: {Company: text}\n"
                                        "---\n# m\n")
    assert source_terms(tmp_path) == {"license": "other", "license_name": "psf-2.0",
                                      "license_link": "https://docs.python.org/3/license.html",
                                      "extra_gated_prompt": "Agree first", "extra_gated_fields": {"Company": "text"}}


def test_library_warnings_go_through_the_json_log(capfd):
    """transformers' own handler and Python warnings would print outside the bot's JSON lines."""
    import io
    import warnings

    from transformers.utils import logging as hf_logging

    from hub_bot.logs import setup_logging

    hf_logging.get_logger("transformers.modeling_utils")  # transformers has set up its own handler by now
    stream = io.StringIO()
    verbosity = hf_logging.get_verbosity()  # a CLI test in this process may have set it to error (core/entry.py)
    with logging_restored():
        hf_logging.set_verbosity_warning()
        setup_logging("INFO", "json", stream=stream)
        hf_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
        warnings.warn("a python warning", UserWarning)
    hf_logging.set_verbosity(verbosity)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [r["logger"] for r in records] == ["transformers.modeling_utils", "py.warnings"]
    assert "a transformers warning" in records[0]["msg"] and "a python warning" in records[1]["msg"]
    captured = capfd.readouterr()
    assert "warning" not in captured.err + captured.out
