"""Shards for tests: Fashion-MNIST shards from the real writer, and shards rewritten with planted faults."""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import replace
from pathlib import Path

from alexnet_dist.data.build import writer as shard_writer
from alexnet_dist.data.manifest import Manifest, ShardInfo, save_manifest


def build_fashion(root, out, *, limit=200, shard_size=50, split="train") -> Manifest:
    opts = shard_writer.BuildOptions(resize_to=36, shard_size=shard_size, limit=limit, processes=2)
    (manifest,) = shard_writer.build(root, str(out), opts, split=split)
    return manifest


def rewrite_shard(manifest: Manifest, index: int, mutate) -> Manifest:
    """Rewrite shard ``index`` with ``mutate(key, files) -> files | None (drop)``; the manifest follows."""
    shard = manifest.shards[index]
    members = []
    with tarfile.open(shard.url) as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    groups: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, _, ext = name.partition(".")
        groups.setdefault(key, {})[ext] = data
    buf = io.BytesIO()
    count = 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in groups.items():
            files = mutate(key, files)
            if files is None:
                continue
            count += 1
            for ext, data in sorted(files.items()):
                shard_writer.add_member(tar, f"{key}.{ext}", data)
    data = buf.getvalue()
    Path(shard.url).write_bytes(data)
    info = ShardInfo(shard.url, count, len(data), hashlib.sha256(data).hexdigest())
    shards = list(manifest.shards)
    shards[index] = info
    m = replace(manifest, shards=tuple(shards), num_samples=sum(s.count for s in shards))
    save_manifest(m, m.url)
    return m


def write_manifest(path: Path, classes: int) -> str:
    """A manifest of ``classes`` classes and no shards, for tests that check specs against manifests."""
    m = Manifest(url=str(path), split="train", shards=(), classes=tuple(str(i) for i in range(classes)),
                 names=tuple(f"c{i}" for i in range(classes)), image_size=32, mean=(1.0, 1.0, 1.0),
                 std=(1.0, 1.0, 1.0), eigval=(3.0, 2.0, 1.0), eigvec=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0),
                 (0.0, 0.0, 1.0)), num_samples=0)  # fmt: skip
    save_manifest(m, str(path))
    return str(path)
