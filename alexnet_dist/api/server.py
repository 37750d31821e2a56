"""The HTTP API over the job store: every user operation the CLI has, for holders of a token.

The server keeps no state of its own (records, users and events all live in Redis), so several can run
behind one load balancer. Every operation is :class:`JobService`'s, so the API and the CLI validate and
refuse alike, and its errors come back as ``{"error": <the CLI's one-line message>, "kind": <class>}``
with a status a client can act on:

| status | when                                                                                  |
| ------ | ------------------------------------------------------------------------------------- |
| 400    | a refused spec or argument (ConfigError); nothing is stored                           |
| 401    | no token, a wrong one or a revoked one                                                |
| 403    | the token may read the job but not change it (another user's job of one's own team),  |
|        | or a dashboard change without its CSRF token                                          |
| 404    | no such job, or one of another team: the answer does not tell them apart, so a token   |
|        | cannot be used to learn which job ids other teams have                                |
| 409    | the job's state refuses the operation (cancel an ended job, result of a running one)  |
| 503    | Redis (or the Ray cluster, for logs) is unreachable                                    |

Events (``GET /api/v1/jobs/{id}/events``) are Server-Sent Events from the job's Redis stream: each has
the stream entry id as its ``id``, so a client that reconnects with ``Last-Event-ID`` gets every later
event once, none lost and none repeated. The stream ends with an ``end`` event once the job has ended.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis
import redis.asyncio
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from alexnet_dist.api.auth import CSRF_HEADER, Caller, caller, check_csrf
from alexnet_dist.errors import (
    AlexNetDistError,
    AuthError,
    ClusterError,
    ConfigError,
    JobNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    UnreachableError,
)
from alexnet_dist.service.connection import connect
from alexnet_dist.service.events import follow_events
from alexnet_dist.service.keys import Keys
from alexnet_dist.service.launcher import Launcher
from alexnet_dist.service.operations import JobService
from alexnet_dist.service.store import JobRecord, JobState, JobStore
from alexnet_dist.service.users import UserStore, can_change, can_read
from alexnet_dist.settings import Settings
from alexnet_dist.spec import parse_spec_text

__all__ = ["create_app", "status_of"]

log = logging.getLogger(__name__)

API = "/api/v1"
MAX_SPEC_BYTES = 1 << 20  # a spec is a few hundred bytes; anything near this is a mistake


def status_of(err: AlexNetDistError) -> int:
    """The HTTP status of one of the package's errors (the table in the module docstring)."""
    for kind, status in (
        (PermissionDeniedError, 403),
        (AuthError, 401),
        (JobNotFoundError, 404),
        (UnreachableError, 503),
        (ClusterError, 503),
        (ConfigError, 400),
        (NotFoundError, 404),
    ):
        if isinstance(err, kind):
            return status
    return 409


def _error(err: AlexNetDistError) -> JSONResponse:
    status = status_of(err)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": str(err), "kind": type(err).__name__}, status_code=status, headers=headers)


def _not_found(job_id: str) -> JobNotFoundError:
    # the same words as the store's, for a job that does not exist and for one the caller may not read
    return JobNotFoundError(f"job {job_id}: not found; check the id with `alexnet-dist list`")


def _view(rec: JobRecord, pending: dict[str, Any] | None, *, spec: bool = True) -> dict[str, Any]:
    return {**rec.to_dict(spec=spec), "pending": pending}


def create_app(
    settings: Settings,
    *,
    launcher: Callable[[], Launcher] | None = None,
    watch_block_ms: int = 1000,
) -> FastAPI:
    """The application: the API under ``/api/v1``, the dashboard at ``/``, OpenAPI docs at ``/docs``."""
    client = connect(settings.redis_url)
    store = JobStore(client, prefix=settings.redis_prefix)
    # Event streams are served on an asyncio client: a watcher waits on Redis without holding a thread.
    aclient = redis.asyncio.Redis.from_url(
        settings.redis_url, decode_responses=True, socket_connect_timeout=5
    )
    if launcher is None:

        def launcher() -> Launcher:
            from alexnet_dist.service.launcher import RayJobsLauncher

            return RayJobsLauncher(settings.ray_dashboard_url)

    service = JobService(
        store, endpoint_url=settings.s3_endpoint_url, launcher=launcher, watch_block_ms=watch_block_ms
    )
    users = UserStore(client, store.keys)

    app = FastAPI(
        title="alexnet-dist",
        summary="Train the original AlexNet as a distributed service",
        description="Every request carries `Authorization: Bearer <token>` (`alexnet-dist admin user add`).",
        version=_version(),
    )
    app.state.service = service
    app.state.users = users
    app.state.settings = settings

    @app.exception_handler(AlexNetDistError)
    async def _package_error(_: Request, err: AlexNetDistError) -> JSONResponse:
        return _error(err)

    def who(request: Request) -> Caller:
        return caller(request, users)

    def readable(ref: str, me: Caller) -> JobRecord:
        """The job ``ref`` names (id, unique prefix or name) among those the caller may read."""
        try:
            return service.resolve(ref, visible=lambda r: can_read(me.user, r.user, r.team))
        except JobNotFoundError:
            raise _not_found(ref) from None

    def changeable(ref: str, me: Caller, request: Request) -> JobRecord:
        rec = readable(ref, me)
        if not can_change(me.user, rec.user):
            raise PermissionDeniedError(
                f"job {rec.id}: owned by {rec.user}; only its owner or an admin can change it"
            )
        check_csrf(me, request.headers.get(CSRF_HEADER))
        return rec

    api = APIRouter(prefix=API)

    @api.get("/whoami", summary="The token's user")
    def whoami(me: Caller = Depends(who)) -> dict[str, Any]:
        return me.user.public()

    @api.post("/jobs", status_code=201, summary="Submit a job (spec as TOML or JSON)")
    async def submit(
        request: Request,
        priority: int | None = Query(None, description="overrides the spec's priority; higher runs first"),
        client_key: str | None = Query(None, description="idempotency key: the same key submits once"),
        me: Caller = Depends(who),
    ) -> JSONResponse:
        check_csrf(me, request.headers.get(CSRF_HEADER))
        body = await request.body()
        if len(body) > MAX_SPEC_BYTES:
            raise ConfigError(f"spec: {len(body)} bytes; a spec is at most {MAX_SPEC_BYTES} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError("spec: not UTF-8 text; send the spec as TOML or JSON") from None
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        spec = parse_spec_text(text, json_format=kind.endswith("json"), source="spec")
        # the manifests' check reads storage and the store's script waits on Redis: off the event loop
        rec, created = await run_in_threadpool(
            service.submit,
            spec,
            priority=priority,
            client_key=client_key,
            user=me.user.name,
            team=me.user.team,
        )
        return JSONResponse({**_view(rec, None), "created": created}, status_code=201 if created else 200)

    @api.get("/jobs", summary="Jobs in submission order (newest last)")
    def list_jobs(
        state: JobState | None = None,
        user: str | None = None,
        team: str | None = None,
        limit: int | None = Query(None, ge=1),
        me: Caller = Depends(who),
    ) -> dict[str, Any]:
        pending = service.pending()
        records = [
            r
            for r in service.list(state)
            if can_read(me.user, r.user, r.team)
            and (user is None or r.user == user)
            and (team is None or r.team == team)
        ]
        if limit:
            records = records[-limit:]
        return {"jobs": [_view(r, pending.get(r.id)) for r in records]}

    @api.get("/pending", summary="Why each queued job the caller may read waits")
    def pending(me: Caller = Depends(who)) -> dict[str, Any]:
        waiting = service.pending()
        if me.user.admin:
            return waiting
        mine = {r.id for r in service.list(JobState.QUEUED) if can_read(me.user, r.user, r.team)}
        return {k: v for k, v in waiting.items() if k in mine}

    @api.get("/jobs/{job_id}", summary="One job's record, with its place in the queue if queued")
    def status(job_id: str, me: Caller = Depends(who)) -> dict[str, Any]:
        rec = readable(job_id, me)
        waits = service.pending().get(rec.id) if rec.state is JobState.QUEUED else None
        return _view(rec, waits)

    @api.get("/jobs/{job_id}/events", summary="The job's events as Server-Sent Events (Last-Event-ID)")
    def events(
        job_id: str,
        request: Request,
        follow: bool = True,
        after: str | None = Query(None, description="a stream entry id; Last-Event-ID wins if both"),
        me: Caller = Depends(who),
    ) -> StreamingResponse:
        job_id = readable(job_id, me).id
        start = request.headers.get("last-event-id") or after or "0-0"
        if not _entry_id(start):
            raise ConfigError(f"Last-Event-ID {start!r}: not a stream entry id (like 1700000000000-0)")
        stream = follow_events(
            aclient, store.keys, job_id, after=start, follow=follow, block_ms=watch_block_ms
        )
        return StreamingResponse(
            _sse(job_id, stream, aclient, store.keys),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},  # no proxy buffering
        )

    @api.post("/jobs/{job_id}/cancel", summary="Cancel a job (its owner or an admin)")
    def cancel(job_id: str, request: Request, me: Caller = Depends(who)) -> dict[str, Any]:
        return _view(service.cancel(changeable(job_id, me, request).id), None)

    @api.post("/jobs/{job_id}/resume", summary="Queue a FAILED or CANCELLED job again (owner or admin)")
    def resume(job_id: str, request: Request, me: Caller = Depends(who)) -> dict[str, Any]:
        return _view(service.resume(changeable(job_id, me, request).id), None)

    @api.get("/jobs/{job_id}/result", summary="The final top-1 and top-5 error (409 until SUCCEEDED)")
    def result(job_id: str, me: Caller = Depends(who)) -> dict[str, Any]:
        return service.result(readable(job_id, me).id)

    @api.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, summary="The Ray Job's driver log")
    def logs(
        job_id: str,
        attempt: int | None = Query(None, ge=1),
        tail: int | None = Query(None, ge=1, description="only the last N lines"),
        me: Caller = Depends(who),
    ) -> str:
        text = service.logs(readable(job_id, me).id, attempt=attempt)
        if tail:
            text = "".join(text.splitlines(keepends=True)[-tail:])
        return text

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, Any]:
        try:
            client.ping()
        except Exception as err:  # noqa: BLE001  the health check reports, never raises
            return JSONResponse({"ok": False, "redis": str(err)}, status_code=503)
        return {"ok": True}

    app.include_router(api)
    from alexnet_dist.api.dashboard import dashboard_router

    app.include_router(dashboard_router(who, readable))
    return app


def _entry_id(value: str) -> bool:
    ms, sep, seq = value.partition("-")
    return bool(sep) and ms.isdigit() and seq.isdigit()


async def _sse(
    job_id: str, stream: AsyncIterator[tuple[str, dict]], aclient: redis.asyncio.Redis, keys: Keys
) -> AsyncIterator[str]:
    """The events as SSE frames; a heartbeat comment while waiting; an ``end`` event once it ended."""
    yield "retry: 1000\n\n"  # browsers' EventSource reconnects after a second, with Last-Event-ID
    try:
        async for entry_id, event in stream:
            if not entry_id:
                yield ": keep-alive\n\n"
                continue
            kind = str(event.get("type", "message")).replace("\n", " ")
            yield f"id: {entry_id}\nevent: {kind}\ndata: {json.dumps(event)}\n\n"
        state = await aclient.hget(keys.job(job_id), "state")
        yield f"event: end\ndata: {json.dumps({'state': state})}\n\n"
    except (redis.ConnectionError, redis.TimeoutError) as err:  # Redis went away: say so; clients reconnect
        message = f"Redis unreachable ({err}); the stream resumes when it is back"
        yield f"event: error\ndata: {json.dumps({'error': message, 'kind': 'UnreachableError'})}\n\n"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alexnet-dist")
    except PackageNotFoundError:
        return "0+unknown"


def app_from_env() -> FastAPI:
    """The application from the environment's settings (uvicorn's factory, one per server process)."""
    from alexnet_dist.settings import load_settings

    return create_app(load_settings())
