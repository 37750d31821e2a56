"""The dispatcher: launch order, lock, races, crash recovery and retries (Redis-backed cluster stand-in),
then real Ray Jobs on a local head (launch, follow, retry, cancel). The policy alone: test_policy.py.

The stand-in (`RedisCluster`) keeps its submissions in Redis so several dispatcher processes share it, and it
behaves as Ray Jobs does: a submission id is accepted once, a second submit is a no-op that is counted.
Run as a script, this file is also a dispatcher process (``serve``) and a Ray Job entrypoint (``entry``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis

from alexnet_dist.service.connection import connect
from alexnet_dist.service.dispatcher import Dispatcher
from alexnet_dist.service.launcher import LaunchStatus
from alexnet_dist.service.policy import Cluster, Decision, Job, plan
from alexnet_dist.service.store import JobState, JobStore
from alexnet_dist.spec import JobSpec, parse_spec

if TYPE_CHECKING:  # run as a script (a dispatcher process, a Ray Job), tests/ is not on the path
    from conftest import RayHead

HERE = Path(__file__).resolve()
PREFIX = "t:"


def make_spec(name: str = "tiny", workers: int = 1, cpus: float = 1.0, **over: object) -> JobSpec:
    data = {
        "name": name,
        "data": {"train": "shards/t.json", "val": "shards/v.json"},
        "scaling": {"workers": workers, "devices": "cpu", "cpus_per_worker": cpus},
        "train": {"batch_size": 4 * workers},
        **over,
    }
    return parse_spec(data)


class RedisCluster:
    """A cluster stand-in whose jobs finish (or fail) the moment they are submitted, kept in Redis."""

    def __init__(
        self, url: str, *, cpus: float = 4.0, outcome: str = "SUCCEEDED", crash_on_submit: bool = False
    ):
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.cpus = cpus
        self.outcome = outcome
        self.crash_on_submit = crash_on_submit

    def submit(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> None:
        if self.crash_on_submit:  # die between claiming the job and launching it
            os.kill(os.getpid(), signal.SIGKILL)
        if self.r.hsetnx("cluster:status", submission_id, self.outcome):
            self.r.hincrby("cluster:launches", submission_id, 1)
        else:
            self.r.hincrby("cluster:duplicates", submission_id, 1)

    def status(self, submission_id: str) -> LaunchStatus | None:
        st = self.r.hget("cluster:status", submission_id)
        return None if st is None else LaunchStatus(st, "exit code 1" if st == "FAILED" else "")

    def statuses(self) -> dict[str, LaunchStatus]:
        return {k: LaunchStatus(v) for k, v in self.r.hgetall("cluster:status").items()}

    def stop(self, submission_id: str) -> None:
        self.r.hset("cluster:status", submission_id, "STOPPED")
        self.r.hincrby("cluster:stops", submission_id, 1)

    def logs(self, submission_id: str) -> str:
        return ""

    def nodes(self) -> list[dict[str, float]]:
        return [{"CPU": self.cpus}]


def test_highest_priority_that_fits_runs_first_and_small_jobs_backfill(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    big, _ = queue.submit(make_spec("big", workers=4), priority=9)  # needs 4 CPUs, the cluster has 2
    low, _ = queue.submit(make_spec("low"), priority=1)
    high, _ = queue.submit(make_spec("high"), priority=5)
    cluster = RedisCluster(redis_url, cpus=2.0, outcome="RUNNING")
    d = Dispatcher(queue, cluster)
    assert d.acquire()
    assert d.launch_ready() == 2
    launched = list(cluster.r.hgetall("cluster:launches"))
    assert launched == [f"{high.id}-1", f"{low.id}-1"]  # priority order; big skipped, not blocking
    assert queue.get(big.id).state is JobState.QUEUED
    assert d.launch_ready() == 0  # both CPUs are held by the two running jobs


def test_a_job_cancelled_before_its_claim_leaves_its_room_to_the_next(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    first, _ = queue.submit(make_spec("first", workers=2), priority=5)
    second, _ = queue.submit(make_spec("second", workers=2), priority=1)
    cluster = RedisCluster(redis_url, cpus=2.0, outcome="RUNNING")  # room for one of the two
    asked: list[list[str]] = []

    def cancel_first(cluster: Cluster, running: list[Job], queued: list[Job], **context) -> list[Decision]:
        asked.append([j.id for j in queued])
        if len(asked) == 1:
            queue.cancel(first.id)  # a user cancels between the plan and the claim
        return plan(cluster, running, queued, **context)

    d = Dispatcher(queue, cluster, policy=cancel_first)
    assert d.acquire()
    assert d.launch_ready() == 1
    assert asked == [[first.id, second.id], [second.id]]  # planned again without the job it could not claim
    assert list(cluster.r.hgetall("cluster:launches")) == [f"{second.id}-1"]
    assert queue.get(first.id).state is JobState.CANCELLED


def _serve(url: str, crash: bool) -> None:
    queue = JobStore(connect(url), prefix=PREFIX)
    d = Dispatcher(queue, RedisCluster(url, crash_on_submit=crash), interval_s=0.02, lock_ttl_s=1.0)
    queue.client.hset("tokens", str(os.getpid()), d.token)
    d.run()


def _spawn(url: str, crash: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), "serve", url, "crash" if crash else "ok"])


def _wait(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.05)
    return time.monotonic() - t0


def test_two_racing_dispatchers_launch_each_job_exactly_once(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    jobs = [queue.submit(make_spec(f"j{i}"))[0] for i in range(60)]
    procs = [_spawn(redis_url), _spawn(redis_url)]
    try:
        _wait(lambda: queue.client.hlen("cluster:launches") >= 10, 30, "no launches")
        # Freeze the active one mid-work, past its lock's TTL: the other takes over; then let it run on.
        holder = queue.client.get(queue.keys.dispatcher_lock)
        tokens = queue.client.hgetall("tokens")
        leader = next(p for p in procs if tokens.get(str(p.pid)) == holder)
        leader.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        leader.send_signal(signal.SIGCONT)
        _wait(lambda: queue.counts()["SUCCEEDED"] == 60, 60, "jobs not all done")
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
    launches = {k: int(v) for k, v in queue.client.hgetall("cluster:launches").items()}
    assert launches == {f"{j.id}-1": 1 for j in jobs}
    assert all(r.attempt == 1 for r in queue.list())


def test_dispatcher_killed_between_claim_and_launch_is_reconciled(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    rec, _ = queue.submit(make_spec())
    crasher = _spawn(redis_url, crash=True)
    assert crasher.wait(30) == -signal.SIGKILL
    assert queue.get(rec.id).state is JobState.LAUNCHING  # taken, never launched
    assert queue.client.hlen("cluster:launches") == 0

    queue2 = JobStore(connect(redis_url), prefix=PREFIX)
    d = Dispatcher(queue2, RedisCluster(redis_url), interval_s=0.05, lock_ttl_s=1.0)
    stop = threading.Event()
    t = threading.Thread(target=d.run, args=(stop,))
    t0 = time.monotonic()
    t.start()
    try:
        took = _wait(lambda: queue.get(rec.id).state is JobState.SUCCEEDED, 10, "not reconciled")
    finally:
        stop.set()
        t.join()
    assert time.monotonic() - t0 < 3.0 and took < 3.0  # within the dead one's 1 s lock TTL plus a pass
    assert queue.client.hgetall("cluster:launches") == {f"{rec.id}-1": "1"}


def test_reconcile_adopts_a_running_ray_job_of_a_queued_job_and_retries_a_vanished_one(
    redis_url: str,
) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    cluster = RedisCluster(redis_url, cpus=0.5)  # no room: nothing new may launch in this test
    queued, _ = queue.submit(make_spec("q"))
    cluster.r.hset("cluster:status", f"{queued.id}-1", "RUNNING")  # Ray runs it; Redis says QUEUED
    gone, _ = queue.submit(make_spec("g", retries=1))
    assert queue.transition(gone, JobState.RUNNING, message="was running")  # Redis says RUNNING; Ray lost it
    d = Dispatcher(queue, cluster)
    assert d.acquire()
    d.reconcile()
    assert queue.get(queued.id).state is JobState.RUNNING
    g = queue.get(gone.id)
    # lost with the cluster, not failed: a new attempt, its retry kept
    assert (g.state, g.attempt, g.retries_left, g.lost) == (JobState.QUEUED, 2, 1, 1)
    assert "not found on the cluster" in g.message and "not counted as a failure" in g.message
    assert d.launches == 0


def test_a_job_whose_ray_job_keeps_vanishing_fails_in_the_end(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    rec, _ = queue.submit(make_spec("v", retries=0))
    d = Dispatcher(queue, RedisCluster(redis_url, cpus=0.5))
    assert d.acquire()
    for _ in range(6):
        cur = queue.get(rec.id)
        assert queue.transition(cur, JobState.RUNNING, message="launched")  # Ray then forgets it
        d.follow()
    final = queue.get(rec.id)
    assert (final.state, final.lost, final.attempt) == (JobState.FAILED, 5, 6)
    assert final.message.startswith(f"Ray job {rec.id}-6 not found on the cluster (6 times)")


def test_a_run_that_lost_a_node_is_queued_again_without_spending_a_retry(redis_url: str) -> None:
    """Its Ray Job FAILED, but its run said first (in the record) that a node under it died: a lost
    attempt, its retry kept; a failure of the next attempt is a failure again."""
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    rec, _ = queue.submit(make_spec("n", retries=1))
    d = Dispatcher(queue, RedisCluster(redis_url, outcome="FAILED"))
    assert d.acquire()
    d.launch_ready()  # attempt 1: submitted, and FAILED on the stand-in at once
    why = "training run 'n': Ray node 3f2a1b9c died under it; its checkpoints are kept"
    assert queue.mark_node_lost(rec.id, 1, why) and not queue.mark_node_lost(rec.id, 2, why)
    d.follow()
    g = queue.get(rec.id)
    assert (g.state, g.attempt, g.retries_left, g.lost, g.node_lost) == (JobState.QUEUED, 2, 1, 1, "")
    assert g.message.startswith(f"Ray job {rec.id}-1: {why}") and "not counted as a failure" in g.message
    d.step()  # attempt 2 launched; it fails without a node lost, and that spends the retry
    d.follow()
    g = queue.get(rec.id)
    assert (g.state, g.attempt, g.retries_left, g.lost) == (JobState.QUEUED, 3, 0, 1)


def test_failed_job_is_retried_up_to_its_limit_then_fails(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    rec, _ = queue.submit(make_spec(retries=2))
    d = Dispatcher(queue, RedisCluster(redis_url, outcome="FAILED"))
    assert d.acquire()
    for _ in range(4):
        d.step()
    final = queue.get(rec.id)
    assert (final.state, final.attempt, final.retries_left) == (JobState.FAILED, 3, 0)
    assert sorted(queue.client.hgetall("cluster:launches")) == [f"{rec.id}-{a}" for a in (1, 2, 3)]
    states = [json.loads(f["data"])["state"] for _, f in queue.client.xrange(queue.keys.events(rec.id))]
    assert states == ["QUEUED"] + ["LAUNCHING", "RUNNING", "QUEUED"] * 2 + ["LAUNCHING", "RUNNING", "FAILED"]


def test_cancel_of_a_running_job_stops_it(redis_url: str) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    rec, _ = queue.submit(make_spec())
    cluster = RedisCluster(redis_url, outcome="RUNNING")
    d = Dispatcher(queue, cluster)
    assert d.acquire()
    d.step()
    assert queue.get(rec.id).state is JobState.RUNNING
    queue.cancel(rec.id)
    d.step()  # stops the Ray job
    d.step()  # sees it STOPPED
    assert cluster.r.hgetall("cluster:stops") == {f"{rec.id}-1": "1"}
    assert queue.get(rec.id).state is JobState.CANCELLED


# -- real Ray -------------------------------------------------------------------------------------------


def _entry(job_id: str, attempt: int) -> str:
    return f"{sys.executable} {HERE} entry {job_id} {attempt}"


def _run_entry(job_id: str, attempt: int) -> None:
    """A Ray Job: a step and a final event, then a stored result; attempt 1 of "flaky" fails."""
    from alexnet_dist.service.events import job_publisher
    from alexnet_dist.service.keys import Keys
    from alexnet_dist.settings import load_settings

    s = load_settings()
    queue = JobStore(connect(s.redis_url), prefix=s.redis_prefix)
    rec = queue.get(job_id)
    print(f"entry {job_id} attempt {attempt}", flush=True)
    if rec.name == "flaky" and attempt == 1:
        sys.exit(1)
    if rec.name == "sleepy":
        time.sleep(120)
    pub = job_publisher(s.redis_url, Keys(s.redis_prefix), job_id)
    pub.publish({"type": "step", "epoch": 1, "epochs": 1, "step": 1, "steps_per_epoch": 1, "loss": 2.3})
    result = {"top1_error": 0.5, "top5_error": 0.125, "ten_crop": True, "attempt_seen": attempt}
    pub.publish({"type": "final", **{k: result[k] for k in ("top1_error", "top5_error", "ten_crop")}})
    pub.close()
    queue.store_result(job_id, result)


@pytest.mark.slow
def test_ray_jobs_launch_retry_result_and_cancel(redis_url: str, ray_head: RayHead) -> None:
    from alexnet_dist.service.events import read_events, subscribe_results
    from alexnet_dist.service.launcher import RayJobsLauncher

    queue = JobStore(connect(redis_url), prefix=PREFIX)
    launcher = RayJobsLauncher(ray_head.dashboard_url)
    env = {"ALEXNET_DIST_REDIS_URL": redis_url, "ALEXNET_DIST_REDIS_PREFIX": PREFIX}
    d = Dispatcher(queue, launcher, env=env, entrypoint=_entry, interval_s=0.2, lock_ttl_s=2.0)
    results = subscribe_results(connect(redis_url), queue.keys, timeout_s=120)
    flaky, _ = queue.submit(make_spec("flaky", retries=1))
    sleepy, _ = queue.submit(make_spec("sleepy"))
    stop = threading.Event()
    t = threading.Thread(target=d.run, args=(stop,))
    t.start()
    try:
        _wait(lambda: queue.get(sleepy.id).state is JobState.RUNNING, 60, "sleepy not running")
        _wait(
            lambda: (launcher.status(sleepy.submission_id) or LaunchStatus("")).state == "RUNNING",
            60,
            "not up",
        )
        queue.cancel(sleepy.id)
        _wait(lambda: queue.get(sleepy.id).state is JobState.CANCELLED, 60, "sleepy not cancelled")
        assert launcher.status(sleepy.submission_id).state == "STOPPED"
        _wait(
            lambda: queue.get(flaky.id).state in {JobState.SUCCEEDED, JobState.FAILED}, 120, "flaky not done"
        )
    finally:
        stop.set()
        t.join()
    done = queue.get(flaky.id)
    assert (done.state, done.attempt) == (JobState.SUCCEEDED, 2)
    assert done.result == {"top1_error": 0.5, "top5_error": 0.125, "ten_crop": True, "attempt_seen": 2}
    assert launcher.status(f"{flaky.id}-1").state == "FAILED"
    published = next(results)
    assert (published["job_id"], published["top5_error"]) == (flaky.id, 0.125)
    events = [e for _, e in read_events(queue.client, queue.keys, flaky.id)]
    assert [e["type"] for e in events if e["type"] != "state"] == ["step", "final"]
    assert [e["state"] for e in events if e["type"] == "state"][-1] == "SUCCEEDED"
    assert f"entry {flaky.id} attempt 2" in launcher.logs(f"{flaky.id}-2")
    # A second submit of a launched id is accepted as already launched, not run again.
    launcher.submit(f"{flaky.id}-2", "false", env)
    assert launcher.status(f"{flaky.id}-2").state == "SUCCEEDED"
    assert d.launches == 3


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        _serve(sys.argv[2], sys.argv[3] == "crash")
    elif sys.argv[1] == "entry":
        _run_entry(sys.argv[2], int(sys.argv[3]))


def test_a_finished_runs_pace_gives_later_runs_like_it_an_eta(redis_url: str, tmp_path: Path) -> None:
    """A SUCCEEDED run records its seconds per step; a queued run of the same preset, scaling and batch
    gets an estimate from it (its manifest's steps at that pace), so its ETA spans start to finish."""
    from alexnet_dist.data.manifest import Manifest, ShardInfo, save_manifest
    from alexnet_dist.events import encode_event

    shard = ShardInfo("s.tar", 640, 1, "x")
    stats = dict(mean=(0.0,) * 3, std=(1.0,) * 3, eigval=(1.0,) * 3, eigvec=((1.0, 0.0, 0.0),) * 3)
    classes = tuple(map(str, range(1000)))
    manifest = Manifest(url=str(tmp_path / "m.json"), split="train", shards=(shard,), names=(),
                        classes=classes, image_size=256, num_samples=640, **stats)  # fmt: skip
    save_manifest(manifest, manifest.url)
    data = {"train": manifest.url, "val": manifest.url}
    queue = JobStore(connect(redis_url), prefix="pace:")
    cluster = RedisCluster(redis_url, cpus=1.0, outcome="RUNNING")
    d = Dispatcher(queue, cluster)
    assert d.acquire()
    done, _ = queue.submit(make_spec("done", data=data, train={"batch_size": 32, "epochs": 2}))
    assert d.launch_ready() == 1
    queue.store_result(done.id, {"steps": 40, "train_seconds": 80.0})  # 2 s a step
    cluster.r.hset("cluster:status", f"{done.id}-1", "SUCCEEDED")
    d.follow()
    assert queue.get(done.id).state is JobState.SUCCEEDED
    assert float(queue.client.hget(queue.keys.throughput, "paper:1xcpu:32")) == 2.0

    running, _ = queue.submit(make_spec("running", data=data, train={"batch_size": 32, "epochs": 1}))
    assert d.launch_ready() == 1  # holds the one CPU; 10 of its 20 steps left at 1 s a step
    step = {"type": "step", "epoch": 1, "epochs": 1, "step": 10, "steps_per_epoch": 20}
    step["images_per_s"] = 32.0
    queue.client.xadd(queue.keys.events(running.id), {"data": encode_event(step)})
    waiting, _ = queue.submit(make_spec("waiting", data=data, train={"batch_size": 32, "epochs": 2}))
    t0 = time.time()
    assert d.launch_ready() == 0
    eta = queue.pending()[waiting.id]
    assert eta["position"] == 1 and "waits for 1 running job to end, in about 10 s" in eta["reason"]
    assert 8.0 < eta["eta_start"] - t0 < 11.0  # when the running job's 10 steps are done
    assert eta["eta_finish"] - eta["eta_start"] == pytest.approx(80.0)  # 40 steps at the measured 2 s
