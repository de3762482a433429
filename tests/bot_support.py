"""Helpers shared by the bot's end-to-end tests (test_hub_bot.py, test_bot_*.py): a bot config for the local
Hub, pushing a folder, draining the job queue, posting webhooks, a clean environment for client subprocesses, and
hooks that run inside Ray tasks (module-level functions, so that Ray can pickle them)."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import HfApi

from conftest import hub_client_online, save_tiny, tiny_model
from hub_bot.config import BotConfig
from hub_bot.logs import JsonFormatter, RedactingFilter
from hub_bot.service import Bot

ROOT = Path(__file__).resolve().parent.parent
CHEAP = {"method": "maw", "target": {"ratio": 0.5}}  # the fastest recipe: no calibration data
FAST_EVAL = {"max_tokens": 200, "max_length": 64, "speed": {"prompt_tokens": 8, "new_tokens": 4, "repeats": 1}}


def client_fixture(token):
    """A module-scoped fixture: a Hub client of the module's `hub` fixture with `token` (False: anonymous)."""
    @pytest.fixture(scope="module")
    def client(hub):
        return HfApi(endpoint=hub.url, token=token)
    return client


def source_fixture(name: str, **kwargs):
    """A module-scoped fixture: a tiny source model folder (`tiny_source` arguments)."""
    @pytest.fixture(scope="module")
    def source(tmp_path_factory):
        return tiny_source(tmp_path_factory.mktemp(name), **kwargs)
    return source


def bot_config(tmp: Path, hub_url: str, watch: list, **changes) -> BotConfig:
    data = {"hub": {"endpoint": hub_url, "disable_xet": True}, "target_org": "pruners",
            "database": str(tmp / "bot.sqlite"), "limits": {"backoff_s": 0.2, "max_attempts": 3},
            "evaluation": FAST_EVAL, "polling": {"interval_s": 3600}, "watch": watch}
    data.update(changes)
    return BotConfig.from_dict(data)


def push(api: HfApi, repo: str, folder: Path, message: str = "Upload model", **kwargs) -> str:
    api.create_repo(repo, exist_ok=True)
    return api.upload_folder(repo_id=repo, folder_path=folder, commit_message=message, **kwargs).oid


def drain(bot: Bot, timeout: float = 120) -> None:
    """Run jobs until none is queued (waiting out retry backoffs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        bot.run_pending()
        if not bot.store.jobs("queued"):
            return
        time.sleep(0.05)
    raise AssertionError("jobs still queued")


def commits(api: HfApi, repo: str, revision: str = "main") -> list[str]:
    return [c.title for c in api.list_repo_commits(repo, revision=revision)]


def webhook_payload(repo: str, sha: str, ref: str = "refs/heads/main", scope: str = "repo.content") -> dict:
    return {"event": {"action": "update", "scope": scope},
            "repo": {"type": "model", "name": repo, "headSha": sha},
            "updatedRefs": [{"ref": ref, "oldSha": None, "newSha": sha}], "webhook": {"id": "x", "version": 3}}


def post_hook(bot: Bot, body, secret: str | None) -> httpx2.Response:
    headers = {"X-Webhook-Secret": secret} if secret is not None else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(f"{bot.url}/webhook", content=content, headers=headers, timeout=60)


def jobs_of(bot: Bot, *repos: str) -> list:
    return [j for j in bot.store.jobs() if j.source_repo in repos]


def subprocess_env(hub_url: str, home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub_url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(home),
               HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1", **extra)
    return env


@contextlib.contextmanager
def online_on_one_thread():
    """The in-process client online without Xet, and one torch thread (tiny models on a busy machine run faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with hub_client_online():
            yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def json_log_file(path: Path):
    """Every log record, while inside, as JSON lines in `path` (through the bot's redacting filter)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def tiny_source(folder: Path, seed: int = 0, title: str = "Tiny source") -> Path:
    """A tiny random Llama with the reference tokenizer and an apache-2.0 card, saved in `folder`."""
    save_tiny(tiny_model("llama", seed=seed), folder)
    (folder / "README.md").write_text(f"---\nlicense: apache-2.0\n---\n# {title}\n")
    return folder


# -------------------------------------------------------------------- hooks that run inside Ray tasks (picklable)
def pause_at(folder: Path, timeout: float = 600):
    """A hook that writes `folder/arrived-<job>-<pid>` and waits until `folder/release` (every job) or
    `folder/release-<attempt>` (the jobs on that attempt) exists: the test sees where the job is, and what runs at
    the same time, before it lets the job go on."""
    return functools.partial(_pause, str(folder), timeout)


def _pause(folder: str, timeout: float, job) -> None:
    path = Path(folder)
    (path / f"arrived-{job.id}-{os.getpid()}").write_text(str(job.attempts))
    deadline = time.monotonic() + timeout
    while not ((path / "release").exists() or (path / f"release-{job.attempts}").exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path / 'release'} never appeared")
        time.sleep(0.1)


def arrivals(folder: Path) -> list[tuple[int, int]]:
    """(job id, pid) of the jobs that reached a `pause_at` hook."""
    return sorted(tuple(int(x) for x in p.name.split("-")[1:]) for p in folder.glob("arrived-*"))


def kill_first_attempt(job) -> None:
    """A hook that SIGKILLs the process running the job's first attempt (e.g. right after its push)."""
    if job.attempts == 1:
        os.kill(os.getpid(), signal.SIGKILL)


def wait_until(predicate, timeout: float = 300, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
