"""Webhook notifications of job state changes and results: signed JSON POSTs that never hold up the service.

:class:`Notifier` puts each event on one bounded queue per URL and returns; a thread per URL posts its queue
in order, retrying with backoff on connection errors, timeouts, 429 and 5xx (not other 4xx). A URL that
stays down costs only its own queue (when full, its oldest event is dropped and counted).
:class:`StateFollower` feeds it from one ``changes`` stream that every state change and result is appended
to, atomically with it, and saves in Redis the newest entry every URL is done with: a restart loses nothing
and re-sends at most what was in flight, under the same ``X-AlexNet-Delivery`` id (the entry id). One
follower is active at a time, by a Redis lock with a TTL; only its holder moves the cursor.
Bodies are signed as GitHub signs webhooks: ``X-AlexNet-Signature: sha256=<hex HMAC-SHA256 of the body>``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis

from alexnet_dist.errors import ConfigError
from alexnet_dist.events import STREAM_MAXLEN
from alexnet_dist.service.keys import Keys

__all__ = [
    "Notifier", "StateFollower", "build_payload", "follower_keys", "record_change", "render_body", "sign",
    "verify_signature",
]  # fmt: skip

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-AlexNet-Signature"
EVENT_HEADER = "X-AlexNet-Event"
DELIVERY_HEADER = "X-AlexNet-Delivery"
_MAX_BACKOFF_S = 60.0  # no single wait is longer, however many retries are configured
_JITTER = 0.25  # each wait is stretched by up to this share at random, so many lanes' retries spread out
_IDLE_S = 60.0  # a URL's thread ends after this long with nothing to send (spec URLs come and go)
_MAX_URLS = 64  # URLs with a thread at once; events for further URLs are dropped and counted


def build_payload(event: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """What a receiver gets: ``event`` (the event's type), the job's fields and, for a result, its errors."""
    out: dict[str, Any] = {"event": str(event.get("type", "state"))}
    out.update((k, event.get(k)) for k in ("job_id", "name", "state", "attempt", "message", "time"))
    out.update((k, event[k]) for k in ("top1_error", "top5_error") if k in event)
    out["time"] = out["time"] or (time.time() if now is None else now)
    if out["event"] == "result" and not out["message"]:
        top1, top5 = (f"{v:.4f}" if isinstance(v, (int, float)) else "n/a" for v in
                      (event.get("top1_error"), event.get("top5_error")))  # fmt: skip
        out["message"] = f"top-1 error {top1}, top-5 error {top5}"
    return out


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn reads <...> as links and mentions: a failure message must not page @channel.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_body(payload: dict[str, Any], *, slack: bool = False) -> bytes:
    """The bytes sent (and signed): the payload as compact JSON, or for Slack ``{"text", "blocks"}``."""
    doc: dict[str, Any] = payload
    if slack:
        p = payload
        what = "result" if p["event"] == "result" else f"{p['state']} (attempt {p['attempt']})"
        line = " ".join(f"alexnet-dist job {p['job_id']}: {what}: {p['message'] or ''}".split())
        text = _slack_escape(line.rstrip(":")[:300])
        shown = {k: v for k, v in p.items() if v not in (None, "") and k != "message"}
        if isinstance(shown.get("time"), (int, float)):
            shown["time"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(shown["time"]))
        # Slack takes at most 10 fields per section, of at most 2000 characters each.
        fields = [{"type": "mrkdwn", "text": _slack_escape(f"*{k}*\n{v}")[:1900]} for k, v in shown.items()]
        doc = {"text": text, "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": text}},
                                        {"type": "section", "fields": fields[:10]}]}  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


def sign(body: bytes, secret: bytes) -> str:
    """The signature header's value: ``sha256=`` and the hex HMAC-SHA256 of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, header: str | None, secret: bytes) -> bool:
    """Whether ``header`` signs exactly ``body`` under ``secret``; compared in constant time."""
    got = (header or "").strip().encode(errors="replace")
    return bool(got and secret) and hmac.compare_digest(sign(body, secret).encode(), got)


def _is_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number
        return False


def _redact(url: str) -> str:
    """The URL fit for logs: no password or query, only the first path segment (Slack's path is a secret)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2] or "?"
    segments = parts.path.strip("/").split("/")
    path = "/" + segments[0] + ("/..." if len(segments) > 1 else "") if segments[0] else ""
    return f"{parts.scheme}://{host}{path}"


@dataclass(eq=False)
class _Delivery:
    """One event's body on its way to ``left`` more URLs; ``on_done`` runs when the last is done with it."""

    body: bytes
    kind: str
    delivery_id: str
    left: int
    on_done: Callable[[], None] | None


@dataclass(eq=False)
class _Lane:
    """One URL's queue and the thread that empties it, in order."""

    url: str
    cond: threading.Condition
    queue: deque[_Delivery] = field(default_factory=deque)
    failing: bool = False  # it gave up on its last event: it does not hold the follower back
    thread: threading.Thread = field(init=False)


class Notifier:
    """POSTs events to ``urls``, and to each event's extra URLs, from background threads.

    ``retries``: attempts after a failed first one, ``backoff_s`` apart, then twice that, and so on.
    ``clock`` stamps events without a ``time``; ``sleep`` waits between attempts (by default, cut short by
    :meth:`close`). Counted per (event, URL): ``delivered``; ``failed`` (given up on after the retries, or
    refused with a 4xx); ``dropped`` (never tried: queue full, too many URLs, or closed).
    """

    def __init__(
        self,
        urls: Iterable[str],
        *,
        secret: bytes | None,
        slack: bool = False,
        max_queue: int = 1000,
        timeout_s: float = 5.0,
        retries: int = 5,
        backoff_s: float = 0.5,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.urls = tuple(dict.fromkeys(urls))
        bad = [_redact(u) for u in self.urls if not _is_url(u)]
        if bad:
            raise ConfigError(
                f"webhook URLs {bad}: not http(s) URLs; use http://host/path or https://host/path"
            )
        if max_queue < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0 or secret == b"":
            raise ConfigError(
                f"webhooks: max_queue={max_queue}, retries={retries}, timeout_s={timeout_s}, "
                f"backoff_s={backoff_s}; use max_queue >= 1, retries >= 0, timeout_s > 0, backoff_s >= 0, "
                "and a non-empty secret or none"
            )
        self.secret, self.slack, self.max_queue = secret, slack, max_queue
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.idle_s, self.max_urls = _IDLE_S, _MAX_URLS
        self._clock, self._rng = clock, rng or random.Random()
        self._abort = threading.Event()
        self._sleep = sleep or self._abort.wait
        self._lock = threading.Lock()
        self._lanes: dict[str, _Lane] = {}
        self._closing = False
        self.delivered = self.failed = self.dropped = 0

    def notify(
        self,
        event: dict[str, Any],
        *,
        urls: Iterable[str] = (),
        delivery_id: str | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Queue ``event`` for every configured URL and ``urls``; never waits on the network, never raises.

        ``on_done`` runs once every URL is done with the event: delivered, given up on, or dropped.
        """
        try:
            targets = list(dict.fromkeys([*self.urls, *urls]))
            payload = build_payload(event, now=self._clock())
            d = _Delivery(render_body(payload, slack=self.slack), payload["event"],
                          delivery_id or uuid.uuid4().hex, max(1, len(targets)), on_done)  # fmt: skip
            if targets:
                self._enqueue(d, targets)
            else:
                self._finish(d)
        except Exception as err:  # a notification must never break the caller's state change
            log.warning("webhook event not queued: %s: %s", type(err).__name__, err)
            self.dropped += 1

    def _enqueue(self, d: _Delivery, targets: list[str]) -> None:
        finished: list[_Delivery] = []
        with self._lock:
            if self._closing:
                self.dropped += len(targets)
                return
            for url in targets:
                lane = self._lanes.get(url) or self._new_lane(url)
                if lane is None:
                    finished.append(d)
                    continue
                if len(lane.queue) >= self.max_queue:
                    finished.append(lane.queue.popleft())
                    self.dropped += 1
                lane.queue.append(d)
                lane.cond.notify()
        for old in finished:
            self._finish(old)

    def _new_lane(self, url: str) -> _Lane | None:
        """A lane with its thread started (called under the lock); None, counted dropped, for a URL that is
        not one or past the limit."""
        if not _is_url(url) or len(self._lanes) >= self.max_urls:
            self.dropped += 1
            why = "not an http(s) URL" if not _is_url(url) else f"{self.max_urls} URLs in use already"
            log.warning("%s: webhook skipped, %s", _redact(url), why)
            return None
        lane = _Lane(url, threading.Condition(self._lock))
        lane.thread = threading.Thread(target=self._run_lane, args=(lane,), name="webhook", daemon=True)
        self._lanes[url] = lane
        lane.thread.start()
        return lane

    def _run_lane(self, lane: _Lane) -> None:
        while True:
            with self._lock:
                lane.cond.wait_for(lambda: lane.queue or self._closing, timeout=self.idle_s)
                if self._abort.is_set() or not lane.queue:
                    if self._lanes.get(lane.url) is lane:
                        del self._lanes[lane.url]
                    return
                d = lane.queue.popleft()
            outcome = self._deliver(lane.url, d)
            if outcome == "aborted":  # not done: a follower's cursor stays before it, to re-send it later
                return
            with self._lock:
                lane.failing = outcome == "failed"
                self.delivered += outcome == "ok"
                self.failed += outcome == "failed"
            self._finish(d)

    def _finish(self, d: _Delivery) -> None:
        with self._lock:
            d.left -= 1
            if d.left or d.on_done is None:
                return
        try:
            d.on_done()
        except Exception as err:
            log.warning("webhook completion callback failed: %s: %s", type(err).__name__, err)

    def _deliver(self, url: str, d: _Delivery) -> str:
        """'ok', 'failed' (after the retries, or refused) or 'aborted' (closing ran out of time)."""
        headers = {"Content-Type": "application/json", "User-Agent": "alexnet-dist-webhook",
                   EVENT_HEADER: d.kind, DELIVERY_HEADER: d.delivery_id}  # fmt: skip
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(d.body, self.secret)
        last, attempts = "", 0
        for attempts in range(1, self.retries + 2):
            if attempts > 1:
                wait = min(_MAX_BACKOFF_S, self.backoff_s * 2 ** (attempts - 2))
                self._sleep(wait * (1.0 + _JITTER * self._rng.random()))
            if self._abort.is_set():
                return "aborted"
            try:
                status = self._post(url, d.body, headers)
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timed out, bad reply
                last = f"{type(err).__name__}: {err}"
                continue
            if 200 <= status < 300:
                return "ok"
            last = f"HTTP {status}"
            if status != 429 and status < 500:  # the receiver refused this event: sending it again won't help
                break
        log.warning("%s: webhook %s %s not delivered after %d attempt(s) (%s); moving on",
                    _redact(url), d.kind, d.delivery_id, attempts, last)  # fmt: skip
        return "failed"

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        # http.client rather than urllib: no redirect is followed (a POST must not become a GET elsewhere)
        # and every status comes back as a number, not an exception.
        parts = urlsplit(url)
        conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_type(parts.hostname or "", parts.port, timeout=self.timeout_s)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("POST", target, body, headers)
            return conn.getresponse().status
        finally:
            conn.close()

    def congested(self) -> bool:
        """Whether a URL that is not failing has half its queue or more waiting (a feeder should wait)."""
        with self._lock:
            return any(not ln.failing and 2 * len(ln.queue) >= self.max_queue for ln in self._lanes.values())

    def close(self, timeout: float = 10.0) -> bool:
        """Deliver what can be delivered within ``timeout``, then stop; True when nothing was left over."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closing = True
            lanes = list(self._lanes.values())
            for lane in lanes:
                lane.cond.notify_all()
        for lane in lanes:
            lane.thread.join(max(0.0, deadline - time.monotonic()))
        if not any(ln.thread.is_alive() for ln in lanes):
            return True
        self._abort.set()  # cuts retry waits short; each lane stops after the attempt it is making
        left = sum(len(ln.queue) + 1 for ln in lanes if ln.thread.is_alive())
        log.warning("webhooks: closed with %d event(s) unsent; a follower re-sends them on restart", left)
        return False


def follower_keys(keys: Keys) -> tuple[str, str, str]:
    """(changes stream, cursor, lock) under the prefix."""
    return keys.changes, keys.notify_cursor, keys.notify_lock


def record_change(client: Any, keys: Keys, job_id: str, data: str) -> None:
    """Append an event (JSON text) of ``job_id`` to the changes stream as the store's scripts do; ``client``
    may be a transaction's pipeline (as in :meth:`JobStore.store_result`)."""
    stream = follower_keys(keys)[0]
    client.xadd(stream, {"job": keys.job(job_id), "data": data}, maxlen=STREAM_MAXLEN, approximate=True)


# Take the lock, or renew it if ours; move the cursor only while holding it (fencing).
_HOLD = """local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0"""
_SAVE = """if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2]) return 1"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


class StateFollower:
    """Tails the changes stream into ``notifier``; :meth:`start` runs it in a thread, :meth:`close` stops it.
    ``client`` must decode responses (see connection.connect).

    ``only`` keeps the events whose state (or ``"result"``, for results) is in it; None keeps all.
    ``spec_urls`` adds each job's own ``notify.urls`` from its spec. On its first run ever (no cursor
    saved) it starts after the stream's newest entry, unless ``from_start``: history is not news.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        notifier: Notifier,
        *,
        only: Iterable[str] | None = None,
        spec_urls: bool = True,
        from_start: bool = False,
        block_ms: int = 1000,
        lock_ttl_s: float = 10.0,
    ) -> None:
        if not 1 <= block_ms < lock_ttl_s * 1000:
            raise ConfigError(f"follower: block_ms={block_ms}; use 1 up to the lock TTL ({lock_ttl_s} s)")
        self.client, self.keys, self.notifier = client, keys, notifier
        self.stream, self.cursor_key, self.lock_key = follower_keys(keys)
        self.only = None if only is None else frozenset(only)
        self.spec_urls, self.from_start = spec_urls, from_start
        self.block_ms, self.batch, self.lock_ttl_ms = block_ms, 100, int(lock_ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self._hold, self._save, self._release = (client.register_script(s) for s in (_HOLD, _SAVE, _RELEASE))
        self._position: str | None = None  # the newest entry read; None: start from the saved cursor
        self._pending: OrderedDict[str, bool] = OrderedDict()  # entry id -> done with, in stream order
        self._pending_lock = threading.Lock()
        self._jobs: dict[str, tuple[str, list[str]]] = {}  # job id -> (name, spec URLs): fixed at submit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self, block_ms: int | None = None) -> int | None:
        """Read one batch (waiting up to ``block_ms`` for it) and hand it on: the entries read, or None
        when it may not read now (another follower holds the lock, or the notifier is congested)."""
        if not self._hold(keys=[self.lock_key], args=[self.token, self.lock_ttl_ms]):
            self._position = None  # what is in flight from before reports to the old dict below, harmlessly
            self._pending = OrderedDict()
            return None
        self._save_done()
        if self._position is None:
            self._position = self._load_cursor()
        if self.notifier.congested():
            return None
        reply = self.client.xread({self.stream: self._position}, count=self.batch, block=block_ms)
        entries = reply[0][1] if reply else []
        for entry_id, fields in entries:
            self._position = entry_id
            self._hand_on(entry_id, fields)
        self._save_done()
        return len(entries)

    def _load_cursor(self) -> str:
        saved = self.client.get(self.cursor_key)
        if saved:
            return saved
        newest = self.client.xrevrange(self.stream, count=1)
        start = "0-0" if self.from_start or not newest else newest[0][0]
        self._save(keys=[self.lock_key, self.cursor_key], args=[self.token, start])
        return start

    def _hand_on(self, entry_id: str, fields: dict[str, str]) -> None:
        pending = self._pending
        with self._pending_lock:
            pending[entry_id] = False

        def done() -> None:
            with self._pending_lock:
                if entry_id in pending:
                    pending[entry_id] = True

        try:
            event = json.loads(fields.get("data", ""))
            job_id = str(event.get("job_id") or fields.get("job", "").removeprefix(self.keys.job("")))
        except (ValueError, AttributeError) as err:
            log.warning("%s %s: not a JSON event (%s); skipped", self.stream, entry_id, err)
            return done()
        label = event.get("state") if event.get("type") == "state" else event.get("type")
        if not job_id or (self.only is not None and label not in self.only):
            return done()
        name, urls = self._job(job_id)
        event = {**event, "job_id": job_id, "name": event.get("name") or name}
        self.notifier.notify(event, urls=urls, delivery_id=entry_id, on_done=done)

    def _job(self, job_id: str) -> tuple[str, list[str]]:
        """The job's name and its spec's ``notify.urls``."""
        if job_id in self._jobs:
            return self._jobs[job_id]
        if len(self._jobs) >= 1024:
            self._jobs.clear()
        name, spec = self.client.hmget(self.keys.job(job_id), ["name", "spec"])
        try:
            found = (json.loads(spec).get("notify") or {}).get("urls") if spec and self.spec_urls else []
        except (ValueError, AttributeError):
            log.warning("job %s: notify.urls in its spec unreadable; service URLs only", job_id)
            found = []
        self._jobs[job_id] = info = (name or "", [str(u) for u in found or []])
        return info

    def _save_done(self) -> None:
        """Save as the cursor the newest entry that it and every entry before it are done with."""
        newest = None
        with self._pending_lock:
            while self._pending and next(iter(self._pending.values())):
                newest, _ = self._pending.popitem(last=False)
        if newest is not None:
            self._save(keys=[self.lock_key, self.cursor_key], args=[self.token, newest])

    def run(self, stop: threading.Event) -> None:
        """Follow until ``stop`` is set; a Redis error is logged once and retried, never raised."""
        failing = False
        while not stop.is_set():
            try:
                if self.step(block_ms=self.block_ms) is None:
                    stop.wait(0.1)
                failing = False
            except (redis.RedisError, OSError) as err:
                if not failing:
                    log.warning("%s: webhook follower paused, Redis error (%s); retrying", self.stream, err)
                failing, self._position = True, None
                stop.wait(1.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="notify", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> bool:
        """Stop reading, deliver what the notifier can within ``timeout``, save the cursor, free the lock."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        drained = self.notifier.close(max(0.0, deadline - time.monotonic()))
        try:
            self._save_done()
            self._release(keys=[self.lock_key], args=[self.token])
        except (redis.RedisError, OSError) as err:
            log.warning("%s: cursor not saved at close (%s); a restart re-sends", self.stream, err)
        return drained
