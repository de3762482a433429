"""`python -m hub_bot demo`: the whole loop offline on CPU, in a couple of minutes.

Starts the local Hub on free ports in a temp folder, creates a user (`demo-user`), the bot's account (member of
`pruners`) and their tokens, uploads the reference model as `demo-user/reference-llama`, starts the bot with two
recipes (maw_range 30%, slimllm 20% with a small calibration set), registers a webhook to the bot, pushes a new
commit to the source, waits for the variants, then loads each one by name through the Hub with
`core.load_pruned` (and plain `from_pretrained` for uniform ones) and prints a short table.

With `--executor ray` the bot is the head of a local Ray instance of two worker processes (`executor: {ray:
{address: local}}`): a second source (`demo-user/reference-llama-copy`) gets a new commit too, the four jobs run
as Ray tasks two at a time, and the demo checks that every variant got exactly one commit from the bot.
"""
from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import socket
import string
import tempfile
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "reference" / "model"
EVAL_TEXT = ROOT / "reference" / "corpus" / "eval.txt"
USER, BOT_USER, ORG, SOURCE = "demo-user", "pruning-bot", "pruners", "demo-user/reference-llama"
_STATE: dict = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))


def prepare_environment(workdir: str | None) -> None:
    """Pick the Hub's ports and point every Hub client of this process at it (before huggingface_hub is
    imported): endpoint, no Xet, online, a private HF_HOME (no cached token, nothing from the real Hub)."""
    if workdir:
        work = Path(workdir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="hub-bot-demo-"))
        atexit.register(shutil.rmtree, work, True)
    port, storage_port = _free_port(), _free_port()
    _STATE.update(work=work, keep=bool(workdir), port=port, storage_port=storage_port, user_token=_token(),
                  bot_token=_token(), secret=secrets.token_urlsafe(24))
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        os.environ.pop(key, None)
    os.environ.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
                      HF_HOME=str(work / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      TOKENIZERS_PARALLELISM="false", DEMO_BOT_TOKEN=_STATE["bot_token"],
                      DEMO_WEBHOOK_SECRET=_STATE["secret"])


def _source_folder(source: str | None) -> Path:
    if source:
        folder = Path(source)
        if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
            raise SystemExit(f"--source {folder} needs config.json and *.safetensors weights.")
        return folder
    if (REFERENCE / "config.json").is_file() and any(REFERENCE.glob("*.safetensors")):
        return REFERENCE
    logger.warning("the reference model is not there yet (%s has no weights): seeding a tiny random Llama with the "
                   "reference tokenizer instead (pass --source DIR for another model)", REFERENCE)
    return _tiny_model(_STATE["work"] / "tiny-source")


def _tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _edited_card(folder: Path) -> bytes:
    """The source's card with one more line (the demo's 'new commit'); a minimal card when it has none."""
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else "---\nlicense: apache-2.0\n---\n# Tiny Llama\n"
    return (text.rstrip() + "\n\nServed by the local Hub of `python -m hub_bot demo`.\n").encode()


def _bot_config(work: Path, hub_url: str, sources: list[str], executor: str = "local") -> Path:
    path = work / "bot.yaml"
    ray = "executor: {ray: {address: local, num_cpus: 1, max_concurrent: 2}}\n" if executor == "ray" else ""
    watch = "".join(f"""  - repo: {source}
    publish: repo
    recipes:
      - {{method: maw_range, target: {{ratio: 0.3}}}}
      - {{method: slimllm, target: {{ratio: 0.2}}, calibration: {{n_samples: 8, seq_len: 64}}}}
""" for source in sources)
    path.write_text(f"""# written by `python -m hub_bot demo`
hub: {{endpoint: "{hub_url}", token_env: DEMO_BOT_TOKEN, disable_xet: true}}
target_org: {ORG}
database: bot.sqlite
limits: {{max_params: 2.0e9, max_attempts: 3, backoff_s: 2}}
evaluation:
  text: "{EVAL_TEXT}"
  max_tokens: 2048
  speed: {{prompt_tokens: 64, new_tokens: 16, batch_sizes: [1], repeats: 2}}
server: {{host: 127.0.0.1, port: 0}}
webhook: {{path: /webhook, secret_env: DEMO_WEBHOOK_SECRET}}
{ray}watch:
{watch}""", encoding="utf-8")
    return path


def _wait(bot, shas: set[str], expected: int, timeout: float) -> list:
    deadline, seen = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        jobs = [j for j in bot.store.jobs() if j.source_sha in shas]
        for j in jobs:
            if seen.get(j.id) != j.state:
                seen[j.id] = j.state
                logger.info("job %d (%s): %s", j.id, j.recipe_name, j.state)
        if len(jobs) >= expected and all(j.state in ("done", "failed") for j in jobs):
            return jobs
        time.sleep(0.5)
    raise SystemExit(f"the variants did not appear within {timeout:.0f}s; see the log above")


def _published_once(api, jobs: list) -> dict[str, int]:
    """Per variant repo: how many of its commits come from the bot's jobs (the demo expects one each)."""
    return {j.target_repo: sum(c.title.startswith(f"{j.recipe_name} of {j.source_repo}@")
                               for c in api.list_repo_commits(j.target_repo)) for j in jobs if j.state == "done"}


def _load_and_measure(jobs: list) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import core
    from core.evaluate import perplexity

    text = EVAL_TEXT.read_text(encoding="utf-8")
    rows = []
    for job in sorted(jobs, key=lambda j: j.id):
        if job.state != "done":
            rows.append({"repo": job.target_repo, "error": job.error})
            continue
        model = core.load_pruned(job.output_repo, device="cpu", dtype="float32")  # by name, through the local Hub
        tokenizer = AutoTokenizer.from_pretrained(job.output_repo)
        row = {"repo": job.output_repo, "params": sum(p.numel() for p in model.parameters()),
               "perplexity": perplexity(model, tokenizer, text, max_tokens=2048).perplexity,
               "base_perplexity": job.results.get("perplexity_base"), "link": job.output_url,
               "uniform": job.results.get("uniform")}
        if row["uniform"]:
            plain = AutoModelForCausalLM.from_pretrained(job.output_repo, dtype=torch.float32).eval()
            ids = torch.tensor([tokenizer(text[:400])["input_ids"][:64]])
            with torch.no_grad():
                diff = (plain(ids).logits - model(ids).logits).abs().max().item()
            row["from_pretrained"] = f"equal logits (max diff {diff:.1e})" if diff < 1e-4 else f"DIFFERS ({diff})"
        else:
            row["from_pretrained"] = "per-layer sizes: core.load_pruned only"
        rows.append(row)
    return rows


def _print_table(rows: list[dict]) -> None:
    print("\n| variant | parameters | perplexity (base) | loads with | link |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['repo']} | - | - | FAILED: {r['error']} | - |")
            continue
        print(f"| {r['repo']} | {r['params'] / 1e6:.2f}M | {r['perplexity']:.2f} ({r['base_perplexity']:.2f}) | "
              f"core.load_pruned; from_pretrained: {r['from_pretrained']} | {r['link']} |")


def run_demo(source: str | None, timeout: float = 600, executor: str = "local") -> int:
    from huggingface_hub import HfApi
    from transformers.utils import logging as hf_logging

    from .config import BotConfig
    from .local_hub import start_local_hub
    from .logs import register_secret
    from .service import Bot

    hf_logging.disable_progress_bar()
    work, user_token = _STATE["work"], _STATE["user_token"]
    for secret in (user_token, _STATE["bot_token"], _STATE["secret"]):
        register_secret(secret)
    started = time.monotonic()
    hub = start_local_hub(work / "hub", {"users": {BOT_USER: {"fullname": "Pruning bot", "orgs": [ORG]}},
                                         "tokens": {user_token: {"user": USER, "role": "write"},
                                                    _STATE["bot_token"]: {"user": BOT_USER, "role": "write"}},
                                         "webhook_backoff_s": 0.2},
                          port=_STATE["port"], storage_port=_STATE["storage_port"])
    bot = None
    try:
        user = HfApi(endpoint=hub.url, token=user_token)
        folder = _source_folder(source)
        sources = [SOURCE, f"{SOURCE}-copy"] if executor == "ray" else [SOURCE]
        for repo in sources:
            user.create_repo(repo)
            user.upload_folder(repo_id=repo, folder_path=folder, commit_message="Seed the reference model",
                               allow_patterns=["*.json", "*.safetensors", "*.md", "*.txt", "tokenizer.model"])
            logger.info("seeded %s/%s from %s", hub.url, repo, folder)
        bot = Bot(BotConfig.from_file(_bot_config(work, hub.url, sources, executor))).start()
        user.create_webhook(url=f"{bot.url}/webhook", watched=[{"type": "user", "name": USER}], domains=["repo"],
                            secret=_STATE["secret"])
        runner = threading.Thread(target=bot.run_forever, name="hub-bot", daemon=True)
        runner.start()
        shas = set()
        for repo in sources:
            commit = user.upload_file(path_or_fileobj=_edited_card(folder), path_in_repo="README.md", repo_id=repo,
                                      commit_message="Update the model card")
            shas.add(commit.oid)
            logger.info("pushed %s to %s: waiting for the bot (status page: %s/)", commit.oid[:10], repo, bot.url)
        jobs = _wait(bot, shas, expected=2 * len(sources), timeout=timeout)
        bot.stop()
        runner.join(timeout=30)
        once = _published_once(user, jobs)
        rows = _load_and_measure(jobs)
        _print_table(rows)
        if executor == "ray":
            places = sorted({f"{j.runner.get('host')} pid {j.runner.get('pid')}" for j in jobs if j.runner})
            print(f"\nRay: {len(jobs)} jobs ran in {len(places)} worker process(es) ({', '.join(places)}); bot "
                  f"commits per variant: {sorted(once.values())}")
            if any(n != 1 for n in once.values()):
                print(f"NOT published exactly once: {once}")
                return 1
        kept = f" (Hub data, database and bot.yaml kept in {work})" if _STATE.get("keep") else ""
        print(f"\n{len([r for r in rows if 'error' not in r])} variant(s) published and loaded by name in "
              f"{time.monotonic() - started:.0f}s{kept}")
        return 0 if all("error" not in r for r in rows) else 1
    finally:
        if bot is not None:
            bot.stop()
        hub.stop()
