"""The Space in a real browser: the app runs in a subprocess (HF_ENDPOINT -> the local Hub, HF_TOKEN = a stored write
token, as in a local run) and headless Chromium drives it: errors shown as messages, a pruning run with its numbers
and chart, the zip download, a push, a refused push, and the pushed model loading by name; a second user on a phone
who waits in line, a Cancel, a badly damaged model flagged; and the named API through `gradio_client`.

Needs Debian's `chromium` and the `playwright` package (no browser download: the system Chromium is used).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
if importlib.util.find_spec("gradio") is None:  # (not imported here: the app imports it in its own process)
    pytest.skip("gradio is not installed", allow_module_level=True)

from conftest import hub_client_online, save_tiny, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
WRITE, READ = "hf_alice_write", "hf_alice_read"
BASE_REPO = "alice/reference-llama"
TIMEOUT_MS = 120_000  # a pruning run on a busy machine
STEP_MS = 20_000  # anything else

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client_env(hub_url: str, home: Path) -> dict:
    """A clean environment for a Hub client subprocess: endpoint and Xet set before huggingface_hub is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "GRADIO_", "SPACE_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(home),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """The reference model when it is there (it is small), else a tiny Llama with the reference tokenizer."""
    ref = ROOT / "reference" / "model"
    if (ref / "config.json").is_file() and any(ref.glob("*.safetensors")):
        return ref
    return save_tiny(tiny_model("llama"), tmp_path_factory.mktemp("tiny-reference"))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from hub_bot.local_hub import start_local_hub

    server = start_local_hub(tmp_path_factory.mktemp("hub"), {"tokens": {
        WRITE: {"user": "alice", "role": "write"}, READ: {"user": "alice", "role": "read"}}})
    with hub_client_online():
        yield server
    server.stop()


class App:
    def __init__(self, hub_url: str, model: Path, work: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.work = work
        self.log_path = work.parent / "app.log"
        env = _client_env(hub_url, work.parent / "hf-home")
        # one thread: on a shared, busy CPU two OpenMP threads wait on each other and the speed numbers are noise
        env.update(HF_TOKEN=WRITE, OMP_NUM_THREADS="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_NAME="127.0.0.1",
                   GRADIO_SERVER_PORT=str(self.port), GRADIO_TEMP_DIR=str(work.parent / "gradio"),
                   SPACE_DEFAULT_MODEL=str(model), SPACE_WORK_DIR=str(work), SPACE_EVAL_TOKENS="1024",
                   SPACE_SPEED_PROMPT_TOKENS="32", SPACE_SPEED_NEW_TOKENS="8", SPACE_SPEED_REPEATS="2")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "space.app"], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 150) -> None:
        import urllib.request

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"the app exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"the app did not start within {timeout} s:\n{self.log_tail()}")

    def work_root(self) -> Path:
        """The app's folder of job folders (one `prune-space-*` folder under SPACE_WORK_DIR)."""
        roots = list(self.work.glob("prune-space-*"))
        assert len(roots) == 1, roots
        return roots[0]

    def log_tail(self, n: int = 4000) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the app closes Gradio and its exit hooks clean up
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def app(hub, model_folder, tmp_path_factory):
    """Started first (its imports take a while); `base_repo` uploads to the Hub meanwhile."""
    application = App(hub.url, model_folder, tmp_path_factory.mktemp("app") / "work")
    yield application
    application.stop()


@pytest.fixture(scope="module")
def base_repo(app, hub, model_folder):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=WRITE)
    api.create_repo(BASE_REPO)
    api.upload_folder(repo_id=BASE_REPO, folder_path=model_folder, allow_patterns=["*.json", "*.safetensors"])
    return api


def _browser_context(p, app, viewport: dict):
    """A Chromium page on the app that records and refuses anything leaving this machine (it must work offline)."""
    external: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith((app.url, "data:", "blob:")):
            r.continue_()
        else:
            external.append(url)
            r.abort()

    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(STEP_MS)
    pg.route("**/*", route)
    pg.external = external
    return browser, pg


@pytest.fixture(scope="module")
def playwright_session():
    with playwright.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def page(app, base_repo, playwright_session):
    browser, pg = _browser_context(playwright_session, app, {"width": 1400, "height": 1000})
    app.wait_ready()
    pg.goto(app.url)
    pg.wait_for_selector("#run")
    yield pg
    browser.close()


def _fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} :is(input, textarea)").first.fill(value)


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _choose(page, elem_id: str, label: str) -> None:
    """Pick `label` in a dropdown."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=label, exact=True).click()
    page.wait_for_function("([id, v]) => document.querySelector(`#${id} input`)?.value === v", arg=[elem_id, label])


def _set_checkbox(page, elem_id: str, value: bool) -> None:
    box = page.locator(f"#{elem_id} input[type=checkbox]")
    if box.is_checked() != value:
        box.click()


def _status_change(page, pattern: str, previous: str, timeout: int = TIMEOUT_MS) -> str:
    script = """([pat, prev]) => { const t = document.querySelector('#status')?.innerText || '';
                                  return t !== prev && new RegExp(pat).test(t) ? t : null; }"""
    return page.wait_for_function(script, arg=[pattern, previous], timeout=timeout).json_value()


def _run(page, pattern: str, click=lambda page: page.click("#run")) -> str:
    """Press Prune and wait for a new status matching `pattern` (the previous one may match too)."""
    previous = _text(page, "status")
    click(page)
    return _status_change(page, pattern, previous)


def _no_sideways_scroll(page) -> None:
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page scrolls sideways: {width[0]} px wide in a {width[1]} px window"


def _in_view(page, selector: str) -> None:
    """Wait until `selector`'s top is inside the window (the page scrolled to it)."""
    page.wait_for_function("(sel) => { const r = document.querySelector(sel)?.getBoundingClientRect();"
                           " return r && r.top >= -1 && r.top < window.innerHeight * 0.6; }", arg=selector)


def _job_ids(page) -> list[int]:
    return [int(n) for n in re.findall(r"job (\d+) started", page.locator("#log textarea").input_value())]


def _shot(page, name: str, tmp_path: Path) -> Path:
    """A full-page screenshot; copied to SPACE_SCREENSHOT_DIR when set (for review)."""
    shot = tmp_path / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    if os.environ.get("SPACE_SCREENSHOT_DIR"):
        Path(os.environ["SPACE_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(os.environ["SPACE_SCREENSHOT_DIR"]) / shot.name)
    return shot


def test_errors_are_messages_and_the_app_keeps_serving(page):
    _fill(page, "model-id", "alice/no-such-model")
    page.click("#check-model")
    page.wait_for_selector("#model-info:has-text('Repository not found')", timeout=TIMEOUT_MS)
    _fill(page, "model-id", "")
    _fill(page, "target-value", "1.5")
    message = _run(page, "^⚠")
    assert "must be between 0 and 1" in message
    # a share of 0 would change nothing: refused at once, no job started
    _fill(page, "target-value", "0")
    message = _run(page, "^⚠")
    assert "A share of 0 removes nothing" in message and _job_ids(page) == []
    # a broken options YAML: the whole message is shown, `<stream end>` included
    page.get_by_text("Method options and layers").click()
    _fill(page, "options", "unit: [\n")
    _fill(page, "target-value", "30%")
    message = _run(page, "^⚠")
    assert "not valid YAML (line 2, column 1" in message and "'<stream end>'" in message, message
    _fill(page, "options", "")
    page.get_by_text("Method options and layers").click()  # closed again
    assert page.locator("#run").is_enabled() and _text(page, "run") == "Prune"
    assert "Traceback" not in page.inner_text("body")


def test_prune_download_and_push(page, app, hub, model_folder, tmp_path):
    import json

    from huggingface_hub import HfApi

    config = json.loads((model_folder / "config.json").read_text())
    _fill(page, "model-id", BASE_REPO)
    page.click("#check-model")
    page.wait_for_selector("#model-info:has-text('parameters')", timeout=TIMEOUT_MS)
    assert f"{config['num_hidden_layers']} layers" in _text(page, "model-info")
    # readable names, the ids in small print
    assert page.locator("#method input").input_value() == "MLP neurons (width pruning)"
    assert "method mlp_width · score maw" in _text(page, "method-help")
    _fill(page, "target-value", "30%")
    _set_checkbox(page, "measure-speed", True)  # off by default on a CPU
    def start(pg):
        pg.locator("#run").dblclick()  # must not start two jobs
        pg.wait_for_selector("#stages li[data-state=active]", timeout=TIMEOUT_MS)
        pg.evaluate("window.scrollTo(0, 0)")  # the user scrolls up while it runs

    done = _run(page, "Done|^⚠", start)
    assert done.startswith("✔ Done"), f"{done}\n{app.log_tail()}"
    _in_view(page, "#status")  # at the end, the page scrolled to the results

    # the numbers: parameters and size, perplexity, speed, before and after
    page.wait_for_selector("#summary tr >> nth=2")  # components render a moment after the status
    page.wait_for_selector("#chart tr[data-layer]")
    rows = {r[0]: r[1:] for r in (tr.split("\t") for tr in page.locator("#summary tr").all_inner_texts())}
    before, after = (int(v.replace(",", "")) for v in rows["parameters"][:2])
    assert after < before
    ppl_before, ppl_after = (float(v) for v in rows["perplexity"][:2])
    assert ppl_before > 1 and ppl_after > 1
    assert rows["prefill latency (ms)"][2].split(" (")[0].endswith(("faster", "slower", "not measurable here"))
    assert rows["decode tokens/s (batch 1)"]
    # the stage list: every stage done, with its time
    stages = page.locator("#stages li")
    assert stages.count() == 8 and "Done · took" in _text(page, "stages")
    assert page.locator("#stages li[data-state=done]").count() == 8  # a Hub model: downloaded too
    assert page.locator("#stages li[data-stage=speed][data-state=done]").count() == 1
    assert page.locator("#run").is_enabled() and not page.locator("#cancel").is_visible()
    # the chart: one row per layer, MLP widths cut by 30%
    assert page.locator("#chart tr[data-layer]").count() == config["num_hidden_layers"]
    width = config["intermediate_size"]
    assert f"{round(width * 0.7)} / {width}" in _text(page, "chart")
    assert page.locator("#gen-base textarea").input_value() is not None
    time.sleep(1.5)  # had the double click queued a second job, it would have started by now
    assert _text(page, "status").startswith("✔ Done")
    assert len(_job_ids(page)) == 1

    with page.expect_download() as download:
        page.click("#download")
    zipped = tmp_path / "model.zip"
    download.value.save_as(zipped)
    with zipfile.ZipFile(zipped) as zf:
        assert any(n.endswith("/model.safetensors") for n in zf.namelist())

    repo_id = page.locator("#repo-id :is(input, textarea)").first.input_value()
    assert re.fullmatch(r"alice/reference-llama-mlp_width-\d+pct", repo_id), repo_id
    page.click("#push")
    page.wait_for_selector("#push-status:has-text('Pushed')")
    link = page.locator("#push-status a").get_attribute("href")
    assert link == f"{hub.url}/{repo_id}"
    page.evaluate("window.scrollTo(0, 0)")
    shot = _shot(page, "desktop-done", tmp_path)
    if os.environ.get("SPACE_SCREENSHOT"):  # refresh the committed screenshot only when asked to
        shutil.copyfile(shot, ROOT / "space" / "screenshot.png")

    # a refused push (someone else's namespace) is a message in the page and leaves no repo
    _fill(page, "repo-id", "bob/not-yours")
    page.click("#push")
    page.wait_for_selector("#push-status:has-text('⚠')")
    assert "Could not create bob/not-yours" in _text(page, "push-status")

    api = HfApi(endpoint=hub.url, token=WRITE)
    assert not list(api.list_models(author="bob"))
    info = api.model_info(repo_id)
    assert {"model.safetensors", "config.json", "pruning_recipe.yaml", "README.md"} <= {
        s.rfilename for s in info.siblings}
    card = info.card_data.to_dict()
    assert card["base_model"] == BASE_REPO and {"pruned", "mlp_width", "structured-pruning"} <= set(card["tags"])
    metric = card["model-index"][0]["results"][0]["metrics"][0]
    assert metric["type"] == "perplexity" and metric["value"] == pytest.approx(ppl_after, rel=1e-2)
    recipe = api.hf_hub_download(repo_id, "pruning_recipe.yaml")
    assert "/tmp/" not in Path(recipe).read_text() and str(app.work) not in Path(recipe).read_text()

    # the pushed model loads by name, as a user would load it
    script = ("import core, json; m = core.load_pruned(%r, device='cpu'); "
              "print(json.dumps(m.config.intermediate_size))" % repo_id)
    out = subprocess.run([sys.executable, "-c", script], env=_client_env(hub.url, tmp_path / "hf-home"), cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(round(width * 0.7))


@pytest.mark.slow  # ~50 s: two browsers, two jobs
def test_phone_user_waits_in_line_while_another_job_is_cancelled(page, app, playwright_session, tmp_path):
    """A long job runs (depth pruning with many Shapley samples, progress per sample); a second user on a phone
    presses Prune and sees their place in line; the first job is cancelled, its folder disappears, and the
    phone user's job (90% removed) runs and warns that the model is wrecked. No sideways scrolling on the phone."""
    browser, phone = _browser_context(playwright_session, app, {"width": 390, "height": 844})
    try:
        phone.goto(app.url)
        phone.wait_for_selector("#run")
        _no_sideways_scroll(phone)

        # user 1 (desktop): a slow job, reported sample by sample
        _fill(page, "model-id", "")
        _choose(page, "method", "Whole layers or sub-layers (depth pruning)")
        _choose(page, "score", "Shapley value (Monte Carlo) · uses data")
        page.get_by_text("Method options and layers").click()
        _fill(page, "options", "samples: 2000\n")
        _fill(page, "target-value", "20%")
        _set_checkbox(page, "measure-speed", False)
        page.click("#run")
        page.wait_for_selector("#stages li[data-stage=prune][data-state=active]", timeout=TIMEOUT_MS)
        assert page.locator("#run").is_disabled() and _text(page, "run") == "Running…"
        assert page.locator("#cancel").is_visible()
        first_job = _job_ids(page)[-1]
        assert (app.work_root() / f"job-{first_job}").is_dir(), (
            f"{_text(page, 'status')}\n{page.locator('#log textarea').input_value()}\n{app.log_tail()}")

        # user 2 (phone): waits in line, sees the position and the expected wait
        _fill(phone, "target-value", "90%")
        phone.click("#run")
        phone.wait_for_selector("#queue-info")
        text = _text(phone, "queue-info")
        assert "Waiting in line: you are number 2. 1 job is ahead of you" in text and "Expected wait:" in text
        assert phone.locator("#run").is_disabled() and _text(phone, "run") == "Waiting in line…"
        _no_sideways_scroll(phone)
        _shot(phone, "phone-waiting", tmp_path)
        phone.evaluate("window.scrollTo(0, 0)")

        # user 1 cancels: the job stops and its folder is gone
        previous = _text(page, "status")
        page.click("#cancel")
        status = _status_change(page, "Cancelled", previous, timeout=60_000)
        assert status == "⏹ Cancelled: the job stopped and its files were deleted."
        assert not (app.work_root() / f"job-{first_job}").exists()
        assert page.locator("#stages .head").inner_text().startswith("Cancelled")
        assert page.locator("#run").is_enabled() and not page.locator("#cancel").is_visible()

        # user 2's job runs next: a wrecked model gets a loud warning, and the phone layout holds
        done = _status_change(phone, "Done|^⚠", "", timeout=TIMEOUT_MS)
        assert done.startswith("⚠ Done, but see the warning"), f"{done}\n{app.log_tail()}"
        assert "badly damaged" in _text(phone, "damage")
        phone.wait_for_selector("#chart tr[data-layer]")
        _in_view(phone, "#status")
        _no_sideways_scroll(phone)
        _shot(phone, "phone-done", tmp_path)
        assert phone.external == [], f"the page tried to reach {phone.external}"
    finally:
        browser.close()
    _fill(page, "options", "")


def test_named_api_prune_and_push(app, hub, base_repo):
    """`gradio_client` with named arguments: the two public endpoints, percentages, the zip, a push."""
    from gradio_client import Client
    from huggingface_hub import HfApi

    app.wait_ready()
    client = Client(app.url, verbose=False)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) == {"/prune", "/push"}
    assert {p["parameter_name"] for p in endpoints["/prune"]["parameters"]} >= {"model", "method", "ratio", "score"}
    assert all(p["parameter_has_default"] for p in endpoints["/prune"]["parameters"])
    summary, zipped = client.predict(model=BASE_REPO, method="attention_heads", ratio="50%", prompt="",
                                     api_name="/prune")
    assert summary["method"] == "attention_heads" and summary["base_model"] == BASE_REPO
    assert summary["params_after"] < summary["params_before"] and summary["speed"]["base"] is None
    with zipfile.ZipFile(zipped) as zf:
        assert any(n.endswith("/model.safetensors") for n in zf.namelist())
    with pytest.raises(Exception, match="A share of 0 removes nothing"):
        client.predict(ratio="0", api_name="/prune")
    url = client.predict(job_id=summary["job_id"], repo_id="alice/pruned-by-api", api_name="/push")
    assert url.rstrip("/").endswith("alice/pruned-by-api")
    assert "config.json" in {s.rfilename for s in HfApi(endpoint=hub.url, token=WRITE).model_info(
        "alice/pruned-by-api").siblings}


def test_page_stayed_offline_and_app_cleans_up(page, app):
    assert page.external == [], f"the page tried to reach {page.external}"
    page.close()
    assert app.stop() == 0, app.log_tail()
    assert not app.work.exists() or list(app.work.iterdir()) == [], list(app.work.rglob("*"))[:10]
    assert "Traceback" not in app.log_tail(100_000), app.log_tail(100_000)[-6000:]
