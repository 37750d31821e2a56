"""Job events on the wire: one JSON object per entry of a Redis stream, also pushed on a channel.

This is the contract between whoever produces events (the training loop's rank 0, the job store's state
changes) and whoever reads them (``watch``, the dashboard, plots). Each stream entry has one field,
``data``: the event as JSON (never pickle), ``type`` first and ``time`` (unix seconds) added. The producer
is told the stream and channel names; it does not know how the service names its keys.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

__all__ = ["STREAM_MAXLEN", "EventPublisher", "EventTarget", "YieldSignal", "encode_event"]

log = logging.getLogger(__name__)

# About 100k entries per job: a 90-epoch ImageNet run logging every 50 steps writes ~18k step events
# (1.28M images / batch 128 / 50 * 90), so the bound only trims runaway logging, never a real run.
STREAM_MAXLEN = 100_000
_RECONNECT_AFTER_S = 5.0  # after a failure, the publisher buffers events this long before trying again
_BUFFER_EVENTS = 10_000  # events kept during an outage: a run logging every 50 steps, for hours


@dataclass(frozen=True)
class EventTarget:
    """Where a producer publishes: a Redis server, the stream that keeps the events, the channel that pushes
    them. Travels as JSON to training workers."""

    redis_url: str
    stream: str
    channel: str

    def to_dict(self) -> dict[str, str]:
        return {"redis_url": self.redis_url, "stream": self.stream, "channel": self.channel}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> EventTarget:
        return cls(data["redis_url"], data["stream"], data["channel"])

    def publisher(self, **options: Any) -> EventPublisher:
        return EventPublisher(self.redis_url, stream=self.stream, channel=self.channel, **options)


@dataclass(frozen=True)
class YieldSignal:
    """The one message a run reads back: whether the service asked it to yield its room (a hash field set
    to a timestamp). Reading it never raises into training: an unreachable Redis reads as "not asked"."""

    redis_url: str
    key: str
    field: str = "yield_requested"

    def to_dict(self) -> dict[str, str]:
        return {"redis_url": self.redis_url, "key": self.key, "field": self.field}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> YieldSignal:
        return cls(data["redis_url"], data["key"], data.get("field", "yield_requested"))

    def requested(self) -> bool:
        import redis

        try:
            if not hasattr(self, "_client"):
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2.0, socket_timeout=2.0)
                object.__setattr__(self, "_client", client)
            value = self._client.hget(self.key, self.field)  # type: ignore[attr-defined]
        except (redis.RedisError, OSError) as err:
            log.warning("%s: cannot read the yield request (%s); going on", self.key, err)
            return False
        return value not in (None, b"", b"0", b"0.0")


def encode_event(event: dict[str, Any], *, now: float | None = None) -> str:
    """The event as JSON with ``type`` first and ``time`` (unix seconds) added unless present."""
    if "type" not in event:
        raise ValueError(f"event {event!r}: has no 'type'")
    out: dict[str, Any] = {"type": event["type"]}
    out.update((k, v) for k, v in event.items() if k != "type")
    out.setdefault("time", time.time() if now is None else now)
    return json.dumps(out, separators=(",", ":"))


class EventPublisher:
    """Publishes a job's events; never raises into training (a lost metric must not kill a run).

    While Redis is unreachable, events wait in order in a bounded buffer (``buffer`` events; the oldest
    are dropped, and counted in ``dropped``, once it is full) and the publisher tries again every
    ``retry_after_s``; the first publish that reaches Redis delivers the buffer first, in order. Each
    event keeps the ``time`` it happened, so a reader sees when, even if it arrived late.
    """

    def __init__(
        self,
        redis_url: str,
        *,
        stream: str,
        channel: str,
        retry_after_s: float = _RECONNECT_AFTER_S,
        buffer: int = _BUFFER_EVENTS,
    ) -> None:
        self._retry_after_s = retry_after_s
        self._url = redis_url
        self._stream, self._channel = stream, channel
        self._client: redis.Redis | None = None
        self._retry_at = 0.0
        self._failing = False
        self._pending: collections.deque[str] = collections.deque(maxlen=buffer)
        self.dropped = 0  # events lost: not JSON-able, or pushed out of a full buffer during an outage

    @property
    def buffered(self) -> int:
        """Events waiting for Redis to come back."""
        return len(self._pending)

    def _connection(self) -> redis.Redis | None:
        import redis  # here, not at the top: a run without a job store (the local runner) needs no redis

        if self._client is None and time.monotonic() >= self._retry_at:
            self._client = redis.Redis.from_url(self._url, socket_connect_timeout=2.0, socket_timeout=5.0)
        return self._client

    def publish(self, event: dict[str, Any]) -> None:
        try:
            data = encode_event(event)
        except (TypeError, ValueError) as err:  # not JSON-able: a bug in the caller, still not fatal
            log.warning("event %r not published: %s", event.get("type"), err)
            self.dropped += 1
            return
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1  # the deque drops the oldest on append
        self._pending.append(data)
        self.flush()

    def flush(self) -> bool:
        """Send what waits, in order; True when nothing is left waiting."""
        if not self._pending:
            return True
        client = self._connection()
        if client is None:
            return False
        try:
            while self._pending:
                batch = list(itertools.islice(self._pending, 500))
                pipe = client.pipeline(transaction=False)
                for data in batch:
                    pipe.xadd(self._stream, {"data": data}, maxlen=STREAM_MAXLEN, approximate=True)
                    pipe.publish(self._channel, data)
                pipe.execute()
                for _ in batch:
                    self._pending.popleft()
            if self._failing:
                log.info("%s: event publishing to Redis works again", self._stream)
                self._failing = False
            return True
        except (_redis_errors(), OSError) as err:
            if not self._failing:
                log.warning(
                    "%s: events not published, Redis error (%s); keeping up to %d until it is back",
                    self._stream, err, self._pending.maxlen,
                )  # fmt: skip
                self._failing = True
            self._drop_client()
            self._retry_at = time.monotonic() + self._retry_after_s
            return False

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except (_redis_errors(), OSError):
                pass
            self._client = None

    def close(self, wait_s: float = 0.0) -> None:
        """Deliver what waits (the end of a run), trying again for up to ``wait_s`` while Redis is away;
        what is still undelivered then is counted as dropped. Then let go of the connection."""
        deadline = time.monotonic() + wait_s
        self._retry_at = 0.0
        while not self.flush() and self._pending and time.monotonic() < deadline:
            time.sleep(min(self._retry_after_s, max(0.0, deadline - time.monotonic())))
            self._retry_at = 0.0
        if self._pending:
            log.warning("%s: %d events not delivered, Redis unreachable", self._stream, len(self._pending))
            self.dropped += len(self._pending)
            self._pending.clear()
        self._drop_client()


def _redis_errors() -> type[Exception]:
    import redis

    return redis.RedisError
