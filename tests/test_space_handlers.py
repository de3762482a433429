"""The Space's handler functions without a browser: forms -> recipes, model validation, a whole job on a tiny model,
error messages, one-job-at-a-time, cleanup, and pushing to the local Hub (in-process, real huggingface_hub client)."""
from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from core.methods import METHODS
from core.scores import HEAD_SCORES
from space import chart, forms, handlers, hub
from space.errors import SpaceError, friendly
from space.jobs import JobSlot, ResultStore, stream
from space.settings import Settings

from conftest import save_tiny, tiny_model

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

WRITE, READ, BOB = "hf_alice_write", "hf_alice_read", "hf_bob_write"
FAST = dict(eval_tokens=256, eval_length=128, speed_prompt_tokens=16, speed_new_tokens=4, speed_repeats=1,
            generation_tokens=6)
# parameters of conftest's tiny Llama: embeddings 4096 x 64 (tied) + 4 layers x (q, k, v, o: 64 x (64 + 32 + 32 + 64)
# + gate, up, down: 3 x 64 x 96 + two norms of 64) + the final norm of 64
TINY_PARAMS = 4096 * 64 + 4 * (64 * 192 + 3 * 64 * 96 + 2 * 64) + 64  # 385,600


# -------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("tiny-default"))


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """An in-process local Hub; the client's constants point at it (as HF_ENDPOINT would in a real run)."""
    from huggingface_hub import constants

    from hub_bot.local_hub import start_local_hub

    server = start_local_hub(tmp_path_factory.mktemp("hub"), {"tokens": {
        WRITE: {"user": "alice", "role": "write"}, READ: {"user": "alice", "role": "read"},
        BOB: {"user": "bob", "role": "write"}}})
    names = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE")
    saved = {n: getattr(constants, n) for n in names}
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
    constants.ENDPOINT = server.url  # the core's own Hub look-ups (revision, license) go there too
    constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    yield server
    for n, v in saved.items():
        setattr(constants, n, v)
    server.stop()


@pytest.fixture(scope="module")
def settings(tiny_folder, tmp_path_factory) -> Settings:
    return Settings(default_model=tiny_folder, default_model_label="tiny default", on_space=False,
                    allow_local_paths=True, work_dir=tmp_path_factory.mktemp("work"), **FAST)


@pytest.fixture
def store(settings):
    s = ResultStore(keep=2, root=settings.work_dir)
    yield s
    s.close()


def run(form: forms.Form, settings: Settings, store: ResultStore, slot: JobSlot | None = None,
        session: str = "s1", token: str | None = None) -> tuple[str, object, list]:
    """Run a job through the same event stream the page uses: (kind, value, events)."""
    slot = slot or JobSlot()
    events = [e for e in stream(lambda r: handlers.run_job(form, settings, store, slot, session, r, token))
              if e[0] != "tick"]
    kind, value = events[-1][0], events[-1][1]
    return kind, value, events


@pytest.fixture(scope="module")
def finished(tiny_folder, settings, tmp_path_factory):
    """One successful job on the default model, shared by the result checks."""
    store = ResultStore(keep=2, root=settings.work_dir)
    form = forms.Form(method="mlp_width", score="maw", target_value="0.3", prompt="def add(a, b):")
    kind, res, events = run(form, settings, store)
    assert kind == "done", res
    yield store, res, events
    store.close()


# -------------------------------------------------------------------- forms and the registry
def test_methods_and_options_come_from_the_registry():
    assert forms.method_names() == list(METHODS)
    for name, method in METHODS.items():
        defaults = forms.option_defaults(name)
        assert list(defaults) == [f.name for f in dataclasses.fields(method.Options)]
        assert forms.parse_options(name, forms.options_yaml(name)) == {}  # the shown defaults change nothing
    form = handlers.method_form("attention_heads")
    assert [v for _, v in form["scores"]] == list(HEAD_SCORES)
    assert form["score"] == METHODS.get("attention_heads").default_score
    assert "mode: kv_group" in form["options"]
    assert handlers.method_form("slimllm")["scores"] == []
    assert "calibration data" in handlers.method_help("attention_heads", "activation")
    assert "Weights only" in handlers.method_help("mlp_width", "maw")


def test_form_to_recipe():
    r = forms.build_recipe(forms.Form(method="attention_heads", score="magnitude", target_kind="param_ratio",
                                      target_value="0.2", options_yaml="mode: query\n", protect_last=1), "org/m")
    assert (r.model, r.target.param_ratio, r.options, r.layers.protect_last) == ("org/m", 0.2, {"mode": "query"}, 1)
    r = forms.build_recipe(forms.Form(target_kind="target_params", target_value="300k"), None)
    assert r.target.target_params == 300_000 and r.calibration.source == "builtin"
    r = forms.build_recipe(forms.Form(score="activation", calib_source="dataset", calib_dataset="wikitext:raw",
                                      calib_samples=8, calib_seq_len=64), None)
    assert (r.calibration.source, r.calibration.n_samples, r.calibration.seq_len) == ("dataset:wikitext:raw", 8, 64)


@pytest.mark.parametrize("changes, expected", [
    (dict(target_value="1.5"), "must be in [0, 1)"),
    (dict(target_value="lots"), "must be a number"),
    (dict(target_kind="target_params", target_value="huge"), "like 800M"),
    (dict(options_yaml="unit: [\n"), "not valid YAML"),
    (dict(method="depth", options_yaml="unit: brick\n"), "unit must be one of"),
    (dict(options_yaml="colour: red\n"), "has no option 'colour'"),
    (dict(score="mawr"), "Did you mean 'maw'"),
    (dict(score="activation", calib_source="upload", calib_file=None), "Upload a .txt or .jsonl"),
    (dict(score="activation", calib_source="dataset", calib_dataset=" "), "Give a dataset name"),
])
def test_bad_form_values_give_clear_messages(changes, expected):
    with pytest.raises(SpaceError, match=None) as info:
        forms.build_recipe(forms.Form(**changes), None)
    assert expected in str(info.value)


@pytest.mark.parametrize("name, content, expected", [
    ("texts.csv", "a,b\n", "must be .txt"),
    ("texts.jsonl", '{"text": "ok"}\nnot json\n', "texts.jsonl:2 is not valid JSON"),
    ("texts.jsonl", '{"body": "no text field"}\n', "no string field 'text'"),
    ("empty.txt", "  \n", "contains no text"),
])
def test_bad_calibration_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SpaceError) as info:
        forms.build_recipe(forms.Form(score="activation", calib_source="upload", calib_file=str(path)), None)
    assert expected in str(info.value) and str(tmp_path) not in str(info.value)


def test_unsupported_or_missing_local_models(tmp_path, settings):
    with pytest.raises(SpaceError, match="config.json missing"):
        handlers.check_model(str(tmp_path), settings)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(Exception) as info:
        handlers.check_model(str(tmp_path), settings)
    assert friendly(info.value).startswith("Unsupported model: Model type 'bert' is not supported.")
    with pytest.raises(SpaceError, match="Local folders are not accepted"):
        handlers.check_model(str(tmp_path), dataclasses.replace(settings, allow_local_paths=False))


def test_default_model_summary(settings):
    text = handlers.check_model("", settings)
    assert "tiny default" in text and "4 layers" in text and f"{TINY_PARAMS:,} parameters" in text


# -------------------------------------------------------------------- a whole job
def test_job_result(finished, settings):
    store, res, events = finished
    ev = res.evidence.comparison
    assert ev.base.params == TINY_PARAMS and ev.pruned.params < ev.base.params
    assert ev.base.perplexity > 1 and ev.pruned.perplexity > 1 and ev.pruned.eval_tokens > 200
    assert {"prefill_speedup", "decode_speedup_batch1"} <= set(ev.ratios)
    assert res.evidence.generations[0] and res.evidence.generations[1] is not None
    assert [r["intermediate_size"] for r in res.chart_rows] == [(67, 96)] * 4
    assert "method: mlp_width" in res.recipe_yaml and "score: maw" in res.recipe_yaml
    progress = [e for e in events if e[0] == "progress"]
    assert any("layer 4/4" in e[2] for e in progress) and progress[-1][1] == 1.0
    assert [e[1] for e in events if e[0] == "log"][0] == f"job {res.job_id} started"
    with zipfile.ZipFile(res.zip_path) as zf:
        names = zf.namelist()
    assert f"{res.zip_path.stem}/model.safetensors" in names and f"{res.zip_path.stem}/pruning_recipe.yaml" in names
    summary = handlers.summary_markdown(res)
    assert "| perplexity |" in summary and f"{TINY_PARAMS:,}" in summary
    html = handlers.chart_markdown(res)
    assert html.count('data-removed="false"') == 4 and "67 / 96" in html
    base, pruned = handlers.regenerate(store, res.job_id, "s1", "import os", settings)
    assert isinstance(base, str) and isinstance(pruned, str)


def test_job_failure_is_a_message_and_cleans_up(settings, store):
    # the method itself refuses (rounding to 64 would remove all 96 neurons), after the model was loaded
    form = forms.Form(target_value="0.9", round_to=64, prompt="")
    kind, message, _ = run(form, settings, store)
    assert kind == "error" and message.startswith("Target cannot be met:") and "Traceback" not in message
    assert list(store.root.iterdir()) == []  # the job folder is gone
    kind, message, _ = run(forms.Form(model="/nonexistent/folder"), settings, store)
    assert kind == "error" and "config.json missing" in message


def test_uploaded_calibration_file(settings, store, tmp_path):
    texts = Path(__file__).resolve().parent.parent / "reference" / "corpus" / "calibration.txt"
    upload = tmp_path / "my texts.jsonl"
    chunks = texts.read_text(encoding="utf-8")[:20_000].split("\n\n")
    upload.write_text("\n".join(json.dumps({"text": c}) for c in chunks if c.strip()), encoding="utf-8")
    form = forms.Form(score="activation", calib_source="upload", calib_file=str(upload), calib_samples=4,
                      calib_seq_len=32, prompt="")
    kind, res, _ = run(form, settings, store)
    assert kind == "done", res
    recipe = yaml.safe_load(res.recipe_yaml)
    assert recipe["calibration"]["source"] == "my texts.jsonl"  # the file's name, not a server path
    assert recipe["result"]["calibration"].startswith("my texts.jsonl, 4 x 32 tokens")
    assert (res.folder.parent / "calibration.jsonl").is_file()


def test_pruned_checkpoint_keeps_the_base_dtype(settings, store, tmp_path):
    folder = save_tiny(tiny_model("qwen2").to(torch.bfloat16), tmp_path / "bf16")
    kind, res, _ = run(forms.Form(model=str(folder), prompt=""), settings, store)
    assert kind == "done", res
    assert json.loads((res.folder / "config.json").read_text())["dtype"] == "bfloat16"
    base, pruned = res.evidence.disk_bytes
    assert pruned < base  # measured in float32, saved in bfloat16 like the base
    assert "| checkpoint (MB) |" in handlers.summary_markdown(res)


def test_one_job_at_a_time(settings, store):
    slot = JobSlot()
    slot.acquire()
    kind, message, _ = run(forms.Form(), settings, store, slot=slot)
    assert kind == "error" and "already running" in message
    slot.release()
    assert not slot.busy


def test_results_are_evicted_and_sessions_cleaned(tmp_path):
    store = ResultStore(keep=1, root=tmp_path)
    a, b, c = (store.new_folder(i) for i in (1, 2, 3))
    store.put(1, "s1", a, "first")
    store.put(2, "s1", b, "second")
    assert not a.exists() and store.get(2, "s1") == "second"
    with pytest.raises(SpaceError, match="run a job first"):
        store.get(1, "s1")
    with pytest.raises(SpaceError):
        store.get(2, "another session")
    store.put(3, "s2", c, "third")
    store.drop_session("s2")
    assert not c.exists()
    store.close()
    assert not store.root.exists()


def test_depth_chart_marks_removed_layers():
    before = [{"layer": i, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}
              for i in range(4)]
    after = [dict(before[0]), dict(before[2], layer=1), dict(before[3], layer=2, skip=["mlp"])]
    rows = chart.layer_rows(before, after, removed=[1])
    assert [r["removed"] for r in rows] == [False, True, False, False]
    assert rows[3]["intermediate_size"] == (0, 96) and rows[2]["num_attention_heads"] == (4, 4)
    assert chart.chart_html(rows).count("layer removed") == 1


def test_friendly_messages():
    import httpx2
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    response = httpx2.Response(401, request=httpx2.Request("GET", "http://hub/api/x"))
    assert "Sign in again" in friendly(HfHubHTTPError("401", response=response))
    gated = httpx2.Response(403, request=httpx2.Request("GET", "http://hub/x"))
    assert "gated" in friendly(GatedRepoError("gated", response=gated))
    assert friendly(torch.OutOfMemoryError("CUDA out of memory")).startswith("Out of memory")
    msg = friendly(ZeroDivisionError("division by zero"))
    assert msg.startswith("Unexpected error (ZeroDivisionError): division by zero") and "\n" not in msg


# -------------------------------------------------------------------- the Hub
@pytest.fixture(scope="module")
def hub_settings(settings, local_hub):
    return dataclasses.replace(settings, endpoint=local_hub.url)


@pytest.fixture(scope="module")
def hub_repos(local_hub, tiny_folder, tmp_path_factory):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=local_hub.url, token=WRITE)
    api.create_repo("alice/tiny-base")
    api.upload_folder(repo_id="alice/tiny-base", folder_path=tiny_folder)
    adapter = tmp_path_factory.mktemp("adapter")
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "alice/tiny-base"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    api.create_repo("alice/tiny-lora")
    api.upload_folder(repo_id="alice/tiny-lora", folder_path=adapter)
    api.create_repo("alice/bert")
    api.upload_file(path_or_fileobj=json.dumps({"model_type": "bert"}).encode(), path_in_repo="config.json",
                    repo_id="alice/bert")
    api.upload_file(path_or_fileobj=b"\0" * 16, path_in_repo="model.safetensors", repo_id="alice/bert")
    api.create_repo("alice/pickled")
    api.upload_file(path_or_fileobj=(tiny_folder / "config.json").read_bytes(), path_in_repo="config.json",
                    repo_id="alice/pickled")
    api.upload_file(path_or_fileobj=b"\0" * 16, path_in_repo="pytorch_model.bin", repo_id="alice/pickled")
    api.create_repo("alice/gated")
    api.upload_folder(repo_id="alice/gated", folder_path=tiny_folder)
    api.update_repo_settings("alice/gated", gated="manual")
    api.create_repo("alice/private", private=True)
    return api


@pytest.mark.parametrize("repo, token, expected", [
    ("alice/tiny-base", None, f"{TINY_PARAMS:,} parameters"),
    ("alice/tiny-lora", None, "holds only an adapter (adapter_config.json) on top of `alice/tiny-base`"),
    ("alice/bert", None, "Unsupported model: Model type 'bert' is not supported"),
    ("alice/pickled", None, "has no safetensors weights"),
    ("alice/gated", BOB, "This model is gated: request access"),
    ("alice/private", BOB, "Repository not found"),
    ("alice/nothing-here", None, "Repository not found"),
    ("not a repo id", None, "is not a Hub model id"),
])
def test_hub_model_validation(hub_settings, hub_repos, repo, token, expected):
    try:
        text = handlers.check_model(repo, hub_settings, token)
    except Exception as err:  # what the page shows
        text = friendly(err)
    assert expected in text


def test_push_to_the_hub(hub_settings, hub_repos, local_hub, store):
    form = forms.Form(model="alice/tiny-base", method="attention_heads", score="magnitude", target_value="0.5",
                      prompt="")
    kind, res, _ = run(form, hub_settings, store, token=WRITE)
    assert kind == "done", res
    assert res.suggest_repo("alice") == "alice/tiny-base-attention_heads-6pct"
    # refused pushes: read-only token, someone else's namespace; neither leaves a repo behind
    with pytest.raises(SpaceError, match="read"):
        handlers.push(store, res.job_id, "s1", "alice/refused", False, hub_settings, READ)
    with pytest.raises(SpaceError, match="Could not create bob/stolen"):
        handlers.push(store, res.job_id, "s1", "bob/stolen", False, hub_settings, WRITE)
    # a failure after the repo was created: the repo is deleted again
    local_hub.hub.faults.add(r"^POST /api/models/alice/broken/commit/", 500, count=1)
    with pytest.raises(SpaceError, match="deleted again"):
        handlers.push(store, res.job_id, "s1", "alice/broken", False, hub_settings, WRITE)
    with pytest.raises(SpaceError, match="Sign in with Hugging Face"):
        handlers.push(store, res.job_id, "s1", "x", False, dataclasses.replace(hub_settings, on_space=True))
    url = handlers.push(store, res.job_id, "s1", "pruned-heads", True, hub_settings, WRITE)  # namespace added
    assert url.endswith("/alice/pruned-heads")
    with pytest.raises(SpaceError, match="already exists"):
        handlers.push(store, res.job_id, "s1", "alice/pruned-heads", False, hub_settings, WRITE)
    api = hub_repos
    names = {m.id for m in api.list_models(author="alice")} | {m.id for m in api.list_models(author="bob")}
    assert not names & {"alice/refused", "bob/stolen", "alice/broken"}
    info = api.model_info("alice/pruned-heads")
    assert info.private
    files = {s.rfilename for s in info.siblings}
    assert {"model.safetensors", "config.json", "pruning_recipe.yaml", "README.md", "tokenizer.json"} <= files
    card = info.card_data.to_dict()
    assert card["base_model"] == "alice/tiny-base" and {"pruned", "attention_heads"} <= set(card["tags"])
    metric = card["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "perplexity" and metric["value"] == pytest.approx(res.evidence.comparison.pruned.perplexity, 1e-3)
    readme = Path(api.hf_hub_download("alice/pruned-heads", "README.md")).read_text()
    assert "# alice/pruned-heads" in readme and "| perplexity |" in readme
    recipe = yaml.safe_load(Path(api.hf_hub_download("alice/pruned-heads", "pruning_recipe.yaml")).read_text())
    assert recipe["model"] == "alice/tiny-base" and recipe["result"]["base_revision"] == res.model.revision


def test_tokens(hub_settings, monkeypatch):
    assert hub.read_token(None, hub_settings) is None  # local: the client's stored token
    assert hub.read_token(None, dataclasses.replace(hub_settings, on_space=True)) is False  # never the Space's
    assert hub.write_token("oauth", hub_settings) == "oauth"
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(SpaceError, match="hf auth login"):
        hub.write_token(None, hub_settings)
    with pytest.raises(SpaceError, match="not a valid repository id"):
        hub.check_repo_id("alice/bad name!", "tok", hub_settings)
