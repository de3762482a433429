"""The bot's job table, the choices it makes: which job is due, which later job supersedes, what is shown and kept.
(Complements test_hub_bot_units.py; written against the documented behaviour of hub_bot/store.py.)"""
from __future__ import annotations

import time

from hub_bot.store import JobStore, NewJob


def _job(sha: str, recipe: str = "r1", target: str = "pruners/llama-x") -> NewJob:
    return NewJob(source_repo="alice/llama", source_sha=sha, recipe_hash=recipe, recipe_name=recipe,
                  recipe_yaml="method: maw\n", publish="repo", target_repo=target)


def test_store_creates_its_folder(tmp_path):
    store = JobStore(tmp_path / "not" / "yet" / "there" / "jobs.sqlite")
    assert store.enqueue(_job("a" * 40)) is not None


def test_a_job_due_exactly_now_is_claimed(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job = store.get(store.enqueue(_job("a" * 40)))
    assert store.claim(now=job.next_attempt_at - 1e-3) is None
    assert store.claim(now=job.next_attempt_at).id == job.id


def test_the_latest_job_of_a_variant_supersedes_every_earlier_one(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [store.enqueue(_job(c * 40)) for c in "abc"]
    first = store.get(ids[0])
    assert store.newer_job(first).id == ids[2]  # the newest, not the next one
    assert store.newer_job(store.get(ids[1])).id == ids[2]
    assert store.newer_job(store.get(ids[2])) is None


def test_listing_counts_and_next_due_follow_the_states(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    assert store.next_due() is None
    ids = [store.enqueue(_job(c * 40)) for c in "ab"]
    due = store.get(ids[0]).next_attempt_at
    assert store.next_due() == due
    running = store.claim(now=time.time() + 1)
    assert [j.id for j in store.jobs("running")] == [running.id]
    assert [j.id for j in store.jobs("queued")] == [ids[1]]
    assert [j.id for j in store.jobs()] == sorted(ids, reverse=True)  # newest first
    assert store.jobs("done") == []


def test_status_view_and_log_fields(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    queued = store.get(store.enqueue(_job("a" * 40)))
    assert queued.public()["next_attempt_at"] == queued.next_attempt_at  # when it will run
    running = store.claim(now=time.time() + 1)
    assert running.public()["next_attempt_at"] is None  # not waiting any more
    assert running.log_fields == {"job": running.id, "repo": "alice/llama", "sha": "a" * 12, "recipe": "r1",
                                  "state": "running"}


def test_long_errors_keep_their_beginning(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    store.enqueue(_job("a" * 40))
    job = store.claim()
    store.fail(job.id, "first line says what happened. " + "x" * 5000, permanent=True, retry_at=None)
    error = store.get(job.id).error
    assert len(error) == 2000 and error.startswith("first line says what happened.")
