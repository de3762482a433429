"""Running a recipe: validate, load, prune with the method, and describe the result."""
from __future__ import annotations

import difflib
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from .architectures import ArchSpec, spec_for_config
from .card import public_model_name
from .errors import InvalidTargetError, ModelLoadError, RecipeError, UnknownNameError
from .layer_config import layer_shapes
from .methods import METHODS, PruneContext
from .memory import check_fits
from .model_io import (LoadOptions, can_stream, compute_dtype, load_config, load_model, resolve_device,
                       resolve_model_name)
from .params import count_parameters
from .progress import Progress, ProgressCallback
from .recipe import STAGE_FIELDS, Recipe, Stage
from .scores import MLP_SCORES
from .streaming import drop_head, reopen

logger = logging.getLogger(__name__)


def normalize(recipe: Recipe) -> Recipe:
    """Resolve shorthands (`method: maw` means MLP width pruning scored by maw) and validate every stage for its
    method; a structured stage after an N:M sparsity stage (which would break its groups) is refused."""
    stages = [_normalize_stage(stage) for stage in recipe.stages()]
    for n, (before, after) in enumerate(zip(stages, stages[1:]), 2):
        if before.method == "sparsity" and after.method != "sparsity" and \
                ":" in str(before.options.get("pattern", "")):
            raise RecipeError(f"Stage {n} ({after.method}) would slice the N:M groups that stage {n - 1} made. Put "
                              "structured stages before the sparsity stage.")
    first, rest = stages[0], stages[1:]
    return first.replace(then=tuple(Stage(**{k: getattr(s, k) for k in STAGE_FIELDS}) for s in rest))


def _normalize_stage(recipe: Recipe) -> Recipe:
    if recipe.method not in METHODS and recipe.method in MLP_SCORES:
        if recipe.score not in (None, recipe.method):
            raise RecipeError(f"Method {recipe.method!r} is shorthand for mlp_width with score {recipe.method!r}, "
                              f"which conflicts with score {recipe.score!r}. Use --method mlp_width --score "
                              f"{recipe.score}.")
        recipe = recipe.replace(method="mlp_width", score=recipe.method)
    elif recipe.method not in METHODS:  # the registry's did-you-mean would not know the score shorthands
        close = difflib.get_close_matches(recipe.method, list(METHODS) + list(MLP_SCORES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"Unknown pruning method {recipe.method!r}.{hint} Available: {', '.join(METHODS)}, "
                               f"or an MLP score as shorthand for mlp_width: {', '.join(MLP_SCORES)}.")
    method = METHODS.get(recipe.method)
    method.validate(recipe)
    recipe = method.canonical(recipe)
    if recipe.score is None and method.default_score:
        recipe = recipe.replace(score=method.default_score)
    return recipe


@dataclass
class PruneResult:
    """A pruned model with everything needed to describe and export it."""

    model: nn.Module
    tokenizer: Any
    recipe: Recipe
    spec: ArchSpec
    params_before: dict
    params_after: dict
    report: dict
    seconds: float
    base_model: str
    base_revision: str | None = None
    calibration: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return not getattr(self.model.config, "is_heterogeneous", False)

    def layers(self) -> list[dict]:
        return [{"layer": i, **s.overrides()} for i, s in enumerate(layer_shapes(self.model.config))]

    def summary(self) -> dict:
        """JSON-able description stored as the `result` section of pruning_recipe.yaml."""
        from . import __version__

        before, after = self.params_before["total"], self.params_after["total"]
        return {
            "tool": "core", "tool_version": __version__,
            "base_model": public_model_name(self.base_model), "base_revision": self.base_revision,
            "family": self.spec.family,
            "calibration": self.calibration,
            "params_before": before, "params_after": after,
            "params_removed_fraction": round(1 - after / before, 6),
            "attention_params": [self.params_before["attention"], self.params_after["attention"]],
            "mlp_params": [self.params_before["mlp"], self.params_after["mlp"]],
            "num_layers": [len(self.params_before["layers"]), len(self.params_after["layers"])],
            "uniform": self.uniform,
            "prune_seconds": round(self.seconds, 3),
            "method_report": self.report,
            "layers": self.layers(),
            **({"sparsity": self.extra["sparsity"]} if "sparsity" in self.extra else {}),
            **({"recovery": self.extra["recovery"]} if "recovery" in self.extra else {}),
        }


def _hub_revision(name: str, revision: str | None) -> str | None:
    """The commit sha a Hub id resolves to (None for local folders or when the Hub is unreachable)."""
    if Path(name).exists():
        return revision
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(name, revision=revision).sha
    except Exception as err:  # offline or no access: the recipe records the requested revision instead
        logger.info("could not resolve the revision of %s: %s", name, err)
        return revision


def prune(model: nn.Module, tokenizer, recipe: Recipe, progress: ProgressCallback | None = None,
          bars: bool = False, base_model: str | None = None, offload_hidden: bool = False,
          **recovery) -> PruneResult:
    """Prune `model` in place according to `recipe` (every stage, in order). A streamed model
    (`LoadOptions(stream=True)`) is pruned one block at a time; its changed blocks wait on disk until
    `save_pruned`. `offload_hidden` keeps the calibration hidden states in CPU memory between blocks (for many
    calibration tokens on a GPU). With a `recover:` section, recovery training follows (in one or several
    prune -> recover rounds, on a model in memory); `recovery` keywords (on_event, should_stop, teacher,
    checkpoint_dir, resume) go to `core.recover_run.prune_and_recover`."""
    recipe = normalize(recipe)
    if recipe.recover is not None:
        if getattr(model, "core_stream", None) is not None:
            raise RecipeError("Recovery training (recover:) trains the model in memory: load it whole "
                              "(LoadOptions(stream=False)) or prune without recover: and train afterwards.")
        from .recover_run import prune_and_recover

        return prune_and_recover(model, tokenizer, recipe, progress, bars, base_model, **recovery)
    if recovery:
        raise RecipeError(f"Recovery options ({', '.join(sorted(recovery))}) were given but the recipe has no "
                          "recover: section; add one (e.g. recover: {steps: 200}) or drop the options.")
    spec = spec_for_config(model.config)
    stream = getattr(model, "core_stream", None)
    if stream is None and any(p.is_meta for p in model.parameters()):
        raise ModelLoadError("Some weights were offloaded to disk by the device map (they sit on 'meta'); pruning "
                             "needs every weight in CPU or GPU memory. Give the device map enough CPU memory "
                             "(max_memory) instead of disk offload.")
    if stream is not None:  # refused before the first block if even one block at a time cannot fit
        check_fits(model.config, recipe, str(stream.device), stream.dtype, True, offload_hidden)
    prog = Progress(progress, bars)
    before = count_parameters(model, spec)
    stages = recipe.stages()
    reports, calibration, extra = [], None, {}
    store_device = "cpu" if offload_hidden else None
    start = time.perf_counter()
    try:
        for stage in stages:
            ctx = PruneContext(model, tokenizer, spec, stage, prog, store_device=store_device,
                               _calibration=calibration)
            stage_before = count_parameters(model, spec)["total"]
            report = METHODS.get(stage.method).run(ctx)
            calibration = ctx._calibration if stage.calibration == recipe.calibration else None
            _check_target(stage, stage_before, count_parameters(model, spec)["total"])
            reports.append({"method": stage.method, "score": stage.score, "report": report})
        if any(s.method == "sparsity" for s in stages):  # measured while the blocks can still be read
            from .sparse_format import measure_sparsity

            extra["sparsity"] = measure_sparsity(model, spec)
        if stream is not None:  # the last block's changes reach the disk; the head leaves memory
            stream.release()
            drop_head(model)
    finally:
        prog.close()
    seconds = time.perf_counter() - start
    name = base_model or recipe.model or getattr(model.config, "_name_or_path", "") or "unknown"
    needs_data = any(METHODS.get(s.method).needs_data(s) for s in stages)
    if count_parameters(model, spec)["total"] == before["total"] and not extra.get("sparsity", {}).get("zeros"):
        raise InvalidTargetError(f"The target removed nothing from the model (method {recipe.method}): raise the "
                                 "ratio or choose a larger unit.")
    return PruneResult(
        model=model, tokenizer=tokenizer, recipe=recipe, spec=spec, params_before=before,
        params_after=count_parameters(model, spec), report=reports[0]["report"] if len(reports) == 1 else
        {"stages": reports}, seconds=seconds, base_model=name,
        base_revision=_hub_revision(name, recipe.revision) if name != "unknown" else None,
        calibration=recipe.calibration.describe() if needs_data else None, extra=extra,
    )


def _check_target(recipe: Recipe, before: int, after: int) -> None:
    """Warn when a parameter-level target could only be approximated (uniform sizes round per layer)."""
    wanted = recipe.target.params_to_remove(before)
    if wanted is None or wanted == 0:
        return
    removed = before - after
    if abs(removed - wanted) > 0.05 * wanted:
        logger.warning("the target asked for %s parameters removed, the result removes %s (%+.0f%%): sizes are "
                       "rounded to whole units per layer; per-layer ratios or a finer unit get closer",
                       f"{wanted:,}", f"{removed:,}", 100 * (removed - wanted) / wanted)


def should_stream(recipe: Recipe, name: str, opts: LoadOptions, stream: bool | None = None) -> bool:
    """Whether `recipe` prunes the model `name` streamed: `stream` when given (RecipeError when the recipe cannot
    stream), else whenever the checkpoint can stream and every stage works block by block (recovery training and
    scores or recoveries with gradients through the whole model need the model in memory)."""
    recipe = normalize(recipe)
    if recipe.recover is not None:
        if stream:
            raise RecipeError("Recovery training (recover:) trains the model in memory, so it cannot stream: drop "
                              "--stream, or prune streamed without recover: and train afterwards with "
                              "`python -m core recover`.")
        return False
    whole_only = [s.method for s in recipe.stages() if not METHODS.get(s.method).streams(s)]
    if whole_only and stream:
        raise RecipeError(f"This {whole_only[0]} recipe (its score or recovery needs gradients through the whole "
                          "model) cannot stream: drop --stream.")
    if whole_only:
        return False
    return can_stream(name, opts) if stream is None else stream


def run_recipe(recipe: Recipe, progress: ProgressCallback | None = None, bars: bool = False,
               stream: bool | None = None, out_dir: str | Path | None = None,
               offload_hidden: bool = False, **recovery) -> PruneResult:
    """Load the recipe's model and prune it (and recover it, with a `recover:` section).

    By default the model streams (one decoder block in memory at a time, see core.streaming) whenever it can:
    safetensors weights and no device map; `stream=False` loads it whole, `stream=True` insists on streaming.
    A streamed run writes its changed blocks as it goes: into the temporary folder of `out_dir` when given (the
    folder `save_pruned(result, out_dir)` then moves into place), else into a temporary folder of its own; both
    are removed if the run fails. Recovery training needs the whole model in memory: a recipe with `recover:`
    never streams.
    """
    recipe = normalize(recipe)
    name = resolve_model_name(recipe.model)
    load = recipe.load
    opts = load_options(recipe)
    streamed = should_stream(recipe, name, opts, stream)
    # weights only: scores compute in float32 from their own copies and surgery only slices, so streamed blocks
    # stay in the checkpoint's dtype while pruning (half the memory, no casts; the result is the same bit for bit)
    in_source_dtype = streamed and load.dtype == "auto" and \
        not any(METHODS.get(s.method).needs_data(s) for s in recipe.stages())
    if not opts.device_map:  # refused before loading anything when it cannot fit (accelerate places device maps)
        check_fits(load_config(name, opts), recipe, resolve_device(opts.device),
                   "source" if in_source_dtype else opts.dtype, streamed, offload_hidden)
    model, tokenizer = load_model(name, replace(opts, stream=streamed, dtype="source" if in_source_dtype else opts.dtype))
    store = getattr(model, "core_stream", None)
    try:
        if store is not None and out_dir is not None:
            from .staging import staged_name

            store.use_work_folder(staged_name(Path(out_dir).expanduser().resolve()))
        result = prune(model, tokenizer, recipe, progress, bars, base_model=recipe.model or name,
                       offload_hidden=offload_hidden, **recovery)
    except BaseException:
        if store is not None:
            store.close()
        raise
    if in_source_dtype:  # the result computes like any other (evaluation, speed) in the usual dtype
        result.model = reopen(result.model, compute_dtype(opts.dtype, str(store.device), model.config))
    return result


def load_options(recipe: Recipe) -> LoadOptions:
    load = recipe.load
    return LoadOptions(revision=recipe.revision, dtype=load.dtype, device=load.device, device_map=load.device_map,
                       allow_pickle=load.allow_pickle, trust_remote_code=load.trust_remote_code)
