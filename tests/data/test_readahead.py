"""S3 read-ahead: GETs overlap (seen by a latency-injecting proxy), and no batch, sample or byte changes."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import torch
from proxies import CuttingProxy, LatencyProxy
from shardkit import build_fashion

from alexnet_dist import storage
from alexnet_dist.data.loader import LoaderConfig, make_loader
from alexnet_dist.data.readahead import ReadAhead
from alexnet_dist.errors import ConfigError, DataError, StorageError

DELAY = 0.25  # seconds each GET waits for its first byte behind the latency proxy


@pytest.fixture(scope="module")
def s3_shards(fashion_mnist_dir, s3_server, tmp_path_factory):
    """200 training samples in 8 S3 shards of 25 (written straight to the server, not through a proxy)."""
    bucket = s3_server.make_bucket("readahead")
    with pytest.MonkeyPatch.context() as mp:  # the shard writer finds the server as users' code does
        mp.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
        return build_fashion(fashion_mnist_dir, f"s3://{bucket}/fm", limit=200, shard_size=25)


def config(**kw) -> LoaderConfig:
    base = dict(batch_size=25, crop=32, mode="train", seed=4, num_workers=0, shuffle_buffer=30)
    return LoaderConfig(**{**base, **kw})


def snap(b):
    return b.keys, b.images.clone(), b.lighting.clone(), b.labels.clone()


def epoch(manifest, cfg, endpoint_url):
    loader = make_loader(manifest, cfg, rank=0, world_size=1, endpoint_url=endpoint_url)
    return [snap(b) for b in loader], loader


def assert_same_batches(got, want) -> None:
    assert len(got) == len(want)
    for (keys, images, lighting, labels), (wkeys, wimages, wlighting, wlabels) in zip(got, want, strict=True):
        assert keys == wkeys
        assert torch.equal(images, wimages) and torch.equal(lighting, wlighting)
        assert torch.equal(labels, wlabels)


def test_read_ahead_overlaps_gets_and_changes_no_batch(s3_shards, s3):
    """One stream over 8 shards, every GET 250 ms from its first byte: read one at a time, the epoch takes
    at least 8 x 250 ms; read ahead, GETs are in flight together and the epoch takes less than that."""
    k = len(s3_shards.shards)
    proxy = LatencyProxy(s3.endpoint_url, delay=DELAY)
    try:
        start = time.perf_counter()
        off, _ = epoch(s3_shards, config(read_ahead=0), proxy.endpoint_url)
        wall_off = time.perf_counter() - start
        off_gets, off_overlap = proxy.gets, proxy.max_waiting
        proxy.reset()
        start = time.perf_counter()
        on, loader = epoch(s3_shards, config(read_ahead=4), proxy.endpoint_url)
        wall_on = time.perf_counter() - start
    finally:
        proxy.close()
    assert off_gets == k and off_overlap == 1  # one GET a shard, one after the other
    assert proxy.gets == k and proxy.max_waiting >= 2  # still one GET a shard (8 MB pieces), overlapping
    assert wall_off >= k * DELAY > wall_on, (wall_off, wall_on)
    assert_same_batches(on, off)
    assert len({key for keys, *_ in on for key in keys}) == 200 and loader.bad_samples == 0


def test_resume_with_read_ahead_in_workers_yields_the_uninterrupted_epoch(s3_shards, s3):
    """Two loader workers, each reading ahead in 16 KB pieces (several a shard, across shards); stopped
    and resumed mid-epoch, the batches are those of one uninterrupted run without read-ahead."""
    reference, _ = epoch(s3_shards, config(num_workers=2, read_ahead=0), s3.endpoint_url)
    cfg = config(num_workers=2, read_ahead=3, read_ahead_chunk=16 << 10)
    first = make_loader(s3_shards, cfg, rank=0, world_size=1, endpoint_url=s3.endpoint_url)
    it = iter(first)
    head = [snap(next(it)) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    del it
    resumed = make_loader(s3_shards, cfg, rank=0, world_size=1, endpoint_url=s3.endpoint_url)
    resumed.load_state_dict(state)
    tail = [snap(b) for b in resumed]
    assert_same_batches(head + tail, reference)


def test_connection_cuts_mid_read_ahead_lose_and_repeat_nothing(s3_shards, s3):
    reference, _ = epoch(s3_shards, config(read_ahead=0), s3.endpoint_url)
    proxy = CuttingProxy(s3.endpoint_url, cut_after=20_000, cuts=3)  # inside a 32 KB piece
    try:
        got, loader = epoch(s3_shards, config(read_ahead=3, read_ahead_chunk=32 << 10), proxy.endpoint_url)
    finally:
        proxy.close()
    assert proxy.cuts == 3 and loader.bad_samples == 0
    assert_same_batches(got, reference)


def test_an_unreadable_shard_is_one_warning_and_its_samples_counted_bad(fashion_mnist_dir, s3, caplog):
    bucket = s3.make_bucket("readahead-missing")
    m = build_fashion(fashion_mnist_dir, f"s3://{bucket}/fm", limit=100, shard_size=25)
    gone = m.shards[1].url
    storage.delete(gone, endpoint_url=s3.endpoint_url)
    cfg = config(read_ahead=2, read_ahead_chunk=16 << 10, max_bad_fraction=0.5, mode="val")
    with caplog.at_level(logging.WARNING, logger="alexnet_dist.data.stream"):
        got, loader = epoch(m, cfg, s3.endpoint_url)
    keys = [k for keys, *_ in got for k in keys if k]
    assert len(keys) == len(set(keys)) == 75 and loader.bad_samples == 25
    assert f"{gone}: unreadable after 0 samples ({gone}: not found; check the URL)" in caplog.messages
    with pytest.raises(DataError, match=r"25 bad samples of 100 in one stream \(limit 0.001\)") as err:
        epoch(m, config(read_ahead=2, mode="val"), s3.endpoint_url)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("hint", ["exact", "short", "long"])
def test_readers_return_each_object_exactly_with_at_most_depth_gets_in_flight(s3, hint):
    """Objects of many sizes around the piece size, with the manifest's byte count right, too small (the
    object goes on: read on) or too big (the object ends first): each reader gives the object's bytes."""
    bucket = s3.make_bucket(f"readahead-sizes-{hint}")
    chunk, depth = 1000, 3
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 3 * chunk + 5, 7 * chunk]
    blobs = {f"s3://{bucket}/o{i}": os.urandom(n) for i, n in enumerate(sizes)}
    for url, data in blobs.items():
        storage.write_bytes(url, data, endpoint_url=s3.endpoint_url)
    off = {"exact": 0, "short": -chunk // 2, "long": chunk + 7}[hint]
    shards = [(url, max(0, len(data) + off)) for url, data in blobs.items()]
    proxy = LatencyProxy(s3.endpoint_url, delay=0.02)
    ahead = ReadAhead(shards, depth=depth, chunk=chunk, endpoint_url=proxy.endpoint_url)
    try:
        for i, (url, data) in enumerate(blobs.items()):
            with ahead.open(i) as f:
                got = b"".join(iter(lambda f=f: f.read(777), b""))
            assert got == data, (url, len(got), len(data))
    finally:
        ahead.close()
        proxy.close()
    assert 2 <= proxy.max_waiting <= depth + (hint == "short")  # + the piece read on past the manifest's


def test_a_shard_replaced_while_read_ahead_is_an_error_not_a_splice(s3):
    bucket = s3.make_bucket("readahead-replaced")
    url = f"s3://{bucket}/obj"
    storage.write_bytes(url, b"a" * 3000, endpoint_url=s3.endpoint_url)
    ahead = ReadAhead([(url, 3000)], depth=1, chunk=1000, endpoint_url=s3.endpoint_url)
    try:
        ahead._ahead[0][1].result()  # the first piece is in; the next is asked for once it is taken
        storage.write_bytes(url, b"b" * 3000, endpoint_url=s3.endpoint_url)
        with ahead.open(0) as f, pytest.raises(StorageError, match=f"{url}: object changed while being read"):
            f.read()
    finally:
        ahead.close()


def test_read_ahead_bounds_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"loader read_ahead 33: use 0 \(off\) to 32 GETs"):
        config(read_ahead=33)
    with pytest.raises(ConfigError, match=r"read_ahead_chunk >= 1 byte \(got 0\)"):
        config(read_ahead_chunk=0)
    assert (config().read_ahead, config().read_ahead_chunk) == (4, 8 << 20)
