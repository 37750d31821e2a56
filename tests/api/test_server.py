"""The HTTP API over real HTTP (`alexnet-dist server`, uvicorn) on a real redis-server: every endpoint,
refused specs that store nothing, Server-Sent Events resumed after a dropped connection, who may read
and change which job, and tokens (none, wrong, revoked; never stored)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from apiserver import ApiServer, start_api_server
from jobspecs import cpu_spec
from proxies import CuttingProxy
from shardkit import write_manifest

from alexnet_dist.api.client import ApiClient
from alexnet_dist.errors import (
    AuthError,
    JobNotFoundError,
    PermissionDeniedError,
    QueueError,
    UnreachableError,
)
from alexnet_dist.service.events import job_publisher, read_events
from alexnet_dist.service.store import JobRecord, JobState, JobStore
from alexnet_dist.spec import JobSpec

CLI = Path(sys.executable).parent / "alexnet-dist"


def call(
    api: ApiServer,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request on a connection of its own; (status, JSON body or text)."""
    parts = urlsplit(api.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=h)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(raw)
    except ValueError:
        return resp.status, raw.decode()


def _toml(train: str, val: str, **extra: str) -> str:
    lines = [
        'name = "api"',
        "seed = 3",
        "[data]",
        f'train = "{train}"',
        f'val = "{val}"',
        "[model]",
        'preset = "small"',
        "num_classes = 10",
        "[scaling]",
        "workers = 1",
        'devices = "cpu"',
    ]
    return "\n".join(lines + [f"{k} = {v}" for k, v in extra.items()]) + "\n"


@pytest.fixture
def manifests(tmp_path: Path) -> tuple[str, str]:
    return write_manifest(tmp_path / "train.json", 10), write_manifest(tmp_path / "val.json", 10)


@pytest.fixture
def spec(manifests: tuple[str, str], tmp_path: Path) -> JobSpec:
    return cpu_spec(*manifests, str(tmp_path / "runs"))


def _snapshot(client: redis.Redis) -> dict[str, Any]:
    """Every key in Redis with its type and contents: what "nothing stored" is checked against."""
    out: dict[str, Any] = {}
    for key in sorted(client.keys("*")):
        kind = client.type(key)
        if kind == "hash":
            out[key] = client.hgetall(key)
        elif kind == "string":
            out[key] = client.get(key)
        elif kind == "zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            out[key] = sorted(client.smembers(key))
        elif kind == "stream":
            out[key] = client.xrange(key)
        else:
            out[key] = kind
    return out


def test_every_endpoint(api: ApiServer, manifests: tuple[str, str]) -> None:
    alice = api.add_user("alice", "vision")
    store = api.store

    status, me = call(api, "GET", "/api/v1/whoami", token=alice)
    assert (status, me["name"], me["team"], me["admin"]) == (200, "alice", "vision", False)
    assert "token_sha256" not in me

    # submit: the spec as TOML; owner and team come from the token
    status, job = call(
        api,
        "POST",
        "/api/v1/jobs?priority=5",
        token=alice,
        body=_toml(*manifests),
        headers={"Content-Type": "application/toml"},
    )
    assert status == 201, job
    assert (job["state"], job["user"], job["team"], job["priority"], job["created"]) == (
        "QUEUED",
        "alice",
        "vision",
        5,
        True,
    )
    jid = job["id"]
    assert store.get(jid).user == "alice" and store.get(jid).spec.model.preset == "small"

    # ... and as JSON, idempotent by client key: the same key returns the first job (200, not 201)
    spec_json = store.get(jid).spec.to_json()
    first, again = (
        call(api, "POST", "/api/v1/jobs?client_key=k1", token=alice, body=spec_json,
             headers={"Content-Type": "application/json"})
        for _ in range(2)
    )  # fmt: skip
    assert (first[0], again[0]) == (201, 200) and first[1]["id"] == again[1]["id"]
    assert again[1]["created"] is False

    # list, with filters; status with the scheduler's reason, position and ETA
    store.store_pending({jid: {"reason": "waiting for 2 CPUs", "position": 1, "eta_start": 1.0e9}}, {}, 0.0)
    status, listing = call(api, "GET", "/api/v1/jobs", token=alice)
    assert status == 200 and [j["id"] for j in listing["jobs"]] == [jid, first[1]["id"]]
    assert listing["jobs"][0]["pending"]["reason"] == "waiting for 2 CPUs"
    assert [j["id"] for j in call(api, "GET", "/api/v1/jobs?limit=1", token=alice)[1]["jobs"]] == [
        first[1]["id"]
    ]
    assert call(api, "GET", "/api/v1/jobs?state=RUNNING", token=alice)[1]["jobs"] == []
    assert len(call(api, "GET", "/api/v1/jobs?user=alice&team=vision", token=alice)[1]["jobs"]) == 2
    assert call(api, "GET", "/api/v1/jobs?user=bob", token=alice)[1]["jobs"] == []
    status, one = call(api, "GET", f"/api/v1/jobs/{jid}", token=alice)
    assert status == 200 and one["pending"]["position"] == 1 and one["spec"]["name"] == "api"
    assert call(api, "GET", "/api/v1/pending", token=alice)[1] == {
        jid: {"reason": "waiting for 2 CPUs", "position": 1, "eta_start": 1.0e9}
    }

    # result: 409 with the CLI's message until the job has succeeded
    status, err = call(api, "GET", f"/api/v1/jobs/{jid}/result", token=alice)
    assert status == 409 and err == {
        "error": f"job {jid}: QUEUED, no result yet; follow it with `alexnet-dist watch {jid}`",
        "kind": "JobNotFinishedError",
    }

    # cancel, then cancel again (409), resume as attempt 2
    status, cancelled = call(api, "POST", f"/api/v1/jobs/{jid}/cancel", token=alice)
    assert (status, cancelled["state"]) == (200, "CANCELLED")
    status, err = call(api, "POST", f"/api/v1/jobs/{jid}/cancel", token=alice)
    assert (status, err["error"]) == (409, f"job {jid}: already CANCELLED; nothing to cancel")
    status, resumed = call(api, "POST", f"/api/v1/jobs/{jid}/resume", token=alice)
    assert (status, resumed["state"], resumed["attempt"]) == (200, "QUEUED", 2)

    # the job runs and succeeds (as the dispatcher and training would write it): the result comes back
    rec = store.get(jid)
    assert store.transition(rec, JobState.LAUNCHING, message="launching")
    assert store.transition(store.get(jid), JobState.RUNNING, message="running")
    store.store_result(jid, {"top1_error": 0.125, "top5_error": 0.0075, "model_url": "file:///m.pt"})
    assert store.transition(store.get(jid), JobState.SUCCEEDED, message="finished")
    status, res = call(api, "GET", f"/api/v1/jobs/{jid}/result", token=alice)
    assert (status, res) == (
        200,
        {"job_id": jid, "top1_error": 0.125, "top5_error": 0.0075, "model_url": "file:///m.pt"},
    )

    # events without following: the whole stream, then `end`
    status, text = call(api, "GET", f"/api/v1/jobs/{jid}/events?follow=false", token=alice)
    states = [json.loads(line[6:])["state"] for line in text.splitlines() if line.startswith('data: {"ty')]
    assert states == ["QUEUED", "CANCELLED", "QUEUED", "LAUNCHING", "RUNNING", "SUCCEEDED"]
    assert text.rstrip().endswith('data: {"state": "SUCCEEDED"}')

    # logs: no Ray cluster behind this server, so a clean 503 naming what to check
    status, err = call(api, "GET", f"/api/v1/jobs/{jid}/logs", token=alice)
    assert status == 503 and err["kind"] == "ClusterError", err
    assert "Ray dashboard unreachable" in err["error"] and "ALEXNET_DIST_RAY_DASHBOARD" in err["error"]

    # the OpenAPI docs list every operation
    assert call(api, "GET", "/docs")[0] == 200
    paths = call(api, "GET", "/openapi.json")[1]["paths"]
    for path in (
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/events",
        "/api/v1/jobs/{job_id}/cancel",
        "/api/v1/jobs/{job_id}/resume",
        "/api/v1/jobs/{job_id}/result",
        "/api/v1/jobs/{job_id}/logs",
        "/api/v1/whoami",
    ):
        assert path in paths, path
    assert call(api, "GET", "/healthz")[1] == {"ok": True}


def test_a_refused_spec_stores_nothing(api: ApiServer, manifests: tuple[str, str], tmp_path: Path) -> None:
    alice = api.add_user("alice", "vision")
    client = redis.Redis.from_url(api.redis_url, decode_responses=True)
    before = _snapshot(client)
    wrong_classes = write_manifest(tmp_path / "five.json", 5)
    toml = {"Content-Type": "application/toml"}
    cases = [
        (_toml(*manifests).replace("[data]", "[data"), toml, "spec: not valid TOML"),
        (
            _toml(*manifests) + '[extra]\nuser = "mallory"\n',
            toml,
            "spec: extra: Extra inputs are not permitted",
        ),
        (
            _toml(*manifests, epochs="-1").replace("epochs", "[train]\nepochs"),
            toml,
            "spec: train.epochs: Input should be greater than or equal to 1",
        ),
        (
            _toml(str(tmp_path / "none.json"), manifests[1]),
            toml,
            f"data.train: {tmp_path / 'none.json'}: not found",
        ),
        (
            _toml(wrong_classes, manifests[1]),
            toml,
            f"data.train: {wrong_classes} has 5 classes but model.num_classes=10",
        ),
        ('["a list"]', {"Content-Type": "application/json"}, "spec: a spec is a JSON object, not list"),
        (b"\x89PNG\r\n\x1a\n\x00\xff", toml, "spec: not UTF-8 text"),
        ("x" * (1 << 20 | 1), toml, "spec: 1048577 bytes"),
    ]
    for body, headers, message in cases:
        status, err = call(api, "POST", "/api/v1/jobs", token=alice, body=body, headers=headers)
        assert status == 400 and err["kind"] == "ConfigError", (message, err)
        assert err["error"].startswith(message), (message, err)
        assert "\n" not in err["error"]
    status, err = call(api, "POST", "/api/v1/jobs?priority=1e99", token=alice, body=_toml(*manifests))
    assert status == 422  # FastAPI's own check of the query
    assert _snapshot(client) == before


def test_who_may_read_and_change_which_job(api: ApiServer, spec: JobSpec) -> None:
    tokens = {
        n: api.add_user(n, t, admin=n == "root")
        for n, t in (("a1", "vision"), ("a2", "vision"), ("b1", "speech"), ("root", "ops"))
    }
    store = api.store
    job_a1, _ = store.submit(spec, user="a1", team="vision")
    job_b1, _ = store.submit(spec, user="b1", team="speech")

    def ids(who: str, query: str = "") -> list[str]:
        return [j["id"] for j in call(api, "GET", f"/api/v1/jobs{query}", token=tokens[who])[1]["jobs"]]

    assert ids("a1") == ids("a2") == [job_a1.id]  # their team's jobs only
    assert ids("b1") == [job_b1.id]
    assert ids("root") == [job_a1.id, job_b1.id]
    assert ids("a1", "?team=speech") == []  # a filter never widens what a user may read

    # another team's job: 404, the same answer as for a job that does not exist (ids do not leak)
    missing = call(api, "GET", "/api/v1/jobs/nope-00000000", token=tokens["b1"])
    for path in (
        f"/api/v1/jobs/{job_a1.id}",
        f"/api/v1/jobs/{job_a1.id}/events",
        f"/api/v1/jobs/{job_a1.id}/result",
    ):
        status, err = call(api, "GET", path, token=tokens["b1"])
        assert (
            status == 404
            and err["error"] == f"job {job_a1.id}: not found; check the id with `alexnet-dist list`"
        )
    assert missing[0] == 404
    assert call(api, "POST", f"/api/v1/jobs/{job_a1.id}/cancel", token=tokens["b1"])[0] == 404

    # a teammate reads it but may not cancel or resume it: 403, and nothing changed
    assert call(api, "GET", f"/api/v1/jobs/{job_a1.id}", token=tokens["a2"])[0] == 200
    status, err = call(api, "POST", f"/api/v1/jobs/{job_a1.id}/cancel", token=tokens["a2"])
    assert status == 403 and err == {
        "error": f"job {job_a1.id}: owned by a1; only its owner or an admin can change it",
        "kind": "PermissionDeniedError",
    }
    assert store.get(job_a1.id).state is JobState.QUEUED
    # the owner may; an admin may change anyone's
    assert (
        call(api, "POST", f"/api/v1/jobs/{job_a1.id}/cancel", token=tokens["a1"])[1]["state"] == "CANCELLED"
    )
    assert call(api, "POST", f"/api/v1/jobs/{job_a1.id}/resume", token=tokens["a2"])[0] == 403
    assert call(api, "POST", f"/api/v1/jobs/{job_a1.id}/resume", token=tokens["root"])[1]["attempt"] == 2
    assert (
        call(api, "POST", f"/api/v1/jobs/{job_b1.id}/cancel", token=tokens["root"])[1]["state"] == "CANCELLED"
    )

    # a job submitted through the API belongs to the token's user, whatever the request says
    status, job = call(
        api,
        "POST",
        "/api/v1/jobs?user=a1&team=vision",
        token=tokens["b1"],
        body=spec.to_json(),
        headers={"Content-Type": "application/json"},
    )
    assert status == 201 and (job["user"], job["team"]) == ("b1", "speech")
    # a cookie-authenticated change (the dashboard's) needs the CSRF token
    status, err = call(
        api,
        "POST",
        f"/api/v1/jobs/{job['id']}/cancel",
        headers={"Cookie": f"alexnet_dist_token={tokens['b1']}"},
    )
    assert status == 403 and err["error"].startswith("CSRF token missing or wrong")


def test_no_token_a_wrong_one_and_a_revoked_one(api: ApiServer) -> None:
    env = {"ALEXNET_DIST_REDIS_URL": api.redis_url}
    out = subprocess.run(
        [str(CLI), "admin", "user", "add", "carol", "--team", "vision"],
        env={**api.env(), **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    token = out.strip().splitlines()[-1]
    assert token.startswith("adt_") and len(token) > 40
    assert call(api, "GET", "/api/v1/whoami", token=token)[0] == 200

    status, err = call(api, "GET", "/api/v1/jobs")
    assert status == 401 and err["kind"] == "AuthError" and err["error"].startswith("no token")
    assert call(api, "GET", "/api/v1/jobs", token=token[:-2] + "xx")[0] == 401
    assert call(api, "GET", "/api/v1/jobs", headers={"Authorization": f"Basic {token}"})[0] == 401

    # the store holds no token: not in any key, field or value of the whole Redis
    dump = json.dumps(_snapshot(redis.Redis.from_url(api.redis_url, decode_responses=True)), default=repr)
    assert "carol" in dump and token not in dump and token.removeprefix("adt_") not in dump
    listed = subprocess.run(
        [str(CLI), "admin", "user", "list"],
        env={**api.env(), **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "carol" in listed and "live" in listed and token not in listed

    subprocess.run(
        [str(CLI), "admin", "user", "revoke", "carol"],
        env={**api.env(), **env},
        check=True,
        capture_output=True,
    )
    status, err = call(api, "GET", "/api/v1/whoami", token=token)
    assert status == 401 and err["error"] == "token: not valid (wrong or revoked); ask an admin for a new one"
    # a new token for the same user works, the revoked one still does not
    fresh = api.add_user("carol", "vision")
    assert call(api, "GET", "/api/v1/whoami", token=fresh)[0] == 200
    assert call(api, "GET", "/api/v1/whoami", token=token)[0] == 401


def _running(api: ApiServer, spec: JobSpec) -> tuple[str, JobStore, JobRecord]:
    """alice's token and a job of hers the dispatcher launched (QUEUED -> LAUNCHING -> RUNNING)."""
    token = api.add_user("alice", "vision")
    store = api.store
    rec, _ = store.submit(spec, user="alice", team="vision")
    assert store.transition(rec, JobState.LAUNCHING, message="launching")
    assert store.transition(store.get(rec.id), JobState.RUNNING, message="running")
    return token, store, store.get(rec.id)


def _publish_steps(api: ApiServer, job_id: str, n: int) -> None:
    pub = job_publisher(api.redis_url, api.store.keys, job_id)
    for i in range(n):
        pub.publish({"type": "step", "epoch": 1, "step": i + 1, "loss": 2.0 - i / n})
    pub.close()


def _read_sse(resp: http.client.HTTPResponse, stop_after: int | None = None) -> list[tuple[str, str, dict]]:
    frames: list[tuple[str, str, dict]] = []
    kind, entry_id, data = "message", "", ""
    while line := resp.readline():
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("id: "):
            entry_id = line[4:]
        elif line.startswith("data: "):
            data = line[6:]
        elif not line and data:
            frames.append((kind, entry_id, json.loads(data)))
            kind, entry_id, data = "message", "", ""
            if kind == "end" or (stop_after and len(frames) == stop_after):
                break
        if frames and frames[-1][0] == "end":
            break
    return frames


def test_events_in_order_and_resumed_after_a_dropped_connection(api: ApiServer, spec: JobSpec) -> None:
    token, store, rec = _running(api, spec)
    _publish_steps(api, rec.id, 40)

    parts = urlsplit(api.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", f"/api/v1/jobs/{rec.id}/events", headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    got = _read_sse(resp, stop_after=25)
    conn.close()  # the connection drops mid-stream

    def finish() -> None:
        time.sleep(0.5)
        _publish_steps(api, rec.id, 10)
        assert store.transition(store.get(rec.id), JobState.SUCCEEDED, message="finished")

    t = threading.Thread(target=finish)
    t.start()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request(
        "GET",
        f"/api/v1/jobs/{rec.id}/events",
        headers={"Authorization": f"Bearer {token}", "Last-Event-ID": got[-1][1]},
    )
    rest = _read_sse(conn.getresponse())
    t.join()
    conn.close()

    assert rest[-1][0] == "end" and rest[-1][2] == {"state": "SUCCEEDED"}
    seen = got + rest[:-1]
    stream = list(read_events(store.client, store.keys, rec.id))
    assert [(i, e) for _, i, e in seen] == stream  # every event once, in order: none lost, none repeated
    assert len(stream) == 3 + 40 + 10 + 1
    assert [k for k, _, _ in seen] == [e["type"] for _, e in stream]

    # A malformed Last-Event-ID is refused in one line.
    status, err = call(
        api, "GET", f"/api/v1/jobs/{rec.id}/events", token=token, headers={"Last-Event-ID": "x"}
    )
    assert status == 400 and err["error"].startswith("Last-Event-ID 'x': not a stream entry id")


def test_the_client_watches_through_a_connection_cut_mid_stream(api: ApiServer, spec: JobSpec) -> None:
    """The CLI's client reconnects with Last-Event-ID when the network drops its event stream."""
    token, store, rec = _running(api, spec)
    _publish_steps(api, rec.id, 60)
    proxy = CuttingProxy(api.url, cut_after=3000, cuts=2)  # two cuts, each a few events into a stream
    try:
        client = ApiClient(proxy.endpoint_url, token)
        threading.Timer(
            2.0, lambda: store.transition(store.get(rec.id), JobState.SUCCEEDED, message="done")
        ).start()
        seen = list(client.watch(rec.id))
    finally:
        proxy.close()
    assert proxy.cuts == 2
    assert seen == list(read_events(store.client, store.keys, rec.id))
    assert [e["state"] for _, e in seen if e["type"] == "state"] == [
        "QUEUED",
        "LAUNCHING",
        "RUNNING",
        "SUCCEEDED",
    ]


def test_the_client_raises_the_servers_errors_as_the_packages(api: ApiServer, spec: JobSpec) -> None:
    alice, bob = api.add_user("alice", "vision"), api.add_user("bob", "vision")
    rec, _ = api.store.submit(spec, user="alice", team="vision")
    with pytest.raises(JobNotFoundError, match=r"^job nope: not found"):
        ApiClient(api.url, alice).get("nope")
    with pytest.raises(JobNotFoundError):
        ApiClient(api.url, alice).watch("nope")  # at once, before any event
    with pytest.raises(PermissionDeniedError, match="owned by alice"):
        ApiClient(api.url, bob).cancel(rec.id)
    with pytest.raises(AuthError, match="not valid"):
        ApiClient(api.url, "adt_wrong").list()
    with pytest.raises(QueueError, match="no result yet"):
        ApiClient(api.url, alice).result(rec.id)
    back = ApiClient(api.url, alice).get(rec.id)
    assert back == api.store.get(rec.id)  # the record survives the trip through JSON field for field


def test_tls_with_a_certificate_and_key(
    api_server: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    proc, server = start_api_server(
        api_server.redis_url,
        tmp_path / "tls.log",
        args=("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)),
    )
    try:
        token = api_server.add_user("tls-user", "vision")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts the test's own certificate
        https = server.url.replace("http://", "https://")
        assert ApiClient(https, token).whoami()["name"] == "tls-user"
        with pytest.raises(UnreachableError, match="API server unreachable"):  # plain HTTP is not served
            ApiClient(server.url, token, timeout=5).whoami()
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_hundred_watchers_at_once_all_get_each_event(api: ApiServer, spec: JobSpec) -> None:
    """More watchers than the server has worker threads (40): streams wait on Redis in the event loop,
    so the server still answers other requests and every watcher gets each new event."""
    token = api.add_user("alice", "vision")
    store = api.store
    rec, _ = store.submit(spec, user="alice", team="vision")
    assert store.transition(rec, JobState.LAUNCHING, message="launching")
    parts = urlsplit(api.url)
    conns = []
    for _ in range(100):
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        conn.request("GET", f"/api/v1/jobs/{rec.id}/events", headers={"Authorization": f"Bearer {token}"})
        conns.append(conn.getresponse())
    try:
        for resp in conns:  # each has replayed the stream so far: QUEUED, LAUNCHING
            assert [e["state"] for _, _, e in _read_sse(resp, stop_after=2)] == ["QUEUED", "LAUNCHING"]
        assert call(api, "GET", f"/api/v1/jobs/{rec.id}", token=token)[0] == 200
        assert store.transition(store.get(rec.id), JobState.RUNNING, message="running")
        for resp in conns:
            assert [e["state"] for _, _, e in _read_sse(resp, stop_after=1)] == ["RUNNING"]
    finally:
        for resp in conns:
            resp.close()
