"""Job-store throughput against a local redis-server: submits/s and status reads/s with p50/p99 latency,
beside raw redis-py doing the same writes and reads (one MULTI pipeline per job) as the baseline.

    .venv/bin/python bench/jobqueue.py [--n 2000] [--url redis://...]

(Named jobqueue.py, not queue.py: a bench/queue.py shadows the standard library's queue module for every
script run from bench/, torch and redis-py import it.)

Without ``--url`` it starts its own redis-server (AOF on, fsync every second: the service's setting) on a
free port. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from alexnet_dist.events import STREAM_MAXLEN, encode_event
from alexnet_dist.service.connection import connect
from alexnet_dist.service.keys import Keys
from alexnet_dist.service.store import JobStore, new_job_id
from alexnet_dist.spec import parse_spec


def _timed(n: int, op: Callable[[int], object]) -> dict[str, float]:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        op(i)
        lat.append(time.perf_counter() - s)
    total = time.perf_counter() - t0
    lat.sort()
    return {
        "ops_per_s": round(n / total, 1),
        "p50_ms": round(statistics.median(lat) * 1e3, 4),
        "p99_ms": round(lat[int(0.99 * (n - 1))] * 1e3, 4),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(url: str, n: int) -> dict:
    client = connect(url)
    spec = parse_spec(
        {
            "name": "bench",
            "data": {"train": "a.json", "val": "b.json"},
            "scaling": {"workers": 1, "devices": "cpu"},
        }
    )
    spec_json = spec.to_json()

    queue = JobStore(client, prefix="bench:svc:")
    ids: list[str] = []
    submit = _timed(n, lambda i: ids.append(queue.submit(spec, priority=i % 3, client_key=f"k{i}")[0].id))
    status = _timed(n, lambda i: queue.get(ids[i]))

    # Baseline: the same keys written by a plain MULTI pipeline (no idempotency check, no Lua).
    k = Keys("bench:raw:")
    raw_ids: list[str] = []

    def raw_submit(i: int) -> None:
        jid = new_job_id("bench")
        now = time.time()
        seq = client.incr(k.seq)  # the raw version needs the sequence first: a second round trip
        event = encode_event({"type": "state", "state": "QUEUED", "attempt": 1, "message": "queued"}, now=now)
        pipe = client.pipeline(transaction=True)
        member = f"{seq:016d}:{jid}"
        record = {"id": jid, "name": "bench", "state": "QUEUED", "attempt": 1, "priority": i % 3,
                  "retries_left": 1, "spec": spec_json, "created": now, "updated": now, "message": "queued",
                  "client_key": f"k{i}", "cancel_requested": 0, "seq": seq,
                  "queue_member": member}  # fmt: skip
        pipe.hset(k.job(jid), mapping=record)
        pipe.zadd(k.queue, {member: -(i % 3)})
        pipe.zadd(k.index, {jid: seq})
        pipe.set(k.client(f"k{i}"), jid)
        pipe.xadd(k.events(jid), {"data": event}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.publish(k.live(jid), event)
        pipe.execute()
        raw_ids.append(jid)

    raw_sub = _timed(n, raw_submit)
    raw_get = _timed(n, lambda i: client.hgetall(k.job(raw_ids[i])))
    assert len(queue.list()) == n  # every submit landed
    return {
        "n": n,
        "submit": submit,
        "submit_raw_pipeline": raw_sub,
        "submit_ratio": round(submit["ops_per_s"] / raw_sub["ops_per_s"], 3),
        "status": status,
        "status_raw_hgetall": raw_get,
        "status_ratio": round(status["ops_per_s"] / raw_get["ops_per_s"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--url", default=None, help="an existing Redis (flushes nothing, uses bench:* keys)")
    args = ap.parse_args()
    if args.url:
        print(json.dumps(run(args.url, args.n), indent=1))
        return
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found; install it or pass --url")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--dir",
                tmp,
                "--save",
                "",
                "--appendonly",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    connect(f"redis://127.0.0.1:{port}/0")
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            out = run(f"redis://127.0.0.1:{port}/0", args.n)
            out["redis"] = "local redis-server, AOF everysec"
            print(json.dumps(out, indent=1))
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
