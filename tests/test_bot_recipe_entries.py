"""The bot's recipe entries: the job key's recipe hash has a fixed form and does not depend on how the config
orders a recipe's options; the YAML a job carries (what the worker runs) is the recipe itself."""
from __future__ import annotations

import hashlib
import json

from core import Recipe
from hub_bot.recipes import recipe_entry, recipe_hash

OPTIONS = {"greedy": False, "clip": 0.8, "head_mode": "query"}


def _entry(options: dict):
    return recipe_entry({"method": "slimllm", "target": {"ratio": 0.2}, "options": options})


def test_recipe_hash_is_16_hex_digits_of_the_sha256_of_the_sorted_recipe():
    entry = _entry(OPTIONS)
    plain = entry.recipe.to_dict()
    assert entry.hash == hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
    assert len(entry.hash) == 16 and int(entry.hash, 16) >= 0


def test_recipe_hash_does_not_depend_on_the_order_of_options():
    reordered = dict(reversed(list(OPTIONS.items())))
    assert list(reordered) != list(OPTIONS)
    first, second = _entry(OPTIONS), _entry(reordered)
    assert list(first.recipe.options) != list(second.recipe.options)  # the recipes keep the config's order
    assert first.hash == second.hash == recipe_hash(second.recipe)


def test_a_job_carries_the_recipe_as_yaml():
    entry = _entry(OPTIONS)
    assert Recipe.from_yaml(entry.as_yaml()) == entry.recipe
