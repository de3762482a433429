"""Running a recipe: validate, load, prune with the method, and describe the result."""
from __future__ import annotations

import difflib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .architectures import ArchSpec, spec_for_config
from .card import public_model_name
from .errors import InvalidTargetError, ModelLoadError, RecipeError, UnknownNameError
from .layer_config import layer_shapes
from .methods import METHODS, PruneContext
from .model_io import LoadOptions, load_model, resolve_model_name
from .params import count_parameters
from .progress import Progress, ProgressCallback
from .recipe import Recipe
from .scores import MLP_SCORES

logger = logging.getLogger(__name__)


def normalize(recipe: Recipe) -> Recipe:
    """Resolve shorthands (`method: maw` means MLP width pruning scored by maw) and validate for the method."""
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
          bars: bool = False, base_model: str | None = None, **recovery) -> PruneResult:
    """Prune `model` in place according to `recipe`. With a `recover:` section, recovery training follows (in
    one or several prune -> recover rounds); `recovery` keywords (on_event, should_stop, teacher, checkpoint_dir,
    resume) go to `core.recover_run.prune_and_recover`."""
    recipe = normalize(recipe)
    if recipe.recover is not None:
        from .recover_run import prune_and_recover

        return prune_and_recover(model, tokenizer, recipe, progress, bars, base_model, **recovery)
    if recovery:
        raise RecipeError(f"Recovery options ({', '.join(sorted(recovery))}) were given but the recipe has no "
                          "recover: section; add one (e.g. recover: {steps: 200}) or drop the options.")
    spec = spec_for_config(model.config)
    method = METHODS.get(recipe.method)
    if any(p.is_meta for p in model.parameters()):
        raise ModelLoadError("Some weights were offloaded to disk by the device map (they sit on 'meta'); pruning "
                             "needs every weight in CPU or GPU memory. Give the device map enough CPU memory "
                             "(max_memory) instead of disk offload.")
    prog = Progress(progress, bars)
    ctx = PruneContext(model, tokenizer, spec, recipe, prog)
    before = count_parameters(model, spec)
    start = time.perf_counter()
    try:
        report = method.run(ctx)
    finally:
        prog.close()
    seconds = time.perf_counter() - start
    after = count_parameters(model, spec)["total"]
    if after == before["total"] and getattr(method, "changes_shapes", True):
        raise InvalidTargetError(f"The target removed nothing from the model (method {recipe.method}): raise the "
                                 "ratio or choose a larger unit.")
    _check_target(recipe, before["total"], after)
    name = base_model or recipe.model or getattr(model.config, "_name_or_path", "") or "unknown"
    return PruneResult(
        model=model, tokenizer=tokenizer, recipe=recipe, spec=spec, params_before=before,
        params_after=count_parameters(model, spec), report=report, seconds=seconds, base_model=name,
        base_revision=_hub_revision(name, recipe.revision) if name != "unknown" else None,
        calibration=recipe.calibration.describe() if method.needs_data(recipe) else None,
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


def run_recipe(recipe: Recipe, progress: ProgressCallback | None = None, bars: bool = False,
               **recovery) -> PruneResult:
    """Load the recipe's model and prune it (and recover it, with a `recover:` section)."""
    recipe = normalize(recipe)
    name = resolve_model_name(recipe.model)
    model, tokenizer = load_model(name, load_options(recipe))
    return prune(model, tokenizer, recipe, progress, bars, base_model=recipe.model or name, **recovery)


def load_options(recipe: Recipe) -> LoadOptions:
    load = recipe.load
    return LoadOptions(revision=recipe.revision, dtype=load.dtype, device=load.device, device_map=load.device_map,
                       allow_pickle=load.allow_pickle, trust_remote_code=load.trust_remote_code)
