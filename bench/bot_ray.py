"""The bot's Ray executor against its local executor: the same six jobs on the reference model, in one run.

A local Hub (in a temp folder) serves the reference model as `bench/reference-llama`; the bot watches it with six
recipes (maw, ratios 0.1 ... 0.6: six variant repos). Phases, each a fresh bot on its own database and target
organisation, all against the same source commit:

    local     executor: local (jobs one at a time in the bot process)
    local-warm  the same again in this process (the imports and first-use costs paid already)
    ray       executor: {ray: {address: auto, num_cpus: 1, max_concurrent: 2}} on a local Ray instance of 2 CPUs
              that this script starts once (timed apart): its worker processes start cold (import torch & co.)
    ray-warm  the same on the same Ray instance: its worker processes have run jobs already (a running bot's case)
    ray+kill  the same, and the Ray worker process running the 10% job is SIGKILLed after its pruning
              (first attempt only): that job must still end done, exactly once

Each phase first pushes a new commit to the source (a card edit), so that every phase prunes a commit of its own
and measures its base model anew (a worker process measures it once per commit, as the bot does).
Timed per phase: the drain (from the first `run_pending` to the last job recorded), the bot's start apart.
Counted per phase: jobs done, bot commits per variant repo (publishes) and duplicates (a variant with more than
one bot commit). The ratios are of drain times of this one run: ray-warm/local-warm is the steady state of a
running bot, ray/local the first jobs after a start.

    python bench/bot_ray.py                    # writes bench/results/bot_ray_cpu.{json,md}
    python bench/bot_ray.py --phases local,ray
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
RESULTS = BENCH / "results"
SOURCE = "bench/reference-llama"
RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)

logger = logging.getLogger("bot_ray")


def kill_after_pruning(job) -> None:
    """A hook that runs inside the Ray task (pickled by value from this script): the first attempt of the first
    job dies with its worker process after pruning."""
    if job.attempts == 1 and job.recipe_name.endswith("-10pct"):
        os.kill(os.getpid(), signal.SIGKILL)


def _config(work: Path, hub_url: str, org: str, executor):
    from hub_bot.config import BotConfig

    return BotConfig.from_dict({
        "hub": {"endpoint": hub_url, "disable_xet": True}, "target_org": org, "database": str(work / f"{org}.sqlite"),
        "limits": {"backoff_s": 0.5, "max_attempts": 3}, "polling": {"interval_s": 3600}, "torch_threads": 1,
        "evaluation": {"text": str(ROOT / "reference" / "corpus" / "eval.txt"), "max_tokens": 512, "speed": False},
        "executor": executor,
        "watch": [{"repo": SOURCE, "recipes": [{"method": "maw", "target": {"ratio": r}} for r in RATIOS]}]})


def run_phase(name: str, work: Path, hub_url: str, token: str, user) -> dict:
    from hub_bot.service import Bot

    org = f"pruners-{name.replace('+', '-')}"
    executor = "local" if name.startswith("local") else {"ray": {"address": "auto", "num_cpus": 1, "max_concurrent": 2}}
    hooks = {"pruned": kill_after_pruning} if name == "ray+kill" else None
    user.upload_file(path_or_fileobj=f"# reference model, {name} phase\n".encode(), path_in_repo="README.md",
                     repo_id=SOURCE, commit_message=f"Card for the {name} phase")
    started = time.monotonic()
    bot = Bot(_config(work, hub_url, org, executor), token=token, hooks=hooks).start()
    start_s = time.monotonic() - started
    try:
        time.sleep(1)  # the polling thread plans the six jobs at start
        bot.poller.poll_once()
        started = time.monotonic()
        while bot.store.jobs("queued") or bot.store.jobs("running"):
            bot.run_pending()
            time.sleep(0.05)
        drain_s = time.monotonic() - started
        jobs = bot.store.jobs()
    finally:
        bot.stop()
    commits = {j.target_repo: sum(c.title.startswith(f"{j.recipe_name} of ") for c in user.list_repo_commits(
        j.target_repo)) for j in jobs if j.state == "done"}
    places = sorted({f"{(j.runner or {}).get('host') or (j.runner or {}).get('node')}:{(j.runner or {}).get('pid')}"
                     for j in jobs})
    return {"phase": name, "start_s": round(start_s, 2), "drain_s": round(drain_s, 2), "jobs": len(jobs),
            "done": sum(j.state == "done" for j in jobs), "publishes": sum(commits.values()),
            "duplicates": sum(max(0, n - 1) for n in commits.values()), "attempts": sorted(j.attempts for j in jobs),
            "processes": places}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="local,ray,local-warm,ray-warm,ray+kill")
    parser.add_argument("--out", default=str(RESULTS / "bot_ray_cpu"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="bot-ray-bench-"))
    os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_HOME=str(work / "hf-home"),
                      HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    from huggingface_hub import HfApi

    from hub_bot.local_hub import start_local_hub

    user_token, bot_token = (f"hf_{secrets.token_hex(17)}" for _ in range(2))
    phases = args.phases.split(",")
    hub = start_local_hub(work / "hub", {
        "users": {"pruning-bot": {"orgs": [f"pruners-{p.replace('+', '-')}" for p in phases]}},
        "tokens": {user_token: {"user": "bench", "role": "write"},
                   bot_token: {"user": "pruning-bot", "role": "write"}}})
    try:
        user = HfApi(endpoint=hub.url, token=user_token)
        user.create_repo(SOURCE)
        user.upload_folder(repo_id=SOURCE, folder_path=ROOT / "reference" / "model",
                           allow_patterns=["*.json", "*.safetensors", "*.md", "*.txt", "tokenizer.model"])
        rows, ray_start_s = [], None
        if any(p.startswith("ray") for p in phases):
            import ray

            started = time.monotonic()
            ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False, namespace="hub_bot")
            ray_start_s = round(time.monotonic() - started, 2)
        for name in phases:
            rows.append(run_phase(name, work, hub.url, bot_token, user))
            logger.warning("%s", rows[-1])
    finally:
        hub.stop()
        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        shutil.rmtree(work, ignore_errors=True)
    by = {r["phase"]: r for r in rows}
    ratios = {f"{p}/{q}": round(by[p]["drain_s"] / by[q]["drain_s"], 3)
              for p, q in (("ray-warm", "local-warm"), ("ray", "local")) if {p, q} <= set(by)}
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "note": "shared machine: up to 8 sessions on 2 cores; load average (1 min) at the end "
                               f"{os.getloadavg()[0]:.1f}"},
           "command": "python bench/bot_ray.py " + shlex.join(argv or sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "jobs": f"{len(RATIOS)} maw recipes on the reference model", "ray_start_s": ray_start_s,
           "phases": rows, "drain_ratios": ratios}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Bot: Ray executor vs local executor ({doc['jobs']})", "",
             f"Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs ({doc['machine']['note']}).",
             f"Command: `{doc['command']}` ({doc['date']}).", "",
             "| phase | bot start (s) | drain (s) | done | publishes | duplicates | attempts | worker processes |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['start_s']} | {r['drain_s']} | {r['done']}/{r['jobs']} | {r['publishes']} | "
              f"{r['duplicates']} | {r['attempts']} | {len(r['processes'])} |" for r in rows]
    lines += ["", f"Ray instance start (2 CPUs, once): {ray_start_s} s. Drain time ratios (same run): "
              + ", ".join(f"{k} **{v}**" for k, v in ratios.items()) + "."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
