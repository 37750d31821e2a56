"""Preemption in the job store, against a real redis-server: asked to yield, yielded, back in the queue
at its original place, a new attempt, its retries untouched; fenced by the dispatcher's lock token."""

from __future__ import annotations

import time

import redis as redis_py

from alexnet_dist.events import YieldSignal
from alexnet_dist.service.connection import connect
from alexnet_dist.service.store import JobState, JobStore
from alexnet_dist.spec import parse_spec

TOKEN = "lock-token"


def _store(redis_url: str, prefix: str) -> JobStore:
    store = JobStore(connect(redis_url), prefix=prefix)
    store.client.set(store.keys.dispatcher_lock, TOKEN)
    return store


def _spec(name: str, **over):
    return parse_spec({"name": name, "retries": 2, "data": {"train": "t.json", "val": "v.json"},
                       "scaling": {"workers": 1, "devices": "cpu"}, **over})  # fmt: skip


def _run(store: JobStore, job_id: str) -> None:
    rec = store.get(job_id)
    assert store.transition(rec, JobState.LAUNCHING, message="launching", lock_token=TOKEN)
    rec = store.get(job_id)
    assert store.transition(rec, JobState.RUNNING, message="running", fields={"started": time.time()},
                            lock_token=TOKEN)  # fmt: skip


def test_a_preempted_job_goes_back_to_its_place_as_a_new_attempt(redis_url: str) -> None:
    store = _store(redis_url, "pre1:")
    low, _ = store.submit(_spec("low"), priority=1, user="ana", team="vision")
    later, _ = store.submit(_spec("later"), priority=1)
    _run(store, low.id)
    assert [r.id for r in store.queued()] == [later.id]

    signal = YieldSignal(redis_url, store.keys.job(low.id))
    assert not signal.requested()
    assert not store.request_yield(store.get(low.id), lock_token="stale", why="x")  # fenced
    assert store.request_yield(store.get(low.id), lock_token=TOKEN, why="room for high")
    assert signal.requested()  # what the run's rank 0 reads at its next logging step
    assert store.mark_yielded(low.id, attempt=1) and not store.mark_yielded(low.id, attempt=2)

    rec = store.get(low.id)
    assert rec.yielded and rec.yield_requested > 0 and (rec.user, rec.team) == ("ana", "vision")
    assert store.preempted(rec, lock_token=TOKEN, why="preempted: checkpointed and gave its room up")
    back = store.get(low.id)
    assert (back.state, back.attempt, back.retries_left, back.preemptions) == (JobState.QUEUED, 2, 2, 1)
    assert (back.yield_requested, back.yielded, back.started) == (0.0, False, 0.0)
    assert not signal.requested()  # the next attempt is not told to yield again
    assert [r.id for r in store.queued()] == [low.id, later.id]  # its original place, not the tail
    states = [e["state"] for _, e in _events(store, low.id)]
    assert states == ["QUEUED", "LAUNCHING", "RUNNING", "PREEMPTED", "QUEUED"]


def test_a_stale_dispatcher_cannot_preempt(redis_url: str) -> None:
    store = _store(redis_url, "pre2:")
    job, _ = store.submit(_spec("j"))
    _run(store, job.id)
    assert not store.preempted(store.get(job.id), lock_token="stale", why="x")
    assert store.get(job.id).state is JobState.RUNNING


def test_the_yield_signal_reads_an_unreachable_redis_as_not_asked() -> None:
    signal = YieldSignal("redis://127.0.0.1:1/0", "alexnet:job:x")
    assert signal.requested() is False


def _events(store: JobStore, job_id: str):
    from alexnet_dist.service.events import read_events

    return list(read_events(store.client, store.keys, job_id))


def test_records_without_the_new_fields_still_load(redis_url: str) -> None:
    """A record written before preemption existed reads with defaults."""
    store = _store(redis_url, "pre3:")
    job, _ = store.submit(_spec("old"))
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    client.hdel(store.keys.job(job.id), "user", "team")
    rec = store.get(job.id)
    assert (rec.user, rec.team, rec.preemptions, rec.yielded) == ("", "", 0, False)
