"""The Redis job store against a real redis-server: submit, order, idempotency, atomic states, AOF."""

from __future__ import annotations

import json
import multiprocessing as mp
import threading
from pathlib import Path

import pytest
from conftest import free_port, start_redis
from shardkit import write_manifest

from alexnet_dist.errors import ConfigError, JobNotFoundError, QueueError
from alexnet_dist.service.connection import connect, redact
from alexnet_dist.service.keys import Keys
from alexnet_dist.service.store import JobState, JobStore
from alexnet_dist.spec import JobSpec, parse_spec


def make_spec(name: str = "tiny", **over: object) -> JobSpec:
    data = {"name": name, "data": {"train": "shards/t.json", "val": "shards/v.json"},
            "scaling": {"workers": 1, "devices": "cpu"}, **over}  # fmt: skip
    return parse_spec(data)


def _submitter(url: str, worker: int, n: int) -> None:
    queue = JobStore(connect(url), prefix="t:")
    spec = make_spec()
    for i in range(n):
        # Three priorities, and every 10th submit sent twice under its client key (a client retrying).
        key = f"w{worker}-{i}"
        queue.submit(spec, priority=i % 3, client_key=key)
        if i % 10 == 0:
            _, created = queue.submit(spec, priority=i % 3, client_key=key)
            assert not created


def test_four_processes_submit_1000_jobs_none_lost_or_doubled(redis_url: str) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_submitter, args=(redis_url, w, 250)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    queue = JobStore(connect(redis_url), prefix="t:")
    records = queue.list()
    assert len(records) == 1000
    assert len({r.id for r in records}) == 1000
    assert sorted(r.client_key for r in records) == sorted(f"w{w}-{i}" for w in range(4) for i in range(250))
    assert queue.counts()["QUEUED"] == 1000

    served = queue.queued(limit=2000)
    assert len(served) == 1000
    # Priority first (2, 1, 0: 332 + 332 + 336 jobs), then submission order inside each priority.
    assert [r.priority for r in served] == [2] * 332 + [1] * 332 + [0] * 336
    keys = [(-r.priority, r.seq) for r in served]
    assert keys == sorted(keys)
    # Each process's own submits keep their order inside a priority (FIFO = time).
    for w in range(4):
        mine = [
            int(r.client_key.split("-")[1])
            for r in served
            if r.client_key.startswith(f"w{w}-") and r.priority == 0
        ]
        assert mine == sorted(mine) and len(mine) == 84


def test_submit_is_idempotent_per_client_key_and_writes_a_state_event(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix="t:")
    a, created_a = queue.submit(make_spec(), client_key="k1")
    b, created_b = queue.submit(make_spec(priority=7), client_key="k1")
    c, created_c = queue.submit(make_spec(), client_key="k2")
    assert (created_a, created_b, created_c) == (True, False, True)
    assert a.id == b.id != c.id
    assert b.priority == 0  # the first submission stands
    assert len(queue.list()) == 2
    assert a.spec == make_spec()
    entries = queue.client.xrange(Keys("t:").events(a.id))
    assert len(entries) == 1
    event = json.loads(entries[0][1]["data"])
    assert list(event)[:4] == ["type", "state", "attempt", "message"]
    assert (event["type"], event["state"], event["attempt"]) == ("state", "QUEUED", 1)


def test_only_one_of_eight_racing_claims_wins(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix="t:")
    jobs = [queue.submit(make_spec())[0] for _ in range(20)]
    wins: list[str] = []
    lock = threading.Lock()

    def claim_all() -> None:
        q = JobStore(connect(redis_url), prefix="t:")
        for rec in jobs:
            if q.transition(rec, JobState.LAUNCHING, message="launching"):
                with lock:
                    wins.append(rec.id)

    threads = [threading.Thread(target=claim_all) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == sorted(r.id for r in jobs)  # each job claimed exactly once
    assert queue.queued() == []
    assert len(queue.active()) == 20


def test_transition_with_a_stale_lock_token_changes_nothing(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix="t:")
    rec, _ = queue.submit(make_spec())
    queue.client.set(queue.keys.dispatcher_lock, "holder")
    assert not queue.transition(rec, JobState.LAUNCHING, message="x", lock_token="someone-else")
    assert queue.get(rec.id).state is JobState.QUEUED
    assert queue.transition(rec, JobState.LAUNCHING, message="x", lock_token="holder")
    assert queue.get(rec.id).state is JobState.LAUNCHING


def test_cancel_queued_then_resume_as_attempt_two(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix="t:")
    rec, _ = queue.submit(make_spec(retries=2))
    cancelled = queue.cancel(rec.id)
    assert cancelled.state is JobState.CANCELLED
    assert queue.queued() == []
    with pytest.raises(QueueError, match="already CANCELLED"):
        queue.cancel(rec.id)
    resumed = queue.resume(rec.id)
    assert (resumed.state, resumed.attempt, resumed.submission_id) == (JobState.QUEUED, 2, f"{rec.id}-2")
    assert [r.id for r in queue.queued()] == [rec.id]
    states = [json.loads(f["data"])["state"] for _, f in queue.client.xrange(queue.keys.events(rec.id))]
    assert states == ["QUEUED", "CANCELLED", "QUEUED"]
    with pytest.raises(QueueError, match="only FAILED or CANCELLED"):
        queue.resume(rec.id)


def test_cancel_running_sets_a_flag_for_the_dispatcher(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix="t:")
    rec, _ = queue.submit(make_spec())
    assert queue.transition(rec, JobState.LAUNCHING, message="launching")
    out = queue.cancel(rec.id)
    assert (out.state, out.cancel_requested) == (JobState.LAUNCHING, True)


def test_store_result_keeps_and_publishes_it(redis_url: str) -> None:
    from alexnet_dist.service.events import subscribe_results

    queue = JobStore(connect(redis_url), prefix="t:")
    rec, _ = queue.submit(make_spec())
    results = subscribe_results(connect(redis_url), queue.keys, timeout_s=5)
    queue.store_result(rec.id, {"top1_error": 0.25, "top5_error": 0.05, "ten_crop": True})
    got = next(results)
    assert got == {
        "job_id": rec.id,
        "name": "tiny",
        "attempt": 1,
        "top1_error": 0.25,
        "top5_error": 0.05,
        "ten_crop": True,
    }
    assert queue.get(rec.id).result == {"top1_error": 0.25, "top5_error": 0.05, "ten_crop": True}


def test_errors_are_one_line_and_name_the_thing(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix="t:")
    with pytest.raises(JobNotFoundError, match="^job nope: not found"):
        queue.get("nope")
    with pytest.raises(ConfigError, match="priority="):
        queue.submit(make_spec(), priority=2**60)
    port = free_port()
    with pytest.raises(QueueError) as err:
        connect(f"redis://:secret@127.0.0.1:{port}/0", timeout=1)
    text = str(err.value)
    assert "\n" not in text and "secret" not in text and f"127.0.0.1:{port}" in text
    assert "ALEXNET_DIST_REDIS_URL" in text
    assert redact("rediss://u:pw@h:6380/1") == "rediss://u:***@h:6380/1"
    with pytest.raises(QueueError, match="not a Redis URL"):
        connect("http://127.0.0.1:1/")


def test_password_protected_redis(tmp_path: Path) -> None:
    server = start_redis(tmp_path, "--requirepass", "s3cret")
    try:
        bad = f"redis://:wrong@127.0.0.1:{server.port}/0"
        with pytest.raises(QueueError, match="refused the password|Redis unreachable"):
            connect(bad)
        queue = JobStore(connect(f"redis://:s3cret@127.0.0.1:{server.port}/0"), prefix="t:")
        rec, _ = queue.submit(make_spec())
        assert queue.get(rec.id).state is JobState.QUEUED
    finally:
        server.stop()


def test_redis_killed_and_restarted_with_aof_mid_queue_loses_nothing(tmp_path: Path) -> None:
    server = start_redis(tmp_path, "--appendonly", "yes", "--appendfsync", "always")
    try:
        queue = JobStore(connect(server.url), prefix="t:")
        jobs = [queue.submit(make_spec(), priority=i % 2, client_key=f"k{i}")[0] for i in range(200)]
        for rec in queue.queued(limit=50):  # the dispatcher has taken the first 50 ...
            assert queue.transition(rec, JobState.LAUNCHING, message="launching")
        before = {r.id: r for r in queue.list()}
        order = [r.id for r in queue.queued(limit=500)]
        server.restart(kill=True)  # ... when Redis dies without a clean shutdown

        queue = JobStore(connect(server.url), prefix="t:")
        after = {r.id: r for r in queue.list()}
        assert after == before
        assert len(after) == 200 and queue.counts() == {**queue.counts(), "QUEUED": 150, "LAUNCHING": 50}
        assert [r.id for r in queue.queued(limit=500)] == order
        assert len(queue.active()) == 50
        # The store keeps working: a resubmit under an old key is still recognised, a new job is queued last.
        assert queue.submit(make_spec(), client_key="k7")[0].id == jobs[7].id
        new, created = queue.submit(make_spec())
        assert created and queue.queued(limit=500)[-1].id == new.id
        assert sum(len(queue.client.xrange(queue.keys.events(j.id))) for j in jobs) == 250
    finally:
        server.stop()


@pytest.mark.slow
def test_cli_submit_checks_manifests_and_is_idempotent(redis_url: str, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    train, val = write_manifest(tmp_path / "t.json", 10), write_manifest(tmp_path / "v.json", 10)
    spec = tmp_path / "job.toml"
    spec.write_text(f'name = "fm"\n[data]\ntrain = "{train}"\nval = "{val}"\n[model]\nnum_classes = 10\n'
                    '[scaling]\nworkers = 1\ndevices = "cpu"\n')  # fmt: skip
    env = {**os.environ, "ALEXNET_DIST_REDIS_URL": redis_url, "ALEXNET_DIST_REDIS_PREFIX": "t:"}
    exe = str(Path(sys.executable).parent / "alexnet-dist")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=60)

    first = cli("submit", str(spec), "--priority", "4", "--client-key", "c1", "--json")
    again = cli("submit", str(spec), "--client-key", "c1", "--json")
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert (a["id"], a["priority"], a["created"], b["created"]) == (b["id"], 4, True, False)
    wrong = cli("submit", str(spec), "--set", "model.num_classes=1000")
    assert wrong.returncode == 2
    assert "data.train: " in wrong.stderr and "has 10 classes but model.num_classes=1000" in wrong.stderr
    missing = cli("submit", str(spec), "--set", f'data.val="{tmp_path}/none.json"')
    assert missing.returncode == 2 and "data.val: " in missing.stderr
    bad_field = cli("submit", str(spec), "--set", "train.epochs=0")
    assert bad_field.returncode == 2 and "train.epochs" in bad_field.stderr
    listed = json.loads(cli("list", "--json").stdout)
    assert [j["id"] for j in listed] == [a["id"]]  # nothing else was queued


def test_a_taken_job_id_never_overwrites_the_job_that_holds_it(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = JobStore(connect(redis_url))
    first, created = store.submit(make_spec(), job_id="tiny-deadbeef", user="alice", team="vision")
    assert created
    with pytest.raises(ConfigError, match="^job tiny-deadbeef: the id is taken"):
        store.submit(make_spec(), job_id="tiny-deadbeef", user="bob", team="speech")
    # A random id that collides is drawn again: the older job keeps its owner and its one queue entry.
    ids = iter(["tiny-deadbeef", "tiny-0badcafe"])
    monkeypatch.setattr("alexnet_dist.service.store.new_job_id", lambda name: next(ids))
    second, created = store.submit(make_spec(), user="bob", team="speech")
    assert created and second.id == "tiny-0badcafe" and second.user == "bob"
    assert store.get("tiny-deadbeef") == first and first.user == "alice"
    assert [r.id for r in store.queued()] == ["tiny-deadbeef", "tiny-0badcafe"]
    assert len(store.list()) == 2
