"""Splits -> WebDataset tar shards + a manifest per split (``alexnet-dist shards build``).

The splits and their samples come from :mod:`alexnet_dist.data.build.sources`. A split is written as
``OUT/<dataset>-<split>-000000.tar ...`` with ``OUT/<dataset>-<split>.json`` (Fashion-MNIST:
``OUT/fashion-mnist-train.json`` and ``OUT/fashion-mnist-test.json``); copies of the manifests go to
``manifest_dir`` only when one is given. The demo stores Fashion-MNIST as 36x36 RGB (``resize_to=36``:
28 upscaled bilinearly, grey copied to R, G and B) so the small preset can crop 32x32.

Every sample is ``<key>.cls`` (label, ASCII), ``<key>.jpg`` and ``<key>.json`` (origin), under the stable,
dot-free key its source gave it. Training samples are shuffled once with a fixed seed before sharding, so
shards mix classes and the loader's shuffle buffer starts from a well-mixed stream. Shards are built in
parallel, one task per shard: encode, write a local tar, hash, then move/upload it atomically.
The mean, std and PCA of the RGB pixels come from the training split and are copied into the other
splits' manifests (normalising evaluation images with their own statistics would leak).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import random
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet_dist import storage
from alexnet_dist.data.build.sources import FORMATS, Item, SplitSource, detect_format, list_splits
from alexnet_dist.data.manifest import Manifest, ShardInfo, save_manifest
from alexnet_dist.errors import ConfigError, DataError, NotFoundError

log = logging.getLogger(__name__)

SHUFFLE_SEED = 0  # the build's fixed sample order for training splits
TAR_MTIME = 0  # fixed member times: the same source gives byte-identical shards


@dataclass(frozen=True)
class BuildOptions:
    resize_to: int | None = 256  # shorter side to N, then the central NxN crop (section 2); None: as is
    quality: int = 90  # JPEG quality of the re-encoded images
    shard_size: int = 1000  # samples per shard
    shard_bytes: int | None = None  # if set, a target tar size: converted to a count from measured samples
    processes: int = 2
    limit: int | None = None  # only the first N samples of each split (tests, demos)


@dataclass
class PixelStats:
    """Running sums for the mean and the RGB covariance (float64: 1e9 pixels keep 7 digits)."""

    n: int = 0
    total: np.ndarray = field(default_factory=lambda: np.zeros(3))
    outer: np.ndarray = field(default_factory=lambda: np.zeros((3, 3)))

    def add(self, rgb: np.ndarray) -> None:
        if rgb.shape[0] > 64:  # every 4th row and column: the statistics converge long before
            rgb = rgb[::4, ::4]
        x = rgb.reshape(-1, 3).astype(np.float64)
        self.n += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def merge(self, other: PixelStats) -> None:
        self.n += other.n
        self.total += other.total
        self.outer += other.outer

    def summary(self) -> dict:
        if self.n == 0:
            raise DataError("no pixels to compute statistics from; is the source empty?")
        mean = self.total / self.n
        cov = self.outer / self.n - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = np.clip(eigval[order], 0, None), eigvec[:, order].T  # rows = eigenvectors
        eigvec = eigvec * np.where(eigvec.sum(1, keepdims=True) < 0, -1.0, 1.0)  # a fixed sign
        return {
            "mean": tuple(float(v) for v in mean),
            "std": tuple(float(v) for v in np.sqrt(np.diag(cov))),
            "eigval": tuple(float(v) for v in eigval),
            "eigvec": tuple(tuple(float(v) for v in row) for row in eigvec),
        }


# --- encoding one sample ----------------------------------------------------------------------------


def load_rgb(item: Item, resize_to: int | None) -> np.ndarray:
    """The sample as an RGB uint8 array, preprocessed as in section 2 when ``resize_to`` is set."""
    if item.pixels is not None:
        img = Image.fromarray(item.pixels, mode="L")
    else:
        img = Image.open(item.path)  # type: ignore[arg-type]
        if resize_to and img.format == "JPEG":
            w, h = img.size
            s = min(w, h)
            img.draft("RGB", (-(-w * resize_to // s), -(-h * resize_to // s)))  # DCT-domain downscale
    img = img.convert("RGB")
    if resize_to:
        w, h = img.size
        scale = resize_to / min(w, h)
        size = (max(resize_to, round(w * scale)), max(resize_to, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.BILINEAR)
        left, top = (size[0] - resize_to) // 2, (size[1] - resize_to) // 2
        img = img.crop((left, top, left + resize_to, top + resize_to))
    return np.asarray(img)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    tar.addfile(info, io.BytesIO(data))


def sample_members(key: str, label: int, jpeg: bytes, meta: dict) -> list[tuple[str, bytes]]:
    """A sample's tar members, extensions sorted as webdataset's TarWriter writes them."""
    return [
        (f"{key}.cls", str(label).encode()),
        (f"{key}.jpg", jpeg),
        (f"{key}.json", json.dumps(meta, sort_keys=True).encode()),
    ]


# --- one shard per task -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTask:
    index: int
    url: str
    items: list[Item]
    resize_to: int | None
    quality: int
    classes: tuple[str, ...]
    endpoint_url: str | None


@dataclass
class ShardResult:
    index: int
    info: ShardInfo
    stats: PixelStats
    min_side: int
    failures: list[tuple[str, str]]  # (origin, reason) of source images that could not be read


def write_shard(task: ShardTask) -> ShardResult:
    stats, failures, min_side, count = PixelStats(), [], 1 << 30, 0
    local = storage.parse_url(task.url)
    tmpdir = str(Path(local.key).parent) if local.scheme == "file" else None
    if tmpdir:
        Path(tmpdir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=tmpdir, prefix=".shard-", suffix=".tar", delete=False) as f:
        tmp = f.name
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for item in task.items:
                try:
                    rgb = load_rgb(item, task.resize_to)
                except Exception as err:  # a broken source image is reported, not fatal
                    failures.append((item.origin, f"{type(err).__name__}: {err}"))
                    continue
                stats.add(rgb)
                min_side = min(min_side, *rgb.shape[:2])
                meta = {"origin": item.origin, "label": item.label, "class": task.classes[item.label]}
                for name, data in sample_members(item.key, item.label, encode_jpeg(rgb, task.quality), meta):
                    add_member(tar, name, data)
                count += 1
    digest, nbytes = hashlib.sha256(), 0
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            nbytes += len(chunk)
    storage.put_file(tmp, task.url, endpoint_url=task.endpoint_url)
    info = ShardInfo(task.url, count, nbytes, digest.hexdigest())
    return ShardResult(task.index, info, stats, min_side, failures)


def _shard_count(items: list[Item], opts: BuildOptions) -> int:
    if not opts.shard_bytes:
        return max(1, opts.shard_size)
    probe = items[: min(64, len(items))]
    sizes = [len(encode_jpeg(load_rgb(i, opts.resize_to), opts.quality)) + 3 * 512 + 700 for i in probe]
    return max(1, int(opts.shard_bytes // (sum(sizes) / max(1, len(sizes)))))


def build_split(
    src: SplitSource,
    out: str,
    opts: BuildOptions,
    *,
    endpoint_url: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[Manifest, PixelStats, list[tuple[str, str]]]:
    """Write one split's shards under ``out``; returns its (unsaved) manifest, pixel stats, failures."""
    items = list(src.items)
    if src.split == "train":
        random.Random(SHUFFLE_SEED).shuffle(items)
    if opts.limit is not None:
        items = items[: opts.limit]
    if not items:
        raise DataError(f"{src.name} {src.split}: no samples found; check SOURCE")
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        raise DataError(
            f"{src.name} {src.split}: duplicate sample keys; rename files that differ only by suffix"
        )
    per_shard = _shard_count(items, opts)
    tasks = [
        ShardTask(
            n, storage.join(out, f"{src.name}-{src.split}-{n:06d}.tar"), items[i : i + per_shard],
            opts.resize_to, opts.quality, src.classes, endpoint_url,
        )
        for n, i in enumerate(range(0, len(items), per_shard))
    ]  # fmt: skip
    results: list[ShardResult] = []
    for result in _run(tasks, opts.processes):
        results.append(result)
        if progress:
            progress(len(tasks[result.index].items))
    results.sort(key=lambda r: r.index)
    stats = PixelStats()
    for r in results:
        stats.merge(r.stats)
    failures = [f for r in results for f in r.failures]
    shards = tuple(r.info for r in results)
    manifest = Manifest(
        url=storage.join(out, f"{src.name}-{src.split}.json"),
        split=src.split,
        shards=shards,
        classes=src.classes,
        names=src.names,
        image_size=opts.resize_to or min(r.min_side for r in results),
        num_samples=sum(s.count for s in shards),
        extra={"dataset": src.name, "quality": opts.quality, "source_failures": len(failures)},
        **stats.summary(),
    )
    return manifest, stats, failures


def _run(tasks: list[ShardTask], processes: int) -> Iterator[ShardResult]:
    if processes <= 1 or len(tasks) == 1:
        yield from map(write_shard, tasks)
        return
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield from pool.imap_unordered(write_shard, tasks)


def build(
    source: str | Path,
    out: str,
    opts: BuildOptions,
    *,
    fmt: str | None = None,
    split: str | None = None,
    manifest_dir: str | Path | None = None,
    stats_from: Manifest | None = None,
    endpoint_url: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[Manifest]:
    """Build every split; save manifests beside the shards (and copies in ``manifest_dir``)."""
    source = Path(source)
    if not source.exists():
        raise NotFoundError(f"{source}: not found; check SOURCE")
    fmt = fmt or detect_format(source)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    built = []
    for src in list_splits(source, fmt, split):
        total = min(len(src.items), opts.limit) if opts.limit is not None else len(src.items)
        tick = (lambda n, s=src.split, t=total: progress(s, n, t)) if progress else None
        manifest, _, failures = build_split(src, out, opts, endpoint_url=endpoint_url, progress=tick)
        for origin, reason in failures[:20]:
            log.warning("%s: skipped (%s)", origin, reason)
        built.append(manifest)
    train = next((m for m in built if m.split == "train"), None)
    reference = stats_from or train
    manifests = []
    for m in built:
        if reference is not None and m is not reference:
            m = replace(
                m, mean=reference.mean, std=reference.std, eigval=reference.eigval, eigvec=reference.eigvec
            )
        elif reference is None:
            log.warning("%s: no training split built; its own pixel statistics are used", m.url)
        save_manifest(m, m.url, endpoint_url=endpoint_url)
        if manifest_dir is not None:
            copy = Path(manifest_dir) / Path(storage.parse_url(m.url).key).name
            save_manifest(m, str(copy))
        manifests.append(m)
    return manifests
