"""Read-ahead of one stream's S3 shards: the next bytes are on their way while the stream decodes.

A stream reads its shards in the plan's order. :class:`ReadAhead` cuts the S3 ones into pieces of
``chunk`` bytes (by the manifest's byte counts) and keeps up to ``depth`` ranged GETs of the next pieces
in flight, on a small thread pool of the stream's own, across shard boundaries: the next shard's first
bytes arrive while this one decodes, and a big shard arrives over several connections at once. What holds:

- a shard's reader returns exactly the object's bytes in order, what one streaming GET would: the same
  records in the same order, so sample order, resumption and every-sample-once do not depend on it;
- at most ``depth`` pieces are in flight or waiting to be read, so a stream holds at most
  ``(depth + 1) * chunk`` bytes ahead (the one being read included, or read on past the manifest's end);
- each GET resumes with ``Range`` inside its piece after a cut connection (:func:`storage.read_range`),
  and every piece of a shard must come from one object (one ETag): a shard replaced while being read is
  a StorageError, never a splice of two objects. An object longer than the manifest says is read to its
  end; a shorter one ends where it ends, as a streaming read would;
- a shard that cannot be read raises its one-line StorageError from its reader's ``read``; the pieces
  still coming for it are dropped when the next shard is opened, and that one reads on as before;
- local files (and ``depth=0``) are read straight through :func:`storage.open_read`: the OS reads ahead.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from alexnet_dist import storage
from alexnet_dist.errors import StorageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Piece:
    shard: int
    start: int
    end: int  # inclusive


class ReadAhead:
    """Readers of a stream's shards, in order, with the next pieces of S3 shards fetched ahead.

    ``shards`` are (URL, bytes in the manifest); open each with :meth:`open` in their order (skipping
    none), and :meth:`close` at the end, which also stops the GETs still in flight.
    """

    def __init__(self, shards: Sequence[tuple[str, int]], *, depth: int, chunk: int,
                 endpoint_url: str | None = None) -> None:  # fmt: skip
        self.shards, self.depth, self.chunk, self.endpoint_url = list(shards), depth, chunk, endpoint_url
        self._planned: deque[_Piece] = deque()
        if depth > 0:
            for i, (url, size) in enumerate(self.shards):
                if storage.parse_url(url).scheme == "s3":
                    last = max(size, 1)  # an empty shard still gets its one (empty) GET
                    self._planned.extend(
                        _Piece(i, a, min(a + chunk, last) - 1) for a in range(0, last, chunk)
                    )
        self._ahead: deque[tuple[_Piece, Future[storage.Span]]] = deque()
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="read-ahead") if self._planned else None
        self._fill()

    def _fill(self) -> None:
        while self._pool is not None and self._planned and len(self._ahead) < self.depth:
            piece = self._planned.popleft()
            url = self.shards[piece.shard][0]
            future = self._pool.submit(
                storage.read_range, url, piece.start, piece.end, endpoint_url=self.endpoint_url
            )
            self._ahead.append((piece, future))

    def _drop_before(self, shard: int) -> None:
        """Forget the pieces of shards before ``shard`` (a shard given up on, or its unread tail)."""
        while self._ahead and self._ahead[0][0].shard < shard:
            self._ahead.popleft()[1].cancel()
        while self._planned and self._planned[0].shard < shard:
            self._planned.popleft()
        self._fill()

    def next_piece(self, shard: int) -> storage.Span | None:
        """The next fetched piece of ``shard`` (waiting for it), or None when its planned pieces are done."""
        if not self._ahead or self._ahead[0][0].shard != shard:
            return None
        _, future = self._ahead.popleft()
        self._fill()  # the window moves on before this piece is waited for
        return future.result()

    def open(self, shard: int) -> IO[bytes]:
        """A binary reader of shard ``shard`` (its index in ``shards``)."""
        url = self.shards[shard][0]
        if self._pool is None or storage.parse_url(url).scheme != "s3":
            return storage.open_read(url, endpoint_url=self.endpoint_url)
        self._drop_before(shard)
        return _ShardReader(self, shard, url)  # type: ignore[return-value]

    def close(self) -> None:
        self._planned.clear()
        while self._ahead:
            self._ahead.popleft()[1].cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)  # a GET in flight ends with its piece


class _ShardReader:
    """One S3 shard's bytes, in order, from the read-ahead's pieces (and read on where the object is longer
    than the manifest says)."""

    def __init__(self, ahead: ReadAhead, shard: int, url: str) -> None:
        self.ahead, self.shard, self.url = ahead, shard, url
        self.pos = 0  # bytes of the object handed out or held in `buf`
        self.size: int | None = None
        self.etag: str | None = None
        self.buf = memoryview(b"")
        self.ended = self.read_on = False

    def _take(self, span: storage.Span) -> None:
        if self.size is None:  # the first piece says which object this is
            self.size, self.etag = span.size, span.etag
        if (
            (span.size is not None and span.size != self.size)
            or (span.data and (span.etag != self.etag or span.start != self.pos))
        ):  # fmt: skip
            raise StorageError(f"{self.url}: object changed while being read; retry the read")
        self.pos += len(span.data)
        self.buf = memoryview(span.data)

    def _refill(self) -> None:
        span = self.ahead.next_piece(self.shard)
        if span is None:  # the planned pieces are done: the object may go on past the manifest's size
            if self.size is None or self.pos >= self.size:
                self.ended = True
                return
            if not self.read_on:
                log.warning("%s: longer than the manifest says; reading on", self.url)
                self.read_on = True
            end = self.pos + self.ahead.chunk - 1
            span = storage.read_range(self.url, self.pos, end, endpoint_url=self.ahead.endpoint_url)
            if not span.data:
                self.ended = True
                return
        self._take(span)

    def read(self, n: int = -1) -> bytes:
        while not self.buf and not self.ended:
            self._refill()
        if n < 0:
            parts = [bytes(self.buf)]
            while not self.ended:
                self.buf = memoryview(b"")
                self._refill()
                parts.append(bytes(self.buf))
            self.buf = memoryview(b"")
            return b"".join(parts)
        out, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return out

    def close(self) -> None:
        self.buf, self.ended = memoryview(b""), True

    def __enter__(self) -> _ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
