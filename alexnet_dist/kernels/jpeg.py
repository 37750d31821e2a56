"""Decode only a view's crop of a JPEG, straight into its batch slot (``csrc/jpeg_crop.c``).

The loader's training and central-crop views need 227x227 of a 256x256 image: decoding just those rows
and iMCU columns skips ~20% of the decoder's work, and writing the rows (mirrored when flipped) into the
batch skips a copy of the whole decoded image. :func:`decode_view_into` reads the header once and places
the crop from the sample's random draws (bench/data.py compares it with torchvision's whole decode plus
the crop/flip copy).

Built against the system's libjpeg-turbo (Debian: ``libjpeg62-turbo-dev``, installed by ``make setup``)
by :mod:`alexnet_dist.kernels.library`, and used only once a self-test against torchvision's decoder
passes. Without it, :func:`available` is False and the loader decodes whole images with torchvision:
slower, same pixels (tests/kernels/test_jpeg_kernel.py compares them).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from alexnet_dist.kernels import library

__all__ = ["available", "decode_crop_into", "decode_view_into", "decode_views_into", "is_jpeg", "jpeg_size"]

log = logging.getLogger(__name__)

_i32, _i64, _u64, _ulong = ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_ulong
_ptr, _str = ctypes.c_void_p, ctypes.c_char_p
_ip = ctypes.POINTER(ctypes.c_int)
SIGNATURES: library.Signatures = {
    "jpeg_size": ([_ptr, _ulong, _ip, _ip, _str, _i32], _i32),
    "jpeg_decode_crop": ([_ptr, _ulong, _i32, _i32, _i32, _i32, _i32, _ptr, _str, _i32], _i32),
    "jpeg_decode_view": ([_ptr, _ulong, _i32, _i32, _u64, _u64, _i32, _ptr, _str, _i32], _i32),
    "jpeg_decode_views": (
        [_i32, _ptr, _ptr, _ptr, _i32, _ptr, _ptr, _ptr, _i64, _ptr, _ptr, _i32],
        _i32,
    ),
}
_MESSAGE = 200


def _self_test(lib: ctypes.CDLL) -> bool:
    """A mirrored crop through ``lib`` equals torchvision's decode of the same JPEG, cropped and mirrored."""
    import torchvision.io as tvio  # registers torchvision's image ops

    g = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 40, 48, generator=g) * 255).to(torch.uint8)
    data = torch.ops.image.encode_jpeg(img, 90)  # the ops, not the wrappers: those warn (deprecation)
    ref = torch.ops.image.decode_image(data, tvio.ImageReadMode.RGB.value, False)
    ref = ref[:, 5:37, 7:39].flip(-1).permute(1, 2, 0)
    data = bytes(data.numpy())
    out = torch.empty(32, 32, 3, dtype=torch.uint8)
    message = ctypes.create_string_buffer(_MESSAGE)
    if lib.jpeg_decode_crop(data, len(data), 5, 7, 32, 32, 1, out.data_ptr(), message, _MESSAGE):
        log.warning("crop decoder self-test failed: %s", message.value.decode(errors="replace"))
        return False
    return torch.equal(out, ref)


@functools.cache
def _load() -> ctypes.CDLL | None:
    lib = library.load("jpeg_crop", SIGNATURES)
    if lib is not None and not _self_test(lib):
        log.warning("the crop-only JPEG decoder does not match torchvision's; decoding whole images")
        return None
    return lib


def available() -> bool:
    return _load() is not None


def is_jpeg(data: bytes | bytearray) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _pointer(data: bytes | bytearray) -> Any:
    """The bytes' address without a copy (a bytearray is borrowed through the buffer protocol).

    Not ``(c_char * len(data)).from_buffer``: ctypes makes (and caches) an array type per length, which
    is slow each time a new length comes, and every JPEG in a shard brings one."""
    if isinstance(data, bytearray):
        return ctypes.byref(ctypes.c_char.from_buffer(data))  # holds the buffer until the call returns
    return ctypes.c_char_p(data)  # points into the bytes object itself


def jpeg_size(data: bytes | bytearray) -> tuple[int, int]:
    """(height, width) from the JPEG header; ValueError with libjpeg's message when it cannot be read."""
    h, w, message = ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(_MESSAGE)
    if _load().jpeg_size(_pointer(data), len(data), ctypes.byref(h), ctypes.byref(w), message, _MESSAGE):
        raise ValueError(message.value.decode(errors="replace") or "unreadable JPEG header")
    return h.value, w.value


def _check_slot(dst: torch.Tensor) -> None:
    if dst.dtype != torch.uint8 or dst.dim() != 3 or dst.shape[2] != 3 or not dst.is_contiguous():
        raise ValueError(f"jpeg_kernel: wants a contiguous uint8 [H, W, 3] tensor, not {tuple(dst.shape)}")


def decode_crop_into(dst: torch.Tensor, data: bytes | bytearray, top: int, left: int, flip: bool) -> None:
    """Decode rows [top, top+H) and columns [left, left+W) into ``dst`` [H, W, 3] uint8 (contiguous),
    mirrored left-right when ``flip``. ValueError (libjpeg's message) on corrupt or truncated data."""
    _check_slot(dst)
    message = ctypes.create_string_buffer(_MESSAGE)
    h, w = dst.shape[0], dst.shape[1]
    if _load().jpeg_decode_crop(
        _pointer(data), len(data), top, left, h, w, int(flip), dst.data_ptr(), message, _MESSAGE
    ):
        raise ValueError(message.value.decode(errors="replace") or "corrupt JPEG")


def decode_view_into(
    dst: torch.Tensor, data: bytes | bytearray, draws: tuple[int, int] | None, flip: bool = False
) -> bool:
    """Decode a square view into ``dst`` [S, S, 3]: at (top draw mod (h-S+1), left draw mod (w-S+1)) as
    :func:`alexnet_dist.data.augment.train_params` places it, or the centre when ``draws`` is None; mirrored
    when ``flip``. One header read. False (nothing written) when the image is smaller than the view;
    ValueError (libjpeg's message) on corrupt or truncated data."""
    _check_slot(dst)
    crop = dst.shape[0]
    if dst.shape[1] != crop:
        raise ValueError(f"decode_view_into: the view must be square, not {tuple(dst.shape)}")
    message = ctypes.create_string_buffer(_MESSAGE)
    top, left = draws if draws is not None else (0, 0)
    status = _load().jpeg_decode_view(
        _pointer(data), len(data), crop, int(draws is None), top, left, int(flip), dst.data_ptr(), message,
        _MESSAGE,
    )  # fmt: skip
    if status == 1:
        raise ValueError(message.value.decode(errors="replace") or "corrupt JPEG")
    return status == 0


def decode_views_into(
    dst: torch.Tensor, datas: Sequence[bytes | bytearray], draws: Sequence[tuple[int, int]] | None,
    flips: Sequence[bool] | None = None,
) -> tuple[list[int], list[str]]:  # fmt: skip
    """:func:`decode_view_into` for many JPEGs in one call: the views that decode fill ``dst`` [N, S, S, 3]
    from its first slot, in order. Per JPEG: status 0 (written), 1 (corrupt: its libjpeg message) or 2
    (smaller than the view: nothing written), and the message ("" unless 1). One call per batch, not per
    image: the Python and ctypes cost of a call is paid once."""
    n = len(datas)
    if dst.dim() != 4 or not dst.is_contiguous() or dst.shape[0] < n:
        raise ValueError(
            f"decode_views_into: wants a contiguous [>= {n}, S, S, 3] tensor, not {tuple(dst.shape)}"
        )
    _check_slot(dst[0])
    crop = dst.shape[1]
    if dst.shape[2] != crop:
        raise ValueError(f"decode_views_into: the views must be square, not {tuple(dst.shape[1:])}")
    if n == 0:
        return [], []
    lens = np.fromiter(map(len, datas), np.int64, n)
    offsets = np.zeros(n, np.int64)
    np.cumsum(lens[:-1], out=offsets[1:])
    blob = b"".join(datas)  # one copy of the batch's bytes: cheap beside one call per image
    draw_array = np.asarray(draws, np.uint64).reshape(n, 2) if draws is not None else None
    flip_array = np.asarray(flips, np.uint8).reshape(n) if flips is not None else None
    status = np.zeros(n, np.int32)
    messages = ctypes.create_string_buffer(n * _MESSAGE)
    _load().jpeg_decode_views(
        n, blob, offsets.ctypes.data, lens.ctypes.data, crop,
        None if draw_array is None else draw_array.ctypes.data,
        None if flip_array is None else flip_array.ctypes.data,
        dst.data_ptr(), crop * crop * 3, status.ctypes.data, messages, _MESSAGE,
    )  # fmt: skip
    codes = status.tolist()
    raw = messages.raw
    texts = [
        raw[i * _MESSAGE : (i + 1) * _MESSAGE].split(b"\0", 1)[0].decode(errors="replace") or "corrupt JPEG"
        if code == 1 else ""
        for i, code in enumerate(codes)
    ]  # fmt: skip
    return codes, texts
