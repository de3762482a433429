"""The Space in a real browser: the app runs in a subprocess (HF_ENDPOINT -> the local Hub, HF_TOKEN = a stored write
token, as in a local run) and headless Chromium drives it: errors shown as messages, a pruning run with its numbers
and chart, the zip download, a push, a refused push, and the pushed model loading by name.

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


@pytest.fixture(scope="module")
def page(app, base_repo):
    external: list[str] = []

    def route(r):  # the page must work offline: record and refuse anything that leaves this machine
        url = r.request.url
        if url.startswith((app.url, "data:", "blob:")):
            r.continue_()
        else:
            external.append(url)
            r.abort()

    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(STEP_MS)
        pg.route("**/*", route)
        app.wait_ready()
        pg.goto(app.url)
        pg.wait_for_selector("#run")
        pg.external = external
        yield pg
        browser.close()


def _fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} :is(input, textarea)").first.fill(value)


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def _run(page, pattern: str, click=lambda page: page.click("#run")) -> str:
    """Press Prune and wait for a new status matching `pattern` (the previous one may match too)."""
    previous = _text(page, "status")
    click(page)
    script = """([pat, prev]) => { const t = document.querySelector('#status')?.innerText || '';
                                  return t !== prev && new RegExp(pat).test(t) ? t : null; }"""
    return page.wait_for_function(script, arg=[pattern, previous], timeout=TIMEOUT_MS).json_value()


def test_errors_are_messages_and_the_app_keeps_serving(page):
    _fill(page, "model-id", "alice/no-such-model")
    page.click("#check-model")
    page.wait_for_selector("#model-info:has-text('Repository not found')")
    _fill(page, "model-id", "")
    _fill(page, "target-value", "1.5")
    message = _run(page, "^⚠")
    assert "must be in [0, 1)" in message
    assert "Traceback" not in page.inner_text("body")


def test_prune_download_and_push(page, app, hub, model_folder, tmp_path):
    import json

    from huggingface_hub import HfApi

    config = json.loads((model_folder / "config.json").read_text())
    _fill(page, "model-id", BASE_REPO)
    page.click("#check-model")
    page.wait_for_selector("#model-info:has-text('parameters')")
    assert f"{config['num_hidden_layers']} layers" in _text(page, "model-info")
    _fill(page, "target-value", "0.3")
    done = _run(page, "Done|^⚠", lambda pg: pg.locator("#run").dblclick())  # must not start two jobs
    assert done.startswith("✔ Done"), f"{done}\n{app.log_tail()}"

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
    # the chart: one row per layer, MLP widths cut by 30%
    assert page.locator("#chart tr[data-layer]").count() == config["num_hidden_layers"]
    width = config["intermediate_size"]
    assert f"{round(width * 0.7)} / {width}" in _text(page, "chart")
    assert page.locator("#gen-base textarea").input_value() is not None
    time.sleep(1.5)  # had the double click queued a second job, it would have started by now
    assert _text(page, "status").startswith("✔ Done")
    assert len(re.findall(r"job \d+ started", page.locator("#log textarea").input_value())) == 1

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
    shot = tmp_path / "space.png"
    page.screenshot(path=str(shot), full_page=True)
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

    # the pushed model loads by name, as a user would load it
    script = ("import core, json; m = core.load_pruned(%r, device='cpu'); "
              "print(json.dumps(m.config.intermediate_size))" % repo_id)
    out = subprocess.run([sys.executable, "-c", script], env=_client_env(hub.url, tmp_path / "hf-home"), cwd=ROOT,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(round(width * 0.7))


def test_page_stayed_offline_and_app_cleans_up(page, app):
    assert page.external == [], f"the page tried to reach {page.external}"
    page.close()
    assert app.stop() == 0, app.log_tail()
    assert not app.work.exists() or list(app.work.iterdir()) == [], list(app.work.rglob("*"))[:10]
    assert "Traceback" not in app.log_tail(100_000)
