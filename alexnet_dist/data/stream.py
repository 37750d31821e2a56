"""One stream's work in an epoch: its shards' records -> batches of B augmented uint8 views.

A stream, after each stage: records (key, files) in shard order -> records with an image and a label in
range (others counted bad) -> seeded shuffle buffer (training) -> the first ``skip`` records dropped
undecoded (resume) -> each sample decoded and its augmented view written straight into the batch's buffer
by the configured decoder (a corrupt image is counted bad) -> batches of B.
A stream that runs out early (bad samples) pads its quota with ``PAD_LABEL`` samples, so train losses need
``ignore_index=PAD_LABEL``. A batch never reads past its own records, so a batch's ``records`` is where
the stream resumes after it.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from alexnet_dist import storage
from alexnet_dist.data import augment
from alexnet_dist.data.batch import PAD_LABEL, Batch, BufferPool, Layout
from alexnet_dist.data.decoders import Decoder, Views, get_decoder
from alexnet_dist.data.plan import StreamPlan
from alexnet_dist.data.records import check_record
from alexnet_dist.data.tar import iter_tar
from alexnet_dist.errors import DataError, StorageError

if TYPE_CHECKING:  # for annotations only: the loader imports this module
    from alexnet_dist.data.loader import LoaderConfig

log = logging.getLogger(__name__)


@dataclass
class Stream:
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
    pool: BufferPool | None = None  # set in a loader worker

    @property
    def decoder(self) -> Decoder:
        return get_decoder(self.cfg.decoder)

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
        """Decode the pending records and write their views into ``images`` [B, V, S, S, 3] after filled."""
        views = Views(self.cfg.mode, self.cfg.crop, self.seed, self.epoch)
        for key, label, alphas in self.decoder.write(images[len(filled.keys) :], pending, views, self._bad):
            filled.add(key, label, alphas)

    def _buffer(self, layout: Layout) -> tuple[torch.Tensor, tuple[str, int, int] | None]:
        if self.pool is not None:
            return self.pool.take(layout.nbytes)
        return torch.empty(layout.nbytes, dtype=torch.uint8), None  # in-process: no pages to share

    def _batch(self, layout: Layout, buf: torch.Tensor, slot, filled: _Filled, pad_to: int = 0) -> Batch:
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
        layout = Layout(bsz, 10 if self.cfg.mode == "ten_crop" else 1, self.cfg.crop)
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
