"""The operations the CLI (and the HTTP API) call, against a real redis-server: submit's manifest check,
result before success, watch replaying and following a job to its end, logs, the driver's attempt check."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import start_redis
from shardkit import write_manifest

from alexnet_dist.errors import ConfigError, JobNotFoundError, QueueError, UnreachableError
from alexnet_dist.service.connection import connect
from alexnet_dist.service.events import job_publisher
from alexnet_dist.service.operations import JobService
from alexnet_dist.service.store import JobState, JobStore
from alexnet_dist.spec import JobSpec, parse_spec

PREFIX = "t:"


def _spec(train: str, val: str, classes: int = 10, name: str = "op") -> JobSpec:
    return parse_spec({"name": name, "data": {"train": train, "val": val}, "model": {"num_classes": classes},
                       "scaling": {"workers": 1, "devices": "cpu"}})  # fmt: skip


@pytest.fixture
def service(redis_url: str) -> JobService:
    return JobService(JobStore(connect(redis_url), prefix=PREFIX), watch_block_ms=50)


@pytest.fixture
def spec(tmp_path: Path) -> JobSpec:
    return _spec(write_manifest(tmp_path / "t.json", 10), write_manifest(tmp_path / "v.json", 10))


def test_submit_checks_the_manifests_and_queues_nothing_when_they_are_wrong(
    service: JobService, spec: JobSpec, tmp_path: Path
) -> None:
    wrong = r"^data\.train: .* has 10 classes but model\.num_classes=1000; set model\.num_classes=10$"
    with pytest.raises(ConfigError, match=wrong):
        service.submit(_spec(spec.data.train, spec.data.val, classes=1000))
    with pytest.raises(ConfigError, match=r"^data\.val: "):
        service.submit(_spec(spec.data.train, str(tmp_path / "none.json")))
    assert service.list() == []
    rec, created = service.submit(spec, priority=3, client_key="c")
    again, created_again = service.submit(spec, client_key="c")
    assert (created, created_again, again.id, rec.priority) == (True, False, rec.id, 3)
    assert [r.id for r in service.list(JobState.QUEUED)] == [rec.id] and service.list(JobState.RUNNING) == []


def test_result_is_an_error_until_the_job_succeeded(service: JobService, spec: JobSpec) -> None:
    rec, _ = service.submit(spec)
    with pytest.raises(QueueError, match=f"^job {rec.id}: QUEUED, no result yet; follow it with"):
        service.result(rec.id)
    store = service.store
    store.store_result(rec.id, {"top1_error": 0.5, "top5_error": 0.25})
    with pytest.raises(QueueError, match="QUEUED, no result yet"):  # a result alone is not success
        service.result(rec.id)
    assert store.transition(store.get(rec.id), JobState.SUCCEEDED, message="finished")
    assert service.result(rec.id) == {"job_id": rec.id, "top1_error": 0.5, "top5_error": 0.25}
    with pytest.raises(JobNotFoundError, match="^job nope: not found"):
        service.result("nope")


def test_cancel_and_resume(service: JobService, spec: JobSpec) -> None:
    rec, _ = service.submit(spec)
    assert service.cancel(rec.id).state is JobState.CANCELLED
    resumed = service.resume(rec.id)
    assert (resumed.state, resumed.attempt) == (JobState.QUEUED, 2)
    assert service.get(rec.id) == resumed


def _states(events: list[dict]) -> list[str]:
    return [e["state"] for e in events if e["type"] == "state"]


def test_watch_replays_then_follows_a_resumed_job_to_its_end(
    service: JobService, spec: JobSpec, redis_url: str
) -> None:
    store = service.store
    rec, _ = service.submit(spec)
    service.cancel(rec.id)
    service.resume(rec.id)  # the stream now holds attempt 1's end: watch must not stop there

    def run_attempt_2() -> None:
        time.sleep(0.2)
        assert store.transition(store.get(rec.id), JobState.LAUNCHING, message="launching")
        assert store.transition(store.get(rec.id), JobState.RUNNING, message="running")
        pub = job_publisher(redis_url, store.keys, rec.id)
        pub.publish({"type": "step", "epoch": 1, "step": 1})
        pub.close()
        time.sleep(0.2)
        assert store.transition(store.get(rec.id), JobState.SUCCEEDED, message="finished")

    t = threading.Thread(target=run_attempt_2)
    t.start()
    try:
        seen = list(service.watch(rec.id))
    finally:
        t.join()
    events = [e for _, e in seen]
    assert _states(events) == ["QUEUED", "CANCELLED", "QUEUED", "LAUNCHING", "RUNNING", "SUCCEEDED"]
    assert [e["type"] for e in events].count("step") == 1
    ids = [i for i, _ in seen]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(set(ids)) == len(ids)

    # Started again after an entry, it gives only what came after; without follow it stops at once.
    rest = [e for _, e in service.watch(rec.id, after=ids[2])]
    assert rest == events[3:]
    assert [e for _, e in service.watch(rec.id, follow=False)] == events


def test_watch_of_an_unknown_job_raises_before_any_event(service: JobService) -> None:
    with pytest.raises(JobNotFoundError, match="^job nope: not found"):
        service.watch("nope")  # not only once iterated


def test_watch_without_follow_stops_at_the_end_of_the_stream(service: JobService, spec: JobSpec) -> None:
    rec, _ = service.submit(spec)
    t0 = time.monotonic()
    assert _states([e for _, e in service.watch(rec.id, follow=False)]) == ["QUEUED"]
    assert time.monotonic() - t0 < 1.0  # no wait for a job that is still queued


class _Logs:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def logs(self, submission_id: str) -> str:
        self.asked.append(submission_id)
        return f"log of {submission_id}"


def test_logs_read_the_attempts_ray_job_and_make_the_launcher_once(redis_url: str, spec: JobSpec) -> None:
    made: list[_Logs] = []

    def launcher() -> _Logs:
        made.append(_Logs())
        return made[-1]

    store = JobStore(connect(redis_url), prefix=PREFIX)
    service = JobService(store, launcher=launcher)  # type: ignore[arg-type]  # a Launcher with logs only
    rec, _ = service.submit(spec)
    with pytest.raises(JobNotFoundError):
        service.logs("nope")
    assert made == []  # an unknown job is refused before the cluster is contacted
    assert service.logs(rec.id) == f"log of {rec.id}-1"
    assert service.logs(rec.id, attempt=3) == f"log of {rec.id}-3"
    assert len(made) == 1 and made[0].asked == [f"{rec.id}-1", f"{rec.id}-3"]
    with pytest.raises(ConfigError, match="no cluster"):
        JobService(store).logs(rec.id)


def test_a_stale_attempt_is_refused(service: JobService, spec: JobSpec) -> None:
    rec, _ = service.submit(spec)
    assert service.current_attempt(rec.id, 1).id == rec.id
    service.cancel(rec.id)
    service.resume(rec.id)
    stale = f"^job {rec.id}: attempt 1 is stale \\(current 2\\); not running it$"
    with pytest.raises(QueueError, match=stale):
        service.current_attempt(rec.id, 1)


def test_a_result_is_retried_until_redis_is_back(tmp_path: Path, spec: JobSpec) -> None:
    """Hours of training end in one write: a Redis that is down for a while must not lose it."""
    (tmp_path / "redis").mkdir()
    server = start_redis(tmp_path / "redis", "--appendonly", "yes")
    try:
        service = JobService(JobStore(connect(server.url), prefix=PREFIX))
        rec, _ = service.submit(spec)
        server.stop()
        restart = threading.Timer(2.0, server.start)
        restart.start()
        t0 = time.monotonic()
        service.store_result(rec.id, {"top1_error": 0.25, "top5_error": 0.05})
        restart.join()
        assert time.monotonic() - t0 >= 2.0  # it waited for the server rather than giving up
        assert service.store.get(rec.id).result == {"top1_error": 0.25, "top5_error": 0.05}
        server.stop()
        with pytest.raises(UnreachableError, match="Redis unreachable"):
            service.store_result(rec.id, {"top1_error": 0.5}, retry_s=1.5)  # and gives up in the end
    finally:
        server.stop()


def test_watch_follows_a_job_through_a_redis_restart(tmp_path: Path, spec: JobSpec) -> None:
    (tmp_path / "redis").mkdir()
    server = start_redis(tmp_path / "redis", "--appendonly", "yes")
    try:
        store = JobStore(connect(server.url), prefix=PREFIX)
        service = JobService(store, watch_block_ms=100)
        rec, _ = service.submit(spec)
        seen: list[dict] = []
        watcher = threading.Thread(target=lambda: seen.extend(e for _, e in service.watch(rec.id)))
        watcher.start()
        time.sleep(0.5)
        server.stop()  # AOF keeps the queue; watch must wait, not die
        time.sleep(3.0)
        assert watcher.is_alive()
        server.start()
        assert store.transition(store.get(rec.id), JobState.LAUNCHING, message="launching")
        assert store.transition(store.get(rec.id), JobState.RUNNING, message="running")
        assert store.transition(store.get(rec.id), JobState.SUCCEEDED, message="finished")
        watcher.join(30)
        assert not watcher.is_alive()
        assert _states(seen) == ["QUEUED", "LAUNCHING", "RUNNING", "SUCCEEDED"]  # every event once
    finally:
        server.stop()
