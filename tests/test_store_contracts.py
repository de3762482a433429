"""The bot's job table, the choices it makes: which job is due, who holds it, what is shown, kept and given back.
(Complements test_hub_bot_units.py and test_bot_keys.py; written against the documented behaviour of
hub_bot/store.py.)"""
from __future__ import annotations

import time

from hub_bot.store import JobStore, NewJob

OWNER, OTHER = "local:1", "remote:2"


def _job(sha: str, recipe: str = "r1", target: str = "pruners/llama-x", source: str = "alice/llama",
         publish: str = "repo", private: bool = False) -> NewJob:
    return NewJob(source_repo=source, source_sha=sha, recipe_hash=recipe, recipe_name=recipe,
                  recipe_yaml="method: maw\n", publish=publish, target_repo=target, private=private)


def _id(store: JobStore, job: NewJob) -> int:
    job_id, new = store.enqueue(job)
    assert new
    return job_id


def test_store_creates_its_folder(tmp_path):
    store = JobStore(tmp_path / "not" / "yet" / "there" / "jobs.sqlite")
    assert store.enqueue(_job("a" * 40)) == (1, True)


def test_the_job_key_ignores_the_case_of_repo_names_only(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    first = _id(store, _job("a" * 40))
    assert store.enqueue(_job("a" * 40, source="Alice/Llama", target="Pruners/LLAMA-X")) == (first, False)
    assert store.enqueue(_job("A" * 40))[1]  # a sha is not a name: its case is kept


def test_a_job_due_exactly_now_is_claimed_and_the_oldest_due_goes_first(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [_id(store, _job(c * 40)) for c in "ab"]
    due = store.get(ids[0]).next_attempt_at
    assert store.claim(OWNER, 60, now=due - 1e-3) is None
    job = store.claim(OWNER, 60, now=due)
    assert (job.id, job.lease_owner, job.lease_expires, job.attempts) == (ids[0], OWNER, due + 60, 1)
    assert store.claim(OWNER, 60, now=time.time() + 1).id == ids[1]
    assert store.claim(OWNER, 60, now=time.time() + 1) is None  # nothing queued is left


def test_only_the_lease_holder_renews_finishes_or_fails_and_an_expired_lease_is_lost(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _id(store, _job("a" * 40))
    job = store.claim(OWNER, 60)
    assert store.holds(job_id, OWNER) and not store.holds(job_id, OTHER)
    assert not store.renew(job_id, OTHER, 60) and store.renew(job_id, OWNER, 600)
    assert store.get(job_id).lease_expires > job.lease_expires + 500  # extended from now, not from the old expiry
    assert store.fail(job_id, OTHER, "x", permanent=False, retry_at=None) is None
    assert not store.release(job_id, OTHER, "stop")
    assert store.get(job_id).state == "running"
    assert store.renew(job_id, OWNER, -1) and not store.holds(job_id, OWNER)  # lease ran out
    assert not store.renew(job_id, OWNER, 60)
    assert store.recover(max_attempts=3) == [job_id]  # an expired lease is recovered, whoever held it
    assert store.get(job_id).state == "queued" and store.get(job_id).lease_owner is None


def test_a_released_job_is_due_at_once_and_its_attempt_is_not_counted(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _id(store, _job("a" * 40))
    store.claim(OWNER, 60)
    before = time.time()
    assert store.release(job_id, OWNER, "the worker stopped")
    job = store.get(job_id)
    assert (job.state, job.attempts, job.error, job.lease_owner) == ("queued", 0, "the worker stopped", None)
    assert before <= job.next_attempt_at <= time.time()
    assert store.claim(OWNER, 60).attempts == 1
    assert store.release(job_id, OWNER, "again") and store.get(job_id).attempts == 0


def test_recover_keeps_live_leases_of_other_owners(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    mine, theirs = _id(store, _job("a" * 40)), _id(store, _job("b" * 40))
    store.claim(OWNER, 60)
    store.claim(OTHER, 60)
    assert store.recover(max_attempts=3, dead_owner_prefix="local:") == [mine]
    assert store.get(theirs).state == "running" and store.get(mine).state == "queued"
    assert store.recover(max_attempts=3, now=time.time() + 61) == [theirs]  # its lease ran out


def test_only_a_failed_job_is_requeued_and_it_starts_afresh(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _id(store, _job("a" * 40))
    assert not store.requeue(job_id)  # queued: nothing to do
    store.claim(OWNER, 60)
    assert not store.requeue(job_id)  # running: not taken from its holder
    assert store.fail(job_id, OWNER, "unsupported", permanent=True, retry_at=None) == "failed"
    assert store.requeue(job_id)
    job = store.get(job_id)
    assert (job.state, job.attempts, job.permanent) == ("queued", 0, False)


def test_listing_counts_and_next_due_follow_the_states(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    assert store.next_due() is None
    ids = [_id(store, _job(c * 40)) for c in "ab"]
    assert store.next_due() == store.get(ids[0]).next_attempt_at
    running = store.claim(OWNER, 60, now=time.time() + 1)
    assert store.next_due() == store.get(ids[1]).next_attempt_at  # a running job is not due
    assert [j.id for j in store.jobs("running")] == [running.id]
    assert [j.id for j in store.jobs("queued")] == [ids[1]]
    assert [j.id for j in store.jobs()] == sorted(ids, reverse=True)  # newest first
    assert [j.id for j in store.jobs(limit=1)] == [max(ids)]
    assert store.jobs("done") == []
    assert store.counts() == {"queued": 1, "running": 1, "done": 0, "failed": 0}


def test_status_view_and_log_fields(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    queued = store.get(_id(store, _job("a" * 40)))
    view = queued.public()
    assert view["next_attempt_at"] == queued.next_attempt_at  # when it will run
    assert "recipe_yaml" not in view and "lease_owner" not in view and view["recipe_hash"] == "r1"
    running = store.claim(OWNER, 60, now=time.time() + 1)
    assert running.public()["next_attempt_at"] is None  # not waiting any more
    assert running.log_fields == {"job": running.id, "repo": "alice/llama", "sha": "a" * 12, "recipe": "r1",
                                  "state": "running"}


def test_a_job_is_confidential_unless_its_source_is_known_public_and_it_is_not_private(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    plain, private = _id(store, _job("a" * 40)), _id(store, _job("b" * 40, private=True))
    other = _id(store, _job("c" * 40, source="bob/llama"))
    assert store.get(plain).confidential and store.get(plain).source_private is None  # not known yet
    store.set_source_private("Alice/Llama", False)  # names compare ignoring case
    assert not store.get(plain).confidential and store.get(private).confidential
    assert store.get(other).source_private is None  # another source is untouched
    store.set_source_private("alice/llama", True)
    assert store.get(plain).confidential and store.get(plain).source_private is True
    store.set_source_private("alice/llama", None)
    assert store.get(plain).source_private is None


def test_long_errors_keep_their_beginning_and_a_retry_is_due_when_asked(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _id(store, _job("a" * 40))
    store.claim(OWNER, 60)
    retry = time.time() + 300
    assert store.fail(job_id, OWNER, "first line says what happened. " + "x" * 5000, permanent=False,
                      retry_at=retry) == "queued"
    job = store.get(job_id)
    assert len(job.error) == 2000 and job.error.startswith("first line says what happened.")
    assert (job.next_attempt_at, job.permanent, job.lease_owner) == (retry, False, None)
    assert store.claim(OWNER, 60, now=retry - 1) is None and store.claim(OWNER, 60, now=retry).id == job_id


def test_published_and_created_targets(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a = _id(store, _job("a" * 40, target="pruners/llama-a"))
    b = _id(store, _job("b" * 40, target="pruners/llama-b", private=True))
    pr = _id(store, _job("c" * 40, publish="pr", target="alice/llama"))
    for job_id, out in ((a, "pruners/llama-a"), (b, "pruners/llama-b"), (pr, "alice/llama")):
        assert store.claim(OWNER, 60, now=time.time() + 1).id == job_id
        assert store.finish(job_id, OWNER, out, "c" * 40, None, None)
    assert sorted(store.published_targets("Alice/Llama")) == [("pruners/llama-a", False), ("pruners/llama-b", True)]
    assert store.published_targets("bob/llama") == []
    assert not store.created_target("pruners/llama-a")
    store.mark_created_target(a)
    assert store.created_target("Pruners/Llama-A") and not store.created_target("pruners/llama-b")
    assert store.is_target("pruners/llama-b") and not store.is_target("alice/llama")  # a PR's target is the source


def test_a_target_is_in_use_by_another_job_that_published_or_will_publish_there(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a = _id(store, _job("a" * 40))
    assert not store.target_in_use("pruners/llama-x", except_job=a)  # only the job itself
    b = _id(store, _job("b" * 40))
    assert store.target_in_use("Pruners/Llama-X", except_job=a)  # b is queued for it
    store.claim(OWNER, 60)
    job = store.claim(OWNER, 60)
    assert job.id == b and store.fail(b, OWNER, "unsupported", True, None) == "failed"
    assert not store.target_in_use("pruners/llama-x", except_job=a)  # a failed job will not publish
    c = _id(store, _job("c" * 40, target="pruners/other"))
    store.claim(OWNER, 60, now=time.time() + 1)
    assert store.finish(c, OWNER, "pruners/llama-x", "d" * 40, None, None)  # published there after all
    assert store.target_in_use("pruners/llama-x", except_job=a)


def test_a_lease_holds_up_to_and_including_its_expiry(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _id(store, _job("a" * 40))
    now = time.time() + 1
    job = store.claim(OWNER, 60, now=now)
    assert job.lease_expires == now + 60
    assert store.recover(max_attempts=3, now=now + 60) == []  # expires at, not before, its time
    assert store.recover(max_attempts=3, now=now + 60.001) == [job_id]


def test_competing_jobs_of_a_variant_come_oldest_first(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [_id(store, _job(c * 40)) for c in "abcd"]
    assert [j.id for j in store.same_variant(store.get(ids[0]))] == ids[1:]
    assert [j.id for j in store.same_variant(store.get(ids[2]))] == [ids[0], ids[1], ids[3]]
