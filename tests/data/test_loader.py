"""The streaming pipeline: Fashion-MNIST shards -> batches over 2 ranks x 2 loader workers, local and S3."""

from __future__ import annotations

import gc
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from proxies import CuttingProxy
from shardkit import build_fashion, rewrite_shard

from alexnet_dist import storage
from alexnet_dist.data.batch import PAD_LABEL, POOL_SLOTS
from alexnet_dist.data.build import fashion_mnist
from alexnet_dist.data.decoders import DECODERS
from alexnet_dist.data.loader import LoaderConfig, make_loader
from alexnet_dist.data.manifest import Manifest, ShardInfo
from alexnet_dist.data.plan import plan_epoch
from alexnet_dist.errors import DataError


@pytest.fixture(scope="module")
def shards(fashion_mnist_dir, tmp_path_factory) -> Manifest:
    """400 training samples in 8 shards of 50."""
    return build_fashion(fashion_mnist_dir, tmp_path_factory.mktemp("fm"), limit=400, shard_size=50)


@pytest.fixture(scope="module")
def labels(fashion_mnist_dir) -> np.ndarray:
    return fashion_mnist.load_split(fashion_mnist_dir, "train")[1]


def run_epoch(manifest, cfg, world_size=2, epoch=0, endpoint_url=None):
    """Every rank's batches for one epoch: [rank] -> list of Batch."""
    out = []
    for rank in range(world_size):
        loader = make_loader(manifest, cfg, rank=rank, world_size=world_size, endpoint_url=endpoint_url)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        out.append(batches)
    return out


def real_keys(per_rank) -> list[str]:
    return [
        k
        for batches in per_rank
        for b in batches
        for k, y in zip(b.keys, b.labels.tolist(), strict=True)
        if y != PAD_LABEL
    ]


def test_train_two_ranks_two_workers_see_every_sample_once(shards, labels):
    cfg = LoaderConfig(batch_size=25, crop=32, mode="train", seed=7, num_workers=2, shuffle_buffer=40)
    per_rank = run_epoch(shards, cfg)
    assert [len(r) for r in per_rank] == [8, 8]  # 4 streams x 100 samples / 25
    keys = real_keys(per_rank)
    assert len(keys) == 400 and len(set(keys)) == 400
    for b in per_rank[0] + per_rank[1]:
        assert b.images.shape == (25, 3, 32, 32) and b.images.dtype == torch.uint8
        assert b.lighting.shape == (25, 3) and b.lighting.abs().max() > 0
        assert b.labels.tolist() == [int(labels[int(k.split("_")[1])]) for k in b.keys]
    # the next epoch: another order, the same samples
    second = real_keys(run_epoch(shards, cfg, epoch=1))
    assert sorted(second) == sorted(keys) and second != keys


def test_eval_every_sample_once_with_padding_for_uneven_ranks(fashion_mnist_dir, tmp_path):
    m = build_fashion(fashion_mnist_dir, tmp_path, limit=230, shard_size=50)  # 50,50,50,50,30
    for mode, shape in (("val", (3, 32, 32)), ("ten_crop", (10, 3, 32, 32))):
        cfg = LoaderConfig(batch_size=16, crop=32, mode=mode, seed=0, num_workers=2)
        per_rank = run_epoch(m, cfg)
        assert len(per_rank[0]) == len(per_rank[1])
        keys = real_keys(per_rank)
        assert len(keys) == 230 and len(set(keys)) == 230
        pads = [b for r in per_rank for b in r if b.labels.tolist() == [PAD_LABEL]]
        assert all(b.keys == [""] for b in pads) and len(pads) >= 1  # ranks hold 130 and 100 samples
        assert all(b.images.shape[1:] == shape and b.lighting.abs().max() == 0 for r in per_rank for b in r)


def test_train_lengths_equal_when_shards_are_uneven(fashion_mnist_dir, tmp_path):
    m = build_fashion(fashion_mnist_dir, tmp_path, limit=230, shard_size=50)
    cfg = LoaderConfig(batch_size=16, crop=32, mode="train", seed=3, num_workers=2, shuffle_buffer=20)
    for epoch in range(3):
        plan = plan_epoch(m, cfg, epoch, 2)
        per_rank = run_epoch(m, cfg, epoch=epoch)
        assert len(per_rank[0]) == len(per_rank[1]) == plan.length
        keys = real_keys(per_rank)
        assert len(keys) == len(set(keys)) == 2 * plan.length * 16 and len(keys) >= 230 - 4 * 15


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize("workers,stop", [(2, 5), (0, 4)])
def test_resume_yields_exactly_the_rest_of_the_epoch(shards, workers, stop, decoder):
    cfg = LoaderConfig(
        batch_size=10, crop=32, mode="train", seed=11, num_workers=workers, shuffle_buffer=30, decoder=decoder
    )
    full = make_loader(shards, cfg, rank=1, world_size=2)
    full.set_epoch(2)
    reference = list(full)
    first = make_loader(shards, cfg, rank=1, world_size=2)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))  # JSON only, as it crosses into checkpoints
    del it
    assert state["epoch"] == 2 and state["batches"] == stop and state["seed"] == 11
    resumed = make_loader(shards, cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the training loop's usual call keeps the restored position
    tail = list(resumed)
    assert len(head) + len(tail) == len(reference) == len(resumed)
    for got, want in zip(head + tail, reference, strict=True):
        assert got.keys == want.keys
        assert torch.equal(got.images, want.images) and torch.equal(got.lighting, want.lighting)
    assert resumed.state_dict()["batches"] == len(reference)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_augmentation_does_not_depend_on_worker_count(shards, decoder):
    views = []
    for workers in (0, 1, 2):
        cfg = LoaderConfig(
            batch_size=20,
            crop=32,
            mode="train",
            seed=5,
            num_workers=workers,
            shuffle_buffer=10,
            decoder=decoder,
        )
        by_key = {}
        for b in make_loader(shards, cfg, rank=0, world_size=1):
            for i, k in enumerate(b.keys):
                by_key[k] = (b.images[i], b.lighting[i])
        views.append(by_key)
    assert len(views[0]) == 400
    for other in views[1:]:
        assert other.keys() == views[0].keys()
        assert all(torch.equal(other[k][0], views[0][k][0]) and torch.equal(other[k][1], views[0][k][1])
                   for k in views[0])  # fmt: skip


def test_s3_pipeline_over_http_sees_every_sample_once(fashion_mnist_dir, s3):
    bucket = s3.make_bucket("data-s3")
    m = build_fashion(fashion_mnist_dir, f"s3://{bucket}/fm", limit=200, shard_size=50)
    cfg = LoaderConfig(batch_size=25, crop=32, mode="train", seed=1, num_workers=2, shuffle_buffer=30)
    keys = real_keys(run_epoch(m, cfg, endpoint_url=s3.endpoint_url))
    assert len(keys) == 200 and len(set(keys)) == 200


def test_connection_cut_mid_shard_loses_and_repeats_nothing(fashion_mnist_dir, s3):
    bucket = s3.make_bucket("data-cut")
    m = build_fashion(fashion_mnist_dir, f"s3://{bucket}/fm", limit=200, shard_size=100)  # ~250 KB shards
    proxy = CuttingProxy(s3.endpoint_url, cut_after=60_000, cuts=3)
    try:
        cfg = LoaderConfig(batch_size=20, crop=32, mode="train", seed=1, num_workers=0, shuffle_buffer=30)
        loader = make_loader(m, cfg, rank=0, world_size=1, endpoint_url=proxy.endpoint_url)
        keys = [k for b in loader for k in b.keys]
    finally:
        proxy.close()
    assert proxy.cuts == 3 and loader.bad_samples == 0
    assert len(keys) == 200 and len(set(keys)) == 200


@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_bad_samples_are_skipped_counted_and_limited(fashion_mnist_dir, tmp_path, decoder):
    m = build_fashion(fashion_mnist_dir, tmp_path, limit=200, shard_size=50)
    planted = []

    def corrupt_one(key, files):
        if len(planted) < 1:
            planted.append(key)
            return {**files, "jpg": b"\xff\xd8\xff" + b"\x00" * 50}
        return files

    def relabel_one(key, files):
        if len(planted) < 2:
            planted.append(key)
            return {**files, "cls": b"12"}
        return files

    m = rewrite_shard(m, 0, corrupt_one)
    m = rewrite_shard(m, 1, relabel_one)
    cut = Path(m.shards[2].url)
    cut.write_bytes(
        cut.read_bytes()[: cut.stat().st_size * 4 // 5]
    )  # a truncated tar: some of its 50 samples are lost
    readable = sum(1 for _ in wds.WebDataset([str(cut)], shardshuffle=False, handler=wds.ignore_and_continue))
    assert 0 < readable < 50
    cfg = LoaderConfig(
        batch_size=16, crop=32, mode="val", seed=0, num_workers=2, max_bad_fraction=0.6, decoder=decoder
    )
    loaders = [make_loader(m, cfg, rank=r, world_size=2) for r in range(2)]
    keys = [
        k
        for ld in loaders
        for b in ld
        for k, y in zip(b.keys, b.labels.tolist(), strict=True)
        if y != PAD_LABEL
    ]
    assert len(keys) == len(set(keys)) and not set(planted) & set(keys)
    lost = 200 - len(keys)
    assert sum(ld.bad_samples for ld in loaders) == lost == 2 + (50 - readable)
    strict = LoaderConfig(batch_size=16, crop=32, mode="val", seed=0, num_workers=2, decoder=decoder)
    with pytest.raises(DataError, match=r"json: 1 bad samples of 100 in one stream \(limit 0.001\)") as err:
        list(make_loader(m, strict, rank=0, world_size=1))
    assert "\n" not in str(err.value)  # one line, though raised inside a loader worker


def test_shards_written_by_webdataset_shardwriter_feed_the_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(tmp_path / "wds-%06d.tar"), maxcount=30, verbose=0) as sink:
        for i in range(70):
            image = (rng.random((40, 44, 3)) * 255).astype(np.uint8)  # encoded by webdataset as .jpg
            sink.write({"__key__": f"s{i:04d}", "jpg": image, "cls": i % 3})
    infos = []
    for path in sorted(tmp_path.glob("wds-*.tar")):
        data = path.read_bytes()
        count = sum(1 for _ in wds.WebDataset([str(path)], shardshuffle=False))
        infos.append(ShardInfo(str(path), count, len(data), hashlib.sha256(data).hexdigest()))
    m = Manifest(
        url=str(tmp_path / "m.json"), split="train", shards=tuple(infos), classes=("a", "b", "c"),
        names=("a", "b", "c"), image_size=40, mean=(127.0,) * 3, std=(70.0,) * 3,
        eigval=(9000.0, 500.0, 100.0), num_samples=70,
        eigvec=((0.58, 0.58, 0.57), (-0.7, 0.01, 0.71), (0.41, -0.81, 0.41)),
    )  # fmt: skip
    assert [i.count for i in infos] == [30, 30, 10]
    cfg = LoaderConfig(batch_size=8, crop=32, mode="val", seed=0, num_workers=2)
    batches = run_epoch(m, cfg)
    keys = real_keys(batches)
    assert sorted(keys) == [f"s{i:04d}" for i in range(70)]
    labels = {k: y for r in batches for b in r for k, y in zip(b.keys, b.labels.tolist(), strict=True)}
    assert all(labels[f"s{i:04d}"] == i % 3 for i in range(70))
    counts = Counter(b.images.shape[1:] for r in batches for b in r)
    assert set(counts) == {(3, 32, 32)}
    assert storage.exists(infos[0].url)


def test_recycled_batch_buffers_never_change_a_batch_still_in_use(shards):
    """Workers refill a shared batch buffer only once the consumer let go of every view of it."""
    cfg = LoaderConfig(batch_size=10, crop=32, mode="train", seed=2, num_workers=2, shuffle_buffer=20)
    reference = {
        k: (b.images[i].clone(), b.lighting[i].clone(), int(b.labels[i]))
        for b in list(make_loader(shards, cfg, rank=0, world_size=1))  # all held: no buffer reused
        for i, k in enumerate(b.keys)
    }
    views, buffers = [], set()
    for n, b in enumerate(make_loader(shards, cfg, rank=0, world_size=1)):
        buffers.add(b.images.untyped_storage().data_ptr())  # the worker's shared buffer it came in
        if n % 8 == 0:  # keep views of a few batches, drop the rest
            views.append((b.keys, b.images[1:], b.lighting, b.labels))
        else:
            for i, k in enumerate(b.keys):
                img, light, label = reference[k]
                assert torch.equal(b.images[i], img) and torch.equal(b.lighting[i], light)
                assert int(b.labels[i]) == label
    assert len(buffers) <= 2 * POOL_SLOTS  # 40 batches came in a few buffers per worker: recycled
    for keys, images, lighting, labels in views:
        for i, k in enumerate(keys):
            img, light, label = reference[k]
            assert torch.equal(lighting[i], light) and int(labels[i]) == label
            assert i == 0 or torch.equal(images[i - 1], img)


def test_training_buffers_outlive_epochs_and_a_batch_held_across_them_stays_intact(shards):
    """A training loader makes its shared batch buffers once: every epoch's workers reuse them, a batch
    kept from an abandoned epoch is never written over, and the slots come back once nothing holds them."""
    cfg = LoaderConfig(batch_size=10, crop=32, mode="train", seed=2, num_workers=2, shuffle_buffer=20)
    loader = make_loader(shards, cfg, rank=0, world_size=1)
    epoch0 = iter(loader)
    kept = next(epoch0)
    want = (kept.images.clone(), kept.lighting.clone(), kept.labels.clone(), list(kept.keys))
    epoch0.close()  # abandoned mid-epoch: its workers stop, the slots they had taken come back
    made = {b.data_ptr() for b in loader._pool.buffers.values()}
    assert len(made) == 2 * POOL_SLOTS and int(loader._pool.flags.sum()) == 1  # only `kept` is held
    loader.set_epoch(1)
    seen = {b.images.untyped_storage().data_ptr() for b in loader}
    assert seen <= made  # the same buffers, no fresh ones
    assert kept.images.untyped_storage().data_ptr() not in seen  # its slot was skipped while held
    assert torch.equal(kept.images, want[0]) and torch.equal(kept.lighting, want[1])
    assert torch.equal(kept.labels, want[2]) and kept.keys == want[3]
    del kept
    gc.collect()
    assert int(loader._pool.flags.sum()) == 0
