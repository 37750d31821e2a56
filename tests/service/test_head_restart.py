"""The Ray head dies under a running job (every process of it killed at once: GCS, raylet, dashboard,
the job's driver and its Ray Train workers) and a new head starts at the same address.

The dispatcher sees that the job's Ray Job is gone with the old cluster, queues a new attempt without
counting a failure (the spec allows no retries), and that attempt resumes from the newest checkpoint
to the weights of the same job run without the fault. No job is left RUNNING for a Ray Job that no
longer exists. Real redis-server, real Ray heads, the real dispatcher and CLI, real Fashion-MNIST shards.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import RayHeadProcess
from servicekit import (
    cluster_env,
    diagnosis,
    events,
    fault_job,
    lost_work,
    same_weights,
    start_dispatcher,
    states,
    steps_seen,
    stop,
    submit,
)
from servicekit import wait_until as _wait

from alexnet_dist.service.connection import connect
from alexnet_dist.service.launcher import RayJobsLauncher
from alexnet_dist.service.store import JobState, JobStore

pytestmark = pytest.mark.slow


def test_a_restarted_ray_head_costs_the_job_an_attempt_not_its_result(
    redis_url: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    sets = fault_job(fashion_mnist_dir, tmp_path)
    process = RayHeadProcess(tmp_path / "head.log")
    head = process.start()
    env = cluster_env(redis_url, head, tmp_path)
    store = JobStore(connect(redis_url))
    dispatcher = start_dispatcher(env, tmp_path / "dispatcher.log")

    def diagnose(job_id: str) -> str:
        return diagnosis(store, job_id, tmp_path / "dispatcher.log")

    try:
        # The same job without the fault: the weights the faulted one must end with.
        alone = submit(env, sets)
        _wait(lambda: store.get(alone).state in (JobState.SUCCEEDED, JobState.FAILED), "the reference job")
        assert store.get(alone).state is JobState.SUCCEEDED, diagnose(alone)

        job = submit(env, sets)
        _wait(
            lambda: len(steps_seen(store, job)) >= 4, "the job's 8th step"
        )  # logged every 2 steps: a checkpoint at 6
        process.kill(signal.SIGKILL)  # the head and everything on it, at once
        t_kill = time.monotonic()
        time.sleep(2)
        process.start()
        assert store.get(job).state is not JobState.FAILED, diagnose(job)
        recovered = _wait(
            lambda: store.get(job).attempt == 2 and store.get(job).state is JobState.RUNNING,
            "attempt 2 running on the new head",
        )
        recovery_s = time.monotonic() - t_kill
        _wait(lambda: store.get(job).state in (JobState.SUCCEEDED, JobState.FAILED), "the job's end")
        rec = store.get(job)
        assert rec.state is JobState.SUCCEEDED, diagnose(job)
        assert (rec.attempt, rec.retries_left, rec.lost) == (2, 0, 1)  # a lost attempt, not a failure
        assert states(store, job) == [
            ("QUEUED", 1),
            ("LAUNCHING", 1),
            ("RUNNING", 1),
            ("QUEUED", 2),
            ("LAUNCHING", 2),
            ("RUNNING", 2),
            ("SUCCEEDED", 2),
        ]
        assert any("not counted as a failure" in e.get("message", "") for e in events(store, job))
        killed_at, resumed_at = lost_work(store, job)
        lost_steps = killed_at - resumed_at
        # it resumed from a checkpoint, at most a checkpoint interval (3) and a logging interval (2) back
        # (a checkpoint may also be one step past the last logged step: -1)
        assert resumed_at > 0 and -1 <= lost_steps <= 3 + 2, (killed_at, resumed_at)
        # the resumed attempt ends where the uninterrupted run ended, weight for weight
        assert same_weights(store.get(alone).result["model_url"], rec.result["model_url"])
        # the new cluster ran exactly the new attempt; nothing is left RUNNING for the lost one
        known = RayJobsLauncher(head.dashboard_url).statuses()
        assert sorted(k for k in known if k.startswith(job)) == [f"{job}-2"]
        assert not store.active()
        print(
            f"\nhead restart: killed at step {killed_at}, resumed from step {resumed_at} "
            f"({lost_steps} steps redone); attempt 2 running {recovery_s:.1f} s after the kill "
            f"(waited {recovered:.1f} s after the new head)"
        )
    finally:
        stop(dispatcher)
        process.kill()
