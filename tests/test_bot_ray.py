"""The bot on Ray (issue 16), end to end over real HTTP against the local Hub, on a real local Ray instance.

The module starts one small Ray instance (2 CPUs, no dashboard) in this process; every bot here is a head that
connects to it (`executor: {ray: {address: auto}}` finds the connection this process has; the restarted head runs
in a subprocess and connects by the instance's address). Each test owns its sources. Hooks that run inside Ray
tasks come from bot_support (module-level, so Ray can pickle them); they pause a task at a stage until the test
lets it go on, or SIGKILL its worker process.

The guarantees are those of the local worker: no job is lost, run twice at the same time or published twice,
and a variant is never more visible than its source.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("fastapi")

import httpx2  # noqa: E402
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import RepositoryNotFoundError  # noqa: E402

from bot_support import (CHEAP, ROOT, arrivals, bot_config, client_fixture, commits, drain, jobs_of,  # noqa: E402
                         kill_first_attempt, online_on_one_thread, pause_at, push, source_fixture, subprocess_env,
                         wait_until)
from hub_bot.local_hub import start_local_hub  # noqa: E402
from hub_bot.service import Bot  # noqa: E402
from hub_bot.store import RAY_OWNER  # noqa: E402

ALICE = "hf_AliceRayToken0123456789abcdefghij"
BOB = "hf_BobRayToken0123456789abcdefghijkl"
BOT = "hf_BotRayToken0123456789abcdefghijkl"
SECRET = "whsec-ray-0123456789"
STATUS_TOKEN = "status-operator-ray-0123456789"
OPERATOR = {"authorization": f"Bearer {STATUS_TOKEN}"}
EVAL = {"max_tokens": 64, "max_length": 32, "speed": False}
LIMITS = {"backoff_s": 0.5, "max_attempts": 3, "retry_after_max_s": 1.0, "inline_wait_max_s": 0.5, "lease_s": 60}
QUARTER = {"method": "maw", "target": {"ratio": 0.25}}
RAY = {"ray": {"address": "auto", "num_cpus": 1, "max_concurrent": 2}}

pytestmark = pytest.mark.slow  # a Ray instance and several jobs in worker processes: minutes on 2 cores


def variant(source: str, recipe: str = "maw-50pct") -> str:
    return f"pruners/{source.split('/')[1]}-{recipe}"


@pytest.fixture(scope="module", autouse=True)
def client_online():
    with online_on_one_thread():
        yield


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 worker CPUs; yields its address (HOST:PORT of its GCS). Its worker processes
    inherit this environment: PYTHONPATH lets them import bot_support's hooks and the project."""
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), str(ROOT), path) if p)
    # Ray's memory monitor kills tasks when the *machine* is nearly full; on a shared test machine that is other
    # people's memory, and the tests would fail for it (the bot's handling of it: test_bot_ray_units.py)
    own_monitor_setting = "RAY_memory_monitor_refresh_ms" not in os.environ
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, namespace="hub_bot",
             object_store_memory=100 * 2**20)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if own_monitor_setting:
            os.environ.pop("RAY_memory_monitor_refresh_ms", None)
        if path is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    server = start_local_hub(tmp_path_factory.mktemp("hub"), {
        "users": {"pruning-bot": {"orgs": ["pruners", "acme"]}, "alice": {"orgs": ["acme"]}},
        "tokens": {ALICE: {"user": "alice", "role": "write"}, BOB: {"user": "bob", "role": "write"},
                   BOT: {"user": "pruning-bot", "role": "write"}}})
    yield server
    server.stop()


alice = client_fixture(ALICE)
bot_api = client_fixture(BOT)
source_dir = source_fixture("src")


def ray_bot(tmp: Path, hub_url: str, watch: list, hooks=None, **changes) -> Bot:
    # triggers: a webhook endpoint (no polling thread: the tests poll themselves, once)
    changes = {"limits": LIMITS, "evaluation": EVAL, "polling": None, "server": {"port": 0}, "webhook": {},
               "executor": RAY} | changes
    return Bot(bot_config(tmp, hub_url, watch, **changes), token=BOT, webhook_secret=SECRET,
               status_token=STATUS_TOKEN, hooks=hooks).start()


def in_background(fn, *args) -> threading.Thread:
    errors = []

    def run():
        try:
            fn(*args)
        except BaseException as err:  # re-raised by the test through `errors`
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def finish(thread: threading.Thread, timeout: float = 300) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), "the bot did not finish its jobs"
    if thread.errors:
        raise thread.errors[0]


def done_once_on_retry(bot: Bot, bot_api: HfApi, repo: str, sha: str, results: dict | None = None):
    """The job of `repo` ended done on its second attempt, and its variant holds one commit from the bot."""
    (job,) = jobs_of(bot, repo)
    assert (job.state, job.attempts) == ("done", 2), job.error
    assert results is None or job.results == results
    assert commits(bot_api, variant(repo)) == [f"maw-50pct of {repo}@{sha[:10]}", "initial commit"]
    return job


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -------------------------------------------------------------------- concurrency, status, duplicates
def test_jobs_run_concurrently_on_ray_workers_and_each_variant_is_published_once(cluster, hub, alice, bot_api,
                                                                                   source_dir, tmp_path):
    """Four jobs (two sources x two recipes) on two Ray workers: two run at the same time in two worker processes,
    the status page says where each runs and how far it is, a duplicate event plans nothing, and every variant
    gets exactly one commit; a private source's variant is private."""
    sources = ["alice/ray-one", "acme/ray-two"]  # the second is private to the members of acme
    alice.create_repo(sources[1], private=True)
    shas = [push(alice, repo, source_dir) for repo in sources]
    gate = tmp_path / "gate"
    gate.mkdir()
    bot = ray_bot(tmp_path / "bot", hub.url, [{"repo": repo, "recipes": [CHEAP, QUARTER]} for repo in sources],
                  hooks={"downloaded": pause_at(gate)})
    try:
        assert bot.poller.poll_once() == 4
        assert bot.poller.poll_once() == 0  # the same heads again (a duplicate delivery): nothing new
        runner = in_background(bot.run_pending)
        two = wait_until(lambda: len(arrivals(gate)) >= 2 and arrivals(gate), what="two jobs in Ray tasks")
        assert len({pid for _, pid in two}) == 2, two  # two worker processes at the same time
        running = {j.id: j for j in bot.store.jobs("running")}
        assert set(running) == {job for job, _ in two}
        assert len({j.target_repo for j in running.values()}) == 2  # never two jobs into one repo

        def located():
            doc = httpx2.get(f"{bot.url}/status", headers=OPERATOR, timeout=30).json()
            shown = {j["id"]: j for j in doc["jobs"] if j["state"] == "running"}
            ok = all((shown[job].get("runner") or {}).get("pid") == pid
                     and (shown[job].get("progress") or {}).get("stage") == "downloaded" for job, pid in two)
            return ok and shown
        shown = wait_until(located, timeout=60, what="the status page to show where the jobs run")
        for job, pid in two:
            assert shown[job]["runner"]["executor"] == "ray" and shown[job]["runner"]["node"]
            assert shown[job]["runner"]["asked"]["num_cpus"] == 1
        page = httpx2.get(f"{bot.url}/", headers=OPERATOR, timeout=30).text
        assert f"pid {two[0][1]}" in page and "downloaded" in page
        (gate / "release").touch()
        finish(runner)
        drain(bot)
    finally:
        bot.stop()
    jobs = jobs_of(bot, *sources)
    assert sorted(j.state for j in jobs) == ["done"] * 4, [j.error for j in jobs]
    for sha, repo in zip(shas, sources):
        for recipe in ("maw-50pct", "maw-25pct"):
            assert commits(bot_api, variant(repo, recipe)) == [f"{recipe} of {repo}@{sha[:10]}", "initial commit"]
    assert bot_api.model_info(variant(sources[1])).private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=BOB).model_info(variant(sources[1]))
    assert all(j.runner["executor"] == "ray" and j.runner["pid"] for j in jobs)


def test_jobs_into_one_pull_request_never_run_at_the_same_time(cluster, hub, alice, source_dir, tmp_path):
    """PR mode: two recipes of one source go to one pull request on the source; with a free worker, the second
    job still waits for the first (no two pushes race into one PR), and both end in the one PR."""
    repo = "alice/ray-pr"
    sha = push(alice, repo, source_dir)
    gate = tmp_path / "gate"
    gate.mkdir()
    bot = ray_bot(tmp_path / "bot", hub.url, [{"repo": repo, "publish": "pr", "recipes": [CHEAP, QUARTER]}],
                  hooks={"downloaded": pause_at(gate)})
    try:
        assert bot.poller.poll_once() == 2
        runner = in_background(bot.run_pending)
        ((first, _),) = wait_until(lambda: arrivals(gate), what="the first job in its Ray task")
        # the head claims every due job it has room for before any task gets this far: the other one waits
        assert [(j.id, j.state) for j in bot.store.jobs("running")] == [(first, "running")]
        assert len(bot.store.jobs("queued")) == 1
        (gate / "release").touch()
        finish(runner)
        drain(bot)
    finally:
        bot.stop()
    jobs = jobs_of(bot, repo)
    assert [j.state for j in jobs] == ["done", "done"], [j.error for j in jobs]
    prs = list(alice.get_repo_discussions(repo, discussion_type="pull_request"))
    assert [(p.num, p.author, p.status) for p in prs] == [(1, "pruning-bot", "open")]
    assert {j.output_url for j in jobs} == {f"{hub.url}/{repo}/discussions/1"}
    files = alice.list_repo_files(repo, revision="refs/pr/1")
    assert {"pruned/maw-50pct/config.json", "pruned/maw-25pct/config.json"} <= set(files), files
    assert len(commits(alice, repo, "refs/pr/1")) == len(commits(alice, repo, sha)) + 2


# -------------------------------------------------------------------- faults
def test_a_worker_killed_after_its_push_leaves_the_job_done_once(cluster, hub, alice, bot_api, source_dir, tmp_path):
    """The Ray worker process dies (SIGKILL) right after the push: the head records a transient failure, the
    retry finds the variant already published, and the job ends done with one commit."""
    repo = "alice/ray-killed"
    sha = push(alice, repo, source_dir)
    bot = ray_bot(tmp_path, hub.url, [{"repo": repo, "recipes": [CHEAP]}], hooks={"published": kill_first_attempt})
    try:
        bot.poller.poll_once()
        drain(bot, timeout=300)
    finally:
        bot.stop()
    done_once_on_retry(bot, bot_api, repo, sha, results={"note": "already published"})


def test_a_task_whose_lease_was_taken_back_never_pushes(cluster, hub, alice, bot_api, source_dir, tmp_path):
    """The job is taken back from a running task (as a new head does with a dead head's leases) and run again:
    two tasks of one job exist at the same time; the stale one, let go first, stops at the check right before
    its push (no repo, no commit); then the new one publishes, once."""
    repo = "alice/ray-stale"
    sha = push(alice, repo, source_dir)
    gate = tmp_path / "gate"
    gate.mkdir()
    bot = ray_bot(tmp_path / "bot", hub.url, [{"repo": repo, "recipes": [CHEAP]}], hooks={"saved": pause_at(gate)})
    try:
        bot.poller.poll_once()
        runner = in_background(bot.run_pending)
        ((job_id, first_pid),) = wait_until(lambda: arrivals(gate), what="the first task to reach 'saved'")
        assert bot.store.recover(LIMITS["max_attempts"], dead_owner_prefix=RAY_OWNER) == [job_id]
        both = wait_until(lambda: len(arrivals(gate)) == 2 and arrivals(gate), what="a second task of the job")
        assert len({pid for _, pid in both}) == 2  # the stale task still holds its worker process
        (gate / "release-1").touch()  # the stale task goes on first: it must not create the repo nor push
        wait_until(lambda: bot.executor.in_flight == 1, what="the stale task's outcome")
        with pytest.raises(RepositoryNotFoundError):
            bot_api.model_info(variant(repo))
        (gate / "release-2").touch()
        finish(runner)
        drain(bot)
    finally:
        bot.stop()
    job = done_once_on_retry(bot, bot_api, repo, sha)
    assert job.results.get("params_after")  # the second task built and pushed it


HEAD = """
import json, sys
sys.path[:0] = [{tests!r}, {root!r}]
from pathlib import Path
from bot_support import bot_config, pause_at
from hub_bot.logs import setup_logging
from hub_bot.service import Bot
setup_logging("INFO", "json")
args = json.loads({args!r})
cfg = bot_config(Path(args["tmp"]), args["hub"], args["watch"], **args["changes"])
bot = Bot(cfg, token=args["token"], webhook_secret="s", hooks={{"published": pause_at(Path(args["gate"]))}}).start()
bot.poller.poll_once()
bot.run_pending()
"""


def test_a_restarted_head_runs_the_dead_heads_jobs_again_and_publishes_nothing_twice(cluster, hub, alice, bot_api,
                                                                                       source_dir, tmp_path):
    """The head (a process of its own, connected to the cluster) is killed while its Ray task has pushed and not
    yet reported: Ray ends the task with its head; the next head takes the job back at once, finds the variant
    already published and records the job done; the variant keeps one commit."""
    repo = "alice/ray-head"
    sha = push(alice, repo, source_dir)
    gate = tmp_path / "gate"
    gate.mkdir()
    watch = [{"repo": repo, "recipes": [CHEAP]}]
    changes = {"limits": LIMITS, "evaluation": EVAL, "polling": None, "server": {"port": 0}, "webhook": {},
               "executor": {"ray": {"address": cluster, "num_cpus": 1, "max_concurrent": 2}}}
    args = json.dumps({"tmp": str(tmp_path / "bot"), "hub": hub.url, "watch": watch, "changes": changes,
                       "token": BOT, "gate": str(gate)})
    script = HEAD.format(tests=str(ROOT / "tests"), root=str(ROOT), args=args)
    with open(tmp_path / "head.log", "wb") as log:
        head = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                env=subprocess_env(hub.url, tmp_path / "hf-home"), cwd=ROOT)
    try:
        wait_until(lambda: arrivals(gate) or head.poll() is not None, timeout=300, what="the task to push")
        assert head.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
        ((job_id, task_pid),) = arrivals(gate)
        assert commits(bot_api, variant(repo)) == [f"maw-50pct of {repo}@{sha[:10]}", "initial commit"]
        head.send_signal(signal.SIGKILL)
        head.wait(30)
    finally:
        if head.poll() is None:
            head.kill()
            head.wait(30)
    wait_until(lambda: not pid_alive(task_pid), timeout=120, what="Ray to end the dead head's task")
    bot = ray_bot(tmp_path / "bot", hub.url, watch)  # same database: the dead head's lease is taken back at once
    try:
        (job,) = jobs_of(bot, repo)
        assert (job.id, job.state) == (job_id, "queued")
        drain(bot, timeout=300)
    finally:
        bot.stop()
    done_once_on_retry(bot, bot_api, repo, sha, results={"note": "already published"})
