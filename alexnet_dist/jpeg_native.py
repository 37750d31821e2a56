"""Decode only a view's crop of a JPEG, straight into its batch slot (``csrc/jpeg_crop.c``; issue 3).

The loader's training and central-crop views need 227x227 of a 256x256 image: decoding just those rows
and iMCU columns skips ~20% of the decoder's work, and writing the rows into the batch skips a copy of
the whole decoded image. Built on first use against the system's libjpeg-turbo (Debian:
``libjpeg62-turbo-dev``, installed by ``make setup``) by :mod:`alexnet_dist.native`; without it,
:func:`available` is False and the loader decodes whole images with torchvision: slower, same pixels
(tests/test_augment.py compares them).
"""

from __future__ import annotations

import ctypes

import torch

from alexnet_dist import native

__all__ = ["available", "decode_crop_into", "is_jpeg", "jpeg_size"]

_i32, _ulong, _ptr, _str = ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_char_p
_ip = ctypes.POINTER(ctypes.c_int)
SIGNATURES: native.Signatures = {
    "jpeg_size": ([_ptr, _ulong, _ip, _ip, _str, _i32], _i32),
    "jpeg_decode_crop": ([_ptr, _ulong, _i32, _i32, _i32, _i32, _i32, _ptr, _str, _i32], _i32),
}
_MESSAGE = 200


def _load() -> ctypes.CDLL | None:
    return native.load("jpeg_crop", SIGNATURES, libs=("-ljpeg",))


def available() -> bool:
    return _load() is not None


def is_jpeg(data: bytes | bytearray) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _pointer(data: bytes | bytearray) -> ctypes.c_void_p | ctypes.Array:
    """The bytes' address without a copy (a bytearray is borrowed through the buffer protocol)."""
    if isinstance(data, bytearray):
        return (ctypes.c_char * len(data)).from_buffer(data)
    return ctypes.c_char_p(data)  # points into the bytes object itself


def jpeg_size(data: bytes | bytearray) -> tuple[int, int]:
    """(height, width) from the JPEG header; ValueError with libjpeg's message when it cannot be read."""
    h, w, message = ctypes.c_int(), ctypes.c_int(), ctypes.create_string_buffer(_MESSAGE)
    if _load().jpeg_size(_pointer(data), len(data), ctypes.byref(h), ctypes.byref(w), message, _MESSAGE):
        raise ValueError(message.value.decode(errors="replace") or "unreadable JPEG header")
    return h.value, w.value


def decode_crop_into(dst: torch.Tensor, data: bytes | bytearray, top: int, left: int, flip: bool) -> None:
    """Decode rows [top, top+H) and columns [left, left+W) into ``dst`` [H, W, 3] uint8 (contiguous),
    mirrored left-right when ``flip``. ValueError (libjpeg's message) on corrupt or truncated data."""
    if dst.dtype != torch.uint8 or dst.dim() != 3 or dst.shape[2] != 3 or not dst.is_contiguous():
        raise ValueError(f"decode_crop_into: wants a contiguous uint8 [H, W, 3] tensor, not {dst.shape}")
    message = ctypes.create_string_buffer(_MESSAGE)
    h, w = dst.shape[0], dst.shape[1]
    if _load().jpeg_decode_crop(
        _pointer(data), len(data), top, left, h, w, int(flip), dst.data_ptr(), message, _MESSAGE
    ):
        raise ValueError(message.value.decode(errors="replace") or "corrupt JPEG")
