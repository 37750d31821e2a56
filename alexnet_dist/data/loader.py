"""The rank's loader: a manifest -> ``len`` batches per epoch, the same on every rank, resumable mid-epoch.

Each epoch follows its plan (:mod:`alexnet_dist.data.plan`); each stream (:mod:`alexnet_dist.data.stream`)
runs in a DataLoader worker of its own, or all of them in the calling process when ``num_workers=0``.
Streams are interleaved round-robin, exactly as torch's DataLoader interleaves its workers, so
``num_workers=0`` runs the same streams in-process and yields the same batches. Resuming rotates the
streams so the round-robin continues where it stopped: the rest of the epoch comes in the same order.
A training loader makes its workers' shared batch buffers (:mod:`alexnet_dist.data.batch`) once and keeps
them for every epoch. With the ``device`` decoder the workers send undecoded batches and the loader decodes
each on ``LoaderConfig.device`` as it comes in (:mod:`alexnet_dist.data.device`), in the calling process:
the batches it yields lie on that device, and a sample that fails there is padding, counted bad.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from alexnet_dist import storage
from alexnet_dist.data.batch import PAD_LABEL, Batch, BufferPool, Layout, SharedPool
from alexnet_dist.data.decoders import defers, get_decoder
from alexnet_dist.data.device import EncodedBatch, decode_on_device
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.plan import EpochPlan, plan_epoch, round_robin_position
from alexnet_dist.data.stream import Stream
from alexnet_dist.errors import ConfigError, DataError

log = logging.getLogger(__name__)


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
    # a name in decoders.DECODERS. "crop": decode only a view's rows and columns of a JPEG, into its slot
    # (kernels.jpeg; same pixels, less work); "whole": decode every image whole, then copy its view;
    # "device": the batch's JPEGs decoded on `device` (data.device: nvJPEG on CUDA; "whole"'s pixels on CPU)
    decoder: str = "crop"
    device: str = "cpu"  # where the "device" decoder decodes: the rank's training device; others ignore it
    # S3 ranged GETs in flight or waiting per stream, `read_ahead_chunk` bytes each, across shard boundaries
    # (data.readahead): enough to hide a GET's time to first byte and to draw a stream's share of a node's
    # bandwidth over several connections; 0 reads each shard with one streaming GET. Local files ignore it.
    read_ahead: int = 4
    read_ahead_chunk: int = 8 << 20  # bytes per ranged GET; a stream holds (read_ahead + 1) chunks at most

    def __post_init__(self) -> None:
        if self.mode not in ("train", "val", "ten_crop"):
            raise ConfigError(f"loader mode {self.mode!r}: use 'train', 'val' or 'ten_crop'")
        if self.batch_size < 1 or self.crop < 1 or self.num_workers < 0:
            raise ConfigError("loader batch_size and crop must be positive and num_workers >= 0")
        if not 0 <= self.read_ahead <= storage.MAX_CONNECTIONS or self.read_ahead_chunk < 1:
            raise ConfigError(
                f"loader read_ahead {self.read_ahead}: use 0 (off) to {storage.MAX_CONNECTIONS} GETs, "
                f"and read_ahead_chunk >= 1 byte (got {self.read_ahead_chunk})"
            )
        get_decoder(self.decoder)  # an unknown name fails here, naming the known ones
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ConfigError(
                f"loader device {self.device!r}: not a torch device; use 'cpu' or 'cuda:0'"
            ) from err

    @property
    def last_dropped(self) -> bool:
        return self.mode == "train" if self.drop_last is None else self.drop_last

    @property
    def on_device(self) -> bool:
        """Whether the batches are decoded on ``device`` (the "device" decoder, but for ten crops)."""
        return defers(get_decoder(self.decoder), self.mode)


class _EpochDataset(IterableDataset):
    def __init__(self, streams: list[Stream], pool: SharedPool) -> None:
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
        stream.pool = BufferPool(self.pool, self.flags[info.id].numpy(), info.id, self.buffers[info.id])
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
        self._streams: list[list[int]] = []  # per stream: [records, bad, bad found decoding on the device]
        self._bad_before = 0  # bad samples of finished epochs
        self._resume: dict[str, Any] | None = None
        self._pool: SharedPool | None = None  # training's batch buffers, shared with every epoch's workers

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
        return self._bad_before + sum(s[1] + s[2] for s in self._streams)

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

    def _start(self) -> tuple[list[Stream], int]:
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
        progress = [[*saved[w], 0][:3] if w < len(saved) else [done[w] * bsz, 0, 0] for w in range(len(mine))]
        m = self.manifest
        streams = [
            Stream(
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

    def _shared_pool(self, workers: int) -> SharedPool:
        """Training: the loader's buffers, made once and kept for every epoch (each epoch's workers inherit
        them, so no epoch pays for fresh pages). Evaluation: a pool per pass whose workers make buffers as
        they need them (ten-crop batches are ten times bigger; they are let go)."""
        if self.cfg.mode != "train" or self.cfg.on_device:  # undecoded batches bring their own tensors
            return SharedPool(workers, None)
        layout = Layout(self.cfg.batch_size, 1, self.cfg.crop)
        if self._pool is None or self._pool.flags.shape[0] != workers or self._pool.layout != layout:
            self._pool = SharedPool(workers, layout)
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
                    if isinstance(batch, EncodedBatch):
                        batch = self._decode(batch)
                    self._streams[batch.stream][:2] = [batch.records, batch.bad]
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
        dev = self.cfg.device if self.cfg.on_device else "cpu"
        while self._batches < length:  # evaluation padding: ranks with fewer samples still yield `length`
            self._batches += 1
            yield Batch(
                torch.zeros(shape, dtype=torch.uint8, device=dev), torch.zeros(1, 3, device=dev),
                torch.tensor([PAD_LABEL], device=dev), [""],
            )  # fmt: skip

    def _decode(self, encoded: EncodedBatch) -> Batch:
        """An undecoded batch decoded on the device; its samples that fail there are counted bad, against
        the same limit as the stream's own."""
        batch, failed = decode_on_device(encoded, self.cfg.device)
        if failed:
            progress = self._streams[batch.stream]
            progress[2] += len(failed)
            for key, why in failed:
                log.warning("%s: bad sample %s (%s); padded", self.manifest.url, key, why)
            samples = self.plan().streams[self.rank][batch.stream].samples
            if batch.bad + progress[2] > self.cfg.max_bad_fraction * max(1, samples):
                raise DataError(
                    f"{self.manifest.url}: {batch.bad + progress[2]} bad samples of {samples} in one stream "
                    f"(limit {self.cfg.max_bad_fraction:g}); run `alexnet-dist shards verify` on the manifest"
                )
        return batch


def make_loader(manifest: Manifest, cfg: LoaderConfig, *, rank: int, world_size: int,
                endpoint_url: str | None = None) -> ShardLoader:  # fmt: skip
    return ShardLoader(manifest, cfg, rank=rank, world_size=world_size, endpoint_url=endpoint_url)
