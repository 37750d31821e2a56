"""Reading a job's events: replay its stream and wait for more (``watch``), and the results channel.

The format is :mod:`alexnet_dist.events`; the stream and channel names are :class:`Keys`'. Readers replay
the stream from its start and then block for new entries, so a watcher can be stopped and started again
without missing anything.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis
import redis.asyncio

from alexnet_dist.events import EventPublisher, EventTarget
from alexnet_dist.service.keys import Keys

__all__ = ["follow_events", "job_events", "job_publisher", "read_events", "subscribe_results"]

_ENDED = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})  # the store's TERMINAL states


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


async def follow_events(
    client: redis.asyncio.Redis,
    keys: Keys,
    job_id: str,
    *,
    after: str = "0-0",
    follow: bool = True,
    block_ms: int = 1000,
    count: int = 500,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The job's events after ``after`` as (entry id, event), on an asyncio client: what a server
    streams to many watchers at once without a thread each. Following, it yields ``("", {})`` after each
    wait of ``block_ms`` with nothing new (a heartbeat, so a dropped client is noticed) and ends once the
    job has ended and the event of its end has been read, as :meth:`JobService.watch` does.
    """
    stream, job_key = keys.events(job_id), keys.job(job_id)
    last, state = after, ""  # state: of the newest state event (a resumed job's stream holds older ends)

    async def read(block: int | None) -> list[tuple[str, dict[str, Any]]]:
        nonlocal last, state
        batch = await client.xread({stream: last}, count=count, block=block)
        out = [_decode(entry_id, fields) for entry_id, fields in (batch[0][1] if batch else [])]
        for entry_id, event in out:
            last = entry_id
            if event.get("type") == "state":
                state = str(event.get("state"))
        return out

    while got := await read(None):
        for item in got:
            yield item
    while follow and state not in _ENDED:
        got = await read(block_ms)
        for item in got:
            yield item
        if not got:
            yield "", {}
        if state not in _ENDED and await client.hget(job_key, "state") in _ENDED:
            while got := await read(None):  # the end's state event is written with the state: read it too
                for item in got:
                    yield item
            return


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


def job_events(redis_url: str, keys: Keys, job_id: str) -> EventTarget:
    """Where ``job_id``'s events go: the stream and channel the service reads them from."""
    return EventTarget(redis_url, keys.events(job_id), keys.live(job_id))


def job_publisher(redis_url: str, keys: Keys, job_id: str, **options: Any) -> EventPublisher:
    """A publisher of ``job_id``'s events (tests and tools; training gets an :class:`EventTarget`)."""
    return job_events(redis_url, keys, job_id).publisher(**options)
