"""A batch, the layout of its one buffer, and the shared-memory pools that recycle those buffers.

A batch is one uint8 buffer (:class:`Layout`: images in HWC order, the decoder's, then lighting and labels).
In a loader worker it lies in shared memory and is recycled once the main process has dropped every view
of it (:class:`BufferPool` in the worker, :class:`SharedPool` in the main process): the DataLoader then
passes a handle, with no copy and no fresh pages. What holds: a slot is refilled only after the main
process let go of every view of the batch in it, so a batch a consumer keeps never changes under it.
"""

from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

PAD_LABEL = -1  # label of padding samples: ignore them in the loss and the accuracy
# Shared batch buffers a loader worker recycles. In flight at once: DataLoader's prefetch (2 per worker), one
# in the pin-memory thread, one or two with the consumer; when all are taken a fresh buffer is used, never
# a wait. A fresh buffer pays page faults for every byte of it, a good share of the batch's decoding time.
POOL_SLOTS = 6


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
    source: tuple[torch.Tensor | None, Layout, int] | None = field(default=None, repr=False, compare=False)

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


class SharedPool:
    """Main process: a loader's batch buffers in shared memory, and a flag per slot saying whether a batch
    in it is still in use (1: taken by a worker or held here; 0: free). See ``BufferPool``."""

    def __init__(self, workers: int, layout: Layout | None) -> None:
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


_POOLS: weakref.WeakValueDictionary[str, SharedPool] = weakref.WeakValueDictionary()
_pool_names = itertools.count()


def _received_slot(
    keys: list[str], stream: int, records: int, bad: int, slot: tuple[str, int, int],
    buf: torch.Tensor | None, layout: Layout, n: int,
) -> Batch:  # fmt: skip
    """A batch in a worker's recycled buffer; once nothing here uses it (views included), hand it back.

    A training loader's buffers are made here and inherited by the forked workers; an evaluation loader's
    workers make theirs as they need them, and each travels once, on its first batch: torch passes a shared
    tensor as a file descriptor, which costs a socket round trip to the worker and a fresh mapping whose
    pages fault in again (and the consumer's time is the training step's).
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


class BufferPool:
    """A loader worker's shared-memory batch buffers; a slot is refilled only after the main process let go.

    DataLoader moves a batch to the main process through shared memory: a tensor already there travels as a
    handle, a private one is copied into a fresh shared buffer first. Fresh pages are what costs (allocated,
    zeroed, faulted in), so the worker keeps POOL_SLOTS buffers; a flag per slot in memory shared with the
    main process says whether the main process still uses it (1, set here when sent) or not (0, set by a
    finalizer there, see ``_received_slot``).
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
class Layout:
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
