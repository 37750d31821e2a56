"""Batches onto the towers' devices without making the accelerator wait on the host.

What holds, per step:
- the uint8 batch crosses to each tower's device as it is (4x fewer bytes than float32) and is normalized
  there, with mean/std kept on every device once: tower B's input never crosses from tower A as floats;
- the count of real samples comes from the batch's keys (padding has none), never from the device;
- on CUDA, batches are pinned (the loader's pin-memory thread) and copied with ``non_blocking=True`` on a
  side stream, the next batch's copy issued before the current step runs, so copy and compute overlap;
  the step's stream waits for the copy's event before using it;
- on the CPU the same code runs with the copies as no-ops, so the tests exercise every line of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DeviceBatch", "DeviceFeed"]


@dataclass
class DeviceBatch:
    """One step's inputs: each tower's normalized images on its device, the labels on d0."""

    inputs: tuple[torch.Tensor, torch.Tensor]  # (tower A's on d0, tower B's on d1); the same tensor on one
    labels: torch.Tensor
    valid: int  # real samples (not PAD_LABEL), counted on the host
    source: Any  # the loader's batch (its keys, stream position)
    ready: Any = None  # CUDA event the copy recorded; None on the CPU


class DeviceFeed:
    """Normalizes the loader's uint8 batches on the towers' devices, one batch ahead on CUDA."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        devices: tuple[torch.device, torch.device],
        *,
        channels_last: bool = False,
    ) -> None:
        self.devices = devices
        self.channels_last = channels_last
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for device in dict.fromkeys(devices):
            m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1).to(device)
            s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1).to(device)
            self._consts[device] = (m, s)
        cuda = devices[0].type == "cuda"
        self._stream = torch.cuda.Stream(device=devices[0]) if cuda else None

    def normalize(
        self, images_u8: torch.Tensor, lighting: torch.Tensor, device: torch.device
    ) -> torch.Tensor:
        """``(x + lighting - mean) / std`` as float32 on ``device``; images [B,3,S,S] or [B,10,3,S,S]."""
        mean, std = self._consts[device]
        x = images_u8.to(device, non_blocking=True).float()
        light = lighting.to(device, non_blocking=True).float()
        light = light.view(light.shape[0], *([1] * (x.dim() - 4)), 3, 1, 1)
        x = (x + light - mean) / std
        layout = torch.channels_last if self.channels_last and x.dim() == 4 else torch.contiguous_format
        return x.contiguous(memory_format=layout)

    def to_devices(self, batch: Any) -> DeviceBatch:
        d0, d1 = self.devices
        valid = sum(1 for key in batch.keys if key)  # padding has no key: counted on the host, no sync
        a = self.normalize(batch.images, batch.lighting, d0)
        b = a if d1 == d0 else self.normalize(batch.images, batch.lighting, d1)
        labels = batch.labels.to(d0, non_blocking=True)
        return DeviceBatch((a, b), labels, valid, batch)

    def _issue(self, batch: Any) -> DeviceBatch:
        if self._stream is None:
            return self.to_devices(batch)
        with torch.cuda.stream(self._stream):
            out = self.to_devices(batch)
            out.ready = torch.cuda.Event()
            out.ready.record(self._stream)
        return out

    def _wait(self, item: DeviceBatch) -> DeviceBatch:
        if item.ready is not None:
            torch.cuda.current_stream(self.devices[0]).wait_event(item.ready)
            for t in (*item.inputs, item.labels):  # the side stream's memory is now used by this one
                t.record_stream(torch.cuda.current_stream(t.device))
        return item

    def __call__(self, batches: Iterable[Any]) -> Iterator[DeviceBatch]:
        """The batches on the devices, in order; on CUDA each one's copy is issued a step ahead."""
        it = iter(batches)
        try:
            pending = self._issue(next(it))
        except StopIteration:
            return
        for batch in it:
            following = self._issue(batch)  # copies while the consumer computes on `pending`
            yield self._wait(pending)
            pending = following
        yield self._wait(pending)
