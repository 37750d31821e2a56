"""Decoders, looked up by name (``LoaderConfig.decoder``): how a batch's images become their views.

A decoder writes the views of a batch's records into consecutive slots of the batch's buffer and says
which samples it wrote, in slot order; a record it cannot decode goes to the ``bad`` callback, never into
a slot. Where each view lies (crop, flip, lighting) is :class:`Views`' business: a pure function of
(seed, epoch, key), so every decoder gives a sample the same view, the same pixels (the crop kernel is
used only once it matches torchvision's decode); within a batch, decoders may order the samples
differently.

- ``crop`` (the default): a JPEG's view decoded straight into its slot, only its rows and columns
  (:mod:`alexnet_dist.kernels.jpeg`); anything else is decoded as ``whole`` does it;
- ``whole``: every image decoded whole (torchvision), then its view copied (and mirrored) into the slot;
- ``device``: the loader worker only checks each JPEG's header and packs its bytes undecoded; the process
  that owns the training device decodes the batch there (:mod:`alexnet_dist.data.device`: nvJPEG on
  CUDA, the same pixels as ``whole`` on the CPU). Ten crops are decoded here, as ``whole`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from alexnet_dist.data import augment
from alexnet_dist.errors import ConfigError
from alexnet_dist.kernels import jpeg as jpeg_kernel

Record = tuple[str, str, int, bytes]  # (shard URL, key, label, image bytes) of a record with a good label
Written = tuple[str, int, augment.Alphas | None]  # (key, label, lighting alphas) of a view in its slot
OnBad = Callable[[str, str, str], None]  # (shard URL, key, why): a sample counted bad and skipped


@dataclass(frozen=True)
class Views:
    """Which view of each sample a batch gets: random crop, flip and lighting (train), the centre (val) or
    ten crops (ten_crop), drawn from (seed, epoch, key) alone whichever decoder runs."""

    mode: str  # "train", "val" or "ten_crop"
    crop: int
    seed: int
    epoch: int

    def draws(self, key: str) -> tuple[int, int, bool, augment.Alphas]:
        """A training sample's (top draw, left draw, flip, alphas), before the image's size is known."""
        return augment.train_draws(self.seed, self.epoch, key)

    def position(self, key: str, h: int, w: int) -> tuple[int, int, bool, augment.Alphas | None]:
        """Where a sample's view lies in its ``h x w`` image: (top, left, flip, alphas)."""
        if self.mode == "train":
            return augment.train_params(self.seed, self.epoch, key, h, w, self.crop)
        return (*augment.center_position(h, w, self.crop), False, None)


class Decoder(Protocol):
    """The one method a decoder implements; add one by writing a class and naming it in ``DECODERS``."""

    def write(
        self, slots: torch.Tensor, records: Sequence[Record], views: Views, bad: OnBad
    ) -> list[Written]:
        """Decode ``records`` and write their views into ``slots`` [n, V, S, S, 3] (HWC), from slot 0 on.

        Returns one entry per view written, in slot order; each other record was reported to ``bad``.
        """
        ...


class WholeDecoder:
    """Each image decoded whole (upscaled first when smaller than the view), then its view copied.

    All decodes first, then all copies: interleaving each decode with its copy of a view (150 KB at 227 px)
    evicts the decoder's working set from the cache. A corrupt image is reported bad and skipped.
    """

    def write(
        self, slots: torch.Tensor, records: Sequence[Record], views: Views, bad: OnBad
    ) -> list[Written]:
        decoded, written = [], []
        for url, key, label, data in records:
            try:
                decoded.append((key, label, augment.fit_min_side(augment.decode_image(data), views.crop)))
            except Exception as err:  # a corrupt image: counted and skipped, never fatal by itself
                bad(url, key, f"cannot decode: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
        for key, label, img in decoded:
            dst, (h, w) = slots[len(written)], img.shape[-2:]
            if views.mode == "ten_crop":
                augment.write_ten_crop(dst, img)
                written.append((key, label, None))
            else:
                top, left, flip, alphas = views.position(key, h, w)
                augment.write_view(dst[0], img, top, left, flip)
                written.append((key, label, alphas))
        return written


class CropDecoder:
    """A training or central-crop view of a JPEG big enough for it, decoded straight into its slot.

    Only the view's rows and iMCU columns are decoded, all of a batch's JPEGs in one call, and the rows are
    written (mirrored when flipped) into the slot: no whole decode, no copy of the decoded image. The
    kernel places a training view from the sample's draws, since it learns the image's size from the header
    it reads anyway. Other images (not JPEG, smaller than the view, any ten-crop sample, or all of them
    where the kernel is missing) go to ``whole``, after the JPEGs: the same pixels, decoded whole.
    """

    whole = WholeDecoder()

    def write(
        self, slots: torch.Tensor, records: Sequence[Record], views: Views, bad: OnBad
    ) -> list[Written]:
        if views.mode == "ten_crop" or not jpeg_kernel.available():
            return self.whole.write(slots, records, views, bad)
        fallback = [not jpeg_kernel.is_jpeg(r[3]) for r in records]  # decoded whole, in records' order
        jpegs = [i for i, f in enumerate(fallback) if not f]
        draws = flips = None
        alphas: list[augment.Alphas | None] = [None] * len(jpegs)
        if views.mode == "train":
            params = [views.draws(records[i][1]) for i in jpegs]
            draws = [(top, left) for top, left, _, _ in params]
            flips = [flip for _, _, flip, _ in params]
            alphas = [alpha for *_, alpha in params]
        codes, messages = jpeg_kernel.decode_views_into(
            slots[:, 0], [records[i][3] for i in jpegs], draws, flips
        )
        written: list[Written] = []
        for i, code, message, alpha in zip(jpegs, codes, messages, alphas, strict=True):
            url, key, label, _ = records[i]
            if code == 0:
                written.append((key, label, alpha))
            elif code == 1:
                bad(url, key, f"cannot decode: ValueError: {message.splitlines()[0][:80]}")
            else:  # smaller than the crop: decoded whole and upscaled, after the others
                fallback[i] = True
        rest = [r for r, f in zip(records, fallback, strict=True) if f]
        return written + self.whole.write(slots[len(written) :], rest, views, bad)


class DeviceDecoder:
    """The views are made on the training device from the batch's undecoded JPEGs (``deferred``: the stream
    packs them with :func:`alexnet_dist.data.device.pack`); what this writes on the CPU is the ten-crop
    views, as ``whole`` does."""

    deferred = True  # training and central-crop batches leave the worker undecoded
    whole = WholeDecoder()

    def write(
        self, slots: torch.Tensor, records: Sequence[Record], views: Views, bad: OnBad
    ) -> list[Written]:
        return self.whole.write(slots, records, views, bad)


def defers(decoder: Decoder, mode: str) -> bool:
    """Whether this decoder's batches in this mode leave the loader worker undecoded."""
    return bool(getattr(decoder, "deferred", False)) and mode != "ten_crop"


DECODERS: dict[str, Decoder] = {"crop": CropDecoder(), "whole": WholeDecoder(), "device": DeviceDecoder()}


def get_decoder(name: str) -> Decoder:
    if name not in DECODERS:
        raise ConfigError(f"loader decoder {name!r}: unknown; use one of {', '.join(map(repr, DECODERS))}")
    return DECODERS[name]
