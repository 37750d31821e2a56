"""The local runner (no Ray): the same loop as a Ray Train worker, to the same weights.

The smoke job (jobs/smoke.toml) trained by two torchrun processes ends with the weights that two Ray
Train workers reach; one process (`alexnet-dist train --local`) resumes after a crash to the weights of
a run that never stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from shardkit import build_fashion
from typer.testing import CliRunner

from alexnet_dist.cli import app
from alexnet_dist.settings import Settings
from alexnet_dist.spec import load_spec
from alexnet_dist.training.local import run_local

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_data(fashion_mnist_dir, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("smoke")
    train = build_fashion(fashion_mnist_dir, root / "train", limit=256, shard_size=64)
    val = build_fashion(fashion_mnist_dir, root / "val", limit=128, shard_size=64, split="test")
    return [f"data.train={train.url}", f"data.val={val.url}", "train.epochs=1", "train.ten_crop_eval=false"]


def weights(model_url: str) -> dict[str, torch.Tensor]:
    return torch.load(model_url.removeprefix("file://"), weights_only=True)["model"]


def same_weights(a: str, b: str) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_torchrun_workers_reach_the_weights_of_ray_train_workers(smoke_data, tmp_path) -> None:
    import ray

    from alexnet_dist.training.driver import run_training

    overrides = [*smoke_data, f"checkpoint.storage={tmp_path / 'ray'}"]
    spec = load_spec(ROOT / "jobs/smoke.toml", overrides)
    os.environ["RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS"] = "0"
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    try:
        on_ray = run_training(spec, run_name="smoke", settings=Settings())
    finally:
        ray.shutdown()
    sets = [a for o in [*smoke_data, f"checkpoint.storage={tmp_path / 'local'}"] for a in ("--set", o)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    port = ["--master-port", str(free_port())]
    cmd = [*torchrun, *port, "-m", "alexnet_dist.training.local", str(ROOT / "jobs/smoke.toml"), *sets]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # one result for the torchrun job, from rank 0
    local = json.loads(lines[0])
    assert local["steps"] == on_ray.steps == 8  # 256 images, batch 32
    assert same_weights(local["model_url"], on_ray.model_url)
    assert local["top1_error"] == on_ray.top1_error


def test_a_local_run_resumes_after_a_crash_to_the_same_weights(smoke_data, tmp_path) -> None:
    single = [*smoke_data, "scaling.workers=1", "train.batch_size=16", "checkpoint.every_steps=3"]
    reference = load_spec(ROOT / "jobs/smoke.toml", [*single, f"checkpoint.storage={tmp_path / 'ref'}"])
    whole = run_local(reference, run_name="smoke", settings=Settings())

    crashed = [*single, f"checkpoint.storage={tmp_path / 'crash'}"]
    marker = tmp_path / "died"
    code = (
        "from alexnet_dist.spec import load_spec\nfrom alexnet_dist.settings import Settings\n"
        "from alexnet_dist.training.local import run_local\n"
        f"spec = load_spec({str(ROOT / 'jobs/smoke.toml')!r}, {crashed!r})\n"
        f"run_local(spec, run_name='smoke', settings=Settings(), "
        f"fault={{'rank': 0, 'global_step': 11, 'marker': {str(marker)!r}}})\n"
    )
    died = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert died.returncode == 1 and marker.read_text() == "11"  # a real process death at step 11
    runs = sorted(
        p.name for p in (tmp_path / "crash" / "smoke").iterdir() if p.name.startswith("checkpoint_")
    )
    assert runs[-1].startswith("checkpoint_0000000009_")  # the newest checkpoint: step 9 of 16

    cli = CliRunner().invoke(
        app,
        [
            "train",
            str(ROOT / "jobs/smoke.toml"),
            "--local",
            "--json",
            *[a for o in crashed for a in ("--set", o)],
        ],
    )
    assert cli.exit_code == 0, cli.output
    resumed = json.loads(cli.output.strip().splitlines()[-1])
    assert resumed["steps"] == whole.steps == 16
    assert same_weights(resumed["model_url"], whole.model_url)
    assert resumed["top1_error"] == whole.top1_error
