"""One stream's work in an epoch: its shards' records -> batches of B augmented uint8 views.

A stream, after each stage: its shards' bytes in plan order (S3 shards read ahead: the same bytes, see
:mod:`alexnet_dist.data.readahead`) -> records (key, files) in shard order -> records with an image and a
label in range (others counted bad) -> seeded shuffle buffer (training) -> the first ``skip`` records dropped
undecoded (resume) -> each sample decoded and its augmented view written straight into the batch's buffer
by the configured decoder (a corrupt image is counted bad), or, for a decoder that defers to the device,
its bytes packed undecoded (:mod:`alexnet_dist.data.device`) -> batches of B.
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

from alexnet_dist.data import augment, device
from alexnet_dist.data.batch import PAD_LABEL, Batch, BufferPool, Layout
from alexnet_dist.data.decoders import Decoder, Views, defers, get_decoder
from alexnet_dist.data.plan import StreamPlan
from alexnet_dist.data.readahead import ReadAhead
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
        shards = self.plan.shards
        ahead = ReadAhead([(s.url, s.bytes) for s in shards], depth=self.cfg.read_ahead,
                          chunk=self.cfg.read_ahead_chunk, endpoint_url=self.endpoint_url)  # fmt: skip
        try:
            for i, shard in enumerate(shards):
                seen = 0
                try:
                    with ahead.open(i) as f:
                        for key, files in iter_tar(f):
                            seen += 1
                            ext, label, problem = check_record(files, self.num_classes)
                            if problem:
                                self._bad(shard.url, key, problem)
                            else:
                                yield shard.url, key, ext, label, files[ext]  # type: ignore[misc]
                except (tarfile.TarError, EOFError, StorageError, OSError) as err:
                    why = str(err).splitlines()[0] if str(err) else type(err).__name__
                    log.warning("%s: unreadable after %d samples (%s)", shard.url, seen, why)
                if seen < shard.count:  # truncated or missing: the samples it should have had are lost
                    lost = shard.count - seen
                    self._bad(shard.url, "*", f"shard ended after {seen} of {shard.count} samples", lost)
        finally:
            ahead.close()

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

    def _views(self) -> Views:
        return Views(self.cfg.mode, self.cfg.crop, self.seed, self.epoch)

    def _lighting(self, alphas: list) -> np.ndarray:
        """float32 [n, 3] RGB offsets of n samples' alphas (training; zeros in evaluation)."""
        if self.cfg.mode != "train" or not alphas:
            return np.zeros((len(alphas), 3), np.float32)
        return augment.lighting_offsets(np.array(alphas), self.light_matrix)

    def batches(self) -> Iterator[Batch | device.EncodedBatch]:
        bsz, left = self.cfg.batch_size, self.plan.quota - self.done
        if left <= 0:
            return
        out = _Encoded(self) if defers(self.decoder, self.cfg.mode) else _Pixels(self)
        pending: list = []
        records = self._good_records()
        try:
            for url, key, _, label, data in self._shuffled(records):
                self.records += 1
                if self.records <= self.skip:
                    continue
                pending.append((url, key, label, data))
                if out.count + len(pending) < bsz:
                    continue  # never read past this batch's records: `records` is its resume point
                out.add(pending)
                pending = []
                if out.count == bsz:
                    yield out.take()
                    left -= 1
                    if left == 0:
                        return
        finally:
            records.close()  # stops the read-ahead's GETs as soon as the quota is met
        if pending:
            out.add(pending)
        if out.count:  # eval's last partial batch; or a train stream short of its quota (padded to B)
            yield out.take(bsz if self.cfg.mode == "train" else 0)
            left -= 1
        if left > 0:
            log.warning("%s: stream %d ran %d batches short; padding", self.url, self.plan.stream, left)
        for _ in range(left):
            yield out.take(bsz)


class _Pixels:
    """A stream's next batch as the CPU decoders make it: views written into a (recycled) buffer."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        cfg = stream.cfg
        self.layout = Layout(cfg.batch_size, 10 if cfg.mode == "ten_crop" else 1, cfg.crop)
        self.buf: torch.Tensor | None = None
        self.slot: tuple[str, int, int] | None = None
        self.filled = _Filled()

    @property
    def count(self) -> int:
        return len(self.filled.keys)

    def _buffer(self) -> None:
        if self.buf is not None:
            return
        if self.stream.pool is not None:
            self.buf, self.slot = self.stream.pool.take(self.layout.nbytes)
        else:  # in-process: no pages to share
            self.buf, self.slot = torch.empty(self.layout.nbytes, dtype=torch.uint8), None

    def add(self, pending: list) -> None:
        """Decode the pending records and write their views into the batch's images after those filled."""
        self._buffer()
        images = self.layout.split(self.buf)[0]
        st = self.stream
        for key, label, alphas in st.decoder.write(images[self.count :], pending, st._views(), st._bad):
            self.filled.add(key, label, alphas)

    def take(self, pad_to: int = 0) -> Batch:
        """The batch of the samples written so far, padded with PAD_LABEL samples to ``pad_to``."""
        self._buffer()
        st, layout, buf, filled = self.stream, self.layout, self.buf, self.filled
        images, lighting, labels = layout.split(buf)
        n = self.count
        m = max(n, pad_to)
        images[n:m].zero_()
        light = np.zeros((m, 3), np.float32)
        light[:n] = st._lighting(filled.alphas)
        lighting[:m] = torch.from_numpy(light)
        labels[:m] = torch.tensor(filled.labels + [PAD_LABEL] * (m - n), dtype=torch.int64)
        source = None
        if self.slot is not None and st.pool is not None:
            source = (buf if st.pool.first_trip(self.slot[2]) else None, layout, m)
        batch = Batch(
            *layout.views_of(buf, m),
            keys=filled.keys + [""] * (m - n),
            stream=st.plan.stream,
            records=st.records,
            bad=st.bad,
            slot=self.slot,
            source=source,
        )
        self.buf, self.slot, self.filled = None, None, _Filled()
        return batch


class _Encoded:
    """A stream's next batch for a decoder that defers to the device: records packed undecoded, with
    their draws and lighting offsets."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.records: list = []
        self.draws: list[tuple[int, int, bool, augment.Alphas]] = []

    @property
    def count(self) -> int:
        return len(self.records)

    def add(self, pending: list) -> None:
        st = self.stream
        views = st._views()
        for record in device.defer(pending, st._bad):
            self.records.append(record)
            if st.cfg.mode == "train":
                self.draws.append(views.draws(record[1]))

    def take(self, pad_to: int = 0) -> device.EncodedBatch:
        st = self.stream
        train = st.cfg.mode == "train"
        draws = [d[:3] for d in self.draws] if train else None
        lighting = st._lighting([d[3] for d in self.draws] if train else [None] * self.count)
        batch = device.pack(self.records, draws, lighting, st.cfg.crop, pad_to, shared=st.pool is not None)
        batch.stream, batch.records, batch.bad = st.plan.stream, st.records, st.bad
        self.records, self.draws = [], []
        return batch


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
