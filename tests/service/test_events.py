"""Events: the publisher used inside training (never raises), stream replay, and `watch` on the CLI."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, start_redis

from alexnet_dist.events import encode_event
from alexnet_dist.service.connection import connect
from alexnet_dist.service.events import job_publisher, read_events
from alexnet_dist.service.keys import Keys
from alexnet_dist.service.store import JobState, JobStore
from alexnet_dist.spec import parse_spec

PREFIX = "t:"
STEP = {"type": "step", "epoch": 1, "epochs": 2, "step": 3, "steps_per_epoch": 10, "loss": 2.25, "lr": 0.01,
        "images_per_s": 123.4}  # fmt: skip
EPOCH = {"type": "epoch", "epoch": 1, "epochs": 2, "train_loss": 2.0, "val_top1_error": 0.5,
         "val_top5_error": 0.1875, "lr": 0.01, "images_per_s": 120.0, "seconds": 9.5}  # fmt: skip
FINAL = {"type": "final", "top1_error": 0.4375, "top5_error": 0.0625, "ten_crop": True, "val_samples": 64,
         "model_url": "file:///m.pt", "checkpoint_url": "file:///c"}  # fmt: skip


def test_encode_event_puts_type_first_and_adds_time() -> None:
    text = encode_event({"loss": 1.0, "type": "step"}, now=12.5)
    assert text == '{"type":"step","loss":1.0,"time":12.5}'
    with pytest.raises(ValueError, match="no 'type'"):
        encode_event({"loss": 1.0})


def test_publisher_appends_to_the_stream_and_the_live_channel(redis_url: str) -> None:
    client = connect(redis_url)
    sub = client.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(Keys(PREFIX).live("j1"))
    sub.get_message(timeout=2)
    pub = job_publisher(redis_url, Keys(PREFIX), "j1")
    for i in range(5):
        pub.publish({**STEP, "step": i + 1})
    pub.close()
    events = [e for _, e in read_events(client, Keys(PREFIX), "j1")]
    assert [e["step"] for e in events] == [1, 2, 3, 4, 5]
    assert all(list(e)[0] == "type" and abs(e["time"] - time.time()) < 60 for e in events)
    live = [sub.get_message(timeout=2) for _ in range(5)]
    assert [json.loads(m["data"])["step"] for m in live if m] == [1, 2, 3, 4, 5]


def test_publisher_keeps_events_through_a_redis_outage_and_delivers_them_in_order(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_redis(tmp_path, "--appendonly", "yes")
    pub = job_publisher(server.url, Keys(PREFIX), "j1", retry_after_s=0.2)
    pub.publish({**STEP, "step": 0})
    server.stop()
    with caplog.at_level(logging.WARNING, logger="alexnet_dist.events"):
        for i in range(1, 11):
            pub.publish({**STEP, "step": i})  # Redis is down: must not raise into training
            time.sleep(0.05)
    assert (pub.dropped, pub.buffered) == (0, 10)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # one warning, not ten
    server.start()  # the same data dir: AOF kept the event published before the outage
    time.sleep(0.3)
    pub.publish(FINAL)
    pub.close()
    events = [e for _, e in read_events(connect(server.url), Keys(PREFIX), "j1")]
    assert [e.get("step") for e in events] == [*range(11), None] and events[-1]["type"] == "final"
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)  # when each happened
    server.stop()


def test_a_full_outage_buffer_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    server = start_redis(tmp_path, "--appendonly", "yes")
    pub = job_publisher(server.url, Keys(PREFIX), "j2", retry_after_s=0.0, buffer=5)
    server.stop()
    for i in range(8):
        pub.publish({**STEP, "step": i})
    assert (pub.dropped, pub.buffered) == (3, 5)
    server.start()
    pub.close()
    events = [e for _, e in read_events(connect(server.url), Keys(PREFIX), "j2")]
    assert [e["step"] for e in events] == [3, 4, 5, 6, 7]  # the newest kept, still in order
    server.stop()


def test_publisher_to_a_dead_port_drops_quietly() -> None:
    pub = job_publisher(f"redis://127.0.0.1:{free_port()}/0", Keys(PREFIX), "j", retry_after_s=0.0)
    pub.publish(STEP)
    pub.publish({"type": "step", "bad": object()})  # not JSON-able: dropped at once
    assert (pub.dropped, pub.buffered) == (1, 1)
    pub.close()  # the end of the run: what could not be delivered is counted as dropped
    assert (pub.dropped, pub.buffered) == (2, 0)


def test_read_events_resumes_after_the_last_id_and_blocks_for_new(redis_url: str) -> None:
    client = connect(redis_url)
    pub = job_publisher(redis_url, Keys(PREFIX), "j2")
    for i in range(3):
        pub.publish({**STEP, "step": i + 1})
    seen = list(read_events(client, Keys(PREFIX), "j2"))
    assert len(seen) == 3
    last = seen[-1][0]
    t0 = time.monotonic()
    assert list(read_events(client, Keys(PREFIX), "j2", after=last, block_ms=300)) == []
    assert time.monotonic() - t0 >= 0.25
    pub.publish(FINAL)
    assert [e["type"] for _, e in read_events(client, Keys(PREFIX), "j2", after=last)] == ["final"]


def _finished_job(redis_url: str) -> str:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    spec = parse_spec({"name": "w", "data": {"train": "a.json", "val": "b.json"},
                       "scaling": {"workers": 1, "devices": "cpu"}})  # fmt: skip
    rec, _ = queue.submit(spec)
    assert queue.transition(rec, JobState.LAUNCHING, message="launching")
    rec = queue.get(rec.id)
    assert queue.transition(rec, JobState.RUNNING, message="Ray job submitted")
    pub = job_publisher(redis_url, Keys(PREFIX), rec.id)
    for e in (STEP, EPOCH, FINAL):
        pub.publish(e)
    queue.store_result(rec.id, {k: FINAL[k] for k in ("top1_error", "top5_error", "ten_crop")})
    assert queue.transition(queue.get(rec.id), JobState.SUCCEEDED, message="finished")
    return rec.id


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALEXNET_DIST_REDIS_URL": redis_url, "ALEXNET_DIST_REDIS_PREFIX": PREFIX}
    exe = Path(sys.executable).parent / "alexnet-dist"
    return subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=60)


def test_watch_json_replays_every_event_and_ends_with_the_job(redis_url: str) -> None:
    job_id = _finished_job(redis_url)
    run = _cli(redis_url, "watch", job_id, "--json")
    assert run.returncode == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    kinds = [(e["type"], e.get("state")) for e in events]
    assert kinds == [("state", "QUEUED"), ("state", "LAUNCHING"), ("state", "RUNNING"), ("step", None),
                     ("epoch", None), ("final", None), ("state", "SUCCEEDED")]  # fmt: skip
    assert events[5]["top5_error"] == 0.0625


@pytest.mark.slow
def test_watch_renders_progress_and_result_prints_top5(redis_url: str) -> None:
    job_id = _finished_job(redis_url)
    run = _cli(redis_url, "watch", job_id)
    assert run.returncode == 0, run.stderr
    assert "top-5 err 0.1875" in run.stdout and "top-5 error 0.0625" in run.stdout
    assert "SUCCEEDED" in run.stdout
    res = _cli(redis_url, "result", job_id, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["top5_error"] == 0.0625
    status = _cli(redis_url, "status", job_id, "--json")
    assert json.loads(status.stdout)["state"] == "SUCCEEDED"


def test_cli_errors_are_one_line(redis_url: str) -> None:
    missing = _cli(redis_url, "status", "nope")
    assert missing.returncode == 5  # not found
    assert missing.stderr.strip().splitlines()[-1] == (
        "alexnet-dist: error: job nope: not found; check the id with `alexnet-dist list`"
    )
    down = _cli(f"redis://127.0.0.1:{free_port()}/0", "list")
    assert down.returncode == 6 and "Redis unreachable" in down.stderr and "Traceback" not in down.stderr


def test_the_end_of_a_run_waits_for_redis_to_take_its_last_events(tmp_path: Path) -> None:
    """A run that ends while Redis is away keeps its last events until Redis is back (up to ``wait_s``),
    rather than drop them at once."""
    import threading

    server = start_redis(tmp_path, "--appendonly", "yes")
    pub = job_publisher(server.url, Keys(PREFIX), "j3", retry_after_s=0.2)
    server.stop()
    for i in range(4):
        pub.publish({**STEP, "step": i})
    threading.Timer(1.5, server.start).start()  # back 1.5 s into the close
    t0 = time.monotonic()
    pub.close(wait_s=20)
    waited = time.monotonic() - t0
    events = [e for _, e in read_events(connect(server.url), Keys(PREFIX), "j3")]
    assert [e["step"] for e in events] == [0, 1, 2, 3] and pub.dropped == 0
    assert 1.4 < waited < 19, waited  # it waited for Redis, and left once Redis took them (not at 20 s)
    server.stop()
