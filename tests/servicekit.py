"""What the end-to-end fault tests share: the real CLI and dispatcher as subprocesses, waiting on the
job store, and reading a run's events and final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from alexnet_dist.service.events import read_events
from alexnet_dist.service.store import JobStore

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "alexnet-dist"
SMOKE = ROOT / "jobs/smoke.toml"


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 600) -> float:
    """Seconds until ``pred()`` holds; AssertionError naming ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what} after {timeout:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - t0


def weights(model_url: str) -> dict[str, torch.Tensor]:
    return torch.load(model_url.removeprefix("file://"), weights_only=True)["model"]


def same_weights(a_url: str, b_url: str) -> bool:
    a, b = weights(a_url), weights(b_url)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for the CLI and the dispatcher: the venv's bin on PATH, plus ``extra``."""
    return {**os.environ, "PATH": f"{CLI.parent}:{os.environ.get('PATH', '')}", **extra}


def submit(env: dict[str, str], sets: dict[str, object], spec: Path = SMOKE, *extra: str) -> str:
    """``alexnet-dist submit spec --set k=v ... --json``: the new job's id."""
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(
        [str(CLI), "submit", str(spec), *args, *extra, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["id"]


def start_dispatcher(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """``alexnet-dist dispatcher`` (a pass every 0.2 s, a 5 s lock, unless ``args`` say otherwise)."""
    return subprocess.Popen(
        [str(CLI), "dispatcher", "--interval", "0.2", "--lock-ttl", "5", *args],
        env=env,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def events(store: JobStore, job_id: str) -> list[dict]:
    return [e for _, e in read_events(store.client, store.keys, job_id)]


def global_step(e: dict) -> int:
    return (e["epoch"] - 1) * e["steps_per_epoch"] + e["step"]


def steps_seen(store: JobStore, job_id: str) -> list[int]:
    return [global_step(e) for e in events(store, job_id) if e["type"] == "step"]


def states(store: JobStore, job_id: str) -> list[tuple[str, int]]:
    return [(e["state"], e["attempt"]) for e in events(store, job_id) if e["type"] == "state"]


def lost_work(store: JobStore, job_id: str) -> tuple[int, int]:
    """(the last step logged before the attempt that resumed, the step it resumed from)."""
    evs = events(store, job_id)
    (resumed,) = [e for e in evs if e["type"] == "resumed"]
    before = evs[: evs.index(resumed)]
    return max(global_step(e) for e in before if e["type"] == "step"), resumed["global_step"]


def fault_job(fashion_mnist_dir: Path, tmp_path: Path) -> dict[str, object]:
    """The ``--set``s of the fault tests' job: the smoke spec on 512 Fashion-MNIST images of its own,
    one epoch of 16 steps of 2 workers, a checkpoint every 3 steps, no retries."""
    from shardkit import build_fashion

    train = build_fashion(fashion_mnist_dir, tmp_path / "train", limit=512, shard_size=64)
    val = build_fashion(fashion_mnist_dir, tmp_path / "val", limit=128, shard_size=64, split="test")
    return {
        "data.train": train.url,
        "data.val": val.url,
        "retries": 0,
        "train.epochs": 1,
        "checkpoint.every_steps": 3,
        "train.ten_crop_eval": "false",
    }


def cluster_env(redis_url: str, head, tmp_path: Path) -> dict[str, str]:
    """The CLI's and the dispatcher's environment for a Ray head of the test's, runs under tmp_path."""
    return cli_env(
        ALEXNET_DIST_REDIS_URL=redis_url,
        ALEXNET_DIST_RAY_DASHBOARD=head.dashboard_url,
        RAY_ADDRESS=head.address,
        ALEXNET_DIST_STORAGE=str(tmp_path / "runs"),
    )


def diagnosis(store: JobStore, job_id: str, log: Path) -> str:
    """A failing fault test's message: the job's record and the end of the dispatcher's log."""
    return f"record: {store.get(job_id).to_dict(spec=False)}\n--- dispatcher\n{log.read_text()[-3000:]}"
