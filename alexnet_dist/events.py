"""Job events: one JSON object per entry in the job's Redis stream, also pushed on its live channel.

The training loop (rank 0, inside a Ray worker) publishes ``step``, ``epoch`` and ``final`` events through
:class:`EventPublisher`; the queue adds ``state`` events on every state change. Readers (``watch``) replay
the stream from its start and then block for new entries, so a watcher can be stopped and started again
without missing anything. Each stream entry has one field, ``data``: the event as JSON (never pickle).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import redis

from alexnet_dist.keys import Keys

__all__ = [
    "STREAM_MAXLEN",
    "EventPublisher",
    "encode_event",
    "read_events",
    "subscribe_results",
]

log = logging.getLogger(__name__)

# About 100k entries per job: a 90-epoch ImageNet run logging every 50 steps writes ~18k step events
# (1.28M images / batch 128 / 50 * 90), so the bound only trims runaway logging, never a real run.
STREAM_MAXLEN = 100_000
_RECONNECT_AFTER_S = 5.0  # after a failure, the publisher drops events for this long before reconnecting


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

    On a Redis error it logs one warning, drops events for a few seconds, then reconnects.
    """

    def __init__(
        self, redis_url: str, *, prefix: str, job_id: str, retry_after_s: float = _RECONNECT_AFTER_S
    ) -> None:
        self._retry_after_s = retry_after_s
        self._url = redis_url
        self._keys = Keys(prefix)
        self._job_id = job_id
        self._client: redis.Redis | None = None
        self._retry_at = 0.0
        self._failing = False
        self.dropped = 0  # events lost to Redis errors, for the curious

    def _connection(self) -> redis.Redis | None:
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
        client = self._connection()
        if client is None:
            self.dropped += 1
            return
        try:
            pipe = client.pipeline(transaction=False)
            pipe.xadd(self._keys.events(self._job_id), {"data": data}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.publish(self._keys.live(self._job_id), data)
            pipe.execute()
            if self._failing:
                log.info("job %s: event publishing to Redis works again", self._job_id)
                self._failing = False
        except (redis.RedisError, OSError) as err:
            self.dropped += 1
            if not self._failing:
                log.warning(
                    "job %s: events not published, Redis error (%s); retrying later", self._job_id, err
                )
                self._failing = True
            self._drop_client()
            self._retry_at = time.monotonic() + self._retry_after_s

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except (redis.RedisError, OSError):
                pass
            self._client = None

    def close(self) -> None:
        self._drop_client()


def _decode(entry_id: str | bytes, fields: dict) -> tuple[str, dict[str, Any]]:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    raw = fields.get("data", fields.get(b"data", "{}"))
    return eid, json.loads(raw)


def read_events(
    client: redis.Redis,
    keys: Keys,
    job_id: str,
    *,
    after: str = "0-0",
    block_ms: int | None = None,
    count: int = 500,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Entries of the job's stream after ``after`` as (entry id, event).

    Without ``block_ms`` it yields what is there and stops; with it, it then waits up to ``block_ms`` for
    more, once, and stops (callers loop, checking in between whether the job has ended).
    """
    stream = keys.events(job_id)
    last = after
    while True:
        batch = client.xread({stream: last}, count=count)
        if not batch:
            break
        for entry_id, fields in batch[0][1]:
            last, event = _decode(entry_id, fields)
            yield last, event
    if block_ms is not None:
        batch = client.xread({stream: last}, count=count, block=block_ms)
        for entry_id, fields in batch[0][1] if batch else []:
            yield _decode(entry_id, fields)


def subscribe_results(client: redis.Redis, keys: Keys, *, timeout_s: float | None = None) -> Iterator[dict]:
    """Final results as they are published on the results channel (JSON objects with ``job_id``).

    Subscribes before returning, so nothing published after this call is missed.
    """
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.results)
    # Read the server's confirmation now: until it arrives the subscription may not be registered yet.
    pubsub.get_message(timeout=5.0)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    return _results(client, pubsub, deadline)


def _results(client: redis.Redis, pubsub: redis.client.PubSub, deadline: float | None) -> Iterator[dict]:
    # ``client`` is held only to keep it alive: when it is collected, redis-py closes its connections.
    try:
        while deadline is None or time.monotonic() < deadline:
            wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
            message = pubsub.get_message(timeout=wait)
            if message is not None and message["type"] == "message":
                yield json.loads(message["data"])
    finally:
        pubsub.close()
