"""The Ray head dies under a running job (every process of it killed at once: GCS, raylet, dashboard,
the job's driver and its Ray Train workers) and a new head starts at the same address.

The dispatcher sees that the job's Ray Job is gone with the old cluster, queues a new attempt without
counting a failure (the spec allows no retries), and that attempt resumes from the newest checkpoint
to the weights of the same job run without the fault. No job is left RUNNING for a Ray Job that no
longer exists. Real redis-server, real Ray heads, the real dispatcher and CLI, real Fashion-MNIST shards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import RayHeadProcess
from shardkit import build_fashion

from alexnet_dist.service.connection import connect
from alexnet_dist.service.events import read_events
from alexnet_dist.service.launcher import RayJobsLauncher
from alexnet_dist.service.store import JobState, JobStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / "alexnet-dist"
TIMEOUT_S = 600  # generous: two short trainings and a head restart on 2 shared cores


def _wait(pred: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} after {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - t0


def _weights(model_url: str) -> dict[str, torch.Tensor]:
    return torch.load(model_url.removeprefix("file://"), weights_only=True)["model"]


def test_a_restarted_ray_head_costs_the_job_an_attempt_not_its_result(
    redis_url: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    train = build_fashion(fashion_mnist_dir, tmp_path / "train", limit=512, shard_size=64)
    val = build_fashion(fashion_mnist_dir, tmp_path / "val", limit=128, shard_size=64, split="test")
    process = RayHeadProcess(tmp_path / "head.log")
    head = process.start()
    env = {
        **os.environ,
        "PATH": f"{CLI.parent}:{os.environ.get('PATH', '')}",
        "ALEXNET_DIST_REDIS_URL": redis_url,
        "ALEXNET_DIST_RAY_DASHBOARD": head.dashboard_url,
        "RAY_ADDRESS": head.address,
        "ALEXNET_DIST_STORAGE": str(tmp_path / "runs"),
    }
    store = JobStore(connect(redis_url))
    dispatcher = subprocess.Popen(
        [str(CLI), "dispatcher", "--interval", "0.2", "--lock-ttl", "5"],
        env=env,
        stdout=open(tmp_path / "dispatcher.log", "w"),
        stderr=subprocess.STDOUT,
    )

    def submit() -> str:
        sets = [
            "--set",
            f"data.train={train.url}",
            "--set",
            f"data.val={val.url}",
            "--set",
            "retries=0",
            "--set",
            "checkpoint.every_steps=3",
            "--set",
            "train.ten_crop_eval=false",
        ]
        proc = subprocess.run(
            [str(CLI), "submit", str(ROOT / "jobs/smoke.toml"), *sets, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["id"]

    def diagnose(job_id: str) -> str:
        return (
            f"record: {store.get(job_id).to_dict(spec=False)}\n--- dispatcher\n"
            f"{(tmp_path / 'dispatcher.log').read_text()[-3000:]}"
        )

    def steps_seen(job_id: str) -> list[int]:
        events = [e for _, e in read_events(store.client, store.keys, job_id)]
        return [(e["epoch"] - 1) * e["steps_per_epoch"] + e["step"] for e in events if e["type"] == "step"]

    try:
        # The same job without the fault: the weights the faulted one must end with.
        alone = submit()
        _wait(lambda: store.get(alone).state in (JobState.SUCCEEDED, JobState.FAILED), "the reference job")
        assert store.get(alone).state is JobState.SUCCEEDED, diagnose(alone)

        job = submit()
        _wait(
            lambda: len(steps_seen(job)) >= 4, "the job's 8th step"
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
        events = [e for _, e in read_events(store.client, store.keys, job)]
        states = [(e["state"], e["attempt"]) for e in events if e["type"] == "state"]
        assert states == [
            ("QUEUED", 1),
            ("LAUNCHING", 1),
            ("RUNNING", 1),
            ("QUEUED", 2),
            ("LAUNCHING", 2),
            ("RUNNING", 2),
            ("SUCCEEDED", 2),
        ], states
        assert any("not counted as a failure" in e.get("message", "") for e in events)
        (resumed,) = [e for e in events if e["type"] == "resumed"]
        before = events[: events.index(resumed)]  # what attempt 1 logged before the head died
        killed_at = max(
            (e["epoch"] - 1) * e["steps_per_epoch"] + e["step"] for e in before if e["type"] == "step"
        )
        lost_steps = killed_at - resumed["global_step"]
        # it resumed from a checkpoint, at most a checkpoint interval (3) and a logging interval (2) back
        # (a checkpoint may also be one step past the last logged step: -1)
        assert resumed["global_step"] > 0 and -1 <= lost_steps <= 3 + 2, (killed_at, resumed)
        # the resumed attempt ends where the uninterrupted run ended, weight for weight
        a, b = _weights(store.get(alone).result["model_url"]), _weights(rec.result["model_url"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # the new cluster ran exactly the new attempt; nothing is left RUNNING for the lost one
        known = RayJobsLauncher(head.dashboard_url).statuses()
        assert sorted(k for k in known if k.startswith(job)) == [f"{job}-2"]
        assert not store.active()
        print(
            f"\nhead restart: killed at step {killed_at}, resumed from step {resumed['global_step']} "
            f"({lost_steps} steps redone); attempt 2 running {recovery_s:.1f} s after the kill "
            f"(waited {recovered:.1f} s after the new head)"
        )
    finally:
        dispatcher.send_signal(signal.SIGTERM)
        try:
            dispatcher.wait(15)
        except subprocess.TimeoutExpired:
            dispatcher.kill()
        process.kill()
