"""From the page's form to a validated `core.Recipe`. Methods, scores and options come from the core's registry."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.allocation import LayerSelection, Target
from core.calibration import BUILTIN, DATASET_PREFIX, CalibrationConfig, iter_texts
from core.cli import parse_count
from core.errors import PruningError
from core.methods import METHODS
from core.recipe import Recipe
from core.recover_config import RecoverConfig

from .errors import SpaceError, friendly

TARGET_KINDS = {
    "ratio": "share of the pruned part",
    "param_ratio": "share of all parameters",
    "target_params": "parameters after pruning",
}
# what people call the registry's methods and scores; the id is shown in small print next to it
METHOD_TITLES = {
    "mlp_width": "MLP neurons (width pruning)",
    "attention_heads": "Attention heads",
    "depth": "Whole layers or sub-layers (depth pruning)",
    "slimllm": "SlimLLM: attention heads and MLP channels",
    "sparsity": "Single weights: unstructured or 2:4 sparsity",
}
SCORE_TITLES = {
    "maw": "Largest weight (max |w|)",
    "maw_range": "Weight range (max + |min|)",
    "vow": "Variance of the weights",
    "pon": "Product of weight norms",
    "l2": "Weight norms (L2)",
    "activation": "Activations on data (Wanda-style)",
    "magnitude": "Weight magnitude",
    "random": "Random (baseline)",
    "cosine": "Block influence (cosine)",
    "angular": "Angular distance",
    "ppl_drop": "Loss when removed (perplexity drop)",
    "relative_update_norm": "Relative size of the update",
    "update_norm": "Size of the update",
    "shapley": "Shapley value (exact or sampled)",
    "loo_contrast": "Leave-one-out contrast (the paper code's 'Shapley')",
    "subnet_contrast": "Random sub-network contrast",
    "wanda": "Wanda (|w| × input norm)",
    "sparsegpt": "SparseGPT (reconstruction with weight update)",
    "taylor": "Gradient x weight (first-order Taylor)",
    "entropy": "Value norm / attention entropy",
    "contribution_gradient": "Residual contribution x gradient",
}
CALIBRATION_SOURCES = {"shipped": "shipped text", "dataset": "a dataset on the Hub", "upload": "an uploaded file"}
UPLOAD_SUFFIXES = (".txt", ".jsonl")


@dataclass
class Form:
    """The values of the page's form (strings and numbers as the widgets give them)."""

    model: str = ""
    method: str = "mlp_width"
    score: str | None = None
    target_kind: str = "ratio"
    target_value: str = "0.3"
    options_yaml: str = ""
    round_to: int = 1
    protect_first: int = 0
    protect_last: int = 0
    calib_source: str = "shipped"
    calib_dataset: str = ""
    calib_file: str | None = None
    calib_samples: int = 32
    calib_seq_len: int = 128
    prompt: str = ""
    lm_eval: bool = False
    lm_eval_tasks: str = "pydoc_cloze"
    lm_eval_limit: int = 50
    measure_speed: bool = False
    recover_steps: int = 0  # recovery training (distillation from the base model) after pruning; 0: none
    recover_minutes: float = 0  # its time limit (0: the steps alone)


# -- methods from the registry -----------------------------------------------------------------------------------

def method_names() -> list[str]:
    return list(METHODS)


def _title(name: str, titles: dict[str, str]) -> str:
    return titles.get(name) or name.replace("_", " ").capitalize()


def method_title(name: str) -> str:
    return _title(name, METHOD_TITLES)


def score_title(name: str) -> str:
    return _title(name, SCORE_TITLES)


def method_choices() -> list[tuple[str, str]]:
    """(label, id) pairs for the method dropdown."""
    return [(method_title(name), name) for name in METHODS]


def method_doc(name: str) -> str:
    method = METHODS.get(name)
    doc = (sys.modules[type(method).__module__].__doc__ or "").strip()
    return doc.split("\n\n")[0].replace("\n", " ")


def score_choices(name: str) -> list[tuple[str, str]]:
    """(label, value) pairs of the method's scores; empty when the method takes no score."""
    method = METHODS.get(name)
    if method.scores is None:
        return []
    return [(f"{score_title(s)}{' · uses data' if method.scores.get(s).needs_data else ''}", s)
            for s in method.scores]


def score_doc(method: str, score: str | None) -> str:
    m = METHODS.get(method)
    if m.scores is None or not score or score not in m.scores:
        return ""
    return m.scores.get(score).doc


def option_defaults(name: str) -> dict:
    out = {}
    for f in dataclasses.fields(METHODS.get(name).Options):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def options_yaml(name: str) -> str:
    defaults = option_defaults(name)
    return yaml.safe_dump(defaults, sort_keys=False, default_flow_style=None) if defaults else ""


def parse_options(name: str, text: str) -> dict:
    """The options that differ from the method's defaults (so recipes stay short)."""
    if not (text or "").strip():
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpaceError(f"The method options are not valid YAML ({where}{problem}). Write one `name: value` per "
                         "line, e.g. `mode: kv_group`, with lists in brackets: `[1, 2]`.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpaceError("The method options must be `name: value` lines.")
    defaults = option_defaults(name)
    return {k: v for k, v in data.items() if k not in defaults or defaults[k] != v}


# -- target and calibration ---------------------------------------------------------------------------------------

_PERCENT = re.compile(r"^([0-9]*\.?[0-9]+)\s*%$")


def parse_ratio(value) -> float:
    """The share to remove: a fraction (0.3) or a percentage ("30%"). A share that removes nothing (0) or
    everything (1, 100%) is refused."""
    text = str(value if value is not None else "").strip()
    percent = _PERCENT.match(text)
    try:
        number = float(percent.group(1)) / 100 if percent else float(text)
    except ValueError:
        raise SpaceError(f"The share to remove must be a number such as 0.3 or a percentage such as 30% (got "
                         f"{text!r}).") from None
    shown = text if percent else f"{number:g}"
    if number == 0:
        raise SpaceError("A share of 0 removes nothing, so the result would be the unchanged model. Choose how "
                         "much to remove, e.g. 0.3 or 30%.")
    if not 0.0 < number < 1.0:
        hint = f" Did you mean {number:g}%?" if 1 < number < 100 and number.is_integer() and not percent else ""
        raise SpaceError(f"The share to remove must be between 0 and 1 (or 0% and 100%), not {shown}.{hint} For "
                         "example 0.3 or 30% removes 30%.")
    return number


def parse_target(kind: str, value) -> Target:
    text = str(value if value is not None else "").strip()
    if kind not in TARGET_KINDS:
        raise SpaceError(f"Unknown target kind {kind!r}; choose one of {', '.join(TARGET_KINDS)}.")
    if kind == "target_params":
        try:
            count = parse_count(text)
        except argparse.ArgumentTypeError:
            raise SpaceError(f"The parameter count must look like 800M, 1.2B or 123456 (got {text!r}).") from None
        except PruningError as err:
            raise SpaceError(friendly(err)) from None
        if count <= 0:
            raise SpaceError("The parameters after pruning must be more than 0, e.g. 800M.")
        return Target(target_params=count)
    return Target(**{kind: parse_ratio(text)})


def calibration(form: Form, max_upload_mb: int) -> CalibrationConfig:
    """The calibration config of the form; an uploaded file is checked completely here (bad files fail fast)."""
    n, seq = int(form.calib_samples or 32), int(form.calib_seq_len or 128)
    if n < 1 or seq < 2:
        raise SpaceError("Calibration needs at least 1 sample of at least 2 tokens.")
    if form.calib_source == "dataset":
        name = (form.calib_dataset or "").strip().removeprefix(DATASET_PREFIX)
        if not name:
            raise SpaceError("Give a dataset name (e.g. `wikitext:wikitext-2-raw-v1`) or choose another calibration "
                             "source.")
        return CalibrationConfig(source=DATASET_PREFIX + name, n_samples=n, seq_len=seq)
    if form.calib_source == "upload":
        return CalibrationConfig(source=str(check_upload(form.calib_file, max_upload_mb)), n_samples=n, seq_len=seq)
    return CalibrationConfig(source=BUILTIN, n_samples=n, seq_len=seq)


def check_upload(path: str | None, max_mb: int) -> Path:
    if not path:
        raise SpaceError("Upload a .txt or .jsonl calibration file, or choose another calibration source.")
    file = Path(path)
    if file.suffix.lower() not in UPLOAD_SUFFIXES:
        raise SpaceError(f"The calibration file must be .txt (plain text) or .jsonl (one JSON object with a "
                         f"\"text\" field per line), not {file.suffix or 'a file without extension'}.")
    if file.stat().st_size > max_mb * 1024 * 1024:
        raise SpaceError(f"The calibration file is larger than {max_mb} MB; a few MB of text are plenty.")
    try:
        chars = sum(len(t.strip()) for t in iter_texts(CalibrationConfig(source=str(file))))
    except PruningError as err:
        raise SpaceError(f"Bad calibration file: {str(err).replace(str(file), file.name)}") from None
    if chars == 0:
        raise SpaceError("The calibration file contains no text.")
    return file


# -- the recipe ---------------------------------------------------------------------------------------------------

def build_recipe(form: Form, model: str | None, max_upload_mb: int = 50) -> Recipe:
    """A validated recipe for `model` (None: the reference model). Raises SpaceError with a readable message."""
    if form.method not in METHODS:
        raise SpaceError(f"Choose a pruning method ({', '.join(METHODS)}).")
    method = METHODS.get(form.method)
    try:
        recipe = Recipe(
            method=form.method, model=model, target=parse_target(form.target_kind, form.target_value),
            score=(form.score or None) if method.scores is not None else None,
            round_to=int(form.round_to or 1), options=parse_options(form.method, form.options_yaml),
            layers=LayerSelection(protect_first=int(form.protect_first or 0),
                                  protect_last=int(form.protect_last or 0)))
        method.validate(recipe)
        if method.needs_data(recipe) or int(form.recover_steps or 0) > 0:
            recipe = recipe.replace(calibration=calibration(form, max_upload_mb))
        recipe = recipe.replace(recover=recovery(form))
    except PruningError as err:
        raise SpaceError(friendly(err)) from None
    except (TypeError, ValueError) as err:  # e.g. options of the wrong type reaching the Options dataclass
        raise SpaceError(f"Invalid setting: {err}") from None
    return recipe


def recovery(form: Form) -> RecoverConfig | None:
    """The recovery budget of the form: steps (0: no recovery) and an optional time limit in minutes. It trains
    on the calibration source (its held-out tenth for early stopping), distilling from the unpruned model."""
    steps, minutes = int(form.recover_steps or 0), float(form.recover_minutes or 0)
    if steps < 0 or minutes < 0:
        raise SpaceError("Recovery steps and minutes cannot be negative (0: no recovery, no time limit).")
    if steps == 0:
        return None
    return RecoverConfig(steps=steps, max_seconds=60 * minutes if minutes else None)


def needs_calibration(method: str, score: str | None, options_text: str = "") -> bool:
    """Whether the chosen score uses calibration data (False when the choice is not valid yet)."""
    try:
        m = METHODS.get(method)
        recipe = Recipe(method=method, target=Target(ratio=0.1),
                        score=(score or None) if m.scores is not None else None,
                        options=parse_options(method, options_text))
        return m.needs_data(recipe)
    except (PruningError, SpaceError, TypeError, ValueError):
        return False
