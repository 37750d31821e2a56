"""The streaming training/eval pipeline: WebDataset shards -> augmented uint8 batches.

The epoch plan (all arithmetic in :func:`plan_epoch`, computed identically on every rank):

1. shard order: training shuffles the manifest's shards with (seed, epoch); evaluation keeps their order;
2. shards go to ranks, then to each rank's streams (one per loader worker), each time to the one with the
   fewest samples so far: loads stay balanced by the manifest's counts, and each sample has one owner;
3. quotas: a stream yields ``n // B`` batches when training (drop_last) or ``ceil(n / B)`` in evaluation;
   training trims the ranks' totals to the smallest, so every rank yields the same ``len`` and DDP never
   waits; evaluation pads the shorter ranks with one-sample batches of label ``PAD_LABEL`` (-1) at the end,
   so every rank also has the same ``len`` while each real sample is evaluated exactly once.

A stream, after each stage: records (key, files) in shard order -> records with an image and a label in
range (others counted bad) -> seeded shuffle buffer (training) -> the first ``skip`` records dropped
undecoded (resume) -> decoded and augmented samples (a corrupt image is counted bad) -> batches of B.
A stream that runs out early (bad samples) pads its quota with ``PAD_LABEL`` samples, so train losses need
``ignore_index=PAD_LABEL``. Streams are interleaved round-robin, exactly as torch's DataLoader interleaves
its workers, so ``num_workers=0`` runs the same streams in-process. Resuming rotates the streams so the
round-robin continues where it stopped: the rest of the epoch comes in the same order.
"""

from __future__ import annotations

import logging
import math
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alexnet_dist import augment, storage
from alexnet_dist.errors import ConfigError, DataError, StorageError
from alexnet_dist.manifest import Manifest, ShardInfo

log = logging.getLogger(__name__)

PAD_LABEL = -1  # label of padding samples: ignore them in the loss and the accuracy
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class LoaderConfig:
    batch_size: int  # per rank
    crop: int  # side of the network input: 227 (paper's 224 + our conv1 arithmetic) or 32 (small preset)
    mode: Literal["train", "val", "ten_crop"]
    seed: int
    num_workers: int = 1  # DataLoader worker processes (0: decode in the calling process)
    shuffle_buffer: int = 2000  # samples held per stream by the seeded shuffle buffer (training only)
    pca_lighting: float = 0.1  # sigma of the PCA lighting alphas (section 4.1); 0 turns it off
    max_bad_fraction: float = 0.001  # more bad samples than this fraction of a stream fails the run
    max_batches: int | None = None  # cap on batches per epoch (smoke tests)
    drop_last: bool | None = None  # None: True for train, False for eval
    pin_memory: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("train", "val", "ten_crop"):
            raise ConfigError(f"loader mode {self.mode!r}: use 'train', 'val' or 'ten_crop'")
        if self.batch_size < 1 or self.crop < 1 or self.num_workers < 0:
            raise ConfigError("loader batch_size and crop must be positive and num_workers >= 0")

    @property
    def last_dropped(self) -> bool:
        return self.mode == "train" if self.drop_last is None else self.drop_last


@dataclass
class Batch:
    images: torch.Tensor  # uint8 [B, 3, S, S]; ten_crop: [B, 10, 3, S, S]
    lighting: torch.Tensor  # float32 [B, 3]: RGB offsets, 0-255 units, to add before normalising
    labels: torch.Tensor  # int64 [B]; PAD_LABEL for padding
    keys: list[str]  # sample keys; "" for padding
    stream: int = 0  # which stream made it (bookkeeping for resume)
    records: int = 0  # records that stream has consumed so far this epoch (bad ones included)
    bad: int = 0  # bad samples that stream has met so far this epoch

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        self.images, self.lighting, self.labels = (
            t.pin_memory() for t in (self.images, self.lighting, self.labels)
        )
        return self


@dataclass(frozen=True)
class StreamPlan:
    rank: int
    stream: int
    shards: tuple[ShardInfo, ...]
    quota: int  # batches this stream yields this epoch

    @property
    def samples(self) -> int:
        return sum(s.count for s in self.shards)


@dataclass(frozen=True)
class EpochPlan:
    streams: tuple[tuple[StreamPlan, ...], ...]  # [rank][stream]
    length: int  # batches every rank yields (padding included)


def _spread(shards: list[ShardInfo], bins: int) -> list[list[ShardInfo]]:
    """Each shard, in order, to the bin with the fewest samples (ties: lowest index)."""
    out: list[list[ShardInfo]] = [[] for _ in range(bins)]
    load = [0] * bins
    for shard in shards:
        b = min(range(bins), key=lambda i: (load[i], i))
        out[b].append(shard)
        load[b] += shard.count
    return out


def plan_epoch(manifest: Manifest, cfg: LoaderConfig, epoch: int, world_size: int) -> EpochPlan:
    shards = list(manifest.shards)
    if cfg.mode == "train":
        random.Random(f"{cfg.seed}:{epoch}").shuffle(shards)
    nstreams, bsz = max(1, cfg.num_workers), cfg.batch_size
    per_rank = [_spread(r, nstreams) for r in _spread(shards, world_size)]
    counts = [[sum(s.count for s in ss) for ss in rank] for rank in per_rank]
    if cfg.last_dropped:
        quotas = [[n // bsz for n in rank] for rank in counts]
        length = min(sum(q) for q in quotas)
        if cfg.max_batches is not None:
            length = min(length, cfg.max_batches)
        if length == 0:
            raise DataError(
                f"{manifest.url}: some rank of {world_size} gets no full batch of {bsz}; use smaller shards "
                "(shards build --shard-size), fewer workers or a smaller batch"
            )
        for q in quotas:  # trim the biggest streams first until the rank's total is `length`
            while sum(q) > length:
                q[max(range(len(q)), key=lambda i: (q[i], -i))] -= 1
    else:
        quotas = [[math.ceil(n / bsz) for n in rank] for rank in counts]
        length = max(sum(q) for q in quotas)
        if cfg.max_batches is not None:
            length = min(length, cfg.max_batches)
            for q in quotas:
                while sum(q) > length:
                    q[max(range(len(q)), key=lambda i: (q[i], -i))] -= 1
    streams = tuple(
        tuple(StreamPlan(r, w, tuple(per_rank[r][w]), quotas[r][w]) for w in range(nstreams))
        for r in range(world_size)
    )
    return EpochPlan(streams, length)


def round_robin_position(quotas: list[int], consumed: int) -> tuple[list[int], int]:
    """After ``consumed`` round-robin batches over streams with these quotas: (done per stream, next)."""
    done, w, n = [0] * len(quotas), 0, len(quotas)
    for _ in range(min(consumed, sum(quotas))):
        while done[w] >= quotas[w]:
            w = (w + 1) % n
        done[w] += 1
        w = (w + 1) % n
    for _ in range(n):  # the next stream that still has batches
        if done[w] < quotas[w]:
            break
        w = (w + 1) % n
    return done, w


# --- reading shards ---------------------------------------------------------------------------------


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in a tar stream: ustar, GNU long names and pax paths.

    A hand-rolled reader: ``tarfile`` spends ~90 us per header in Python, as much as decoding a small JPEG.
    A stream that ends inside a member raises EOFError; one that ends between members just ends.
    """
    long_name: str | None = None
    while True:
        header = stream.read(512)
        if len(header) < 512 or header == bytes(512):
            return
        raw = header[124:136]
        if raw[0] & 0x80:  # base-256 size (GNU, files over 8 GB)
            size = int.from_bytes(raw[1:], "big")
        else:
            try:
                size = int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError as err:
                raise tarfile.ReadError(f"bad tar header size {raw!r}") from err
        data = stream.read(size)
        if len(data) < size:
            raise EOFError(f"tar ends inside a member ({len(data)} of {size} bytes)")
        stream.read(-size % 512)
        kind = header[156:157]
        if kind == b"L":  # GNU: the next member's long name
            long_name = data.rstrip(b"\0").decode()
            continue
        if kind == b"x":  # pax: "len path=value\n" records
            for rec in data.decode().split("\n"):
                key, _, value = rec.partition(" ")[2].partition("=")
                if key == "path":
                    long_name = value
            continue
        if kind not in (b"0", b"\0", b"7"):
            long_name = None
            continue
        name = long_name
        if name is None:
            name = header[:100].split(b"\0", 1)[0].decode()
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        long_name = None
        yield name, data


def iter_tar(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar stream (key = name up to the first dot)."""
    key, files = None, {}
    for name, data in _tar_members(stream):
        dot = name.find(".", name.rfind("/") + 1)
        if dot < 0:
            continue
        if name[:dot] != key:
            if key is not None:
                yield key, files
            key, files = name[:dot], {}
        files[name[dot + 1 :].lower()] = data
    if key is not None:
        yield key, files


def check_record(files: dict[str, bytes], num_classes: int) -> tuple[str | None, int, str]:
    """(image extension, label, problem): a problem is "" for a good record."""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return None, 0, "no image"
    if "cls" not in files:
        return ext, 0, "no .cls label"
    try:
        label = int(files["cls"].decode().strip())
    except ValueError:
        return ext, 0, f"label {files['cls'][:20]!r} is not an integer"
    if not 0 <= label < num_classes:
        return ext, label, f"label {label} outside 0..{num_classes - 1}"
    return ext, label, ""


@dataclass
class _Stream:
    """One stream's work this epoch, and the state it carries through it."""

    plan: StreamPlan
    skip: int  # records already consumed (resume): dropped before decoding
    done: int  # batches already yielded
    bad: int  # bad samples met so far this epoch
    epoch: int
    seed: int
    num_classes: int
    eigval: tuple[float, ...]
    eigvec: tuple[tuple[float, ...], ...]
    url: str
    cfg: LoaderConfig
    endpoint_url: str | None
    records: int = field(default=0)

    def _bad(self, url: str, key: str, why: str, n: int = 1) -> None:
        if self.records < self.skip:
            return  # met again while skipping to the resume point: counted before the checkpoint
        self.bad += n
        log.warning("%s: bad sample %s (%s); skipped", url, key, why)
        allowed = self.cfg.max_bad_fraction * max(1, self.plan.samples)
        if self.bad > allowed:
            raise DataError(
                f"{self.url}: {self.bad} bad samples of {self.plan.samples} in one stream (limit "
                f"{self.cfg.max_bad_fraction:g}); run `alexnet-dist shards verify` on the manifest"
            )

    def _good_records(self) -> Iterator[tuple[str, str, str, int, bytes]]:
        for shard in self.plan.shards:
            seen = 0
            try:
                with storage.open_read(shard.url, endpoint_url=self.endpoint_url) as f:
                    for key, files in iter_tar(f):
                        seen += 1
                        ext, label, problem = check_record(files, self.num_classes)
                        if problem:
                            self._bad(shard.url, key, problem)
                        else:
                            yield shard.url, key, ext, label, files[ext]  # type: ignore[misc]
            except (tarfile.TarError, EOFError, StorageError, OSError) as err:
                log.warning("%s: unreadable after %d samples (%s)", shard.url, seen, str(err).splitlines()[0])
            if seen < shard.count:  # truncated or missing: the samples it should have had are lost
                self._bad(
                    shard.url, "*", f"shard ended after {seen} of {shard.count} samples", shard.count - seen
                )

    def _shuffled(self, items: Iterator) -> Iterator:
        if self.cfg.mode != "train" or self.cfg.shuffle_buffer <= 1:
            yield from items
            return
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.plan.rank}:{self.plan.stream}")
        buf: list = []
        for item in items:
            if len(buf) < self.cfg.shuffle_buffer:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf

    def _view(self, key: str, data: bytes) -> tuple[torch.Tensor, np.ndarray]:
        crop = self.cfg.crop
        img = augment.fit_min_side(augment.decode_image(data), crop)
        if self.cfg.mode == "train":
            rng = augment.sample_rng(self.seed, self.epoch, key)
            top, left, flip, alphas = augment.train_params(rng, img.shape[1], img.shape[2], crop)
            light = augment.lighting_offset(alphas, self.eigval, self.eigvec, self.cfg.pca_lighting)
            return augment.crop_flip_view(img, top, left, flip, crop), light
        view = augment.center_crop(img, crop) if self.cfg.mode == "val" else augment.ten_crop(img, crop)
        return view, np.zeros(3, np.float32)

    def _batch(self, samples: list, pad_to: int = 0) -> Batch:
        shape = (
            (3, self.cfg.crop, self.cfg.crop)
            if self.cfg.mode != "ten_crop"
            else (10, 3, self.cfg.crop, self.cfg.crop)
        )
        while len(samples) < pad_to:
            samples.append((torch.zeros(shape, dtype=torch.uint8), np.zeros(3, np.float32), PAD_LABEL, ""))
        return Batch(
            images=torch.stack([s[0] for s in samples]),  # the one copy of each view
            lighting=torch.from_numpy(np.stack([s[1] for s in samples])),
            labels=torch.tensor([s[2] for s in samples], dtype=torch.int64),
            keys=[s[3] for s in samples],
            stream=self.plan.stream,
            records=self.records,
            bad=self.bad,
        )

    def batches(self) -> Iterator[Batch]:
        bsz, left = self.cfg.batch_size, self.plan.quota - self.done
        if left <= 0:
            return
        samples: list = []
        for url, key, _, label, data in self._shuffled(self._good_records()):
            self.records += 1
            if self.records <= self.skip:
                continue
            try:
                image, light = self._view(key, data)
            except Exception as err:  # a corrupt image: counted and skipped, never fatal by itself
                self._bad(url, key, f"cannot decode: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
                continue
            samples.append((image, light, label, key))
            if len(samples) == bsz:
                yield self._batch(samples)
                samples, left = [], left - 1
                if left == 0:
                    return
        if samples:  # eval's last partial batch; or a train stream short of its quota (padded to B)
            yield self._batch(samples, bsz if self.cfg.mode == "train" else 0)
            left -= 1
        if left > 0:
            log.warning("%s: stream %d ran %d batches short; padding", self.url, self.plan.stream, left)
        for _ in range(left):
            yield self._batch([], bsz)


class _EpochDataset(IterableDataset):
    def __init__(self, streams: list[_Stream]) -> None:
        self.streams = streams

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            return _interleave([s.batches() for s in self.streams])
        torch.set_num_threads(1)  # one decode per worker process; the cores are the workers
        return self.streams[info.id].batches()


def _interleave(iterators: list[Iterator[Batch]]) -> Iterator[Batch]:
    """Round-robin over the live iterators: the order torch's DataLoader gives its workers' output."""
    live = list(iterators)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


def _one_line(err: Exception) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[-1].removeprefix("alexnet_dist.errors.DataError: ") if lines else type(err).__name__


class ShardLoader:
    """The rank's view of a manifest: ``len`` batches per epoch, the same on every rank."""

    def __init__(self, manifest: Manifest, cfg: LoaderConfig, *, rank: int, world_size: int,
                 endpoint_url: str | None = None) -> None:  # fmt: skip
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} outside world of {world_size}")
        self.manifest, self.cfg, self.rank, self.world_size = manifest, cfg, rank, world_size
        self.endpoint_url = endpoint_url
        self.epoch = 0
        self._plans: dict[int, EpochPlan] = {}
        self._batches = 0
        self._streams: list[list[int]] = []  # per stream: [records, bad]
        self._bad_before = 0  # bad samples of finished epochs
        self._resume: dict[str, Any] | None = None

    def plan(self, epoch: int | None = None) -> EpochPlan:
        epoch = self.epoch if epoch is None else epoch
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.manifest, self.cfg, epoch, self.world_size)}
        return self._plans[epoch]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._bad_before = self.bad_samples
            self._streams, self._batches, self._resume = [], 0, None
            self.epoch = epoch

    def __len__(self) -> int:
        return self.plan().length

    @property
    def bad_samples(self) -> int:
        return self._bad_before + sum(b for _, b in self._streams)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches": self._batches,
            "seed": self.cfg.seed,
            "world_size": self.world_size,
            "streams": [list(s) for s in self._streams],
            "bad_before": self._bad_before,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("seed", self.cfg.seed)) != self.cfg.seed:
            raise ConfigError(
                f"loader state has seed {state['seed']} but the config {self.cfg.seed}; use the same seed"
            )
        self.epoch = int(state["epoch"])
        self._batches = int(state["batches"])
        self._bad_before = int(state.get("bad_before", 0))
        self._resume = dict(state)

    def _start(self) -> tuple[list[_Stream], int]:
        plan, bsz = self.plan(), self.cfg.batch_size
        mine = plan.streams[self.rank]
        quotas = [p.quota for p in mine]
        state, self._resume = self._resume, None
        consumed = 0
        if state is not None:
            consumed = min(int(state["batches"]), plan.length)
            if int(state.get("world_size", self.world_size)) != self.world_size:
                log.warning("loader state is from %s ranks, now %d: epoch %d restarts", state["world_size"],
                            self.world_size, self.epoch)  # fmt: skip
                consumed, state = 0, None
        done, first = round_robin_position(quotas, consumed)
        saved = (state or {}).get("streams") or []
        progress = [list(saved[w]) if w < len(saved) else [done[w] * bsz, 0] for w in range(len(mine))]
        m = self.manifest
        streams = [
            _Stream(
                mine[w], progress[w][0], done[w], progress[w][1], self.epoch, self.cfg.seed, len(m.classes),
                m.eigval, m.eigvec, m.url, self.cfg, self.endpoint_url,
            )
            for w in range(len(mine))
        ]  # fmt: skip
        self._streams, self._batches = progress, consumed
        order = [
            (first + i) % len(mine) for i in range(len(mine))
        ]  # rotate: the round-robin resumes at `first`
        return [streams[w] for w in order], consumed

    def __iter__(self) -> Iterator[Batch]:
        streams, consumed = self._start()
        length = self.plan().length
        real = min(length, sum(s.plan.quota for s in streams))
        if consumed < real:
            if self.cfg.num_workers == 0:
                source: Any = _interleave([s.batches() for s in streams])
            else:
                source = DataLoader(_EpochDataset(streams), batch_size=None, num_workers=len(streams),
                                    pin_memory=self.cfg.pin_memory)  # fmt: skip
            try:
                for batch in source:
                    self._streams[batch.stream] = [batch.records, batch.bad]
                    self._batches += 1
                    yield batch
                    if self._batches >= real:
                        break
            except DataError as err:  # from a worker, DataLoader puts the traceback into the message
                raise DataError(_one_line(err)) from err
        shape = (
            (1, 3, self.cfg.crop, self.cfg.crop)
            if self.cfg.mode != "ten_crop"
            else (1, 10, 3, self.cfg.crop, self.cfg.crop)
        )
        while self._batches < length:  # evaluation padding: ranks with fewer samples still yield `length`
            self._batches += 1
            yield Batch(
                torch.zeros(shape, dtype=torch.uint8), torch.zeros(1, 3), torch.tensor([PAD_LABEL]), [""]
            )


def make_loader(manifest: Manifest, cfg: LoaderConfig, *, rank: int, world_size: int,
                endpoint_url: str | None = None) -> ShardLoader:  # fmt: skip
    return ShardLoader(manifest, cfg, rank=rank, world_size=world_size, endpoint_url=endpoint_url)
