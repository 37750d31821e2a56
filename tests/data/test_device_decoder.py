"""The ``device`` decoder on device="cpu": the same batches, pixels and lighting as the ``whole`` decoder.

The device path is the code that runs on a GPU (nvJPEG there, torchvision's CPU decoder here): no branch
of it is left to the GPU but the one batched decode call.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shardkit import build_fashion, rewrite_shard
from test_decoders import CROP, RECORDS, encoded, expected_view

from alexnet_dist.data.batch import PAD_LABEL
from alexnet_dist.data.decoders import Views
from alexnet_dist.data.device import EncodedBatch, decode_on_device, defer, pack
from alexnet_dist.data.loader import LoaderConfig, make_loader
from alexnet_dist.errors import ConfigError, DataError

TRUNCATED = encoded(40, 44, "JPEG", 9)[:1000]  # a readable header, then the data stop: fails to decode


@pytest.fixture(scope="module")
def manifest(fashion_mnist_dir, tmp_path_factory):
    """200 samples in 4 shards of 50; shard 0 holds a PNG, a JPEG smaller than the crop and one whose
    header is corrupt; shard 2 is cut short (its stream runs out and pads)."""
    m = build_fashion(fashion_mnist_dir, tmp_path_factory.mktemp("dev"), limit=200, shard_size=50)
    planted = iter([("png", encoded(36, 40, "PNG", 1)), ("jpg", encoded(20, 24, "JPEG", 3)),
                    ("jpg", b"\xff\xd8\xff" + bytes(50))])  # fmt: skip

    keys = []

    def plant(key, files):
        kind, data = next(planted, (None, None))
        if kind is None:
            return files
        keys.append(key)
        return {**{k: v for k, v in files.items() if k != "jpg"}, kind: data}

    m = rewrite_shard(m, 0, plant)
    cut = Path(m.shards[2].url)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 4 // 5])
    return m, keys  # keys: the PNG's, the small JPEG's, the corrupt one's


def batches(m, decoder: str, mode: str, workers: int, **kw):
    cfg = LoaderConfig(batch_size=16, crop=32, mode=mode, seed=3, num_workers=workers, shuffle_buffer=20,
                       max_bad_fraction=0.5, decoder=decoder, **kw)  # fmt: skip
    out = []
    for rank in range(2):
        loader = make_loader(m, cfg, rank=rank, world_size=2)
        loader.set_epoch(1)
        out.append(
            ([(b.keys, b.images.clone(), b.lighting.clone(), b.labels.clone()) for b in loader], loader)
        )
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["train", "val", "ten_crop"])
def test_device_batches_are_the_whole_decoders_exactly(manifest, mode, workers):
    """Every batch: the same keys in the same slots, pixels, lighting offsets and labels (padding too)."""
    m, (png, small, corrupt) = manifest
    whole = batches(m, "whole", mode, workers)
    device = batches(m, "device", mode, workers, device="cpu")
    keys = []
    for (want, want_loader), (got, got_loader) in zip(whole, device, strict=True):
        assert len(got) == len(want) == len(got_loader)
        for (k, images, lighting, labels), (wk, wimages, wlighting, wlabels) in zip(got, want, strict=True):
            assert k == wk and torch.equal(labels, wlabels)
            assert images.dtype == torch.uint8 and images.shape == wimages.shape
            assert torch.equal(images, wimages) and torch.equal(lighting, wlighting)
            keys += [key for key in k if key]
        assert got_loader.bad_samples == want_loader.bad_samples
    assert len(keys) == len(set(keys)) and corrupt not in keys
    if mode != "train":  # evaluation sees every sample: the PNG and the small JPEG among them
        assert {png, small} <= set(keys)
    assert sum(ld.bad_samples for _, ld in device) > 1  # the corrupt header, and shard 2's lost tail
    slots = [(k, y) for r, _ in device for b in r for k, y in zip(b[0], b[3].tolist(), strict=True)]
    assert (("", PAD_LABEL) in slots) and all(k == "" for k, y in slots if y == PAD_LABEL)
    if mode == "train":
        assert any(b[2].abs().max() > 0 for r, _ in device for b in r)  # lighting is on, and equal


@pytest.mark.parametrize("mode", ["train", "val"])
def test_decode_on_device_writes_each_view_as_augment_defines_it(mode):
    """The unit under the loader: JPEGs, a PNG and a small JPEG decoded and placed as augment says; the
    corrupt header is bad in the worker (no slot), the truncated JPEG bad on the device (its slot padding)."""
    views = Views(mode, CROP, seed=9, epoch=2)
    bad: list = []
    records = [*RECORDS[:3], ("s0.tar", "truncated", 7, TRUNCATED), *RECORDS[3:]]
    kept = defer(records, lambda *b: bad.append(b))
    assert [k for _, k, _, _ in kept] == ["big_a", "png", "big_b", "truncated", "small", "big_c"]
    assert [(url, key) for url, key, _ in bad] == [("s0.tar", "corrupt")] and "cannot decode" in bad[0][2]
    lighting = torch.arange(18, dtype=torch.float32).view(6, 3).numpy()
    draws = [views.draws(key)[:3] for _, key, _, _ in kept] if mode == "train" else None
    encoded_batch = pack(kept, draws, lighting, CROP, 8, shared=False)
    assert isinstance(encoded_batch, EncodedBatch) and len(encoded_batch.keys) == 8
    batch, failed = decode_on_device(encoded_batch, "cpu")
    assert [k for k, _ in failed] == ["truncated"] and "cannot decode" in failed[0][1]
    assert (
        batch.images.shape == (8, 3, CROP, CROP) and batch.images.stride()[1] == 1
    )  # channels-last, as CPU's
    assert batch.keys == ["big_a", "png", "big_b", "", "small", "big_c", "", ""]
    assert batch.labels.tolist() == [1, 2, 3, PAD_LABEL, 4, 6, PAD_LABEL, PAD_LABEL]
    for slot, (_, key, _, data) in enumerate(kept):
        if key == "truncated":
            continue
        want, _ = expected_view(data, key, views)
        assert torch.equal(batch.images[slot].permute(1, 2, 0), want[0]), key
        assert torch.equal(batch.lighting[slot], torch.from_numpy(lighting[slot]))
    for slot in (3, 6, 7):  # the truncated JPEG's slot and the padding: zero pixels, no lighting
        assert not batch.images[slot].any() and not batch.lighting[slot].any()


def test_a_jpeg_failing_on_the_device_is_padding_counted_bad_and_limited(fashion_mnist_dir, tmp_path):
    m = build_fashion(fashion_mnist_dir, tmp_path, limit=100, shard_size=50)
    planted = []

    def truncate_one(key, files):
        if not planted:
            planted.append(key)
            return {**files, "jpg": TRUNCATED}
        return files

    m = rewrite_shard(m, 1, truncate_one)
    cfg = dict(batch_size=10, crop=32, mode="val", seed=0, num_workers=2, decoder="device")
    loader = make_loader(m, LoaderConfig(**cfg, max_bad_fraction=0.5), rank=0, world_size=1)
    got = [(k, y) for b in loader for k, y in zip(b.keys, b.labels.tolist(), strict=True)]
    real = [k for k, y in got if y != PAD_LABEL]
    assert len(real) == len(set(real)) == 99 and planted[0] not in real and loader.bad_samples == 1
    assert ("", PAD_LABEL) in got[:-1]  # its slot, inside a batch, is padding
    state = loader.state_dict()
    assert [s[2] for s in state["streams"]] == [0, 1]  # found on the device, in the loader's state
    with pytest.raises(DataError, match=r"1 bad samples of 50 in one stream \(limit 0.001\)") as err:
        list(make_loader(m, LoaderConfig(**cfg), rank=0, world_size=1))
    assert "\n" not in str(err.value)


def test_eval_padding_batches_of_the_device_decoder_lie_on_its_device(fashion_mnist_dir, tmp_path):
    m = build_fashion(fashion_mnist_dir, tmp_path, limit=130, shard_size=50)  # ranks hold 80 and 50
    cfg = LoaderConfig(
        batch_size=16, crop=32, mode="val", seed=0, num_workers=2, decoder="device", device="cpu"
    )
    loaders = [make_loader(m, cfg, rank=r, world_size=2) for r in range(2)]
    per_rank = [list(ld) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1])
    pads = [b for r in per_rank for b in r if b.keys == [""]]
    assert pads and all(b.labels.tolist() == [PAD_LABEL] and not b.images.any() for b in pads)
    keys = [k for r in per_rank for b in r for k in b.keys if k]
    assert len(keys) == len(set(keys)) == 130
    assert all(b.images.device.type == "cpu" for r in per_rank for b in r)


def test_the_device_must_be_a_torch_device() -> None:
    with pytest.raises(ConfigError, match=r"loader device 'gpu0': not a torch device"):
        LoaderConfig(batch_size=4, crop=CROP, mode="train", seed=0, decoder="device", device="gpu0")
    assert LoaderConfig(batch_size=4, crop=CROP, mode="ten_crop", seed=0, decoder="device").on_device is False
    assert LoaderConfig(batch_size=4, crop=CROP, mode="train", seed=0, decoder="device").on_device is True
