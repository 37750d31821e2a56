"""Webhooks over real HTTP (http.server on 127.0.0.1): order, signatures, retries, a receiver that is down,
the queue bound, Slack bodies; and the follower of the changes stream against a real redis-server."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from conftest import free_port

from alexnet_dist.errors import ConfigError
from alexnet_dist.events import STREAM_MAXLEN, encode_event
from alexnet_dist.service.connection import connect
from alexnet_dist.service.keys import Keys
from alexnet_dist.service.notify import (
    Notifier,
    StateFollower,
    build_payload,
    follower_keys,
    record_change,
    render_body,
    sign,
    verify_signature,
)

SECRET = b"s3cret"
KEYS = Keys("t:")
# The line the store's scripts gain (see the module's wiring notes): KEYS = changes stream, job key.
CHANGE_LUA = "redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'job', KEYS[2], 'data', ARGV[2])"


class Receiver:
    """A webhook receiver: records every POST as (headers, body, status it answered).

    It answers the ``statuses`` given first, then 200. While ``hold`` is not set, a request that arrived
    waits before answering (``arrived`` counts requests read, ``requests`` those answered).
    """

    def __init__(self, statuses: list[int] | None = None, *, held: bool = False) -> None:
        self.statuses = list(statuses or [])
        self.hold = threading.Event()
        if not held:
            self.hold.set()
        self.arrived = 0
        self.requests: list[tuple[Message, bytes, int]] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with outer.cond:
                    outer.arrived += 1
                    outer.cond.notify_all()
                outer.hold.wait(20)
                with outer.cond:
                    status = outer.statuses.pop(0) if outer.statuses else 200
                    outer.requests.append((self.headers, body, status))
                    outer.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/secret-part"

    def wait_for(self, n: int, *, arrived: bool = False, timeout: float = 20.0) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: (self.arrived if arrived else len(self.requests)) >= n, timeout)
        assert ok, f"{self.url}: {len(self.requests)} answered, {self.arrived} arrived; expected {n}"

    def payloads(self) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(body) for _, body, status in self.requests if status == 200]

    def close(self) -> None:
        self.hold.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def receivers() -> Iterator[Any]:
    made: list[Receiver] = []

    def make(statuses: list[int] | None = None, *, held: bool = False) -> Receiver:
        made.append(Receiver(statuses, held=held))
        return made[-1]

    yield make
    for r in made:
        r.close()


def state(job: str, st: str, attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {"type": "state", "job_id": job, "name": "tiny", "state": st, "attempt": attempt,
            "message": f"{st.lower()} now", "time": 1700000000.5, **extra}  # fmt: skip


def no_wait(waits: list[float]) -> Any:
    return waits.append  # a sleep that records the wait and returns at once


# -- signatures and payloads ---------------------------------------------------------------------------


def test_verify_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"a":1}'
    header = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
    assert sign(body, SECRET) == header
    assert verify_signature(body, header, SECRET)
    assert verify_signature(body, f" {header} ", SECRET)
    assert not verify_signature(body, header, b"wrong")
    assert not verify_signature(b'{"a":2}', header, SECRET)
    assert not verify_signature(body, header.removeprefix("sha256="), SECRET)
    assert not verify_signature(body, None, SECRET)
    assert not verify_signature(body, "", SECRET)
    assert not verify_signature(body, header, b"")
    assert not verify_signature(body, "sha256=\u00e9", SECRET)


def test_payload_has_the_job_fields_and_a_result_its_errors() -> None:
    p = build_payload(state("j-1", "RUNNING"))
    assert p == {"event": "state", "job_id": "j-1", "name": "tiny", "state": "RUNNING", "attempt": 1,
                 "message": "running now", "time": 1700000000.5}  # fmt: skip
    r = build_payload({"type": "result", "job_id": "j-1", "name": "tiny", "attempt": 2, "top1_error": 0.4213,
                       "top5_error": 0.19871, "ten_crop": True}, now=5.0)  # fmt: skip
    assert r["event"] == "result" and r["state"] is None and r["time"] == 5.0
    assert (r["top1_error"], r["top5_error"]) == (0.4213, 0.19871) and "ten_crop" not in r
    assert r["message"] == "top-1 error 0.4213, top-5 error 0.1987"


def test_slack_body_is_one_line_of_text_and_escaped_fields() -> None:
    p = build_payload(state("j-1", "FAILED", 3, message="worker died <!channel> & more\nsecond line"))
    doc = json.loads(render_body(p, slack=True))
    assert set(doc) == {"text", "blocks"}
    text = doc["text"]
    assert "\n" not in text and text.startswith("alexnet-dist job j-1: FAILED (attempt 3): worker died")
    assert "&lt;!channel&gt; &amp; more second line" in text and "<" not in text
    head, fields = doc["blocks"]
    assert head == {"type": "section", "text": {"type": "mrkdwn", "text": text}}
    shown = {f["text"].split("\n")[0]: f["text"].split("\n", 1)[1] for f in fields["fields"]}
    assert all(f["type"] == "mrkdwn" for f in fields["fields"]) and len(fields["fields"]) <= 10
    assert shown["*job_id*"] == "j-1" and shown["*state*"] == "FAILED" and shown["*attempt*"] == "3"
    assert shown["*time*"] == "2023-11-14 22:13:20 UTC"
    result = json.loads(render_body(build_payload({"type": "result", "job_id": "j-1", "top1_error": 0.5,
                                                   "top5_error": 0.25}), slack=True))  # fmt: skip
    assert result["text"] == "alexnet-dist job j-1: result: top-1 error 0.5000, top-5 error 0.2500"


def test_bad_settings_are_config_errors() -> None:
    for urls, kw in [(["ftp://h/x"], {}), (["http://"], {}), (["http://h:xx/"], {}), ([], {"max_queue": 0}),
                     ([], {"retries": -1}), ([], {"timeout_s": 0}), ([], {"secret": b""})]:  # fmt: skip
        with pytest.raises(ConfigError):
            Notifier(urls, **{"secret": SECRET, **kw})


# -- delivery over HTTP --------------------------------------------------------------------------------


def test_every_event_arrives_in_order_signed(receivers: Any) -> None:
    r = receivers()
    n = Notifier([r.url], secret=SECRET)
    events = [state(f"j-{i}", "RUNNING", attempt=i) for i in range(20)]
    events.append({"type": "result", "job_id": "j-19", "name": "tiny", "attempt": 1, "top1_error": 0.25,
                   "top5_error": 0.125})  # fmt: skip
    for e in events:
        n.notify(e)
    r.wait_for(len(events))
    assert n.close(5)
    assert [p.get("attempt") for p in r.payloads()] == [*range(20), 1]
    assert r.payloads()[-1]["top5_error"] == 0.125
    ids = set()
    for headers, body, _ in r.requests:
        assert headers["Content-Type"] == "application/json"
        assert verify_signature(body, headers["X-AlexNet-Signature"], SECRET)
        assert not verify_signature(body, headers["X-AlexNet-Signature"], b"wrong secret")
        assert not verify_signature(body + b" ", headers["X-AlexNet-Signature"], SECRET)
        ids.add(headers["X-AlexNet-Delivery"])
    assert [h["X-AlexNet-Event"] for h, _, _ in r.requests] == ["state"] * 20 + ["result"]
    assert len(ids) == 21 and (n.delivered, n.failed, n.dropped) == (21, 0, 0)


def test_unsigned_when_no_secret_and_slack_body_is_signed_as_sent(receivers: Any) -> None:
    plain, slack = receivers(), receivers()
    unsigned, n = Notifier([plain.url], secret=None), Notifier([slack.url], secret=SECRET, slack=True)
    unsigned.notify(state("j-1", "QUEUED"))
    n.notify(state("j-1", "SUCCEEDED"))
    assert unsigned.close(5) and n.close(5)
    assert plain.requests[0][0]["X-AlexNet-Signature"] is None
    headers, body, _ = slack.requests[0]
    assert verify_signature(body, headers["X-AlexNet-Signature"], SECRET)
    assert json.loads(body)["text"] == "alexnet-dist job j-1: SUCCEEDED (attempt 1): succeeded now"


def test_503_twice_then_200_arrives_once_after_two_backoffs(receivers: Any) -> None:
    r = receivers([503, 503])
    waits: list[float] = []
    n = Notifier([r.url], secret=SECRET, sleep=no_wait(waits))
    n.notify(state("j-1", "RUNNING"))
    r.wait_for(3)
    assert n.close(5)
    assert [s for _, _, s in r.requests] == [503, 503, 200]
    assert len({body for _, body, _ in r.requests}) == 1  # the same bytes, so the same signature
    assert len({h["X-AlexNet-Delivery"] for h, _, _ in r.requests}) == 1
    assert (n.delivered, n.failed) == (1, 0)
    assert len(waits) == 2 and 0.5 <= waits[0] <= 0.625 and 1.0 <= waits[1] <= 1.25


def test_other_4xx_is_not_retried_and_giving_up_logs_one_line(
    receivers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    refusing, failing = receivers([400]), receivers([429, 503, 503])
    waits: list[float] = []
    n = Notifier([refusing.url, failing.url], secret=SECRET, retries=2, sleep=no_wait(waits))
    with caplog.at_level(logging.WARNING, logger="alexnet_dist.service.notify"):
        n.notify(state("j-1", "RUNNING"))
        n.notify(state("j-1", "SUCCEEDED"))
        refusing.wait_for(2)
        failing.wait_for(4)
        assert n.close(5)
    assert [s for _, _, s in refusing.requests] == [400, 200]  # the 400 was not sent again
    assert [s for _, _, s in failing.requests] == [429, 503, 503, 200]  # 3 attempts, given up; then the next
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    port = failing.url.split(":")[2].split("/")[0]
    assert len([m for m in lines if f"127.0.0.1:{port}" in m]) == 1
    assert any("3 attempt(s)" in m and "HTTP 503" in m and "moving on" in m for m in lines)
    assert all("secret-part" not in m for m in lines)  # the path after its first part may be a key
    assert (n.delivered, n.failed) == (2, 2)


def test_a_receiver_that_is_down_does_not_hold_up_notify_or_others(receivers: Any) -> None:
    good = receivers(held=True)  # answers nothing until released: no delivery attempt can finish
    down = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens: connections are refused
    gate = threading.Event()
    n = Notifier([down, good.url], secret=SECRET, retries=1, timeout_s=30, sleep=lambda s: gate.wait(20))
    caller = threading.Thread(target=lambda: [n.notify(state(f"j-{i}", "RUNNING", i)) for i in range(1000)])
    caller.start()
    caller.join(20)
    assert not caller.is_alive()
    # All 1000 calls returned while the good receiver had answered nothing and the down one's retry wait
    # had not ended: notify did not wait on either.
    assert good.requests == [] and not gate.is_set() and n.dropped == 0
    good.hold.set()
    good.wait_for(1000)
    assert [p["attempt"] for p in good.payloads()] == list(range(1000))
    assert not n.close(0.5)  # the down URL's events are still unsent
    gate.set()


def test_a_full_queue_drops_the_oldest_and_counts(receivers: Any) -> None:
    r = receivers(held=True)
    done: list[int] = []
    n = Notifier([r.url], secret=SECRET, max_queue=3)
    n.notify(state("j-0", "RUNNING", 0), on_done=lambda: done.append(0))
    r.wait_for(1, arrived=True)  # e0 is in flight; the queue is empty
    for i in range(1, 6):
        n.notify(state(f"j-{i}", "RUNNING", i), on_done=lambda i=i: done.append(i))
    assert n.dropped == 2 and sorted(done) == [1, 2]  # a dropped event is done with
    assert n.congested()
    r.hold.set()
    r.wait_for(4)
    assert n.close(5)
    assert [p["attempt"] for p in r.payloads()] == [0, 3, 4, 5]
    assert sorted(done) == [0, 1, 2, 3, 4, 5]


def test_per_event_urls_are_added_and_bad_ones_skipped(receivers: Any) -> None:
    service, own = receivers(), receivers()
    n = Notifier([service.url], secret=SECRET)
    n.notify(state("j-1", "QUEUED"), urls=[own.url, service.url])
    n.notify(state("j-2", "QUEUED"), urls=["ftp://nowhere/x"])
    n.notify(state("j-3", "QUEUED"))
    service.wait_for(3)
    own.wait_for(1)
    assert n.close(5)
    assert [p["job_id"] for p in service.payloads()] == ["j-1", "j-2", "j-3"]
    assert [p["job_id"] for p in own.payloads()] == ["j-1"] and n.dropped == 1


def test_notify_never_raises() -> None:
    done: list[bool] = []
    n = Notifier([f"http://127.0.0.1:{free_port()}/"], secret=SECRET, retries=0)
    n.notify({"type": "state", "job_id": "j", "message": object()}, on_done=lambda: done.append(True))
    n.notify(None)  # type: ignore[arg-type]
    assert n.dropped == 2 and done == []
    Notifier([], secret=None).notify(state("j", "QUEUED"), on_done=lambda: done.append(True))
    assert done == [True]  # no URL at all: done at once
    n.close(5)
    n.notify(state("j", "QUEUED"))
    assert n.dropped == 3


# -- the follower against redis-server -----------------------------------------------------------------


def write_change(client: Any, job_id: str, event: dict[str, Any]) -> None:
    """What a state change's script appends to the changes stream."""
    stream = follower_keys(KEYS)[0]
    client.eval(CHANGE_LUA, 2, stream, KEYS.job(job_id), STREAM_MAXLEN, encode_event(event))


def add_job(client: Any, job_id: str, name: str, urls: list[str] | None = None) -> None:
    spec = {"name": name, **({"notify": {"urls": urls}} if urls else {})}
    client.hset(KEYS.job(job_id), mapping={"id": job_id, "name": name, "spec": json.dumps(spec)})


def ev(st: str, attempt: int = 1) -> dict[str, Any]:
    return {"type": "state", "state": st, "attempt": attempt, "message": st.lower()}


def test_follower_resumes_from_its_cursor_after_a_restart_without_repeats(
    redis_url: str, receivers: Any
) -> None:
    client = connect(redis_url)
    service, own = receivers(), receivers()
    add_job(client, "a-1", "alpha", urls=[own.url])
    add_job(client, "b-1", "beta")
    for st in ("QUEUED", "LAUNCHING", "RUNNING"):
        write_change(client, "a-1", ev(st))
    first = StateFollower(client, KEYS, Notifier([service.url], secret=SECRET), from_start=True, block_ms=50)
    first.start()
    service.wait_for(3)
    assert first.close(5)
    for job, st in (("b-1", "QUEUED"), ("a-1", "SUCCEEDED")):
        write_change(client, job, ev(st))
    second = StateFollower(client, KEYS, Notifier([service.url], secret=SECRET), from_start=True)
    assert second.step() == 2  # from the saved cursor, not from the start
    service.wait_for(5)
    assert second.close(5)
    got = [(p["job_id"], p["name"], p["state"]) for p in service.payloads()]
    assert got == [("a-1", "alpha", "QUEUED"), ("a-1", "alpha", "LAUNCHING"), ("a-1", "alpha", "RUNNING"),
                   ("b-1", "beta", "QUEUED"), ("a-1", "alpha", "SUCCEEDED")]  # fmt: skip
    assert len({h["X-AlexNet-Delivery"] for h, _, _ in service.requests}) == 5
    assert [p["state"] for p in own.payloads()] == ["QUEUED", "LAUNCHING", "RUNNING", "SUCCEEDED"]
    assert all(verify_signature(b, h["X-AlexNet-Signature"], SECRET) for h, b, _ in service.requests)


def test_follower_first_run_starts_after_the_history(redis_url: str, receivers: Any) -> None:
    client = connect(redis_url)
    r = receivers()
    add_job(client, "a-1", "alpha")
    write_change(client, "a-1", ev("QUEUED"))
    f = StateFollower(client, KEYS, Notifier([r.url], secret=SECRET))
    assert f.step() == 0
    write_change(client, "a-1", ev("CANCELLED"))
    assert f.step() == 1
    r.wait_for(1)
    assert f.close(5)
    assert [p["state"] for p in r.payloads()] == ["CANCELLED"]


def test_a_crashed_follower_loses_nothing_and_a_standby_waits_for_the_lock(
    redis_url: str, receivers: Any
) -> None:
    client = connect(redis_url)
    stuck, r = receivers(held=True), receivers(held=True)
    add_job(client, "a-1", "alpha")
    for st in ("QUEUED", "LAUNCHING"):
        write_change(client, "a-1", ev(st))
    crashed = StateFollower(client, KEYS, Notifier([stuck.url], secret=SECRET), from_start=True,
                            block_ms=50, lock_ttl_s=0.5)  # fmt: skip
    assert crashed.step() == 2  # both in flight, neither done: the cursor stays before them
    standby = StateFollower(client, KEYS, Notifier([r.url], secret=SECRET), block_ms=50, lock_ttl_s=0.5)
    assert standby.step() is None  # the lock is the crashed one's until its TTL runs out
    deadline = time.monotonic() + 10
    while (got := standby.step()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == 2  # from the saved cursor: both again
    stuck.hold.set()
    stuck.wait_for(2)
    assert crashed.close(5)  # its events are now done, but it no longer holds the lock: no cursor write
    assert client.get(follower_keys(KEYS)[1]) == "0-0"
    r.hold.set()
    r.wait_for(2)
    assert standby.close(5)
    first_ids = [h["X-AlexNet-Delivery"] for h, _, _ in stuck.requests]
    assert [h["X-AlexNet-Delivery"] for h, _, _ in r.requests] == first_ids  # re-sent under the same ids
    assert client.get(follower_keys(KEYS)[1]) == first_ids[-1]


def test_follower_filters_states_and_sends_results(redis_url: str, receivers: Any) -> None:
    client = connect(redis_url)
    r = receivers()
    add_job(client, "a-1", "alpha")
    f = StateFollower(client, KEYS, Notifier([r.url], secret=SECRET), only={"SUCCEEDED", "result"})
    assert f.step() == 0
    for st in ("QUEUED", "RUNNING"):
        write_change(client, "a-1", ev(st))
    pipe = client.pipeline(transaction=True)  # as JobStore.store_result would, with its HSET and PUBLISH
    result = {"job_id": "a-1", "name": "alpha", "attempt": 1, "top1_error": 0.375, "top5_error": 0.125}
    record_change(pipe, KEYS, "a-1", encode_event({"type": "result", **result}))
    pipe.execute()
    write_change(client, "a-1", ev("SUCCEEDED"))
    client.xadd(follower_keys(KEYS)[0], {"data": "not json"})
    assert f.step() == 5
    r.wait_for(2)
    assert f.close(5)
    got = r.payloads()
    assert [(p["event"], p["state"]) for p in got] == [("result", None), ("state", "SUCCEEDED")]
    assert (got[0]["top1_error"], got[0]["top5_error"]) == (0.375, 0.125)
    assert r.requests[0][0]["X-AlexNet-Event"] == "result"
    newest = client.xrevrange(follower_keys(KEYS)[0], count=1)[0][0]
    assert client.get(follower_keys(KEYS)[1]) == newest  # skipped entries move the cursor too


# -- wired to the job store ------------------------------------------------------------------------------


def test_the_stores_own_changes_reach_a_webhook_in_order_signed(redis_url: str, receivers: Any) -> None:
    """Real state changes (submit, launch, run, preemption, result) through the store's scripts: the
    service's webhook and the job's own (its spec's notify.urls) get each one, in order, signed."""
    from alexnet_dist.service.store import JobState, JobStore
    from alexnet_dist.spec import parse_spec

    service_hook, job_hook = receivers(), receivers()
    store = JobStore(connect(redis_url), prefix="wired:")
    follower = StateFollower(store.client, store.keys, Notifier([service_hook.url], secret=SECRET))
    assert follower.step() == 0  # a first run starts after the history
    spec = parse_spec({"name": "hooked", "data": {"train": "t.json", "val": "v.json"},
                       "scaling": {"workers": 1, "devices": "cpu"},
                       "notify": {"urls": [job_hook.url]}})  # fmt: skip
    job, _ = store.submit(spec)
    token = "tok"
    store.client.set(store.keys.dispatcher_lock, token)
    for to in (JobState.LAUNCHING, JobState.RUNNING):
        assert store.transition(store.get(job.id), to, message=to.value.lower(), lock_token=token)
    assert store.preempted(store.get(job.id), lock_token=token, why="preempted: room for another")
    for to in (JobState.LAUNCHING, JobState.RUNNING, JobState.SUCCEEDED):
        assert store.transition(store.get(job.id), to, message=to.value.lower(), lock_token=token)
    store.store_result(job.id, {"top1_error": 0.25, "top5_error": 0.0625})
    want = [
        "QUEUED",
        "LAUNCHING",
        "RUNNING",
        "PREEMPTED",
        "QUEUED",
        "LAUNCHING",
        "RUNNING",
        "SUCCEEDED",
        None,
    ]
    assert follower.step() == len(want)
    for hook in (service_hook, job_hook):
        hook.wait_for(len(want))
        assert [p["state"] for p in hook.payloads()] == want
        assert all(verify_signature(body, h["X-AlexNet-Signature"], SECRET) for h, body, _ in hook.requests)
        assert hook.payloads()[-1]["top1_error"] == 0.25 and hook.payloads()[4]["attempt"] == 2
    assert follower.close(5)
