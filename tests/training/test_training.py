"""Training on a real local Ray cluster: learning, DDP arithmetic, crashes, exact resumption, S3.

Every test here runs real Ray Train workers (2 on the 2 CPUs) on real Fashion-MNIST shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from jobspecs import cpu_spec

from alexnet_dist.data.batch import PAD_LABEL
from alexnet_dist.data.build.writer import BuildOptions, build
from alexnet_dist.errors import ClusterError, ConfigError
from alexnet_dist.model.network import build_model
from alexnet_dist.settings import Settings
from alexnet_dist.spec import JobSpec
from alexnet_dist.training.driver import run_training
from alexnet_dist.training.loop import training_loss

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """One local Ray for the module; started after the S3 server so workers inherit its credentials."""
    import ray

    os.environ["RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS"] = "0"
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    yield
    ray.shutdown()


def _build(root: Path, split: str, limit: int, shard_size: int) -> str:
    (manifest,) = build(
        "/usr/share/datasets/fashion-mnist",
        str(root),
        BuildOptions(resize_to=36, shard_size=shard_size, limit=limit, processes=1),
        fmt="fashion-mnist",
        split=split,
    )
    return manifest.url


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    return {
        # 16-sample shards: with per-worker batch 16, a step of 2 workers reads exactly the two shards
        # that one step of 1 worker with batch 32 reads (the shard order depends on (seed, epoch) only).
        "tiny_train": _build(root / "tiny", "train", 512, 16),
        "tiny_test": _build(root / "tiny", "test", 128, 64),
        "train": _build(root / "more", "train", 6000, 500),
        "test": _build(root / "more", "test", 1000, 250),
    }


def make_spec(shards: dict[str, str], storage: str, *, tiny: bool = True, **overrides) -> JobSpec:
    train, val = (shards["tiny_train"], shards["tiny_test"]) if tiny else (shards["train"], shards["test"])
    return cpu_spec(train, val, storage, **overrides)


def test_training_loss_smooths_labels_and_ignores_padding() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 10)
    labels = torch.tensor([3, 1, PAD_LABEL, 9, 0])
    real = labels != PAD_LABEL
    logp = torch.log_softmax(logits[real], dim=1)
    nll = -logp.gather(1, labels[real, None]).squeeze(1)
    uniform = -logp.mean(dim=1)  # cross-entropy against 1/10 on every class
    for e in (0.0, 0.1):
        want = ((1 - e) * nll + e * uniform).mean()
        torch.testing.assert_close(training_loss(logits, labels, e), want)
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        make_spec({"tiny_train": "/a.json", "tiny_test": "/b.json"}, "/tmp/x", train__label_smoothing=1.0)


def load_weights(model_url: str) -> dict[str, torch.Tensor]:
    path = model_url.removeprefix("file://")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> float:
    assert a.keys() == b.keys()
    gap = max((a[k] - b[k]).abs().max().item() for k in a)
    assert gap <= atol, f"weights differ by {gap}"
    return gap


def test_two_workers_learn_fashion_mnist(ray_cluster, shards, tmp_path) -> None:
    spec = make_spec(
        shards,
        str(tmp_path),
        tiny=False,
        train__epochs=3,
        train__ten_crop_eval=True,
        checkpoint__every_steps=0,
    )
    result = run_training(spec, run_name="learn", settings=Settings())
    # chance is 0.9 top-1 error; 3 short epochs of 6,000 images get well below half of that
    assert result.top1_error < 0.35, result
    assert result.ten_crop and result.val_samples == 1000
    assert result.top5_error < result.top1_error
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert Path(result.model_url.removeprefix("file://")).with_suffix(".json").exists()


def test_two_workers_of_batch_b_equal_one_worker_of_batch_2b(ray_cluster, shards, tmp_path) -> None:
    common = dict(
        model__dropout=0.0, train__epochs=1, train__max_steps_per_epoch=4, checkpoint__every_steps=0
    )
    two = make_spec(shards, str(tmp_path), **common)
    one = make_spec(shards, str(tmp_path), scaling__workers=1, **common)
    assert two.per_worker_batch == 16 and one.per_worker_batch == 32
    r2 = run_training(two, run_name="two", settings=Settings())
    r1 = run_training(one, run_name="one", settings=Settings())
    assert r1.steps == r2.steps == 4
    w1, w2 = load_weights(r1.model_url), load_weights(r2.model_url)
    assert_same_weights(w1, w2, atol=2e-5)  # float sums in another order, nothing more
    torch.manual_seed(two.seed)  # the initial weights every rank starts from
    init = build_model("small", num_classes=10).state_dict()
    assert max((w1[k] - init[k]).abs().max().item() for k in w1) > 1e-3  # 4 steps really moved them


def test_crash_and_restart_resume_exactly(ray_cluster, shards, tmp_path) -> None:
    settings = Settings()
    reference = run_training(make_spec(shards, str(tmp_path)), run_name="reference", settings=settings)
    steps_per_epoch = reference.steps // 2
    assert reference.steps == 2 * steps_per_epoch and steps_per_epoch == 16  # 512 images / 32 a step
    ref = load_weights(reference.model_url)

    # 1. a worker dies mid-epoch; Ray replaces it and the run continues from the last checkpoint
    marker = tmp_path / "died-once"
    crashed = make_spec(shards, str(tmp_path), retries=1)
    fault = {"rank": 1, "global_step": 11, "marker": str(marker)}  # mid-epoch 1, after the checkpoint at 9
    result = run_training(crashed, run_name="crashed", settings=settings, fault=fault)
    assert marker.read_text() == "11"
    assert result.steps == reference.steps
    assert_same_weights(load_weights(result.model_url), ref)

    # 2. the whole run is killed (no retries), its newest checkpoint is then truncated, and starting the
    #    same run again falls back to the previous checkpoint and still ends exactly as the reference.
    marker2 = tmp_path / "died-twice"
    spec = make_spec(shards, str(tmp_path), retries=0)
    with pytest.raises(ClusterError, match="failed"):
        run_training(spec, run_name="restarted", settings=settings, fault={**fault, "marker": str(marker2)})
    run_dir = tmp_path / "restarted"
    ckpts = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert [int(p.name.split("_")[1]) for p in ckpts] == [3, 6, 9]  # every 3 steps, none past the crash
    newest = ckpts[-1] / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = run_training(spec, run_name="restarted", settings=settings)
    assert result.steps == reference.steps
    assert_same_weights(load_weights(result.model_url), ref)


def test_checkpoints_and_model_land_in_s3(ray_cluster, shards, s3_server, monkeypatch) -> None:
    bucket = s3_server.make_bucket("ckpts")
    settings = Settings(s3_endpoint_url=s3_server.endpoint_url)
    spec = make_spec(shards, f"s3://{bucket}/runs", train__epochs=1)
    result = run_training(spec, run_name="s3run", settings=settings)
    assert result.model_url == f"s3://{bucket}/runs/s3run/model.pt"
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    ckpt_files = sorted(k for k in keys if k.endswith("/checkpoint.pt"))
    steps = sorted({int(k.split("/")[2].split("_")[1]) for k in ckpt_files})
    assert steps == [3, 6, 9, 12, 15, 16]  # every 3 steps, the epoch end (16) and the finished run
    body = s3_server.client().get_object(Bucket=bucket, Key="runs/s3run/model.pt")["Body"].read()
    import io

    model_file = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    assert model_file["num_classes"] == 10 and model_file["config"]["name"] == "small"
    assert abs(model_file["source"]["top1_error"] - result.top1_error) < 1e-12
    assert result.checkpoint_url and result.checkpoint_url.startswith(f"s3://{bucket}/runs/s3run/checkpoint_")
