"""`python -m hub_bot run` as a daemon: its loop, SIGTERM in the middle of a job and when idle, the database lock,
and its output (JSON log lines only), against the local Hub over real HTTP.

The local Hub delays the job's first request by a few seconds (a delay-only fault rule), so that SIGTERM lands
while the job is in flight. The bot must keep its database lock until its worker has stopped (here: gives the job
back at its next checkpoint), so that no second bot can take the same job meanwhile.
"""
from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import yaml  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402

from bot_support import CHEAP, ROOT, commits, push, subprocess_env, tiny_source  # noqa: E402
from conftest import hub_client_online  # noqa: E402
from hub_bot.local_hub import start_local_hub  # noqa: E402
from hub_bot.store import JobStore  # noqa: E402

ALICE = "hf_AliceDaemonToken0123456789abcdefg"
BOT = "hf_BotDaemonToken0123456789abcdefghi"
SOURCE = "alice/daemon-src"
DELAY_S = 8.0


@pytest.fixture(scope="module", autouse=True)
def client_online():
    with hub_client_online():
        yield


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = start_local_hub(tmp_path_factory.mktemp("hub"), {
        "users": {"pruning-bot": {"orgs": ["pruners"]}},
        "tokens": {ALICE: {"user": "alice", "role": "write"}, BOT: {"user": "pruning-bot", "role": "write"}}})
    yield server
    server.stop()


def write_config(tmp: Path, hub_url: str) -> Path:
    path = tmp / "bot.yaml"
    path.write_text(yaml.safe_dump({
        "hub": {"endpoint": hub_url, "disable_xet": True, "token_env": "DAEMON_BOT_TOKEN"}, "target_org": "pruners",
        "database": "bot.sqlite", "polling": {"interval_s": 3600}, "limits": {"lease_s": 60, "backoff_s": 1},
        "evaluation": {"max_tokens": 64, "max_length": 32, "speed": False}, "torch_threads": 1,
        "watch": [{"repo": SOURCE, "recipes": [CHEAP]}]}))
    return path


def start(config: Path, hub_url: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    out = config.parent / f"output-{time.monotonic_ns()}.log"
    with open(out, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "hub_bot", "run", "--config", str(config), *extra], cwd=ROOT,
                                env=subprocess_env(hub_url, config.parent / "home", DAEMON_BOT_TOKEN=BOT),
                                stdout=sink, stderr=subprocess.STDOUT)
    return proc, out


def lock_is_free(path: Path) -> bool:
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def wait_for(condition, proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.05)


def json_lines(out: Path) -> list[dict]:
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # raises on any line that is not one of the bot's JSON records


@pytest.mark.slow
def test_sigterm_mid_job_keeps_the_lock_until_the_job_is_given_back(hub, tmp_path):
    """Guarantee (shutdown): SIGTERM during a job does not release the database lock while the job runs; the job is
    given back (queued, attempt not counted, lease cleared) and the next run publishes it once. The daemon loop
    runs polled jobs, stops when idle on SIGTERM, and writes nothing but JSON log lines."""
    alice = HfApi(endpoint=hub.url, token=ALICE)
    sha = push(alice, SOURCE, tiny_source(tmp_path / "src"))
    config = write_config(tmp_path, hub.url)
    store, lock = JobStore(tmp_path / "bot.sqlite"), tmp_path / "bot.sqlite.lock"
    slow = hub.hub.faults.add(rf"^GET /api/models/{SOURCE}/revision/{sha}", None, count=1, delay_s=DELAY_S)

    daemon, out = start(config, hub.url)  # polls at start: one job, which the loop claims
    wait_for(lambda: slow.hits == 1, daemon, out)  # the job's first request is in flight (held DELAY_S)
    (job,) = store.jobs()
    assert job.state == "running" and job.lease_owner.startswith("local:")
    daemon.send_signal(signal.SIGTERM)
    samples = []  # (lock free?, job state) until the daemon exits
    while daemon.poll() is None:
        free = lock_is_free(lock)
        samples.append((free, store.get(job.id).state))
        time.sleep(0.05)
    assert daemon.wait() == 0, out.read_text()[-3000:]
    assert (True, "running") not in samples, "the lock was free while the job ran: a second bot could take it"
    assert (False, "running") in samples  # the job was still in flight after SIGTERM
    job = store.get(job.id)
    assert (job.state, job.attempts, job.lease_owner) == ("queued", 0, None) and "released unfinished" in job.error
    assert lock_is_free(lock)
    records = json_lines(out)
    assert any("stopping" in r["msg"] for r in records) and any(r["msg"] == "job given back unfinished: "
                                                                "the bot is stopping (after checked)"
                                                                for r in records)

    again, out2 = start(config, hub.url, "--once")  # picks the job up where it was left
    assert again.wait(timeout=300) == 0, out2.read_text()[-3000:]
    job = store.get(job.id)
    assert (job.state, job.attempts) == ("done", 1), job.error
    assert commits(HfApi(endpoint=hub.url, token=BOT), "pruners/daemon-src-maw-50pct") == [
        f"maw-50pct of {SOURCE}@{sha[:10]}", "initial commit"]
    json_lines(out2)

    idle, out3 = start(config, hub.url)  # nothing to do: SIGTERM ends its wait at once
    wait_for(lambda: '"msg": "bot started' in out3.read_text(), idle, out3)
    idle.send_signal(signal.SIGTERM)
    assert idle.wait(timeout=60) == 0, out3.read_text()[-3000:]
    assert json_lines(out3)[-1]["msg"] == "bot stopped" and lock_is_free(lock)
