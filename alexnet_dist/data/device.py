"""The ``device`` decoder: a batch's JPEGs decoded on the device that trains on them (nvJPEG on CUDA).

What runs where:

- in the loader worker (:func:`defer` and :func:`pack`, called by the stream): each record's header is
  checked (a JPEG whose header cannot be read is counted bad there and takes no slot, as with the CPU
  decoders), its training draws and lighting offsets are computed (:func:`augment.train_draws`, the same
  numbers the CPU decoders use), and its bytes are copied, undecoded, into one buffer: an
  :class:`EncodedBatch` (with 256-pixel shards a few times smaller than the decoded views), cheap to make;
- in the process that owns the device (:func:`decode_on_device`, called by the loader as batches come
  in): the JPEGs are decoded in one batched call on ``device``, ``torchvision``'s nvJPEG decode on
  CUDA and its CPU decoder (libjpeg-turbo, the ``whole`` decoder's) on ``device="cpu"``, where the tests
  run it; each image smaller than the view is upscaled (:func:`augment.fit_min_side`), its view cut
  where the draws place it, the flipped ones mirrored, all in tensors of that device, into the batch's
  uint8 [B, 3, S, S] (channels-last strides, as the CPU decoders' batches). Non-JPEG images and JPEGs the
  device's decoder refuses are decoded on the CPU and moved there. The same code runs on either device
  but for the one batched decode call (:func:`_decode_jpegs`), so the tests on the CPU test all of it.

What holds: a sample's view is the same function of (seed, epoch, key) as with the CPU decoders. On
``device="cpu"`` the pixels and lighting offsets are exactly the ``whole`` decoder's and the samples in
the same slots; on CUDA the positions, flips and offsets are the same and the pixels are nvJPEG's (its
IDCT and chroma upsampling may differ from libjpeg-turbo's by a level or so). A JPEG that passes the
header check but fails to decode on the device is reported bad by :func:`decode_on_device` and its slot
becomes padding (``PAD_LABEL``, key "", zero pixels and lighting): it never lends its slot a picture.
Ten-crop evaluation keeps the CPU's ``whole`` decode in the worker (the stream never packs ten crops).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
import torchvision.io as tvio

from alexnet_dist.data import augment
from alexnet_dist.data.batch import PAD_LABEL, Batch
from alexnet_dist.data.decoders import OnBad, Record
from alexnet_dist.kernels import jpeg as jpeg_kernel

_RGB = tvio.ImageReadMode.RGB.value
Draw = tuple[int, int, bool]  # a training sample's (top draw, left draw, flip): augment.train_draws


@dataclass
class EncodedBatch:
    """A batch as the ``device`` decoder's loader worker sends it: the samples' image bytes undecoded.

    Slots ``0..n-1`` hold the ``n = len(ends)`` samples, in the order the CPU decoders would write them;
    slots ``n..`` are padding (``PAD_LABEL``).
    """

    data: torch.Tensor  # uint8 [bytes]: the samples' images back to back (shared memory from a worker)
    ends: list[int]  # where each sample's bytes end in ``data``
    draws: list[Draw] | None  # training: each sample's draws; None: the central crop
    crop: int
    lighting: torch.Tensor  # float32 [B, 3]: RGB offsets (0-255 units), zero for padding
    labels: torch.Tensor  # int64 [B]
    keys: list[str]  # "" for padding
    stream: int = 0  # the loader's bookkeeping, as in Batch
    records: int = 0
    bad: int = 0


def defer(records: Sequence[Record], bad: OnBad) -> list[Record]:
    """The records that travel undecoded, in order; a JPEG whose header cannot be read goes to ``bad``.

    The header is read with the crop kernel's libjpeg where it is built; without it, such a JPEG is found
    when the device decodes it (and its slot padded).
    """
    if not jpeg_kernel.available():
        return list(records)
    kept = []
    for url, key, label, data in records:
        if jpeg_kernel.is_jpeg(data):
            try:
                jpeg_kernel.jpeg_size(data)
            except ValueError as err:
                bad(url, key, f"cannot decode: ValueError: {str(err).splitlines()[0][:80]}")
                continue
        kept.append((url, key, label, data))
    return kept


def pack(
    records: Sequence[Record], draws: list[Draw] | None, lighting: np.ndarray, crop: int, pad_to: int,
    *, shared: bool,
) -> EncodedBatch:  # fmt: skip
    """``records`` (already through :func:`defer`) as an :class:`EncodedBatch` of ``max(n, pad_to)`` slots.

    ``draws`` are the records' training draws (None: central crops), ``lighting`` their float32 [n, 3]
    offsets (zeros in evaluation); ``shared`` puts the bytes in shared memory, so that a loader worker's
    batch crosses to the main process without another copy.
    """
    n = len(records)
    m = max(n, pad_to)
    ends = np.cumsum([len(r[3]) for r in records], dtype=np.int64).tolist()
    data = torch.empty(ends[-1] if ends else 0, dtype=torch.uint8)
    if shared and data.numel():
        data.share_memory_()
    flat, start = data.numpy(), 0
    for (*_, blob), end in zip(records, ends, strict=True):
        flat[start:end] = np.frombuffer(blob, np.uint8)
        start = end
    light = torch.zeros(m, 3)
    light[:n] = torch.from_numpy(lighting)
    labels = torch.tensor([r[2] for r in records] + [PAD_LABEL] * (m - n), dtype=torch.int64)
    keys = [r[1] for r in records] + [""] * (m - n)
    return EncodedBatch(data, ends, draws, crop, light, labels, keys)


def _decode_jpegs(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One batched decode on ``device``: nvJPEG on CUDA, libjpeg-turbo's decode_jpeg on the CPU (its
    stand-in); it fails whole, as nvJPEG's batched call does, when one image fails."""
    if device.type == "cuda":
        return torch.ops.image.decode_jpegs_cuda(blobs, _RGB, device)
    return [torch.ops.image.decode_jpeg(b, _RGB, False) for b in blobs]


def _decode_alone(blob: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode_jpegs([blob], device)[0]
    except RuntimeError:
        return None  # the CPU's general decoder tries it next


def _decode(blobs: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor | None], list[str]]:
    """Each blob decoded to uint8 RGB [3, H, W] on ``device`` (None where it cannot be), and why not.

    The JPEGs in one batched call; when it fails, each alone, so that only the bad ones miss; whatever is
    left (not a JPEG, or refused by the device's decoder) is decoded on the CPU and moved to ``device``.
    """
    images: list[torch.Tensor | None] = [None] * len(blobs)
    why = [""] * len(blobs)
    jpegs = [i for i, b in enumerate(blobs) if b.numel() >= 3 and b[:3].tolist() == [0xFF, 0xD8, 0xFF]]
    if jpegs:
        try:
            decoded: list[torch.Tensor | None] = list(_decode_jpegs([blobs[i] for i in jpegs], device))
        except RuntimeError:
            decoded = [_decode_alone(blobs[i], device) for i in jpegs]
        for i, img in zip(jpegs, decoded, strict=True):
            images[i] = img
    for i, blob in enumerate(blobs):
        if images[i] is None:
            try:
                images[i] = torch.ops.image.decode_image(blob, _RGB, False).to(device)
            except RuntimeError as err:
                why[i] = f"cannot decode: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:80]}"
    return images, why


def decode_on_device(batch: EncodedBatch, device: torch.device | str) -> tuple[Batch, list[tuple[str, str]]]:
    """The batch decoded and augmented on ``device``, and the (key, why) of samples that failed to decode.

    Returns a :class:`Batch` whose images (uint8 [B, 3, S, S], channels-last strides), lighting and labels
    lie on ``device``; a sample that failed became padding in its slot.
    """
    device, s = torch.device(device), batch.crop
    images, why = _decode([batch.data[a:b] for a, b in pairwise([0, *batch.ends])], device)
    m = len(batch.keys)
    out = torch.zeros(m, s, s, 3, dtype=torch.uint8, device=device)  # HWC, as the CPU decoders write
    keys, labels, lighting = list(batch.keys), batch.labels.clone(), batch.lighting.clone()
    flips, failed = [], []
    for i, img in enumerate(images):
        if img is None:
            keys[i], labels[i] = "", PAD_LABEL
            lighting[i] = 0
            failed.append((batch.keys[i], why[i]))
            continue
        img = augment.fit_min_side(img, s)
        h, w = img.shape[-2:]
        if batch.draws is not None:
            top, left = augment.crop_position(*batch.draws[i][:2], h, w, s)
            if batch.draws[i][2]:
                flips.append(i)
        else:
            top, left = augment.center_position(h, w, s)
        out[i].copy_(img[:, top : top + s, left : left + s].permute(1, 2, 0))
    if flips:  # the mirrored views, all at once
        index = torch.tensor(flips, device=device)
        out[index] = out[index].flip(2)
    decoded = Batch(
        out.permute(0, 3, 1, 2),
        lighting.to(device, non_blocking=True),
        labels.to(device, non_blocking=True),
        keys,
        batch.stream,
        batch.records,
        batch.bad,
    )
    return decoded, failed
