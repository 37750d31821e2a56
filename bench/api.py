"""HTTP API throughput: submits/s and status reads/s through ``alexnet-dist server`` (FastAPI under uvicorn)
at 1, 8 and 32 concurrent clients, with p50/p99 latency, beside the same operations on :class:`JobService`
called directly from as many threads (the baseline, measured in the same run), and their ratio: what the
HTTP layer (parsing, auth, JSON, uvicorn) costs on top of the store.

    .venv/bin/python bench/api.py [--seconds 3] [--repeat 1] [--workers 1] [--clients 1,8,32]

It starts its own redis-server (a free port, a temp dir, ``--save ""``, AOF everysec: the service's
setting) and one ``alexnet-dist server`` on another free port, pointed at it by ``ALEXNET_DIST_REDIS_URL``,
and adds one user whose token every request carries (``Authorization: Bearer``). A submit is a POST of a
small spec as JSON; the server checks its two manifests exist (10 classes, written to the temp dir), as
``JobService.submit`` does for the baseline. A status is ``GET /api/v1/jobs/{id}`` of a job the cell
submitted; its baseline makes the endpoint's store calls (``JobService.get``, and ``pending()`` for a
queued job). The API side also pays, per request, the token lookup (two HGETs) and the spec's parsing;
the baseline does not: that is part of what the ratio measures.

Clients are threads of this process, each with its own keep-alive ``http.client`` connection (the
baseline's threads share one redis-py pool, a connection each). Each cell runs for ``--seconds``;
``--repeat R`` runs every cell R times, API and baseline interleaved, and reports the median with min/max
(the VM varies about +-20% from one run to the next).

The client's threads, the server's process(es) and redis-server share the same cores (2 on the dev VM):
the API figures are a lower bound on what a server gets on a machine of its own, and more clients or
``--workers`` can lose as much to the client as they gain. The JSON says so in ``note``.

Correctness is checked while measuring: every API answer must be 201 (submit) or 200 (status) and name
the job asked for, else it stops at once and exits non-zero. At the end every submitted job must be in
the store: no id handed out twice, the index's count equals the jobs submitted, each id's record exists;
if not, the JSON still comes out, with ``check_failed``, and it exits non-zero. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alexnet_dist.data.manifest import Manifest, save_manifest
from alexnet_dist.service.connection import connect
from alexnet_dist.service.operations import JobService
from alexnet_dist.service.store import JobState, JobStore
from alexnet_dist.service.users import UserStore
from alexnet_dist.spec import JobSpec, parse_spec

API_PREFIX = "bench:api:"  # the server's keys (ALEXNET_DIST_REDIS_PREFIX)
DIRECT_PREFIX = "bench:direct:"  # the baseline's keys, in the same Redis
USER, TEAM = "bench", "benchteam"
NOTE = (
    "client threads, the API server and redis-server share this machine's {cpus} CPU cores: the API figures "
    "include the client's cost and are a lower bound for a server on its own machine"
)


class BenchError(Exception):
    """A failed correctness check or a server that would not start: the run's figures are void."""


# -- setup -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_manifest(path: Path, classes: int = 10) -> str:
    """A manifest of ``classes`` classes and no shards: enough for submit's check of the data."""
    m = Manifest(
        url=str(path),
        split="train",
        shards=(),
        classes=tuple(str(i) for i in range(classes)),
        names=tuple(f"c{i}" for i in range(classes)),
        image_size=32,
        mean=(1.0, 1.0, 1.0),
        std=(1.0, 1.0, 1.0),
        eigval=(3.0, 2.0, 1.0),
        eigvec=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
        num_samples=0,
    )
    save_manifest(m, str(path))
    return str(path)


def spec_dict(train: str, val: str, storage: str) -> dict[str, Any]:
    """The small CPU job of the training tests (tests/jobspecs.py's cpu_spec)."""
    return {
        "name": "bench",
        "seed": 7,
        "retries": 0,
        "data": {"train": train, "val": val, "loader_workers": 0, "shuffle_buffer": 0},
        "model": {"preset": "small", "num_classes": 10},
        "optim": {"lr": 0.02, "schedule": "cosine"},
        "train": {"epochs": 2, "batch_size": 32, "ten_crop_eval": False, "log_every_steps": 4},
        "scaling": {"workers": 2, "devices": "cpu"},
        "checkpoint": {"storage": storage, "every_steps": 3, "keep": 10},
    }


def start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server not found; install it (apt-get install redis-server)")
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            connect(f"redis://127.0.0.1:{port}/0")
            return proc
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.terminate()
                raise BenchError(f"redis-server on port {port} did not start") from None
            time.sleep(0.05)


def start_server(redis_url: str, port: int, workers: int, log: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "alexnet-dist"
    if not exe.exists():
        raise BenchError(f"{exe}: not found; install the package into this venv (uv pip install -e .)")
    env = {**os.environ, "ALEXNET_DIST_REDIS_URL": redis_url, "ALEXNET_DIST_REDIS_PREFIX": API_PREFIX}
    cmd = [str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    with log.open("wb") as out:
        # its own session: cleanup signals the whole group, uvicorn's worker processes included
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise BenchError(f"alexnet-dist server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                if workers > 1:  # one answering worker is not all: give the others time to build the app
                    time.sleep(2.0 + 0.5 * workers)
                return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"alexnet-dist server did not answer on port {port}:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes] | None, *, group: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)  # the group this script started (start_new_session)
        else:
            proc.terminate()
        proc.wait(10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        if group:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            proc.kill()
        proc.wait(5)


# -- measuring -------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One run of one operation at one concurrency: its throughput and latencies."""

    requests: int
    seconds: float
    latencies: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[int(q * (len(lat) - 1))] * 1e3


def drive(clients: int, seconds: float, make: Callable[[int], Callable[[int], None]]) -> Cell:
    """``clients`` threads, each calling its own ``make(thread)`` op (with a running count) until the
    deadline; all start together. The first error in any thread is raised here."""
    ops = [make(t) for t in range(clients)]
    lats: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)
    deadline = [0.0]

    def loop(t: int) -> None:
        op, lat = ops[t], lats[t]
        barrier.wait()
        end = deadline[0]
        i = 0
        try:
            while True:
                s = time.perf_counter()
                if s >= end:
                    return
                op(i)
                lat.append(time.perf_counter() - s)
                i += 1
        except BaseException as err:  # noqa: BLE001  reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=loop, args=(t,), daemon=True) for t in range(clients)]
    for th in threads:
        th.start()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    barrier.wait()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise BenchError(f"{type(errors[0]).__name__}: {errors[0]}")
    all_lat = [x for lat in lats for x in lat]
    if not all_lat:
        raise BenchError("no request finished within the cell's time")
    return Cell(len(all_lat), elapsed, all_lat)


class Api:
    """The HTTP side: a keep-alive connection per client thread."""

    def __init__(self, port: int, token: str, spec_json: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}"}
        self.body = spec_json.encode()
        self.lock = threading.Lock()
        self.ids: list[str] = []  # every job the API created, over the whole run
        self.conns: list[http.client.HTTPConnection] = []

    def _conn(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.connect()
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()

    def submitter(self, mine: list[str]) -> Callable[[int], Callable[[int], None]]:
        headers = {**self.headers, "Content-Type": "application/json"}

        def make(_: int) -> Callable[[int], None]:
            conn = self._conn()

            def op(_: int) -> None:
                conn.request("POST", "/api/v1/jobs", body=self.body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 201:
                    raise BenchError(f"POST /api/v1/jobs: {resp.status} {data[:300]!r}")
                doc = json.loads(data)
                if not doc.get("created") or doc.get("state") != JobState.QUEUED.value:
                    raise BenchError(f"POST /api/v1/jobs: not a new queued job: {data[:300]!r}")
                with self.lock:
                    mine.append(doc["id"])

            return op

        return make

    def reader(self, ids: list[str]) -> Callable[[int], Callable[[int], None]]:
        def make(t: int) -> Callable[[int], None]:
            conn = self._conn()

            def op(i: int) -> None:
                jid = ids[(t * 7919 + i) % len(ids)]
                conn.request("GET", f"/api/v1/jobs/{jid}", headers=self.headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200:
                    raise BenchError(f"GET /api/v1/jobs/{jid}: {resp.status} {data[:300]!r}")
                if json.loads(data).get("id") != jid:
                    raise BenchError(f"GET /api/v1/jobs/{jid}: another job's record: {data[:300]!r}")

            return op

        return make


class Direct:
    """The baseline: the same operations on one JobService, threads sharing its Redis pool."""

    def __init__(self, service: JobService, spec: JobSpec) -> None:
        self.service = service
        self.spec = spec
        self.lock = threading.Lock()
        self.ids: list[str] = []

    def submitter(self, mine: list[str]) -> Callable[[int], Callable[[int], None]]:
        def make(_: int) -> Callable[[int], None]:
            def op(_: int) -> None:
                rec, created = self.service.submit(self.spec, user=USER, team=TEAM)
                if not created:
                    raise BenchError(f"JobService.submit: job {rec.id} not created")
                with self.lock:
                    mine.append(rec.id)

            return op

        return make

    def reader(self, ids: list[str]) -> Callable[[int], Callable[[int], None]]:
        def make(t: int) -> Callable[[int], None]:
            def op(i: int) -> None:
                jid = ids[(t * 7919 + i) % len(ids)]
                rec = self.service.get(jid)
                if rec.state is JobState.QUEUED:  # what the endpoint does for a queued job
                    self.service.pending().get(jid)
                if rec.id != jid:
                    raise BenchError(f"JobService.get({jid}): another job's record")

            return op

        return make


def one_round(side: Api | Direct, clients: int, seconds: float) -> tuple[Cell, Cell]:
    """Submit for ``seconds``, then read the jobs just submitted for ``seconds``."""
    mine: list[str] = []
    sub = drive(clients, seconds, side.submitter(mine))
    if isinstance(side, Api):
        side.close()
    if len(mine) != sub.requests:
        raise BenchError(f"{len(mine)} job ids for {sub.requests} submits")
    side.ids.extend(mine)
    st = drive(clients, seconds, side.reader(mine))
    if isinstance(side, Api):
        side.close()
    return sub, st


def check_store(store: JobStore, ids: list[str], what: str) -> list[str]:
    """Every job submitted is in the store, and nothing else is: the problems found (none: all well)."""
    problems = []
    twice = sorted(jid for jid, n in Counter(ids).items() if n > 1)
    if twice:
        # two 201s named one id: the second submit wrote over the first job's record (the store's ids are
        # {name}-{8 hex}, so this many submits of one name can meet the birthday bound)
        problems.append(
            f"{what}: {len(twice)} job id(s) handed out twice, e.g. {twice[0]}: a submitted job was "
            "overwritten"
        )
    count = store.client.zcard(store.keys.index)
    if count != len(ids):
        problems.append(f"{what}: the store holds {count} jobs; {len(ids)} were submitted")
    pipe = store.client.pipeline(transaction=False)
    for jid in ids:
        pipe.exists(store.keys.job(jid))
    missing = [jid for jid, n in zip(ids, pipe.execute(), strict=True) if not n]
    if missing:
        problems.append(f"{what}: {len(missing)} submitted jobs not in the store, e.g. {missing[0]}")
    return problems


def summarise(op: str, clients: int, api: list[Cell], direct: list[Cell]) -> dict[str, Any]:
    def med(cells: list[Cell], f: Callable[[Cell], float]) -> float:
        return statistics.median(f(c) for c in cells)

    api_rps, direct_rps = med(api, lambda c: c.rps), med(direct, lambda c: c.rps)
    out: dict[str, Any] = {
        "op": op,
        "clients": clients,
        "api_rps": round(api_rps, 1),
        "direct_rps": round(direct_rps, 1),
        "ratio": round(api_rps / direct_rps, 3),
        "api_p50_ms": round(med(api, lambda c: c.pct(0.5)), 3),
        "api_p99_ms": round(med(api, lambda c: c.pct(0.99)), 3),
        "direct_p50_ms": round(med(direct, lambda c: c.pct(0.5)), 3),
        "direct_p99_ms": round(med(direct, lambda c: c.pct(0.99)), 3),
        "api_requests": sum(c.requests for c in api),
        "direct_requests": sum(c.requests for c in direct),
    }
    if len(api) > 1:
        for name, cells in (("api", api), ("direct", direct)):
            out[f"{name}_rps_min_max"] = [
                round(min(c.rps for c in cells), 1),
                round(max(c.rps for c in cells), 1),
            ]
        ratios = [a.rps / d.rps for a, d in zip(api, direct, strict=True)]
        out["ratio_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return out


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    redis_proc = server = None
    try:
        rport, aport = _free_port(), _free_port()
        redis_proc = start_redis(tmp, rport)
        url = f"redis://127.0.0.1:{rport}/0"
        client = connect(url)
        api_store, direct_store = JobStore(client, prefix=API_PREFIX), JobStore(client, prefix=DIRECT_PREFIX)
        _, token = UserStore(client, api_store.keys).add(USER, team=TEAM)
        train = write_manifest(tmp / "train.json")
        val = write_manifest(tmp / "val.json")
        spec = parse_spec(spec_dict(train, val, f"file://{tmp / 'ckpt'}"))
        server = start_server(url, aport, args.workers, tmp / "server.log")

        api = Api(aport, token, spec.to_json())
        direct = Direct(JobService(direct_store), spec)
        for side in (api, direct):  # warm both paths up: imports, pools, first requests
            warm: list[str] = []
            drive(2, 0.3, side.submitter(warm))
            if isinstance(side, Api):
                side.close()
            side.ids.extend(warm)

        cells: dict[tuple[str, int, str], list[Cell]] = {}
        for _ in range(args.repeat):
            for n in args.clients:
                # API then baseline, round by round: a drift of the machine's load touches both alike
                for name, side in (("api", api), ("direct", direct)):
                    sub, st = one_round(side, n, args.seconds)
                    cells.setdefault(("submit", n, name), []).append(sub)
                    cells.setdefault(("status", n, name), []).append(st)
        problems = check_store(api_store, api.ids, "API") + check_store(direct_store, direct.ids, "baseline")
        results = [
            summarise(op, n, cells[(op, n, "api")], cells[(op, n, "direct")])
            for n in args.clients
            for op in ("submit", "status")
        ]
        cpus = os.cpu_count() or 1
        return {
            "bench": "api",
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
            + f", {cpus} CPUs, Linux {platform.release()}, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "server_workers": args.workers,
            "seconds_per_cell": args.seconds,
            "repeat": args.repeat,
            "redis": "local redis-server, AOF everysec, no RDB",
            "baseline": "JobService.submit (manifest check included) / JobService.get + pending() for a "
            "queued job, from threads sharing one redis-py pool",
            "figures": "median over repeats; *_min_max the spread" if args.repeat > 1 else "one run per cell",
            "note": NOTE.format(cpus=cpus),
            "jobs_checked": {"api": len(api.ids), "direct": len(direct.ids)},
            "results": results,
            **({"check_failed": problems} if problems else {}),
        }
    finally:
        stop(server, group=True)
        stop(redis_proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per cell (one op, one concurrency)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each cell; the median is reported")
    ap.add_argument("--workers", type=int, default=1, help="uvicorn workers of the server")
    ap.add_argument("--clients", default="1,8,32", help="concurrencies, comma-separated")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.seconds <= 0 or args.repeat < 1 or args.workers < 1 or not args.clients or min(args.clients) < 1:
        raise SystemExit("--seconds must be positive; --repeat, --workers and --clients at least 1")
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        try:
            out = run(args, Path(tmp))
        except BenchError as err:
            raise SystemExit(f"bench/api.py: {err}") from None
    print(json.dumps(out, indent=1))
    if out.get("check_failed"):  # the figures stand, but the store lost jobs: fail the run
        raise SystemExit("bench/api.py: " + "; ".join(out["check_failed"]))


if __name__ == "__main__":
    main()
