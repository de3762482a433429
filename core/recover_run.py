"""Prune -> recover, in one or several rounds, and recovery of a checkpoint pruned earlier (or by another tool).

Front ends call `core.prune(model, tokenizer, recipe)` with a `recover:` section (the budget: `steps`, optionally
`max_seconds`) and receive `progress(stage, done, total)` calls for pruning and training, `on_event(dict)` at every
evaluation (the held-out loss curve), and can end training early with `should_stop()`."""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Callable

import yaml
from torch import nn

from .architectures import spec_for_config
from .calibration import CalibrationConfig
from .errors import InvalidTargetError
from .layer_config import layer_shapes
from .methods import METHODS
from .model_io import LoadOptions, build_empty, load_config, load_model
from .params import count_parameters
from .progress import ProgressCallback
from .prune import PruneResult, _hub_revision, load_options, prune
from .recipe import Recipe
from .recover import Recovery, training_dtype
from .recover_config import RecoverConfig
from .recover_data import load_split
from .recover_loss import proportional_origin
from .recover_memory import check_fits, estimate
from .recover_schedule import Schedule

logger = logging.getLogger(__name__)


def surviving_layers(origin: list[int], report: dict, n_before: int, n_after: int) -> list[int]:
    """Original (teacher) index of each layer left after a pruning step that removed whole blocks."""
    if n_after == n_before:
        return origin
    kept_constant = set((report.get("recovery") or {}).get("kept_as_constant_layer", []))
    removed = set(report.get("removed", [])) - kept_constant
    kept = [o for i, o in enumerate(origin) if i not in removed]
    if len(kept) != n_after:  # the method did not say which blocks went: align evenly
        logger.info("no record of the removed blocks; aligning layers evenly for the hidden-state loss")
        return [origin[i] for i in proportional_origin(n_after, len(origin))]
    return kept


def _check_teacher_fits(student: nn.Module, cfg: RecoverConfig, teacher_params: int) -> None:
    device = next(student.parameters()).device
    dtype = training_dtype(cfg, device)
    params = sum(p.numel() for p in student.parameters())
    trainable = params if cfg.trainable == "all" else params // 50  # LoRA adapters: a small fraction
    checkpointing = cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else device.type == "cuda"
    size = dtype.itemsize
    need = estimate(student.config, params, teacher_params, trainable, cfg.batch_size * cfg.seq_len, size,
                    checkpointing, str(device))
    check_fits(need, str(device), already_loaded=params * size,
               hint=" (the teacher is a second, unpruned copy of the model)")


def load_teacher(name: str, opts: LoadOptions, student: nn.Module, cfg: RecoverConfig):
    """Load the teacher after checking that teacher + training fit next to the student."""
    config = load_config(name, opts)
    teacher_params = count_parameters(build_empty(config), spec_for_config(config))["total"]
    _check_teacher_fits(student, cfg, teacher_params)
    teacher, _ = load_model(name, dataclasses.replace(opts, device=str(next(student.parameters()).device)))
    return teacher


def _round_summary(reports: list[dict]) -> dict:
    """One recovery entry for the recipe: totals, the held-out perplexity before the first and after the last
    round, and each round's own report."""
    last = reports[-1]
    return {
        **{k: last[k] for k in ("objective", "trainable", "batch", "lr", "data", "device", "dtype")},
        "steps": sum(r["steps"] for r in reports), "tokens": sum(r["tokens"] for r in reports),
        "seconds": round(sum(r["seconds"] for r in reports), 1),
        "heldout_perplexity": [reports[0]["heldout_perplexity"][0], last["heldout_perplexity"][1]],
        "heldout_loss": [reports[0]["heldout_loss"][0], last["heldout_loss"][1]],
        "loss_curve": [dict(h, round=i + 1) for i, r in enumerate(reports) for h in r["loss_curve"]],
    }


def _round_config(cfg: RecoverConfig, steps: int) -> RecoverConfig:
    """One round's share of the recovery: its steps, and the warm-up scaled to them (a full warm-up in every short
    round would spend most of the round's steps below the peak learning rate)."""
    warmup = min(cfg.warmup, math.ceil(cfg.warmup * steps / cfg.steps)) if cfg.steps else cfg.warmup
    return dataclasses.replace(cfg, steps=steps, warmup=warmup)


def prune_and_recover(model: nn.Module, tokenizer, recipe: Recipe, progress: ProgressCallback | None = None,
                      bars: bool = False, base_model: str | None = None, *, teacher: nn.Module | None = None,
                      on_event: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                      checkpoint_dir: str | Path | None = None, resume: bool = False) -> PruneResult:
    """Prune `model` in place to the recipe's target in `recover.rounds` rounds, recovering after each round
    (`recover.steps` optimizer steps in all, split evenly). The teacher defaults to `recover.teacher` or to a
    copy of `model` taken before pruning."""
    cfg = recipe.recover
    spec = spec_for_config(model.config)
    before = count_parameters(model, spec)
    if teacher is None and cfg.uses_teacher:
        if cfg.teacher:
            teacher = load_teacher(cfg.teacher, load_options(recipe), model, cfg)
        else:
            _check_teacher_fits(model, cfg, before["total"])
            teacher = copy.deepcopy(model)
    schedule = Schedule(recipe, getattr(METHODS.get(recipe.method), "cumulative_target", False), before["total"],
                        max(s.intermediate_size for s in layer_shapes(model.config)), model.config.hidden_size)
    split = load_split(tokenizer, cfg.data or recipe.calibration, cfg.data_tokens, cfg.holdout,
                       cfg.seq_len) if cfg.steps else None
    budget = [cfg.steps // cfg.rounds + (1 if t < cfg.steps % cfg.rounds else 0) for t in range(cfg.rounds)]
    origin = list(range(model.config.num_hidden_layers))
    pruned: list[PruneResult] = []
    rounds: list[dict] = []
    reports: list[dict] = []
    reached = 0.0  # cumulative schedule fraction of the last round that pruned
    for t in range(cfg.rounds):
        tag = f" (round {t + 1}/{cfg.rounds})" if cfg.rounds > 1 else ""
        round_recipe = schedule.round_recipe(t, count_parameters(model, spec)["total"], reached)
        entry: dict = {"round": t + 1, "target": None}
        result = None
        if round_recipe is not None:
            n_before = model.config.num_hidden_layers
            try:
                result = prune(model, tokenizer, round_recipe, progress, bars, base_model)
            except InvalidTargetError as err:
                # an intermediate step finer than the method's units (e.g. 17% of 2 query heads per group) prunes
                # nothing (the methods check rounding while planning, before changing the model); its steps only
                # recover and later rounds catch up. The last round must reach the target.
                if t == cfg.rounds - 1:
                    raise
                logger.info("round %d/%d prunes nothing at this granularity (%s)", t + 1, cfg.rounds, err)
        if result is not None:
            origin = surviving_layers(origin, result.report, n_before, model.config.num_hidden_layers)
            pruned.append(result)
            reached = schedule.fraction(t)
            entry.update(target={k: v for k, v in dataclasses.asdict(round_recipe.target).items() if v is not None},
                         params_after=result.params_after["total"], method_report=result.report)
        if budget[t]:
            folder = Path(checkpoint_dir) / f"round-{t + 1}" if checkpoint_dir and cfg.rounds > 1 else checkpoint_dir
            model, report = Recovery(model, teacher, tokenizer, _round_config(cfg, budget[t]),
                                     origin=origin, split=split, progress=progress, bars=bars, stage=f"recover{tag}",
                                     on_event=on_event, should_stop=should_stop, checkpoint_dir=folder,
                                     resume=resume).run()
            reports.append(report)
            entry["heldout_perplexity"] = report["heldout_perplexity"]
        rounds.append(entry)
    if not pruned:
        raise InvalidTargetError("The target removes nothing from this model; lower it (a run that changes "
                                 "nothing is an error).")
    first = pruned[0]
    recovery = (reports[0] if len(reports) == 1 else _round_summary(reports)) if reports else {"steps": 0}
    if cfg.rounds > 1:
        recovery = dict(recovery, rounds=cfg.rounds, schedule=cfg.schedule, per_round=rounds)
    report = first.report if cfg.rounds == 1 else {"rounds": [r.get("method_report") for r in rounds]}
    return PruneResult(
        model=model, tokenizer=tokenizer, recipe=recipe, spec=spec, params_before=before,
        params_after=count_parameters(model, spec), report=report, seconds=sum(r.seconds for r in pruned),
        base_model=first.base_model, base_revision=first.base_revision, calibration=first.calibration,
        extra={"recovery": recovery},
    )


def _pruned_record(path: str) -> dict | None:
    """The pruning_recipe.yaml next to a checkpoint written by this tool (None for other checkpoints)."""
    from .export import RECIPE_FILE

    file = Path(path) / RECIPE_FILE
    if not file.is_file():
        return None
    data = yaml.safe_load(file.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _recorded_base(pruned: str, record: dict | None) -> str | None:
    """The base model a checkpoint of this tool was pruned from: the recipe's model (a local folder is recorded
    relative to the checkpoint and resolved back by `Recipe.from_file`), else the name in its result."""
    if record is None:
        return None
    from .export import RECIPE_FILE

    model = Recipe.from_file(Path(pruned) / RECIPE_FILE).model if record.get("model") else None
    return model or (record.get("result") or {}).get("base_model")


def recover_checkpoint(pruned: str, cfg: RecoverConfig, teacher: str | None = None,
                       opts: LoadOptions = LoadOptions(), progress: ProgressCallback | None = None,
                       bars: bool = False, **kwargs) -> PruneResult:
    """Load a pruned checkpoint (this tool's, uniform or per-layer, or any other of a supported family) and its
    teacher, recover it, and describe the result for `save_pruned`. `teacher` defaults to the base model named in
    the checkpoint's pruning_recipe.yaml."""
    if cfg.steps == 0:
        raise InvalidTargetError("recover --steps 0 trains nothing; give a positive step budget.")
    record = _pruned_record(pruned)
    summary = (record or {}).get("result") or {}
    teacher = teacher or _recorded_base(pruned, record)
    if cfg.uses_teacher and not teacher:
        raise InvalidTargetError(f"{pruned} does not say which model it was pruned from (no pruning_recipe.yaml "
                                 "with a base model). Name the unpruned model with --teacher.")
    model, tokenizer = load_model(pruned, opts)
    spec = spec_for_config(model.config)
    teacher_model = load_teacher(teacher, opts, model, cfg) if cfg.uses_teacher else None
    reference = teacher_model if teacher_model is not None else model
    n_teacher = reference.config.num_hidden_layers
    origin = surviving_layers(list(range(n_teacher)), summary.get("method_report") or {}, n_teacher,
                              model.config.num_hidden_layers)
    cfg = dataclasses.replace(cfg, teacher=teacher)
    if record is not None:
        base = {k: v for k, v in record.items() if k != "result"}
        recipe = Recipe.from_dict(base).replace(recover=cfg)
        data = cfg.data or recipe.calibration
    else:
        from .allocation import Target

        recipe = Recipe(method="external", target=Target(ratio=0.0), model=teacher, recover=cfg)
        data = cfg.data or CalibrationConfig()
    recovered, report = Recovery(model, teacher_model, tokenizer, cfg, origin=origin, data=data, progress=progress,
                                 bars=bars, **kwargs).run()
    report["recovered_from"] = pruned
    before = count_parameters(teacher_model, spec) if teacher_model is not None else count_parameters(model, spec)
    return PruneResult(
        model=recovered, tokenizer=tokenizer, recipe=recipe, spec=spec, params_before=before,
        params_after=count_parameters(recovered, spec),
        report=summary.get("method_report") or {"note": f"pruned outside this tool ({pruned})"},
        seconds=float(summary.get("prune_seconds") or 0.0), base_model=teacher or pruned,
        base_revision=summary.get("base_revision") or (_hub_revision(teacher, None) if teacher else None),
        calibration=summary.get("calibration"), extra={"recovery": report},
    )
