"""A Ray node lost mid-epoch: a cluster of a head (no CPUs of its own) and two worker nodes of 1 CPU
each, all separate raylets on this machine (``ray start`` three times); a 2-worker job gets one worker
on each node, and one node is killed outright (its raylet and its workers at once, as a reclaimed spot
instance goes) in the middle of an epoch.

The run's driver sees that a node under it died and says so in the job's record; the dispatcher queues
a new attempt without spending a retry (the spec allows none), and the job waits in the queue, "too
small" for what is left, until a new node joins; then it resumes from its newest checkpoint and ends
with the weights of the same job run without the fault. Real redis-server, real Ray, the real
dispatcher and CLI, real Fashion-MNIST shards.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import RayHeadProcess, RayNodeProcess
from servicekit import (
    CLI,
    SMOKE,
    cluster_env,
    diagnosis,
    fault_job,
    lost_work,
    same_weights,
    start_dispatcher,
    states,
    steps_seen,
    stop,
    submit,
    wait_until,
)

from alexnet_dist.service.connection import connect
from alexnet_dist.service.launcher import RayJobsLauncher
from alexnet_dist.service.store import JobState, JobStore

pytestmark = pytest.mark.slow


def test_a_node_lost_mid_epoch_costs_an_attempt_and_waits_for_room(
    redis_url: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    sets = fault_job(fashion_mnist_dir, tmp_path)
    head_process = RayHeadProcess(tmp_path / "head.log", num_cpus=0)  # drivers only: workers go to nodes
    head = head_process.start()
    nodes = {
        name: RayNodeProcess(head, name, tmp_path / f"node-{name}.log", base=base)
        for name, base in (("a", 20000), ("b", 20300), ("c", 20600))
    }
    nodes["a"].start()
    nodes["b"].start()
    env = cluster_env(redis_url, head, tmp_path)
    env.pop("RAY_AUTH_MODE", None)  # `train` must find the cluster's token by itself, as a user's would
    store = JobStore(connect(redis_url))
    dispatcher = None

    def diagnose(job_id: str) -> str:
        return diagnosis(store, job_id, tmp_path / "dispatcher.log")

    try:
        # The same job without the fault, trained straight on the cluster by `alexnet-dist train`.
        args = [a for k, v in {**sets, "name": "alone"}.items() for a in ("--set", f"{k}={v}")]
        proc = subprocess.run(
            [str(CLI), "train", str(SMOKE), *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        alone = json.loads(proc.stdout)

        dispatcher = start_dispatcher(env, tmp_path / "dispatcher.log")
        job = submit(env, sets)
        wait_until(lambda: len(steps_seen(store, job)) >= 4, "the job's 8th step")  # of 16
        nodes["b"].kill(signal.SIGKILL)  # the node, its raylet and its worker, at once
        t_kill = time.monotonic()
        wait_until(lambda: store.get(job).attempt == 2, "attempt 2 queued after the node died")
        requeued_s = time.monotonic() - t_kill
        rec = store.get(job)
        assert rec.state is JobState.QUEUED and rec.lost == 1 and rec.retries_left == 0, diagnose(job)
        assert "died under it" in rec.message and "not counted as a failure" in rec.message, rec.message
        # One node of 1 CPU is left: the job waits, and says why, until the cluster has room again.
        wait_until(lambda: job in store.pending(), "a pending reason")
        time.sleep(5)
        rec = store.get(job)
        assert (rec.state, rec.attempt) == (JobState.QUEUED, 2), diagnose(job)
        assert store.pending()[job]["why"] == "too-small", store.pending()[job]
        t_added = time.monotonic()
        nodes["c"].start()  # returns once the node has joined
        joined_s = time.monotonic() - t_added
        wait_until(lambda: store.get(job).state is JobState.RUNNING, "attempt 2 running on the new node")
        relaunch_s = time.monotonic() - t_added
        wait_until(lambda: store.get(job).state in (JobState.SUCCEEDED, JobState.FAILED), "the job's end")
        rec = store.get(job)
        assert rec.state is JobState.SUCCEEDED, diagnose(job)
        assert (rec.attempt, rec.retries_left, rec.lost, rec.node_lost) == (2, 0, 1, "")
        assert states(store, job) == [
            ("QUEUED", 1),
            ("LAUNCHING", 1),
            ("RUNNING", 1),
            ("QUEUED", 2),
            ("LAUNCHING", 2),
            ("RUNNING", 2),
            ("SUCCEEDED", 2),
        ]
        killed_at, resumed_at = lost_work(store, job)
        lost_steps = killed_at - resumed_at
        # resumed from a checkpoint: at most a checkpoint interval (3) and a logging interval (2) back
        assert resumed_at > 0 and -1 <= lost_steps <= 3 + 2, (killed_at, resumed_at)
        assert same_weights(alone["model_url"], rec.result["model_url"])
        known = RayJobsLauncher(head.dashboard_url).statuses()
        assert {k: known[k].state for k in known if k.startswith(job)} == {
            f"{job}-1": "FAILED",
            f"{job}-2": "SUCCEEDED",
        }
        print(
            f"\nnode lost: killed at step {killed_at}, resumed from step {resumed_at} ({lost_steps} steps "
            f"redone); queued again {requeued_s:.1f} s after the kill; running {relaunch_s:.1f} s after a "
            f"new node was started ({joined_s:.1f} s to join)"
        )
    finally:
        stop(dispatcher)
        for node in nodes.values():
            node.kill(signal.SIGKILL)
        head_process.kill()
