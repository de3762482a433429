"""The recipes of the bot's config: a `core.Recipe` without a model, the name its variants get, and a stable hash
of what it does (the job table's key and the publisher's idempotency check use it)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from core import Recipe
from core.errors import PruningError
from core.prune import normalize

from .errors import ConfigError


@dataclass(frozen=True)
class RecipeEntry:
    """One recipe of a watch entry: the core recipe, its hash and the suffix of the variant's name."""

    recipe: Recipe
    name: str  # e.g. 'maw_range-30pct'
    hash: str  # sha256 of the normalized recipe (without model/revision), 16 hex digits

    def as_yaml(self) -> str:
        return self.recipe.to_yaml()


def recipe_entry(data, where: str = "recipe") -> RecipeEntry:
    """A recipe dict of the config (a core.Recipe without `model`, plus an optional `name`) made typed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping (method:, target:, ...).")
    data = dict(data)
    name = data.pop("name", None)
    for key in ("model", "revision"):
        if key in data:
            raise ConfigError(f"{where} sets `{key}`: the bot fills the model and its commit in; remove it.")
    try:
        recipe = Recipe.from_dict(data)
        normalized = normalize(recipe)
    except PruningError as err:
        raise ConfigError(f"{where}: {err}") from None
    if recipe.load.trust_remote_code or recipe.load.allow_pickle:
        raise ConfigError(f"{where}.load: the bot never runs repository code nor loads pickle weights; remove "
                          "trust_remote_code / allow_pickle.")
    if name is None:
        name = default_name(recipe)
        if name is None:
            raise ConfigError(f"{where} has no ratio to name its variant by: give it a `name:` (e.g. 'heads-800m').")
    if not re.fullmatch(r"[\w.-]+", str(name)):
        raise ConfigError(f"{where}.name {name!r} may only use letters, digits, '-', '_' and '.'.")
    return RecipeEntry(recipe=recipe, name=str(name), hash=recipe_hash(normalized))


def default_name(recipe: Recipe) -> str | None:
    """'{method}-{pct}pct' from the recipe's ratio (MLP score shorthands keep their name, e.g. maw_range)."""
    ratio = recipe.target.ratio if recipe.target.ratio is not None else recipe.target.param_ratio
    if ratio is None:
        return None
    return f"{recipe.method}-{round(100 * ratio)}pct"


def recipe_hash(recipe: Recipe) -> str:
    """Stable hash of what a recipe does (model and revision excluded)."""
    plain = recipe.replace(model=None, revision=None).to_dict()
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
