"""Reading WebDataset tar shards as a stream: (key, {extension: bytes}) per sample.

A hand-rolled reader over 1 MB reads: ``tarfile`` parses each header in Python, at about the cost of
decoding a small JPEG, and makes three small ``read`` calls per member besides. Here a header is a few
slices of a buffer that already holds the member's data. (A C indexer of the headers was measured end to
end on the loader, bench/kernels.py: no faster within the run-to-run spread, so it is gone.) Data come as
``bytearray``s, which the JPEG decoder reads in place.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

__all__ = ["iter_tar", "members"]

_TAR_CHUNK = 1 << 20  # bytes per read from the stream: headers are parsed out of big reads
_ZERO_BLOCK = bytes(512)
_REGULAR = (48, 0, 55)  # type flags "0", NUL, "7": regular files (and contiguous ones); others are skipped


def _resolve(kind: int, data: bytearray, long_name: str | None) -> tuple[bool, str | None]:
    """(whether the member is a regular file, to yield under the pending long name or its header's; the
    long name pending after it), from its type flag: GNU "L" and pax "x" members name the next member,
    any other member ends a pending long name."""
    if kind == 76:  # "L", GNU: the next member's long name
        return False, data.rstrip(b"\0").decode()
    if kind == 120:  # "x", pax: "len path=value\n" records
        return False, _pax_path(data, long_name)
    return kind in _REGULAR, None


def _pax_path(data: bytearray, default: str | None) -> str | None:
    for rec in data.decode().split("\n"):
        key, _, value = rec.partition(" ")[2].partition("=")
        if key == "path":
            default = value
    return default


def members(stream) -> Iterator[tuple[str, bytearray]]:
    """(name, data) of each regular file in a tar stream: ustar, GNU long names and pax paths.

    A stream that ends inside a member raises EOFError; one that ends between members just ends; a header
    whose size is not a number raises ``tarfile.ReadError``.
    """
    buf, pos = bytearray(), 0
    long_name: str | None = None

    def fill(n: int) -> bool:  # make buf[pos : pos + n] available; False at the end of the stream
        nonlocal buf, pos
        if len(buf) - pos >= n:
            return True
        skip = max(0, pos - len(buf))  # a member's padding that lies past what was read so far
        del buf[:pos]
        pos = skip
        while len(buf) < pos + n:
            more = stream.read(max(_TAR_CHUNK, pos + n - len(buf)))
            if not more:
                return False
            buf += more
        return True

    while True:
        if not fill(512):
            return
        header = bytes(buf[pos : pos + 512])
        if header == _ZERO_BLOCK:
            return
        raw = header[124:136]
        if raw[0] & 0x80:  # base-256 size (GNU, files over 8 GB)
            size = int.from_bytes(raw[1:], "big")
        else:
            try:
                size = int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError as err:
                raise tarfile.ReadError(f"bad tar header size {raw!r}") from err
        padded = size + (-size % 512)
        if not fill(512 + size):
            raise EOFError(f"tar ends inside a member ({len(buf) - pos - 512} of {size} bytes)")
        data = buf[pos + 512 : pos + 512 + size]
        pos += 512 + padded  # may pass the end of buf: fill skips the rest of the padding
        regular, pending = _resolve(header[156], data, long_name)
        if regular:
            name = long_name
            if name is None:
                name = header[:100].split(b"\0", 1)[0].decode()
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
            yield name, data
        long_name = pending


def iter_tar(stream) -> Iterator[tuple[str, dict[str, bytearray]]]:
    """(key, {extension: bytes}) per sample of a WebDataset tar stream (key = name up to the first dot)."""
    key, files = None, {}
    for name, data in members(stream):
        dot = name.find(".", name.rfind("/") + 1)
        if dot < 0:
            continue
        if name[:dot] != key:
            if key is not None:
                yield key, files
            key, files = name[:dot], {}
        files[name[dot + 1 :].lower()] = data
    if key is not None:
        yield key, files
