"""The Space's handler functions without a browser: forms -> recipes, model validation, a whole job on a tiny model,
error messages, the job line (positions, waits, cancellation), cleanup, and pushing to the local Hub (in-process,
real huggingface_hub client)."""
from __future__ import annotations

import dataclasses
import json
import pickle
import re
import sys
import threading
import types
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import core.blocks

from core.methods import METHODS
from core.scores import HEAD_SCORES
from core.errors import CalibrationError, ModelLoadError
from core.model_io import REFERENCE_MODEL
from space import chart, forms, gpu, handlers, hub
from space.errors import Redactor, SpaceError, as_markdown, friendly
from space.jobs import Cancelled, JobQueue, ResultStore
from space.settings import Settings
from space.stages import Board, History, render, render_wait

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


def run(form: forms.Form, settings: Settings, store: ResultStore, jobs: JobQueue | None = None,
        session: str = "s1", token: str | None = None) -> tuple[str, object, list]:
    """Run a job through the same event stream the page uses: (kind, value, events)."""
    events = list(handlers.run_job(form, settings, store, jobs or JobQueue(), session, token))
    kind, value = events[-1][0], events[-1][1]
    return kind, value, events


@pytest.fixture(scope="module")
def finished(tiny_folder, settings, tmp_path_factory):
    """One successful job on the default model, shared by the result checks."""
    store = ResultStore(keep=2, root=settings.work_dir)
    form = forms.Form(method="mlp_width", score="maw", target_value="30%", prompt="def add(a, b):",
                      measure_speed=True)
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


def test_methods_and_scores_have_readable_names_with_the_id_in_small_print():
    choices = dict(forms.method_choices())
    assert choices["MLP neurons (width pruning)"] == "mlp_width" and set(choices.values()) == set(METHODS)
    assert all(label != value for label, value in choices.items() if value in forms.METHOD_TITLES)
    scores = dict(forms.score_choices("mlp_width"))
    assert scores["Largest weight (max |w|)"] == "maw" and scores["Activations on data (Wanda-style) · uses data"] == "activation"
    assert forms.method_title("some_new_method") == "Some new method"  # a method added later still reads well
    text = handlers.method_help("mlp_width", "maw")
    assert "**Largest weight (max |w|)**" in text and "<small>In recipes and on the command line: method `mlp_width` · score `maw`</small>" in text


def test_form_to_recipe():
    r = forms.build_recipe(forms.Form(method="attention_heads", score="magnitude", target_kind="param_ratio",
                                      target_value="0.2", options_yaml="mode: query\n", protect_last=1), "org/m")
    assert (r.model, r.target.param_ratio, r.options, r.layers.protect_last) == ("org/m", 0.2, {"mode": "query"}, 1)
    r = forms.build_recipe(forms.Form(target_value="25%"), None)
    assert r.target.ratio == 0.25
    r = forms.build_recipe(forms.Form(target_kind="target_params", target_value="300k"), None)
    assert r.target.target_params == 300_000 and r.calibration.source == "builtin"
    r = forms.build_recipe(forms.Form(score="activation", calib_source="dataset", calib_dataset="wikitext:raw",
                                      calib_samples=8, calib_seq_len=64), None)
    assert (r.calibration.source, r.calibration.n_samples, r.calibration.seq_len) == ("dataset:wikitext:raw", 8, 64)


def test_form_recovery_budget():
    assert forms.build_recipe(forms.Form(), None).recover is None  # 0 steps: no recovery
    r = forms.build_recipe(forms.Form(recover_steps=300, recover_minutes=2.5), None)
    assert (r.recover.steps, r.recover.max_seconds, r.recover.kd) == (300, 150.0, 1.0)
    assert r.calibration.source == "builtin"  # recovery trains on the calibration source, even for weight scores
    assert forms.build_recipe(forms.Form(recover_steps=10), None).recover.max_seconds is None
    assert "recover" in handlers.job_stages(forms.Form(recover_steps=10))
    assert "recover" not in handlers.job_stages(forms.Form())


@pytest.mark.parametrize("changes, expected", [
    (dict(target_value="1.5"), "must be between 0 and 1"),
    (dict(target_value="30"), "Did you mean 30%?"),
    (dict(target_value="0"), "A share of 0 removes nothing"),
    (dict(target_value="0%"), "A share of 0 removes nothing"),
    (dict(target_kind="param_ratio", target_value="100%"), "must be between 0 and 1"),
    (dict(target_value="lots"), "must be a number"),
    (dict(target_kind="target_params", target_value="huge"), "like 800M"),
    (dict(options_yaml="unit: [\n"), "not valid YAML (line 2, column 1: expected the node content, but found '<stream end>')"),
    (dict(method="depth", options_yaml="unit: brick\n"), "unit must be one of"),
    (dict(options_yaml="colour: red\n"), "has no option 'colour'"),
    (dict(score="mawr"), "Did you mean 'maw'"),
    (dict(score="activation", calib_source="upload", calib_file=None), "Upload a .txt or .jsonl"),
    (dict(score="activation", calib_source="dataset", calib_dataset=" "), "Give a dataset name"),
    (dict(recover_steps=-5), "cannot be negative"),
    (dict(recover_steps=5, recover_minutes=-1), "cannot be negative"),
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
    assert "a prune needs about" in text and "MiB of RAM streamed (float32, one block of" in text  # before it starts


# -------------------------------------------------------------------- a whole job
def test_job_result(finished, settings, tiny_folder):
    store, res, events = finished
    ev = res.evidence.comparison
    assert ev.base.params == TINY_PARAMS and ev.pruned.params < ev.base.params
    assert ev.base.perplexity > 1 and ev.pruned.perplexity > 1 and ev.pruned.eval_tokens > 200
    assert set(ev.speed["metrics"]) == {"prefill", "decode_b1"}  # speed-ups enter ratios only when measurable
    assert res.evidence.generations[0] and res.evidence.generations[1] is not None
    assert [r["intermediate_size"] for r in res.chart_rows] == [(67, 96)] * 4
    assert "method: mlp_width" in res.recipe_yaml and "score: maw" in res.recipe_yaml
    # the stage list: every stage passed, the per-layer progress went through, the download was not needed
    board = [e[1] for e in events if e[0] == "stage"][-1]
    assert [(s.key, s.state) for s in board.stages] == [
        ("check", "done"), ("download", "skipped"), ("load", "done"), ("base", "done"), ("prune", "done"),
        ("pruned", "done"), ("speed", "done"), ("save", "done")]
    assert board.remaining() == 0.0 and board.elapsed() > 0
    html = render(board, title="Done")
    assert html.count('data-state="done"') == 7 and re.search(r"took \d+:\d\d", html)  # m:ss, any length
    logs = [e[1] for e in events if e[0] == "log"]
    assert logs[0] == f"job {res.job_id} started" and "pruning (mlp_width): layer 4/4" in logs
    # no server path reaches the page or the saved files; the base model is named as the user chose it
    for text in (*logs, res.recipe_yaml, (res.folder / "README.md").read_text()):
        assert str(store.root) not in text and str(tiny_folder) not in text, text
    assert yaml.safe_load(res.recipe_yaml)["result"]["base_model"] == tiny_folder.name  # SPACE_DEFAULT_MODEL
    with zipfile.ZipFile(res.zip_path) as zf:
        names = zf.namelist()
    assert f"{res.zip_path.stem}/model.safetensors" in names and f"{res.zip_path.stem}/pruning_recipe.yaml" in names
    summary = handlers.summary_markdown(res)
    assert "| perplexity |" in summary and f"{TINY_PARAMS:,}" in summary
    assert "| speed | base | pruned | change |" in summary and "prefill latency (ms)" in summary
    assert "Speed not measured" not in summary
    html = handlers.chart_markdown(res)
    assert html.count('data-removed="false"') == 4 and "67 / 96" in html
    base, pruned = handlers.regenerate(store, JobQueue(), res.job_id, "s1", "import os", settings)
    assert isinstance(base, str) and isinstance(pruned, str)
    # the API's answer is plain data
    api = handlers.api_summary(res)
    assert json.loads(json.dumps(api))["params_after"] == ev.pruned.params and api["base_model"] == tiny_folder.name
    # on ZeroGPU the job's result crosses processes
    assert pickle.loads(pickle.dumps(res)).evidence.comparison.pruned.params == ev.pruned.params


def test_a_model_larger_than_memory_streams(finished, settings, store, monkeypatch):
    """With (pretended) too little memory for the whole model, the same job streams block by block: same numbers, no speed or generations (and
    the page says why), nothing outside the job's folder."""
    import core.memory
    from core.model_io import LoadOptions, load_config

    free = core.memory.estimate_memory(load_config(str(settings.default_model))).streamed_bytes
    monkeypatch.setattr(core.memory, "available_bytes", lambda device="cpu": free)  # enough for one block only
    assert core.memory.too_big_for_memory(str(settings.default_model), LoadOptions())
    loads = []
    real_load = core.blocks.BlockStore.load
    monkeypatch.setattr(core.blocks.BlockStore, "load", lambda self, i, m: loads.append(i) or real_load(self, i, m))
    form = forms.Form(method="mlp_width", score="maw", target_value="30%", prompt="def add(a, b):",
                      measure_speed=True)
    kind, res, events = run(form, settings, store)
    assert kind == "done", res
    assert loads and sorted(set(loads)) == [0, 1, 2, 3]  # the blocks were read one at a time from disk
    logs = [e[1] for e in events if e[0] == "log"]
    assert any(line.startswith("streamed on cpu: the model needs") for line in logs), logs
    ev, whole = res.evidence.comparison, finished[1].evidence.comparison
    assert ev.pruned.params == whole.pruned.params
    assert ev.base.perplexity == pytest.approx(whole.base.perplexity, rel=1e-5)
    assert ev.pruned.perplexity == pytest.approx(whole.pruned.perplexity, rel=1e-5)
    assert ev.base.speed is None and ev.pruned.speed is None and res.evidence.generations is None
    assert "Speed and sample generations not measured: they need the whole model" in handlers.summary_markdown(res)
    assert [r["intermediate_size"] for r in res.chart_rows] == [(67, 96)] * 4
    board = [e[1] for e in events if e[0] == "stage"][-1]
    assert ("speed", "skipped") in [(s.key, s.state) for s in board.stages]
    assert not (res.folder.parent / "blocks").exists() or not any((res.folder.parent / "blocks").rglob("*.safetensors"))
    with pytest.raises(SpaceError, match="need the whole model in memory"):
        handlers.regenerate(store, JobQueue(), res.job_id, "s1", "import os", settings)


def test_speed_is_off_unless_asked_and_a_damaged_model_is_flagged(settings, store):
    # the trained reference model (a random tiny one has nothing to lose): removing 90% of its MLP wrecks it
    reference = dataclasses.replace(settings, default_model=REFERENCE_MODEL, default_model_label="reference model")
    kind, res, events = run(forms.Form(target_value="90%", prompt=""), reference, store)
    assert kind == "done", res
    assert res.evidence.comparison.base.speed is None
    assert "speed" not in [s.key for s in [e[1] for e in events if e[0] == "stage"][-1].stages]
    assert "Speed not measured. Turn on “Measure speed”" in handlers.summary_markdown(res)
    ratio = res.evidence.perplexity_ratio
    assert ratio > reference.ppl_warn_ratio == 2.0
    assert res.warning.startswith(f"The pruned model is badly damaged: its perplexity grew ×{ratio:,.1f}")
    assert handlers.done_status(res).startswith("⚠ Done, but see the warning")
    assert res.evidence.damage(ratio * 2) is None
    assert yaml.safe_load(res.recipe_yaml)["result"]["base_model"] == "reference model"
    assert yaml.safe_load(res.recipe_yaml)["model"] is None  # the recipe's name for the reference model


def test_recovery_training_runs_as_its_own_stage_and_wins_perplexity_back(settings, store):
    reference = dataclasses.replace(settings, default_model=REFERENCE_MODEL, default_model_label="reference model")
    kind, res, events = run(forms.Form(target_value="70%", prompt="", recover_steps=12), reference, store)
    assert kind == "done", res
    board = [e[1] for e in events if e[0] == "stage"][-1]
    # "done", not "skipped": the stage was active (a stage never reported is skipped when the next one starts)
    assert [(s.key, s.state) for s in board.stages][4:6] == [("prune", "done"), ("recover", "done")]
    record = yaml.safe_load(res.recipe_yaml)
    assert record["recover"]["steps"] == 12
    rec = record["result"]["recovery"]
    assert rec["steps"] == 12 and rec["heldout_perplexity"][1] < rec["heldout_perplexity"][0]
    assert "Recovery training" in (res.folder / "README.md").read_text()


def test_no_op_targets_are_refused_before_any_work(settings, store):
    jobs = JobQueue()
    kind, message, events = run(forms.Form(target_value="0"), settings, store, jobs)
    assert kind == "error" and "removes nothing" in message
    assert [e[0] for e in events] == ["error"] and len(jobs) == 0  # not even queued
    kind, message, events = run(forms.Form(target_kind="target_params", target_value="1M"), settings, store, jobs)
    assert kind == "error" and f"has {TINY_PARAMS:,} parameters, so keeping 1.00M removes nothing" in message
    assert not any(e[0] == "log" and "loaded" in e[1] for e in events)  # refused from the config, before loading
    assert list(store.root.iterdir()) == []


def test_job_failure_is_a_message_and_cleans_up(settings, store):
    # the method itself refuses (rounding to 64 would remove all 96 neurons), after the model was loaded
    form = forms.Form(target_value="0.9", round_to=64, prompt="")
    kind, message, _ = run(form, settings, store)
    assert kind == "error" and message.startswith("Target cannot be met:") and "Traceback" not in message
    assert list(store.root.iterdir()) == []  # the job folder is gone
    kind, message, _ = run(forms.Form(model="/nonexistent/folder"), settings, store)
    assert kind == "error" and "config.json missing" in message


def _until(events, stage: str):
    """Consume events until the job reaches `stage`; returns the events seen."""
    seen = []
    for event in events:
        seen.append(event)
        if event[0] == "stage" and event[1].current is not None and event[1].current.key == stage:
            return seen
    raise AssertionError(f"the job never reached {stage}: {seen[-3:]}")


def test_cancel_stops_a_running_job_and_deletes_its_files(settings, store):
    jobs = JobQueue()
    events = handlers.run_job(forms.Form(prompt=""), settings, store, jobs, "s1")
    _until(events, "base")
    assert [p.name for p in store.root.iterdir()] == ["job-1"]
    assert jobs.cancel("s2") is False and jobs.cancel("s1") is True
    rest = list(events)
    assert rest[-1] == ("cancelled", "Cancelled: the job stopped and its files were deleted.")
    assert not [e for e in rest if e[0] == "stage" and e[1].current and e[1].current.key == "prune"]
    assert list(store.root.iterdir()) == [] and len(jobs) == 0


def test_a_page_that_goes_away_stops_its_job(settings, store):
    jobs = JobQueue()
    events = handlers.run_job(forms.Form(prompt=""), settings, store, jobs, "s1")
    _until(events, "prune")
    events.close()  # what Gradio does when the page is closed mid-run
    assert list(store.root.iterdir()) == [] and len(jobs) == 0
    assert [t.name for t in threading.enumerate() if t.name == "prune-job"] == []  # the worker thread has ended


def test_the_line_shows_position_and_expected_wait_and_can_be_cancelled():
    history = History()
    clock = [0.0]
    jobs = JobQueue(max_waiting=2, history=history)
    first, second, third = (jobs.join(s) for s in ("a", "b", "c"))
    with pytest.raises(SpaceError, match="The queue is full"):
        jobs.join("d")
    assert list(jobs.wait_turn(first)) == [] and first.started
    waiting = jobs.wait_turn(second, poll=0.01)
    assert next(waiting) == ("wait", 1, None)  # no job has finished yet: no estimate
    # a finished job of 1M parameters took 10 s in "prune"; the running one has 2M parameters and is halfway
    done = Board(["prune"], history, clock=lambda: clock[0], kind="mlp_width/maw")
    done.params = 1_000_000
    done.update("prune", 0.0)
    clock[0] = 10.0
    done.finish()
    history.record(done)
    first.board = Board(["check", "prune"], history, clock=lambda: clock[0], kind="mlp_width/maw")
    first.board.params = 2_000_000
    first.board.update("prune", 0.5)
    clock[0] = 20.0
    assert first.board.remaining() == pytest.approx(10.0)  # its own progress: 10 s for half of it
    assert next(waiting)[:2] == ("wait", 1)
    assert jobs.expected_wait(second) == pytest.approx(10.0)
    assert jobs.expected_wait(third) == pytest.approx(20.0)  # + a typical job (the one that finished: 10 s)
    assert "you are number 3" in render_wait(2, 20.0) and "about <b>0:20</b>" in render_wait(2, 20.0)
    assert "not known yet" in render_wait(1, None)
    jobs.cancel("c")  # cancelled while waiting: it leaves the line
    with pytest.raises(Cancelled):
        list(jobs.wait_turn(third))
    jobs.leave(third)
    jobs.leave(first)  # the running job ends: the next one starts
    assert list(waiting) == [] and second.started and jobs.position(second) == 0


def test_estimates_without_history_start_from_the_measured_base_model():
    clock = [0.0]
    board = Board(["load", "base", "prune", "pruned", "save"], clock=lambda: clock[0])
    board.update("load")
    assert board.remaining() is None  # nothing to go by yet
    clock[0] = 2.0
    board.update("base")
    clock[0] = 12.0
    assert board.remaining() is None  # the base measurement itself: nothing to go by
    board.update("prune", 0.0)
    assert board.remaining() is None  # pruning has just started: its time depends on the method, not known yet
    clock[0] = 14.0
    board.update("prune", 0.5)  # the running stage extrapolates itself; the rest is priced relative to the base
    assert board.remaining() == pytest.approx(2.0 + 10 * (1.0 + 0.5))
    clock[0] = 16.0
    board.update("pruned")
    clock[0] = 20.0
    assert board.remaining() == pytest.approx(6.0 + 5.0)  # 10 s like the base measurement, 4 s spent; then save
    clock[0] = 31.0
    assert board.remaining() is None  # overran the prior: no "0:00 left"


def test_estimates_from_history_scale_with_the_model_and_price_pruning_by_method():
    history, clock = History(), [0.0]
    done = Board(["base", "prune"], history, clock=lambda: clock[0], kind="mlp_width/maw")
    done.params = 1_000_000
    done.update("base")
    clock[0] = 4.0
    done.update("prune", 0.0)
    clock[0] = 5.0
    done.finish()
    history.record(done)
    same = Board(["base", "prune"], history, clock=lambda: clock[0], kind="mlp_width/maw")
    same.params = 3_000_000  # three times the model: three times the time
    same.update("base")
    assert same.remaining() == pytest.approx(3 * 4.0 + 3 * 1.0)
    other = Board(["base", "prune"], history, clock=lambda: clock[0], kind="depth/shapley_mc")
    other.params = 1_000_000
    other.update("base")
    clock[0] = 6.0
    assert other.remaining() is None  # Shapley pruning is not priced by a weight score's time
    other.update("prune", None)
    clock[0] = 10.0
    assert other.remaining() is None
    other.update("prune", 0.1)  # 4 s for 10%: its own progress now
    assert other.remaining() == pytest.approx(36.0)
    clock[0] = 20.0
    same.update("base")  # overran the 12 s the history gave it: no estimate rather than "0:00 left"
    assert same.remaining() is None


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


def test_messages_use_the_pages_words_and_hide_server_paths():
    msg = friendly(CalibrationError("Calibration text has 3 tokens, fewer than one window of 8. Give more text or a "
                                    "shorter --calib-seq-len (recipe: calibration.seq_len)."))
    assert msg == ("Calibration data problem: Calibration text has 3 tokens, fewer than one window of 8. Give more "
                   "text or a shorter “Tokens per sample” (Calibration data).")
    msg = friendly(CalibrationError("f.jsonl:2 has no string field 'text'; set the text field name "
                                    "(--calib-text-field) to the one your file uses."))
    assert "--" not in msg and 'each line must be a JSON object with a "text" field' in msg
    msg = friendly(ModelLoadError("m has only pickle weights (*.bin/*.pt), which can run arbitrary code when loaded. "
                                  "Convert them to safetensors, or pass --allow-pickle if you trust the source."))
    assert msg.endswith("when loaded. Convert them to safetensors.") and "--" not in msg
    msg = friendly(ModelLoadError("org/m needs custom code from its repository. It is not run unless you pass "
                                  "--trust-remote-code (only for repositories you trust)."))
    assert msg.endswith("from its repository. The Space does not run a repository's code.")
    assert as_markdown("got '<stream end>' & more") == "got '&lt;stream end&gt;' &amp; more"
    redact = Redactor({"/tmp/prune-space-x/job-3": "job folder"})
    assert redact("wrote /tmp/prune-space-x/job-3/model") == "wrote job folder/model"
    assert redact("read /tmp/elsewhere/data/texts.txt from http://hub/tmp/x") == "read …/texts.txt from http://hub/tmp/x"


def test_gpu_support_is_a_no_op_off_zerogpu_and_asks_for_time_by_model_size(monkeypatch, tmp_path):
    fn = handlers._gpu_part
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert gpu.gpu_task(fn, duration=handlers._gpu_seconds) is fn and not gpu.on_zerogpu()
    assert not gpu.has_gpu("cpu") and gpu.has_gpu("cuda:1")
    assert gpu.job_seconds(135_000_000, False, False, 300) < gpu.job_seconds(8_000_000_000, False, False, 300)
    assert gpu.job_seconds(1_000_000_000, True, True, 300) > gpu.job_seconds(1_000_000_000, False, False, 300)
    assert gpu.job_seconds(70_000_000_000, True, True, 300) == 300  # capped at what ZeroGPU grants
    # recovery steps cost GPU time with the model's size, at most its time limit
    plain = gpu.job_seconds(1_000_000_000, False, False, 3000)
    assert gpu.job_seconds(1_000_000_000, False, False, 3000, recover_steps=500) > plain
    assert gpu.job_seconds(1_000_000_000, False, False, 3000, recover_steps=5000, recover_seconds=60) == plain + 60
    # on ZeroGPU, the `spaces` package decorates the GPU part with a duration computed from the call's arguments
    calls = []

    def fake_gpu(duration):
        def deco(task):
            def wrapped(*args, **kwargs):
                calls.append(duration(*args, **kwargs))
                return task(*args, **kwargs)
            return wrapped
        return deco

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert gpu.has_gpu()
    wrapped = gpu.gpu_task(lambda prep, form, settings, *rest: "ran", duration=handlers._gpu_seconds)
    info = dataclasses.replace(handlers.models.resolve("", Settings(on_space=False)), params=8_000_000_000)
    prep = handlers.Prepared(info, forms.build_recipe(forms.Form(), None), tmp_path, None)
    assert wrapped(prep, forms.Form(measure_speed=True), Settings(), tmp_path, None, Redactor()) == "ran"
    assert calls == [gpu.job_seconds(8_000_000_000, True, False, 300)]
    assert pickle.loads(pickle.dumps(prep)).info.params == 8_000_000_000  # it crosses to the GPU process


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
