"""shards build: Fashion-MNIST, ImageFolder and ILSVRC layouts -> tar shards + manifests."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from shardkit import build_fashion
from typer.testing import CliRunner

from alexnet_dist.cli import app
from alexnet_dist.data.build import fashion_mnist, sources
from alexnet_dist.data.build import writer as shard_writer
from alexnet_dist.data.manifest import load_manifest
from alexnet_dist.data.verify import verify_manifest


def make_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class=4, size=(80, 60)) -> Path:
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((size[1], size[0], 3)) * 60 + ci * 80).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"img.{i}.JPEG", quality=95)
    return root


def test_fashion_build_manifest_tar_and_stock_webdataset(fashion_mnist_dir, tmp_path):
    m = build_fashion(fashion_mnist_dir, tmp_path / "out", limit=230, shard_size=50)
    assert m.num_samples == 230 and [s.count for s in m.shards] == [50, 50, 50, 50, 30]
    assert m.image_size == 36 and m.classes == tuple("0123456789") and m.names[9] == "Ankle boot"
    for s in m.shards:
        data = Path(s.url).read_bytes()
        assert len(data) == s.bytes and hashlib.sha256(data).hexdigest() == s.sha256
    # grey -> RGB: all channels share mean and std; one principal component carries all the variance
    assert m.mean[0] == pytest.approx(m.mean[2]) and 50 < m.mean[0] < 100
    assert m.eigval[0] == pytest.approx(3 * m.std[0] ** 2, rel=1e-6) and m.eigval[1] < 1e-6 * m.eigval[0]
    assert np.allclose(m.eigvec[0], [3**-0.5] * 3)
    reloaded = load_manifest(m.url)
    assert reloaded.shards == m.shards and reloaded.mean == m.mean
    # plain tar lists it
    names = subprocess.run(["tar", "-tf", m.shards[0].url], check=True, capture_output=True, text=True).stdout
    names = names.split()
    assert len(names) == 150 and names[:3] == [names[0].split(".")[0] + e for e in (".cls", ".jpg", ".json")]
    # stock webdataset reads our shards: all samples, labels matching the source
    images, labels = fashion_mnist.load_split(fashion_mnist_dir, "train")
    urls = [s.url for s in m.shards]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        index = int(sample["__key__"].split("_")[1])
        assert int(sample["cls"]) == labels[index] and sample["jpg"].shape == (36, 36, 3)
        assert sample["json"]["origin"] == f"fashion-mnist:train:{index}"
        seen += 1
    assert seen == 230


def test_build_is_deterministic(fashion_mnist_dir, tmp_path):
    a = build_fashion(fashion_mnist_dir, tmp_path / "a", limit=60, shard_size=30)
    b = build_fashion(fashion_mnist_dir, tmp_path / "b", limit=60, shard_size=30)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_imagefolder_paper_preprocessing_and_shard_bytes(tmp_path):
    src = make_imagefolder(tmp_path / "src")
    opts = shard_writer.BuildOptions(resize_to=48, shard_size=5, processes=1)
    (m,) = shard_writer.build(src, str(tmp_path / "out"), opts, manifest_dir=tmp_path / "copies")
    assert sources.detect_format(src) == "imagefolder"
    assert m.classes == ("cat", "dog", "eel") and m.num_samples == 12 and len(m.shards) == 3
    assert (tmp_path / "copies" / "src-train.json").exists()
    keys = []
    for sample in wds.WebDataset([s.url for s in m.shards], shardshuffle=False).decode("rgb8"):
        assert sample["jpg"].shape == (48, 48, 3)  # 80x60: shorter side to 48, central 48x48
        keys.append(sample["__key__"])
    assert sorted(keys)[0] == "train/cat/img_0" and len(set(keys)) == 12
    # the central crop: a left/right gradient image keeps its centre
    grad = np.tile(np.linspace(0, 255, 200).astype(np.uint8), (100, 1))
    item = sources.Item("k", 0, "o", pixels=grad)
    out = shard_writer.load_rgb(item, 50)
    assert out.shape == (50, 50, 3) and abs(int(out[:, 25, 0].mean()) - 127) < 6
    # --shard-bytes: a target size becomes a per-shard count from measured samples
    opts = shard_writer.BuildOptions(resize_to=48, shard_bytes=25_000, processes=1)
    (mb,) = shard_writer.build(src, str(tmp_path / "outb"), opts)
    assert mb.num_samples == 12 and 2 <= len(mb.shards) <= 6
    assert all(s.bytes <= 25_000 + 10_240 for s in mb.shards)  # tar pads to its 10 KiB record size


def test_ilsvrc_layout_with_flat_val(tmp_path):
    root = tmp_path / "ilsvrc"
    make_imagefolder(root / "train", classes=("n01440764", "n01443537"), per_class=3)
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n01443537", "n01440764"]):
        Image.new("RGB", (70, 90), (i * 100, 0, 0)).save(root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
        lines.append(f"ILSVRC2012_val_{i + 1:08d},{wnid} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    (root / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish\n")
    assert sources.detect_format(root) == "ilsvrc"
    ms = shard_writer.build(root, str(tmp_path / "out"), shard_writer.BuildOptions(resize_to=32, processes=1))
    train, val = ms
    assert (train.split, train.num_samples, val.split, val.num_samples) == ("train", 6, "val", 2)
    assert val.names == ("tench, Tinca tinca", "goldfish") and val.mean == train.mean  # training statistics
    labels = {s["__key__"]: int(s["cls"]) for s in wds.WebDataset([val.shards[0].url], shardshuffle=False)}
    assert labels == {"val/ILSVRC2012_val_00000001": 1, "val/ILSVRC2012_val_00000002": 0}


def test_build_to_s3(fashion_mnist_dir, s3):
    bucket = s3.make_bucket("shards-out")
    m = build_fashion(fashion_mnist_dir, f"s3://{bucket}/fm", limit=100, shard_size=40)
    assert m.url == f"s3://{bucket}/fm/fashion-mnist-train.json"
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [f"fm/fashion-mnist-train-00000{i}.tar" for i in range(3)] + [
        "fm/fashion-mnist-train.json"
    ]
    loaded = load_manifest(m.url)
    assert [s.count for s in loaded.shards] == [40, 40, 20]
    assert verify_manifest(loaded).good == 100


def test_cli_build_fashion_both_splits(fashion_mnist_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        ["shards", "build", str(fashion_mnist_dir), str(tmp_path / "out"), "--resize-to", "36",
         "--limit", "120", "--shard-size", "60", "--manifest-dir", str(tmp_path / "shards"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["split"], r["samples"], r["shards"]) for r in rows] == [("train", 120, 2), ("test", 120, 2)]
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "fashion-mnist-test.json",
        "fashion-mnist-train.json",
    ]
    ok = CliRunner().invoke(app, ["shards", "verify", str(tmp_path / "out" / "fashion-mnist-test.json")])
    assert ok.exit_code == 0 and "120 good, 0 bad" in ok.stdout
