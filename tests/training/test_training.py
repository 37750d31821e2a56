"""Training on a real local Ray cluster: learning, DDP arithmetic, crashes, exact resumption, S3.

Every test here runs real Ray Train workers (2 on the 2 CPUs) on real Fashion-MNIST shards.
"""

from __future__ import annotations

import os
import time
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


def test_a_full_disk_under_ray_train_fails_in_one_line_and_keeps_the_last_checkpoint(
    ray_cluster, shards, small_disk
) -> None:
    """Ray Train's own checkpoint persistence on a 5 MiB tmpfs: the first checkpoint (3.5 MiB) fits, the
    second does not. The run fails in one line naming the folder and the room needed, before Ray copies
    anything, and the first checkpoint stays whole and loadable."""
    from alexnet_dist.training.checkpoint import read_checkpoint

    spec = make_spec(shards, str(small_disk), train__epochs=1)
    with pytest.raises(ClusterError) as caught:
        run_training(spec, run_name="full", settings=Settings())
    message = str(caught.value)
    assert "\n" not in message, message
    head = f"training run 'full' failed after 0 retries: rank 0: {small_disk}/full/"
    assert message.startswith(head), message
    assert "/checkpoint_0000000006_" in message, message
    assert "no room for the checkpoint (" in message and "MiB needed" in message, message
    run_dir = small_disk / "full"
    kept = sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))
    assert [p.name[: len("checkpoint_0000000003")] for p in kept] == ["checkpoint_0000000003"]
    state = read_checkpoint(kept[0])
    assert (state["global_step"], state["finished"]) == (3, False)
    print(f"\nfull disk under Ray Train: {message}")


def test_ray_train_checkpoint_uploads_ride_out_s3_faults(ray_cluster, shards, s3_server, tmp_path) -> None:
    """Ray Train's own checkpoint uploads (pyarrow's S3 filesystem) through a proxy that resets every
    connection for 1.5 s one MiB into the first checkpoint's upload, and answers 503 for 2 s one MiB
    into the third's. The run ends as the same run on local storage does, weight for weight, and every
    checkpoint it left in S3 is whole."""
    import io
    import threading

    from proxies import FaultProxy

    bucket = s3_server.make_bucket("faulty")
    proxy = FaultProxy(s3_server.endpoint_url)
    mib = 2**20
    checkpoint_bytes = 3.5 * mib  # the small preset's model and momentum

    def faults() -> None:
        for at, mode, for_s in ((1 * mib, "drop", 1.5), (2 * checkpoint_bytes + mib, "http503", 2.0)):
            while proxy.bytes < at:
                time.sleep(0.01)
            proxy.set_mode(mode, for_s=for_s)

    settings = Settings(s3_endpoint_url=proxy.endpoint_url)
    local = make_spec(shards, str(tmp_path), train__epochs=1)
    reference = run_training(local, run_name="ref", settings=settings)
    injector = threading.Thread(target=faults, daemon=True)
    injector.start()
    spec = make_spec(shards, f"s3://{bucket}/runs", train__epochs=1)
    t0 = time.monotonic()
    result = run_training(spec, run_name="faulty", settings=settings)
    took = time.monotonic() - t0
    injector.join(1)
    proxy.close()
    assert proxy.resets > 0 and proxy.answered_503 > 0, (proxy.resets, proxy.answered_503)
    got = _s3_weights(s3_server, bucket, "runs/faulty/model.pt")
    assert_same_weights(load_weights(reference.model_url), got)
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    ckpts = sorted(k for k in keys if k.endswith("/checkpoint.pt"))
    assert sorted({int(k.split("/")[2].split("_")[1]) for k in ckpts}) == [3, 6, 9, 12, 15, 16]
    for key in ckpts:  # each loads whole
        body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    print(
        f"\nS3 faults under Ray Train's uploads: {proxy.resets} connections reset, {proxy.answered_503} "
        f"requests answered 503; run of {result.steps} steps took {took:.1f} s"
    )


def _s3_weights(s3_server, bucket: str, key: str) -> dict[str, torch.Tensor]:
    import io

    body = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)["model"]


def test_the_checkpoint_filesystem_keeps_its_retry_bound_when_pickled_for_ray() -> None:
    """Ray pickles the run's filesystem to its controller and workers; pyarrow's own S3FileSystem loses
    its retry strategy on the way (they would try 3 times, not 8)."""
    import pickle

    from alexnet_dist import storage
    from alexnet_dist.training.driver import resolve_storage
    from alexnet_dist.training.s3fs import BoundedS3FileSystem

    fs = resolve_storage("s3://b/runs", settings=Settings(s3_endpoint_url="http://127.0.0.1:9")).filesystem
    copy = pickle.loads(pickle.dumps(fs))
    assert isinstance(copy, BoundedS3FileSystem) and copy.attempts == storage.S3_ATTEMPTS == 8
    assert copy.kwargs == fs.kwargs and copy.kwargs["endpoint_override"] == "127.0.0.1:9"
    assert (copy.kwargs["connect_timeout"], copy.kwargs["request_timeout"]) == (10.0, 60.0)
