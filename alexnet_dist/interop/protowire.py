"""The protobuf wire format, decoded by hand: https://protobuf.dev/programming-guides/encoding/

It reads Caffe's ``.caffemodel`` files (:mod:`alexnet_dist.interop.caffe`): :class:`Msg` decodes one
message level at a time: field number -> raw entries, read by typed getters (ints, floats, strings,
sub-messages). Float arrays stay zero-copy numpy views of the file's bytes, and a run of unpacked fixed32
fields (how old Caffe files store weights) is found with one numpy comparison. The protobuf library parses
the same files about twice as slowly, as it copies every float into its own array and then into numpy
(``bench/caffe_import.py`` measures both on a bvlc_alexnet-sized file).
Proto2 rules: the last value of a repeated scalar wins; int64 is two's complement.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Msg", "Truncated", "fixed32_run_length", "read_varint"]


_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class Truncated(Exception):
    """The buffer ends inside a field; ``args[0]`` is the byte position."""


def read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Truncated(pos)
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def fixed32_run_length(buf: bytes, start: int, end: int, tag: bytes) -> int:
    """How many fixed32 fields with this tag follow each other from ``start`` (unpacked floats)."""
    stride = len(tag) + 4
    rows = (end - start) // stride
    if rows < 2 or buf[start + stride : start + stride + len(tag)] != tag:
        return min(rows, 1)
    # 60M unpacked floats cannot go through a Python loop: compare every row's tag bytes at once.
    grid = np.frombuffer(buf, np.uint8, rows * stride, start).reshape(rows, stride)[:, : len(tag)]
    same = (grid == np.frombuffer(tag, np.uint8)).all(axis=1)
    return rows if same.all() else int(np.argmin(same))


class Msg:
    """One message decoded one level deep: field number -> raw entries, read by typed getters."""

    def __init__(self, buf: bytes, start: int, end: int) -> None:
        self.buf = buf
        self.fields: dict[int, list[tuple[int, ...]]] = {}
        pos = start
        while pos < end:
            tag_start = pos
            key, pos = read_varint(buf, pos, end)
            num, wire = key >> 3, key & 7
            if num == 0:
                raise ValueError(f"field number 0 at byte {tag_start}")
            if wire == _VARINT:
                value, pos = read_varint(buf, pos, end)
                entry: tuple[int, ...] = (_VARINT, value)
            elif wire == _I64:
                entry, pos = (_I64, pos), pos + 8
            elif wire == _LEN:
                size, pos = read_varint(buf, pos, end)
                entry, pos = (_LEN, pos, pos + size), pos + size
            elif wire == _I32:
                tag = buf[tag_start:pos]
                count = fixed32_run_length(buf, tag_start, end, tag)
                entry = (_I32, pos, max(count, 1), len(tag) + 4)
                pos = tag_start + max(count, 1) * (len(tag) + 4)
            else:
                raise ValueError(f"wire type {wire} at byte {tag_start}")
            if pos > end:
                raise Truncated(pos)
            self.fields.setdefault(num, []).append(entry)

    def has(self, num: int) -> bool:
        return num in self.fields

    def ints(self, num: int) -> list[int]:
        out: list[int] = []
        for e in self.fields.get(num, []):
            if e[0] == _VARINT:
                out.append(e[1])
            elif e[0] == _LEN:  # packed varints
                pos, end = e[1], e[2]
                while pos < end:
                    value, pos = read_varint(self.buf, pos, end)
                    out.append(value)
        return [v - (1 << 64) if v >= 1 << 63 else v for v in out]  # int64 two's complement

    def int(self, num: int, default: int = 0) -> int:
        values = self.ints(num)
        return values[-1] if values else default  # proto2: the last value wins

    def floats(self, num: int, dtype: str = "<f4") -> np.ndarray:
        size = np.dtype(dtype).itemsize
        parts = []
        for e in self.fields.get(num, []):
            if e[0] == _LEN:  # packed
                if (e[2] - e[1]) % size:
                    raise ValueError(f"packed field {num} of {e[2] - e[1]} bytes")
                parts.append(np.frombuffer(self.buf, dtype, (e[2] - e[1]) // size, e[1]))
            elif e[0] in (_I32, _I64) and size == (4 if e[0] == _I32 else 8):
                count, stride = (e[2], e[3]) if e[0] == _I32 else (1, size)
                parts.append(np.ndarray((count,), dtype, self.buf, e[1], (stride,)))
        if not parts:
            return np.zeros(0, dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def float(self, num: int, default: float) -> float:
        values = self.floats(num)
        return float(values[-1]) if len(values) else default

    def strings(self, num: int) -> list[str]:
        return [
            self.buf[e[1] : e[2]].decode("utf-8", "replace") for e in self.fields.get(num, []) if e[0] == _LEN
        ]

    def string(self, num: int, default: str = "") -> str:
        values = self.strings(num)
        return values[-1] if values else default

    def messages(self, num: int) -> list[Msg]:
        return [Msg(self.buf, e[1], e[2]) for e in self.fields.get(num, []) if e[0] == _LEN]

    def message(self, num: int) -> Msg | None:
        values = self.messages(num)
        return values[-1] if values else None
