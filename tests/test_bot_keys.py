"""What makes two bot jobs the same job: the recipe hash changes with every field of the recipe (options
included; only the model and its revision are left out, the bot fills those in), and the job key is (source repo,
source commit, recipe hash, publication mode, target repo), repo names compared ignoring case."""
from __future__ import annotations

import copy
import dataclasses
import sqlite3
import types
import typing

import pytest

from core import Recipe, Stage, Target
from hub_bot.recipes import recipe_entry, recipe_hash
from hub_bot.store import JobStore, NewJob

BASE = Recipe.from_dict({"method": "mlp_width", "score": "maw", "target": {"ratio": 0.3},
                         "layers": {"protect_first": 1}, "options": {"offset": 0.01},
                         "recover": {"steps": 50}})  # a recover: section, so that its fields are covered too
NOT_HASHED = {"model", "revision"}  # the bot fills them in per job; the job key has the source repo and sha


def leaves(obj, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(dotted path, type annotation) of every leaf field of a recipe."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += leaves(value, f"{prefix}{f.name}.")
        elif f"{prefix}{f.name}" not in NOT_HASHED:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


def changed(value, annotation):
    """Another value of the field's type."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] if optional else [annotation]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    items = typing.get_args(kinds[0])
    if kind is tuple and items and dataclasses.is_dataclass(items[0]):  # e.g. `then`: one more stage
        return tuple(value or ()) + (Stage(method="sparsity", target=Target(ratio=0.5)),)
    if dataclasses.is_dataclass(kind) and value is None:  # an optional section: present instead of absent
        return kind()
    if kind is bool:
        return not value
    if kind is int:
        return (value or 0) + 1
    if kind is float:
        return (value or 0.0) + 0.25
    if kind is str:
        return (value or "") + "-other"
    if kind is tuple:
        return tuple(value or ()) + (0.5,)
    if kind is dict:
        return {**value, "another_option": 1}
    raise AssertionError(f"no other value for {annotation}")


def with_leaf(recipe: Recipe, path: str, value) -> Recipe:
    """`recipe` with one leaf replaced, without validation (the hash must see any difference)."""
    out = copy.deepcopy(recipe)
    *parents, name = path.split(".")
    holder = out
    for part in parents:
        holder = getattr(holder, part)
    object.__setattr__(holder, name, value)
    return out


FIELDS = leaves(BASE)


def test_every_field_is_covered():
    """The fields come from the Recipe dataclass itself, so a field added later is covered too."""
    names = {path for path, _ in FIELDS}
    assert {"method", "score", "target.ratio", "options", "calibration.n_samples", "layers.ratios", "load.dtype",
            "seed", "batch_size", "round_to", "recover.steps", "recover.trainable", "recover.data"} <= names
    assert not names & NOT_HASHED and len(names) == len(FIELDS)


@pytest.mark.parametrize("path, annotation", FIELDS, ids=[p for p, _ in FIELDS])
def test_recipe_hash_changes_with_every_field(path, annotation):
    holder = BASE
    for part in path.split("."):
        holder = getattr(holder, part)
    other = with_leaf(BASE, path, changed(holder, annotation))
    assert recipe_hash(other) != recipe_hash(BASE), path


def test_recipe_hash_sees_option_values_and_ignores_model_and_revision():
    assert recipe_hash(with_leaf(BASE, "options", {"offset": 0.02})) != recipe_hash(BASE)
    assert recipe_hash(BASE.replace(model="alice/llama", revision="a" * 40)) == recipe_hash(BASE)
    short = recipe_entry({"method": "maw", "target": {"ratio": 0.3}})
    spelled = recipe_entry({"method": "mlp_width", "score": "maw", "target": {"ratio": 0.3}})
    assert short.hash == spelled.hash  # the same recipe, spelled two ways
    # recovery training is part of what a variant is: with and without it are two jobs
    recovered = recipe_entry({"method": "maw", "target": {"ratio": 0.3}, "recover": {"steps": 200,
                                                                                      "max_seconds": 600}})
    assert recovered.hash != short.hash and recovered.recipe.recover.max_seconds == 600


def job(**changes) -> NewJob:
    base = dict(source_repo="alice/llama", source_sha="a" * 40, recipe_hash="r1", recipe_name="maw-30pct",
                recipe_yaml="method: maw\n", publish="repo", target_repo="pruners/llama-maw-30pct")
    return NewJob(**(base | changes))


@pytest.mark.parametrize("field, value", [("source_repo", "alice/other"), ("source_sha", "b" * 40),
                                          ("recipe_hash", "r2"), ("publish", "pr"),
                                          ("target_repo", "pruners/llama-maw-30pct-2")])
def test_job_key_changes_with_each_of_its_fields(tmp_path, field, value):
    store = JobStore(tmp_path / "jobs.sqlite")
    first, _ = store.enqueue(job())
    second, new = store.enqueue(job(**{field: value}))
    assert new and second == first + 1


@pytest.mark.parametrize("field, value", [("source_repo", "Alice/LLAMA"), ("target_repo", "Pruners/Llama-MAW-30pct"),
                                          ("recipe_name", "renamed"), ("recipe_yaml", "method: maw # same\n"),
                                          ("private", True), ("trigger", "poll")])
def test_job_key_ignores_the_rest(tmp_path, field, value):
    store = JobStore(tmp_path / "jobs.sqlite")
    first, _ = store.enqueue(job())
    assert store.enqueue(job(**{field: value})) == (first, False)


def test_duplicates_do_not_use_up_job_ids(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    first, _ = store.enqueue(job())
    for _ in range(5):
        store.enqueue(job())
    assert store.enqueue(job(source_sha="c" * 40)) == (first + 1, True)


V1_SCHEMA = """CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, source_repo TEXT NOT NULL, source_sha TEXT NOT
NULL, recipe_hash TEXT NOT NULL, recipe_name TEXT NOT NULL, recipe_yaml TEXT NOT NULL, publish TEXT NOT NULL,
target_repo TEXT NOT NULL, private INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT
0, next_attempt_at REAL NOT NULL, error TEXT, permanent INTEGER NOT NULL DEFAULT 0, trigger TEXT, output_repo TEXT,
output_commit TEXT, output_url TEXT, results TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
UNIQUE (source_repo, source_sha, recipe_hash))"""


def test_a_schema_1_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(V1_SCHEMA)
        conn.execute("INSERT INTO jobs (source_repo, source_sha, recipe_hash, recipe_name, recipe_yaml, publish, "
                     "target_repo, state, attempts, next_attempt_at, output_repo, created_at, updated_at) VALUES "
                     "('alice/llama', ?, 'r1', 'maw-30pct', 'x', 'repo', 'pruners/llama-maw-30pct', 'done', 1, 0, "
                     "'pruners/llama-maw-30pct', 0, 0)", ("a" * 40,))
    store = JobStore(path)
    (old,) = store.jobs()
    assert (old.id, old.state, old.output_repo, old.source_private, old.lease_owner) == (
        1, "done", "pruners/llama-maw-30pct", None, None)
    assert store.enqueue(job()) == (1, False)
    assert store.enqueue(job(publish="pr", target_repo="alice/llama")) == (2, True)  # the wider key
    assert JobStore(path).jobs()[0].id == 2  # opening again changes nothing
