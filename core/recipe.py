"""The typed pruning recipe shared by the CLI, the Space and the bot (YAML in and out)."""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .allocation import LayerSelection, Target
from .calibration import CalibrationConfig
from .errors import PruningError, RecipeError
from .recover_config import RecoverConfig

MAX_RECIPE_BYTES = 1 << 20


@dataclass(frozen=True)
class LoadConfig:
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Stage:
    """A further pruning step run after the recipe's own (stacking, e.g. SlimLLM then 2:4 sparsity). It shares the
    recipe's model, calibration data, batch size, seed and load settings."""

    method: str
    target: Target
    score: str | None = None
    round_to: int = 1
    layers: LayerSelection = field(default_factory=LayerSelection)
    options: dict = field(default_factory=dict)


STAGE_FIELDS = ("method", "target", "score", "round_to", "layers", "options")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a pruning run. `model: null` means the shipped reference model."""

    method: str
    target: Target
    model: str | None = None
    revision: str | None = None
    score: str | None = None
    round_to: int = 1
    layers: LayerSelection = field(default_factory=LayerSelection)
    options: dict = field(default_factory=dict)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    batch_size: int = 8
    seed: int = 0
    load: LoadConfig = field(default_factory=LoadConfig)
    then: tuple[Stage, ...] = ()  # further stages, run in order after this one
    recover: RecoverConfig | None = None  # recovery training after pruning (and prune -> recover rounds)

    def __post_init__(self) -> None:
        if self.round_to < 1:
            raise RecipeError(f"round_to must be >= 1 (got {self.round_to}).")
        if self.batch_size < 1:
            raise RecipeError(f"batch_size must be >= 1 (got {self.batch_size}).")

    def to_dict(self) -> dict:
        data = _to_plain(self)
        if not self.then:  # single-stage recipes keep their former layout (and the bot's recipe hashes)
            data.pop("then")
        return data

    def stages(self) -> list["Recipe"]:
        """One single-stage recipe per stage, in order (the first is this recipe without `then`)."""
        return [self.replace(then=())] + [self.replace(then=(), **{k: getattr(s, k) for k in STAGE_FIELDS})
                                          for s in self.then]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        return _from_plain(cls, data, "recipe")

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        return cls.from_dict(parse_recipe_yaml(text))

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(recipe_data(path))

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


def parse_recipe_yaml(text: str, where: str = "The recipe") -> dict:
    """The mapping of a recipe's YAML text (see `recipe_mapping`), without the `result` section that exported
    recipes carry."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RecipeError(f"{where} is not valid YAML{at}: {problem}. Fix the file or write it again.") from None
    return recipe_mapping(data, where)


def recipe_mapping(data: Any, where: str = "The recipe") -> dict:
    """A recipe document as one mapping: a YAML list of stages becomes its first stage plus `then:` (the first
    item carries the shared fields: model, calibration, ...); a written recipe's `result:` section is dropped."""
    if isinstance(data, list):
        if not data or not all(isinstance(item, dict) for item in data):
            raise RecipeError(f"{where} must be a YAML mapping (method:, target:, ...) or a list of such mappings, "
                              "one per stage.")
        for n, item in enumerate(data[1:], 2):
            shared = sorted(set(item) - set(STAGE_FIELDS))
            if shared:
                raise RecipeError(f"Stage {n} of the recipe sets {shared[0]!r}; later stages may only set "
                                  f"{', '.join(STAGE_FIELDS)} (the first stage holds the shared settings).")
        data = dict(data[0], then=[*data[0].get("then", []), *data[1:]])
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a YAML mapping (method:, target:, ...) or a list of stages, not "
                          f"{type(data).__name__}.")
    data = dict(data)
    data.pop("result", None)  # recipes written next to checkpoints carry their results
    return data


def recipe_data(path: str | Path) -> dict:
    """The mapping of a recipe file, with one-line errors for missing, binary or malformed files."""
    p = Path(path)
    if p.is_dir():
        raise RecipeError(f"Recipe {path} is a folder; give the YAML file (e.g. {p / 'pruning_recipe.yaml'}).")
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise RecipeError(f"Cannot read recipe {path}: {err.strerror}.") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"Recipe {path} is larger than {MAX_RECIPE_BYTES // 1024} KB; is it really a recipe?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"Recipe {path} is not a UTF-8 text file; give a YAML recipe.") from None
    data = parse_recipe_yaml(text, f"Recipe {path}")
    _resolve_relative(data, p.parent)
    return data


def _resolve_relative(data: dict, folder: Path) -> None:
    """Exported recipes name local inputs relative to their own folder ('../base'): resolve those that exist there."""
    calibration = data.get("calibration") if isinstance(data.get("calibration"), dict) else {}
    for holder, key in ((data, "model"), (calibration, "source")):
        value = holder.get(key)
        if isinstance(value, str) and value.startswith(("./", "../")) and (folder / value).exists():
            holder[key] = os.path.normpath(folder / value)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a mapping.")
        return _from_plain(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list.")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(inner, v, where) for v in value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise RecipeError(f"{where} must be of type {tp.__name__} (got {value!r}).")
    if tp is dict and not isinstance(value, dict):
        raise RecipeError(f"{where} must be a mapping.")
    return value


def _from_plain(cls: type, data: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RecipeError(f"Unknown field {key!r} in {where}.{hint} Known fields: {', '.join(names)}.")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise RecipeError(f"{where}: {err}") from None
    except PruningError:
        raise
