"""Command-line pieces of recovery training: `python -m core recover PRUNED --teacher BASE --out OUT` and the
recovery flags of `prune` (which fill the recipe's `recover:` section)."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .errors import Interrupted, RecipeError

# flag -> field of RecoverConfig, shared by `recover` and `prune`
_TRAINING_FLAGS = {"batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr", "kd": "kd", "lm": "lm",
                   "hidden": "hidden", "temperature": "temperature", "lora_rank": "lora_rank", "holdout": "holdout",
                   "eval_every": "eval_every", "patience": "patience", "checkpoint_every": "checkpoint_every"}


def add_training_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Recovery settings; `prefix` ('recover-') keeps them apart from pruning flags of the same name."""
    p.add_argument(f"--{prefix}batch-size", dest="r_batch_size", type=int, help="recovery batch size (default 8)")
    p.add_argument(f"--{prefix}seq-len", dest="r_seq_len", type=int, help="tokens per training window (default 128)")
    p.add_argument(f"--{prefix}lr", dest="r_lr", type=float, help="peak learning rate (default: from the model "
                                                                              "width; 1e-3 for the reference model)")
    p.add_argument(f"--{prefix}kd", dest="r_kd", type=float, help="weight of logit distillation (default 1)")
    p.add_argument(f"--{prefix}lm", dest="r_lm", type=float, help="weight of the LM loss (default 0)")
    p.add_argument(f"--{prefix}hidden", dest="r_hidden", type=float, help="weight of hidden-state MSE (default 0)")
    p.add_argument(f"--{prefix}temperature", dest="r_temperature", type=float, help="distillation temperature (2)")
    p.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters (merged before export)")
    p.add_argument("--lora-rank", dest="r_lora_rank", type=int, help="LoRA rank (default 8)")
    p.add_argument(f"--{prefix}data", dest="r_data", help="training text: builtin, a .txt/.jsonl file or "
                                                          "dataset:NAME (default: the calibration source)")
    p.add_argument(f"--{prefix}holdout", dest="r_holdout", type=float, help="held-out fraction (default 0.1)")
    p.add_argument(f"--{prefix}eval-every", dest="r_eval_every", type=int, help="evaluate every N steps (50)")
    p.add_argument(f"--{prefix}patience", dest="r_patience", type=int,
                   help="stop after N evaluations without improvement (default 4, 0 = never)")
    p.add_argument(f"--{prefix}checkpoint-every", dest="r_checkpoint_every", type=int,
                   help="save a resumable checkpoint every N steps (default 100)")
    p.add_argument(f"--{prefix}max-minutes", dest="r_max_minutes", type=float, help="stop training after N minutes")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recovery from its checkpoint")


def add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recover-steps", type=int, help="recovery training after pruning: total optimizer steps")
    p.add_argument("--rounds", "--steps", dest="rounds", type=int,
                   help="reach the target in N prune -> recover rounds")
    p.add_argument("--schedule", help="target schedule of the rounds: linear (default) or cubic")
    p.add_argument("--teacher", help="distil from this model (default: the unpruned model)")
    add_training_args(p, prefix="recover-")


def recover_section(args: argparse.Namespace, data: dict) -> dict:
    """The recipe's `recover:` mapping with the flags applied (empty when no recovery flag was given)."""
    section = dict(data or {})
    for flag, key in _TRAINING_FLAGS.items():
        value = getattr(args, f"r_{flag}", None)
        if value is not None:
            section[key] = value
    if getattr(args, "r_data", None):
        section["data"] = dict(section.get("data") or {}, source=args.r_data)
    if getattr(args, "r_max_minutes", None) is not None:
        section["max_seconds"] = args.r_max_minutes * 60
    if getattr(args, "lora", None):
        section["trainable"] = "lora"
    for attr, key in (("recover_steps", "steps"), ("steps_budget", "steps"), ("rounds", "rounds"),
                      ("schedule", "schedule"), ("teacher", "teacher")):
        value = getattr(args, attr, None)
        if value is not None:
            section[key] = value
    return section


def apply_to_recipe_data(args: argparse.Namespace, data: dict) -> None:
    """`prune`: add the recovery flags to the recipe mapping (a `recover:` section appears only when asked)."""
    section = recover_section(args, data.get("recover"))
    if section:
        data["recover"] = section


def checkpoint_dir(out: str) -> Path:
    """Where an interrupted run keeps its resumable state: a hidden folder next to the output."""
    path = Path(out).resolve()
    return path.parent / f".{path.name}.recover-checkpoint"


def add_recover_parser(sub) -> None:
    from .cli import _add_load_args

    r = sub.add_parser("recover", help="recovery training of a pruned model (distillation from the unpruned one)")
    _add_load_args(r)
    r.set_defaults(model=None)
    r.add_argument("--teacher", help="the unpruned model (default: the base model named in its pruning_recipe.yaml)")
    r.add_argument("--recipe", help="YAML file with recovery settings (a recipe's recover: section, or the section "
                                    "alone); flags override it")
    r.add_argument("--steps", dest="steps_budget", type=int, help="optimizer steps (default 200)")
    add_training_args(r)
    r.add_argument("--out", required=True, help="output folder (written atomically)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    r.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (default 2GB)")


def _settings(args: argparse.Namespace):
    import yaml

    from .recover_config import RecoverConfig
    from .recipe import _from_plain

    data: dict = {}
    if args.recipe:
        try:
            data = yaml.safe_load(Path(args.recipe).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as err:
            raise RecipeError(f"Cannot read recovery settings from {args.recipe}: {err}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"{args.recipe} is not a YAML mapping.")
        data = data.get("recover", data) if isinstance(data.get("recover", data), dict) else {}
    return _from_plain(RecoverConfig, recover_section(args, data), "recover")


def cmd_recover(args: argparse.Namespace) -> None:
    from .cli import _emit
    from .export import check_output, save_pruned
    from .model_io import LoadOptions, resolve_model_name
    from .recover_run import recover_checkpoint

    cfg = _settings(args)
    check_output(args.out, args.overwrite)
    pruned = resolve_model_name(args.model)
    opts = LoadOptions(revision=args.revision, dtype=args.dtype or "auto", device=args.device,
                       allow_pickle=bool(args.allow_pickle), trust_remote_code=bool(args.trust_remote_code))
    folder = checkpoint_dir(args.out)
    result = interruptible(lambda: recover_checkpoint(pruned, cfg, args.teacher, opts, bars=not args.quiet and
                                                      not args.json, checkpoint_dir=folder, resume=args.resume),
                           folder)
    out = save_pruned(result, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    rec = result.extra["recovery"]
    layout = ("uniform: loads with AutoModelForCausalLM.from_pretrained" if result.uniform else
              "per-layer: loads with core.load_pruned")
    lines = [
        f"recovered   {pruned}",
        f"teacher     {result.recipe.recover.teacher or '-'}",
        f"trained     {rec['trainable']}; stopped: {rec['stopped']} (kept step {rec['kept_step']})",
        *finished(result, folder),
        f"layout      {layout}",
        f"written to  {out}",
    ]
    _emit(args, {"out": str(out), "recipe": result.recipe.to_dict(), "result": result.summary()}, lines)


def interruptible(run, folder: Path):
    """Run; on Ctrl-C / SIGTERM nothing is written to the output, and the resumable checkpoint (if any) is named
    before the command line's handler reports the interrupt (exit status 128 + signal)."""
    try:
        return run()
    except (KeyboardInterrupt, Interrupted):
        if (folder / "recover_state.pt").is_file():
            sys.stderr.write(f"The training state was saved in {folder}; run the same command with --resume to "
                             "continue.\n")
        raise


def prune_kwargs(recipe, folder: Path, args: argparse.Namespace) -> dict:
    """`prune` with a recover: section keeps a resumable checkpoint next to the output."""
    return {"checkpoint_dir": folder, "resume": args.resume} if recipe.recover is not None else {}


def finished(result, folder: Path) -> list[str]:
    """After a successful export: drop the resumable checkpoint; summary lines of the recovery (if any)."""
    shutil.rmtree(folder, ignore_errors=True)
    rec = result.extra.get("recovery")
    if not rec or not rec.get("steps"):
        return []
    ppl = rec["heldout_perplexity"]
    return [f"recovery    {rec['objective']}, {rec['steps']:,} steps, {rec['tokens']:,} tokens, {rec['seconds']:.0f} s",
            f"held-out    perplexity {ppl[0]:.3f} -> {ppl[1]:.3f}"]
