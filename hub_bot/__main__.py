"""Command line of the pruning bot.

    python -m hub_bot run --config bot.yaml [--once]     # serve webhooks + status, poll, run jobs
    python -m hub_bot status --config bot.yaml           # the job table (read-only)
    python -m hub_bot requeue --config bot.yaml JOB_ID   # retry a failed job (e.g. after granting access)
    python -m hub_bot demo [--source DIR]                # local Hub + bot + two variants, offline, on CPU

The token and the webhook secret come from the environment variables named in the config.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

logger = logging.getLogger("hub_bot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub_bot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the bot")
    run.add_argument("--config", required=True, help="the bot's YAML config")
    run.add_argument("--once", action="store_true", help="poll once (when polling is configured), run the due "
                     "jobs, exit (for cron-style setups)")
    status = sub.add_parser("status", help="print the job table")
    status.add_argument("--config", required=True)
    status.add_argument("--json", action="store_true")
    requeue = sub.add_parser("requeue", help="queue a failed job again")
    requeue.add_argument("--config", required=True)
    requeue.add_argument("job", type=int)
    demo = sub.add_parser("demo", help="local Hub + bot: publish two variants and load them by name")
    demo.add_argument("--source", help="model folder to seed the local Hub with (default: reference/model, or a "
                      "tiny random model while the reference model is missing)")
    demo.add_argument("--workdir", help="keep the Hub data, database and logs here (default: a temp dir, removed)")
    demo.add_argument("--timeout", type=float, default=600, help="seconds to wait for the variants")
    for p in (run, status, requeue, demo):
        p.add_argument("--log-level", default="INFO")
        p.add_argument("--log-format", choices=("json", "text"), default=None,
                       help="json lines (default for run) or key=value text (default for demo)")
    return parser


def _quiet_progress_bars() -> None:
    """Progress bars would interleave with the JSON log lines."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()


def _run(args) -> int:
    from huggingface_hub import constants

    from .config import BotConfig
    from .service import Bot

    if constants.HF_HUB_OFFLINE:
        logger.error("HF_HUB_OFFLINE is set: the bot needs to reach its Hub endpoint; unset it.")
        return 2
    _quiet_progress_bars()
    bot = Bot(BotConfig.from_file(args.config))

    def _stop(signum, frame):  # only asks: the lock is released once the worker has stopped (bot.stop below)
        logger.info("signal %d: stopping; the current job is finished or given back first", signum)
        bot.request_stop()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        bot.start()
        try:
            if args.once:
                bot.poller.poll_once() if bot.config.poll_interval_s else None
                bot.run_pending()
            else:
                bot.run_forever()
        finally:
            bot.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    logger.info("bot stopped")
    return 0


def _status(args) -> int:
    import json

    from .config import BotConfig
    from .status import status_document
    from .store import JobStore

    config = BotConfig.from_file(args.config)
    doc = status_document(JobStore(config.database), config.hub.endpoint)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(", ".join(f"{k}: {v}" for k, v in doc["counts"].items()))
    for j in doc["jobs"]:
        where = j["output_url"] or j["target_repo"]
        print(f"{j['id']:>5} {j['state']:<8} {j['attempts']} {j['source_repo']}@{j['source_sha'][:10]} "
              f"{j['recipe_name']:<24} {where}" + (f"  ({j['error']})" if j["error"] else ""))
    return 0


def _requeue(args) -> int:
    from .config import BotConfig
    from .store import JobStore

    store = JobStore(BotConfig.from_file(args.config).database)
    if not store.requeue(args.job):
        logger.error("job %d is not a failed job; `python -m hub_bot status` lists the jobs", args.job)
        return 1
    logger.info("job %d queued again; a running bot picks it up", args.job)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import prepare_environment

        prepare_environment(args.workdir)  # HF_ENDPOINT & co. must be set before huggingface_hub is imported
    from .errors import BotError
    from .logs import setup_logging

    setup_logging(args.log_level, args.log_format or ("text" if args.command == "demo" else "json"))
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "status":
            return _status(args)
        if args.command == "requeue":
            return _requeue(args)
        from .demo import run_demo

        return run_demo(args.source, args.timeout)
    except BotError as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
