"""The Ray executor's parts that need no running cluster (issue 16): the `executor:` setting, per-job resources
that follow the model (a 70B job asks for a bigger worker than a 1B job; one that fits no worker fails for good
with the reason), how task faults are classified, the token in transit, the status page's words, and the clear
error when the cluster's address does not answer. The cluster itself is exercised in test_bot_ray.py (slow)."""
from __future__ import annotations

import socket

import pytest

ray = pytest.importorskip("ray")

from transformers import LlamaConfig  # noqa: E402

from bot_support import CHEAP, bot_config, online_on_one_thread  # noqa: E402
from core import Recipe  # noqa: E402
from hub_bot.config import BotConfig, ConfigError, RaySettings  # noqa: E402
from hub_bot.errors import BotError, PermanentJobError  # noqa: E402
from hub_bot.ray_executor import classify_ray  # noqa: E402
from hub_bot.ray_task import Secret  # noqa: E402
from hub_bot.resources import GIB, build_memory, plan  # noqa: E402
from hub_bot.status import progress_text, where  # noqa: E402

BOT = "hf_BotRayUnitToken0123456789abcdefgh"
RECIPE = Recipe.from_dict({"method": "maw", "target": {"ratio": 0.2}})
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, dtype="bfloat16")
LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, dtype="bfloat16")
GPU_TYPES = {"L4": 24, "A100-80G": 80}


def config(executor, device: str = "cpu") -> BotConfig:
    return BotConfig.from_dict({"hub": {"endpoint": "http://127.0.0.1:9"}, "target_org": "pruners",
                                "database": "/tmp/never-opened.sqlite", "device": device, "executor": executor,
                                "polling": {"interval_s": 60},
                                "watch": [{"repo": "alice/m", "recipes": [CHEAP]}]})


# -------------------------------------------------------------------- the setting
def test_executor_is_local_by_default_and_ray_when_asked():
    assert config(None).ray is None and config("local").ray is None
    settings = config({"ray": {"address": "ray://head:10001", "num_cpus": 4, "num_gpus": 1, "memory_gb": 64,
                               "gpu_types": GPU_TYPES, "max_concurrent": 8}}, device="cuda").ray
    assert settings.address == "ray://head:10001" and settings.max_concurrent == 8
    assert (settings.num_cpus, settings.num_gpus, settings.memory_gb) == (4, 1, 64)
    assert settings.gpu_types == (("L4", 24.0), ("A100-80G", 80.0))  # smallest first: the first that fits wins
    assert config("ray").ray == RaySettings()


@pytest.mark.parametrize("executor, device, message", [
    ({"ray": {"address": "http://head"}}, "cpu", "address must be auto, local, HOST:PORT"),
    ({"ray": {"num_gpus": 2}}, "cuda", "num_gpus must be between 0 and 1"),
    ({"ray": {"num_gpus": 1}}, "cpu", "needs `device: cuda`"),
    ({"ray": {"num_gpus": 1}}, "cuda", "needs the workers' GPU memory"),
    ({"ray": {}}, "cuda", "needs executor.ray.num_gpus > 0"),
    ({"ray": {"max_concurent": 2}}, "cpu", "max_concurrent"),  # did you mean
    ({"ray": {"memory_gb": "lots"}}, "cpu", "memory_gb must be a number"),
    ({"kubernetes": {}}, "cpu", "executor must be `local`"),
])
def test_executor_setting_errors_say_what_to_do(executor, device, message):
    with pytest.raises(ConfigError, match=message):
        config(executor, device)


# -------------------------------------------------------------------- resources follow the model
def test_a_70b_job_asks_for_a_bigger_worker_than_a_1b_job_and_a_too_big_one_fails_for_good():
    settings = config({"ray": {"num_gpus": 1, "gpu_types": GPU_TYPES, "memory_gb": 512}}, device="cuda").ray
    small = build_memory(LlamaConfig(**LLAMA_1B), RECIPE, "cuda")
    big = build_memory(LlamaConfig(**LLAMA_70B), RECIPE, "cuda")
    assert 1.1e9 < small.params < 1.4e9 and 69e9 < big.params < 72e9  # counted like `inspect` counts them
    assert small.dtype == big.dtype == "bfloat16"  # the checkpoint's dtype on a GPU
    assert 2 * small.params < small.device_bytes < 24 * GIB < 140 * GIB < big.device_bytes
    first = plan(small, settings, nodes=None)
    assert (first.accelerator_type, first.num_gpus) == ("L4", 1)
    assert first.options()["accelerator_type"] == "L4" and first.memory >= 2 * small.params
    with pytest.raises(PermanentJobError, match=r"fits no worker: it needs 70\.\d+B parameters .*\(A100-80G, 80 GB"):
        plan(big, settings, nodes=None)
    medium = build_memory(LlamaConfig(**(LLAMA_1B | {"hidden_size": 5120, "intermediate_size": 13824,
                                                     "num_hidden_layers": 40, "num_attention_heads": 40,
                                                     "tie_word_embeddings": False})), RECIPE, "cuda")
    assert 24 * GIB < medium.device_bytes < 80 * GIB  # 13B in bfloat16
    assert plan(medium, settings, nodes=None).accelerator_type == "A100-80G"


def test_cpu_jobs_ask_for_ram_and_need_a_live_node_that_has_it():
    settings = config({"ray": {"num_cpus": 2, "memory_gb": 16}}).ray
    needs = build_memory(LlamaConfig(**LLAMA_1B), RECIPE, "cpu")
    assert needs.dtype == "float32" and needs.host_bytes == needs.device_bytes > 4 * needs.params
    small_node, big_node = {"CPU": 4, "memory": 4 * GIB}, {"CPU": 8, "memory": 32 * GIB}
    asked = plan(needs, settings, nodes=[small_node, big_node])
    assert asked.options() == {"num_cpus": 2, "num_gpus": 0, "memory": asked.memory}
    with pytest.raises(PermanentJobError, match="fits no worker of the Ray cluster.*largest node offers 4 CPU"):
        plan(needs, settings, nodes=[small_node])
    autoscaled = config({"ray": {"num_cpus": 2, "memory_gb": 16, "autoscaling": True}}).ray
    assert plan(needs, autoscaled, nodes=[small_node]).memory == asked.memory  # nodes come on demand
    with pytest.raises(PermanentJobError, match=r"more than the 2 GiB of RAM a job may get"):
        plan(needs, config({"ray": {"memory_gb": 2}}).ray, nodes=None)


# -------------------------------------------------------------------- faults
def test_task_faults_are_classified():
    exceptions = ray.exceptions
    crashed = classify_ray(exceptions.WorkerCrashedError())
    assert not crashed.permanent and "died" in crashed.reason
    oom = classify_ray(exceptions.OutOfMemoryError("Task was killed due to the node running low on memory."))
    assert not oom.permanent and "out of memory" in oom.reason
    inner = exceptions.RayTaskError("run_job", "Traceback ...", PermanentJobError("no weights"))
    assert classify_ray(inner).permanent and "no weights" in classify_ray(inner).reason
    assert classify_ray(exceptions.RuntimeEnvSetupError("pip failed")).permanent


def test_the_token_in_transit_never_prints():
    secret = Secret(BOT)
    assert BOT not in repr(secret) and BOT not in str(secret) and BOT not in f"{[secret]}"
    assert secret.reveal() == BOT


def test_status_words_for_where_and_how_far():
    assert where(None) == ""
    assert where({"executor": "ray", "node": None, "asked": {"num_cpus": 4, "num_gpus": 1}}) == \
        "waiting for a worker (4 CPU, 1 GPU)"
    assert where({"executor": "ray", "node": "10.0.0.7", "gpu": "0", "pid": 42}) == "ray 10.0.0.7 GPU 0 pid 42"
    assert progress_text({"stage": "prune", "done": 3, "total": 16}) == "prune 3/16"


# -------------------------------------------------------------------- start
def test_an_unreachable_cluster_is_a_clear_error_at_start(tmp_path):
    """A Ray address nobody answers: the bot refuses to start and says what to do; the lock is released."""
    from hub_bot.local_hub import start_local_hub
    from hub_bot.service import Bot

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = start_local_hub(tmp_path / "hub", {"tokens": {BOT: {"user": "pruning-bot", "role": "write"}}})
    try:
        with online_on_one_thread():
            cfg = bot_config(tmp_path, hub.url, [{"repo": "alice/m", "recipes": [CHEAP]}],
                             executor={"ray": {"address": f"127.0.0.1:{port}", "connect_timeout_s": 2}})
            for _ in range(2):  # the second start gets as far: the first released the database lock
                with pytest.raises(BotError, match=r"Cannot reach the Ray cluster at '127\.0\.0\.1:\d+'.*"
                                                   r"ray start --head.*executor: local"):
                    Bot(cfg, token=BOT).start()
    finally:
        hub.stop()
    assert not ray.is_initialized()


# -------------------------------------------------------------------- the job store's part
def test_store_claims_one_job_per_target_and_takes_reports_from_the_holder_only(tmp_path):
    import sqlite3

    from hub_bot.store import _COLUMNS, JobStore, NewJob

    def job(recipe: str, target: str) -> NewJob:
        return NewJob(source_repo="alice/llama", source_sha="a" * 40, recipe_hash=recipe, recipe_name=recipe,
                      recipe_yaml="method: maw\n", publish="pr", target_repo=target)

    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as conn:  # a database of schema 2 (before runner and progress)
        columns = "\n".join(ln for ln in _COLUMNS.splitlines() if not ln.strip().startswith(("runner", "progress")))
        conn.execute(f"CREATE TABLE jobs ({columns})")
        conn.execute("INSERT INTO jobs (source_repo, source_sha, recipe_hash, recipe_name, recipe_yaml, publish, "
                     "target_repo, source_private, state, lease_owner, lease_expires, created_target, "
                     "next_attempt_at, created_at, updated_at) VALUES ('carol/private', ?, 'r0', 'r0', 'm', 'repo', "
                     "'carol/private-r0', 1, 'failed', 'old-bot', 5.0, 1, 0, 0, 0)", ("c" * 40,))
        conn.execute("PRAGMA user_version = 2")
    store = JobStore(path)
    # schema 2 -> 3 adds columns and keeps what schema 2 already had (schema 1's rebuild would drop these)
    old = store.get(1)
    assert (old.source_private, old.created_target, old.lease_owner, old.lease_expires) == (True, True, "old-bot", 5.0)
    for recipe, target in (("r1", "alice/llama"), ("r2", "Alice/Llama"), ("r3", "pruners/other")):
        store.enqueue(job(recipe, target))
    first = store.claim("ray:a", 60, one_per_target=True)
    second = store.claim("ray:b", 60, one_per_target=True)
    assert (first.recipe_name, second.recipe_name) == ("r1", "r3")  # r2 waits: its target (any case) is busy
    assert store.claim("ray:c", 60, one_per_target=True) is None
    assert store.claim("local:x", 60).recipe_name == "r2"  # one job at a time needs no such rule
    assert store.report(first.id, "ray:a", runner={"node": "10.0.0.7"}, progress={"stage": "pruned"})
    assert not store.report(first.id, "ray:b", progress={"stage": "stale"})  # not the lease holder
    shown = store.get(first.id)
    assert (shown.runner, shown.progress) == ({"node": "10.0.0.7"}, {"stage": "pruned"})
    assert store.finish(first.id, "ray:a", "alice/llama", None, None, {})
    assert store.get(first.id).public()["progress"] is None and store.get(first.id).runner == {"node": "10.0.0.7"}
