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
undecoded (resume) -> each sample decoded and its augmented view written straight into the batch's buffer
(a corrupt image is counted bad) -> batches of B.
A stream that runs out early (bad samples) pads its quota with ``PAD_LABEL`` samples, so train losses need
``ignore_index=PAD_LABEL``. Streams are interleaved round-robin, exactly as torch's DataLoader interleaves
its workers, so ``num_workers=0`` runs the same streams in-process. Resuming rotates the streams so the
round-robin continues where it stopped: the rest of the epoch comes in the same order.

A batch is one uint8 buffer (images in HWC order, the decoder's, then lighting and labels). In a loader
worker it lies in shared memory and is recycled once the main process has dropped every view of it
(``_BufferPool``): the DataLoader then passes a handle, with no copy and no fresh pages (issue 3).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import tarfile
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alexnet_dist import storage
from alexnet_dist.data import augment
from alexnet_dist.data.manifest import Manifest, ShardInfo
from alexnet_dist.data.tar import iter_tar
from alexnet_dist.errors import ConfigError, DataError, StorageError
from alexnet_dist.kernels import jpeg as jpeg_kernel

log = logging.getLogger(__name__)

PAD_LABEL = -1  # label of padding samples: ignore them in the loss and the accuracy
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Shared batch buffers a loader worker recycles. In flight at once: DataLoader's prefetch (2 per worker), one
# in the pin-memory thread, one or two with the consumer; when all are taken a fresh buffer is used, never
# a wait. A fresh 10 MB buffer costs ~75 us per 227 px image in page faults here (issue 3), half a decode.
POOL_SLOTS = 6


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
    # True: decode only a view's rows and columns of a JPEG, into its slot (jpeg_kernel; same pixels).
    # A mirrored 227 crop of a 256 px JPEG costs ~132 us, where a whole decode (~145 us) plus the crop/flip
    # copy cost ~180 (bench/data.py).
    direct_jpeg: bool = True

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
    images: torch.Tensor  # uint8 [B, 3, S, S] (ten_crop: [B, 10, 3, S, S]), channels-last strides (HWC)
    lighting: torch.Tensor  # float32 [B, 3]: RGB offsets, 0-255 units, to add before normalising
    labels: torch.Tensor  # int64 [B]; PAD_LABEL for padding
    keys: list[str]  # sample keys; "" for padding
    stream: int = 0  # which stream made it (bookkeeping for resume)
    records: int = 0  # records that stream has consumed so far this epoch (bad ones included)
    bad: int = 0  # bad samples that stream has met so far this epoch
    slot: tuple[str, int, int] | None = None  # (pool, worker, slot) of a worker's recycled buffer
    # a recycled buffer's (buffer, or None when the main process has it already; layout; samples)
    source: tuple[torch.Tensor | None, _Layout, int] | None = field(default=None, repr=False, compare=False)

    def pin_memory(self) -> Batch:  # called by DataLoader(pin_memory=True)
        self.images, self.lighting, self.labels = (
            t.pin_memory() for t in (self.images, self.lighting, self.labels)
        )
        return self

    def __reduce__(self):  # from a loader worker to the main process
        meta = (self.keys, self.stream, self.records, self.bad, self.slot)
        if self.slot is not None and self.source is not None:
            return _received_slot, (*meta, *self.source)  # the buffer itself only on its first trip
        return Batch, (self.images, self.lighting, self.labels, *meta)  # its own tensors: nothing to recycle


class _SharedPool:
    """Main process: a loader's batch buffers in shared memory, and a flag per slot saying whether a batch
    in it is still in use (1: taken by a worker or held here; 0: free). See ``_BufferPool``."""

    def __init__(self, workers: int, layout: _Layout | None) -> None:
        self.name = f"{os.getpid()}:{next(_pool_names)}"
        self.flags = torch.zeros(workers, POOL_SLOTS, dtype=torch.uint8).share_memory_()
        self.layout = layout  # None: the workers allocate their buffers as they need them
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}
        if layout is not None:  # made (and faulted in) once here; forked workers inherit the mappings
            for w in range(workers):
                for slot in range(POOL_SLOTS):
                    self.buffers[w, slot] = torch.zeros(layout.nbytes, dtype=torch.uint8).share_memory_()
        self.held: set[tuple[int, int]] = set()  # slots whose batch something here still uses
        _POOLS[self.name] = self

    def worker_buffers(self, worker: int) -> list[torch.Tensor]:
        return [self.buffers[worker, s] for s in range(POOL_SLOTS) if (worker, s) in self.buffers]

    def release(self, worker: int, slot: int) -> None:
        self.held.discard((worker, slot))
        self.flags[worker, slot] = 0

    def reclaim(self) -> None:
        """After the workers stopped: free the slots of batches that never reached the consumer."""
        for w, row in enumerate(self.flags):
            for slot in range(POOL_SLOTS):
                if (w, slot) not in self.held:
                    row[slot] = 0


_POOLS: weakref.WeakValueDictionary[str, _SharedPool] = weakref.WeakValueDictionary()
_pool_names = itertools.count()


def _received_slot(
    keys: list[str], stream: int, records: int, bad: int, slot: tuple[str, int, int],
    buf: torch.Tensor | None, layout: _Layout, n: int,
) -> Batch:  # fmt: skip
    """A batch in a worker's recycled buffer; once nothing here uses it (views included), hand it back.

    A training loader's buffers are made here and inherited by the forked workers; an evaluation loader's
    workers make theirs as they need them, and each travels once, on its first batch: torch passes a shared
    tensor as a file descriptor, which costs a socket round trip to the worker and a fresh mapping whose
    pages fault in again (~1 ms a 10 MB batch here, and the consumer's time is the training step's).
    Later batches in the slot name it only.
    """
    pool = _POOLS.get(slot[0])
    if pool is None:  # the loader is gone: nobody waits for this batch
        empty = torch.zeros(layout.nbytes, dtype=torch.uint8)
        return Batch(*layout.views_of(empty, n), keys, stream, records, bad)
    if buf is not None:
        pool.buffers[slot[1:]] = buf
    # A fresh storage over the cached memory per batch: PyTorch keeps a storage's Python object alive as
    # long as any tensor uses it, so the finalizer runs when the last view of this batch is gone.
    mine = torch.from_numpy(pool.buffers[slot[1:]].numpy())
    pool.held.add(slot[1:])
    done = weakref.finalize(mine.untyped_storage(), pool.release, *slot[1:])
    done.atexit = False
    return Batch(*layout.views_of(mine, n), keys, stream, records, bad, slot)


class _BufferPool:
    """A loader worker's shared-memory batch buffers; a slot is refilled only after the main process let go.

    DataLoader moves a batch to the main process through shared memory: a tensor already there travels as a
    handle, a private one is copied into a fresh shared buffer first. Fresh pages are what costs (allocated,
    zeroed, faulted in: ~4.5 ms per 10 MB batch on this VM), so the worker keeps POOL_SLOTS buffers; a
    flag per slot in memory shared with the main process says whether the main process still uses it
    (1, set here when sent) or not (0, set by a finalizer there, see ``_received_slot``).
    """

    def __init__(self, name: str, flags: np.ndarray, worker: int, buffers: list[torch.Tensor]) -> None:
        self.name, self.flags, self.worker = name, flags, worker  # flags: this worker's row
        self.buffers = list(buffers)  # made by the main process (training) or here, as needed
        self.sent = set(range(len(buffers)))  # slots whose buffer the main process has (``_received_slot``)

    def first_trip(self, slot: int) -> bool:
        """True once per slot: the batch being sent from it carries the buffer itself."""
        first = slot not in self.sent
        self.sent.add(slot)
        return first

    def take(self, nbytes: int) -> tuple[torch.Tensor, tuple[str, int, int] | None]:
        for slot, buf in enumerate(self.buffers):
            if self.flags[slot] == 0 and buf.numel() == nbytes:
                self.flags[slot] = 1
                return buf, (self.name, self.worker, slot)
        buf = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        if len(self.buffers) == POOL_SLOTS:
            return buf, None  # all slots in use (a consumer keeping batches): this one is not recycled
        self.buffers.append(buf)
        self.flags[len(self.buffers) - 1] = 1
        return buf, (self.name, self.worker, len(self.buffers) - 1)


@dataclass(frozen=True)
class _Layout:
    """Where a batch's images (HWC), lighting and labels lie in its one uint8 buffer (64-byte aligned)."""

    batch: int
    views: int  # 10 for ten_crop, else 1
    crop: int

    @property
    def image_bytes(self) -> int:
        return self.batch * self.views * self.crop * self.crop * 3

    @property
    def lighting_at(self) -> int:
        return -(-self.image_bytes // 64) * 64

    @property
    def labels_at(self) -> int:
        return -(-(self.lighting_at + self.batch * 12) // 64) * 64

    @property
    def nbytes(self) -> int:
        return self.labels_at + self.batch * 8

    def split(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [B, V, S, S, 3] uint8, lighting [B, 3] float32, labels [B] int64), views of ``buf``."""
        b, s = self.batch, self.crop
        images = buf[: self.image_bytes].view(b, self.views, s, s, 3)
        lighting = buf[self.lighting_at : self.lighting_at + b * 12].view(torch.float32).view(b, 3)
        labels = buf[self.labels_at : self.labels_at + b * 8].view(torch.int64)
        return images, lighting, labels

    def views_of(self, buf: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch's first ``n`` samples as it hands them out: images with NCHW shape over HWC memory
        (channels-last strides; augment.normalize lays them out on the device), lighting, labels."""
        images, lighting, labels = self.split(buf)
        view = images[:n, 0].permute(0, 3, 1, 2) if self.views == 1 else images[:n].permute(0, 1, 4, 2, 3)
        return view, lighting[:n], labels[:n]


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


def check_record(files: Mapping[str, bytes | bytearray], num_classes: int) -> tuple[str | None, int, str]:
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
    pool: _BufferPool | None = None  # set in a loader worker

    @property
    def direct_jpeg(self) -> bool:
        return self.cfg.direct_jpeg and jpeg_kernel.available()

    @property
    def light_matrix(self) -> np.ndarray:
        return augment.lighting_matrix(self.eigval, self.eigvec, self.cfg.pca_lighting)

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

    def _write(self, images: torch.Tensor, filled: _Filled, pending: list) -> None:
        """Decode the pending records and write their views into ``images`` [B, V, S, S, 3] after filled.

        A training or central-crop view of a JPEG big enough for it is decoded straight into its slot,
        only its rows and columns, all of them in one call (:mod:`alexnet_dist.jpeg_kernel`). Other images
        (not JPEG, smaller than the view, or any when the kernel is missing) are decoded whole, all
        decodes first, then all copies: interleaving each decode with its 150 KB copy costs the decoder
        ~15 us an image in cache misses (issue 3). A corrupt image is counted bad and skipped.
        """
        crop, mode, decoded, whole = self.cfg.crop, self.cfg.mode, [], pending
        if mode != "ten_crop" and self.direct_jpeg:
            fallback = [not jpeg_kernel.is_jpeg(r[3]) for r in pending]  # decoded whole, in pending's order
            jpegs = [i for i, f in enumerate(fallback) if not f]
            draws = flips = None
            alphas: list[augment.Alphas | None] = [None] * len(jpegs)
            if mode == "train":
                params = [augment.train_draws(self.seed, self.epoch, pending[i][1]) for i in jpegs]
                draws = [(top, left) for top, left, _, _ in params]
                flips = [flip for _, _, flip, _ in params]
                alphas = [alpha for *_, alpha in params]
            codes, messages = jpeg_kernel.decode_views_into(
                images[len(filled.keys) :, 0], [pending[i][3] for i in jpegs], draws, flips
            )
            for i, code, message, alpha in zip(jpegs, codes, messages, alphas, strict=True):
                url, key, label, _ = pending[i]
                if code == 0:
                    filled.add(key, label, alpha)
                elif code == 1:
                    self._bad(url, key, f"cannot decode: ValueError: {message.splitlines()[0][:80]}")
                else:  # smaller than the crop: decoded whole and upscaled below, after the others
                    fallback[i] = True
            whole = [r for r, f in zip(pending, fallback, strict=True) if f]
        for url, key, label, data in whole:
            try:
                decoded.append((key, label, augment.fit_min_side(augment.decode_image(data), crop)))
            except Exception as err:  # a corrupt image: counted and skipped, never fatal by itself
                self._bad(url, key, f"cannot decode: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
        for key, label, img in decoded:
            dst, (h, w) = images[len(filled.keys)], img.shape[-2:]
            if mode == "ten_crop":
                augment.write_ten_crop(dst, img)
                filled.add(key, label, None)
            else:
                top, left, flip, alphas = self._position(key, h, w)
                augment.write_view(dst[0], img, top, left, flip)
                filled.add(key, label, alphas)

    def _position(self, key: str, h: int, w: int) -> tuple[int, int, bool, augment.Alphas | None]:
        """Where a sample's view lies: random crop, flip and lighting (train), or the centre (val)."""
        if self.cfg.mode == "train":
            return augment.train_params(self.seed, self.epoch, key, h, w, self.cfg.crop)
        return (*augment.center_position(h, w, self.cfg.crop), False, None)

    def _buffer(self, layout: _Layout) -> tuple[torch.Tensor, tuple[str, int, int] | None]:
        if self.pool is not None:
            return self.pool.take(layout.nbytes)
        return torch.empty(layout.nbytes, dtype=torch.uint8), None  # in-process: no pages to share

    def _batch(self, layout: _Layout, buf: torch.Tensor, slot, filled: _Filled, pad_to: int = 0) -> Batch:
        """The batch of the samples written into ``buf``, padded with PAD_LABEL samples to ``pad_to``."""
        images, lighting, labels = layout.split(buf)
        n = len(filled.keys)
        m = max(n, pad_to)
        images[n:m].zero_()
        light = np.zeros((m, 3), np.float32)
        if self.cfg.mode == "train" and n:
            light[:n] = augment.lighting_offsets(np.array(filled.alphas), self.light_matrix)
        lighting[:m] = torch.from_numpy(light)
        labels[:m] = torch.tensor(filled.labels + [PAD_LABEL] * (m - n), dtype=torch.int64)
        source = None
        if slot is not None and self.pool is not None:
            source = (buf if self.pool.first_trip(slot[2]) else None, layout, m)
        return Batch(
            *layout.views_of(buf, m),
            keys=filled.keys + [""] * (m - n),
            stream=self.plan.stream,
            records=self.records,
            bad=self.bad,
            slot=slot,
            source=source,
        )

    def batches(self) -> Iterator[Batch]:
        bsz, left = self.cfg.batch_size, self.plan.quota - self.done
        if left <= 0:
            return
        layout = _Layout(bsz, 10 if self.cfg.mode == "ten_crop" else 1, self.cfg.crop)
        buf, slot, filled, pending = None, None, _Filled(), []
        for url, key, _, label, data in self._shuffled(self._good_records()):
            self.records += 1
            if self.records <= self.skip:
                continue
            pending.append((url, key, label, data))
            if len(filled.keys) + len(pending) < bsz:
                continue  # never read past this batch's records: `records` is its resume point
            if buf is None:
                buf, slot = self._buffer(layout)
            self._write(layout.split(buf)[0], filled, pending)
            pending = []
            if len(filled.keys) == bsz:
                yield self._batch(layout, buf, slot, filled)
                buf, slot, filled, left = None, None, _Filled(), left - 1
                if left == 0:
                    return
        if pending:
            if buf is None:
                buf, slot = self._buffer(layout)
            self._write(layout.split(buf)[0], filled, pending)
        if filled.keys:  # eval's last partial batch; or a train stream short of its quota (padded to B)
            yield self._batch(layout, buf, slot, filled, bsz if self.cfg.mode == "train" else 0)
            buf, slot, left = None, None, left - 1
        if left > 0:
            log.warning("%s: stream %d ran %d batches short; padding", self.url, self.plan.stream, left)
        for _ in range(left):
            if buf is None:
                buf, slot = self._buffer(layout)
            yield self._batch(layout, buf, slot, _Filled(), bsz)
            buf, slot = None, None


@dataclass
class _Filled:
    """What a batch being written holds so far, besides its pixels."""

    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    alphas: list[augment.Alphas | None] = field(default_factory=list)

    def add(self, key: str, label: int, alphas: augment.Alphas | None) -> None:
        self.keys.append(key)
        self.labels.append(label)
        self.alphas.append(alphas)


class _EpochDataset(IterableDataset):
    def __init__(self, streams: list[_Stream], pool: _SharedPool) -> None:
        self.streams = streams
        # what a worker needs of the pool (not the pool: its finalizer bookkeeping lives in the main process)
        self.pool, self.flags = pool.name, pool.flags
        self.buffers = [pool.worker_buffers(w) for w in range(len(streams))]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            return _interleave([s.batches() for s in self.streams])
        torch.set_num_threads(1)  # one decode per worker process; the cores are the workers
        stream = self.streams[info.id]
        stream.pool = _BufferPool(self.pool, self.flags[info.id].numpy(), info.id, self.buffers[info.id])
        return stream.batches()


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
        self._pool: _SharedPool | None = None  # training's batch buffers, shared with every epoch's workers

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

    def _shared_pool(self, workers: int) -> _SharedPool:
        """Training: the loader's buffers, made once and kept for every epoch (each epoch's workers inherit
        them, so no epoch pays fresh pages: ~4.5 ms a 10 MB buffer here). Evaluation: a pool per pass whose
        workers make buffers as they need them (ten-crop batches are ten times bigger; they are let go)."""
        if self.cfg.mode != "train":
            return _SharedPool(workers, None)
        layout = _Layout(self.cfg.batch_size, 1, self.cfg.crop)
        if self._pool is None or self._pool.flags.shape[0] != workers or self._pool.layout != layout:
            self._pool = _SharedPool(workers, layout)
        return self._pool

    def __iter__(self) -> Iterator[Batch]:
        streams, consumed = self._start()
        length = self.plan().length
        real = min(length, sum(s.plan.quota for s in streams))
        if consumed < real:
            pool = None
            if self.cfg.num_workers == 0:
                source: Any = _interleave([s.batches() for s in streams])
            else:
                pool = self._shared_pool(len(streams))
                loader = DataLoader(_EpochDataset(streams, pool), batch_size=None, num_workers=len(streams),
                                    pin_memory=self.cfg.pin_memory)  # fmt: skip
                source = iter(loader)
            try:
                for batch in source:
                    self._streams[batch.stream] = [batch.records, batch.bad]
                    self._batches += 1
                    yield batch
                    if self._batches >= real:
                        break
            except DataError as err:  # from a worker, DataLoader puts the traceback into the message
                raise DataError(_one_line(err)) from err
            finally:
                if pool is not None:  # stop the workers now, then free what they had taken but not sent
                    getattr(source, "_shutdown_workers", lambda: None)()
                    pool.reclaim()
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
