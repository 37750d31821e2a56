"""The HTTP API's client: :class:`JobService`'s user operations, over the network.

The CLI uses it in place of the service when ``ALEXNET_DIST_SERVER`` is set, so its commands print the
same output and exit with the same codes either way: the server's errors come back as the package's own
exceptions, with the server's one-line messages. It needs only the standard library (no FastAPI, no
torch, no Ray), so a command through the API starts as fast as Python does.

Every request is bounded in time (``timeout``); an unreachable server is one :class:`UnreachableError`
line naming it. ``watch`` follows a job's Server-Sent Events and, when the connection drops, reconnects
with ``Last-Event-ID``, so it sees every event exactly once.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from alexnet_dist import errors
from alexnet_dist.errors import AlexNetDistError, AuthError, ConfigError, QueueError, UnreachableError
from alexnet_dist.service.operations import follow_text, wait_for
from alexnet_dist.service.store import TERMINAL, JobRecord, JobState
from alexnet_dist.spec import JobSpec

__all__ = ["ApiClient"]

_KINDS = {
    name: cls
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, AlexNetDistError)
}
_HEALTHY_S = 10.0  # a stream that stood this long before dropping counts as recovered
_BY_STATUS = {400: ConfigError, 401: AuthError, 403: errors.PermissionDeniedError,
              404: errors.JobNotFoundError, 503: UnreachableError}  # fmt: skip


class ApiClient:
    """Calls one server with one token. ``reconnect_s``: how long ``watch`` keeps trying to reconnect."""

    def __init__(
        self, url: str, token: str | None, *, timeout: float = 30.0, reconnect_s: float = 120.0
    ) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"ALEXNET_DIST_SERVER={url!r}: not an http:// or https:// URL")
        if not token:
            raise AuthError(
                f"{url}: no token; set ALEXNET_DIST_TOKEN or run `alexnet-dist login --server {url}`"
            )
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.reconnect_s = reconnect_s

    # -- JobService's operations -----------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        *,
        priority: int | None = None,
        client_key: str | None = None,
        user: str = "",  # noqa: ARG002  the server takes the owner and team from the token
        team: str = "",  # noqa: ARG002
    ) -> tuple[JobRecord, bool]:
        query = {k: v for k, v in (("priority", priority), ("client_key", client_key)) if v is not None}
        body = self._json("POST", "/jobs", query=query, body=spec.to_json().encode(),
                          content_type="application/json")  # fmt: skip
        return _record(body), bool(body.get("created"))

    def pending(self) -> dict[str, dict[str, Any]]:
        return self._json("GET", "/pending")

    def list(self, state: JobState | None = None, *, limit: int | None = None) -> list[JobRecord]:
        query = {k: v for k, v in (("state", state and state.value), ("limit", limit)) if v}
        return [_record(r) for r in self._json("GET", "/jobs", query=query)["jobs"]]

    def get(self, job_id: str) -> JobRecord:
        return _record(self._json("GET", f"/jobs/{_quote(job_id)}"))

    def cancel(self, job_id: str) -> JobRecord:
        return _record(self._json("POST", f"/jobs/{_quote(job_id)}/cancel"))

    def resume(self, job_id: str) -> JobRecord:
        return _record(self._json("POST", f"/jobs/{_quote(job_id)}/resume"))

    def result(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/jobs/{_quote(job_id)}/result")

    def logs(self, job_id: str, *, attempt: int | None = None) -> str:
        query = {"attempt": attempt} if attempt else {}
        with self._open("GET", f"/jobs/{_quote(job_id)}/logs", query=query) as resp:
            return resp.read().decode("utf-8", errors="replace")

    def follow_logs(self, job_id: str, *, poll_s: float = 2.0) -> Iterator[str]:
        rec = self.get(job_id)
        return follow_text(
            lambda: self.logs(rec.id), lambda: self.get(rec.id).state in TERMINAL, poll_s=poll_s
        )

    def wait(self, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> JobRecord:
        return wait_for(self.get(job_id), self.get, timeout_s=timeout_s, poll_s=poll_s)

    def whoami(self) -> dict[str, Any]:
        return self._json("GET", "/whoami")

    def watch(self, job_id: str, *, follow: bool = True, after: str = "0-0") -> Iterator[tuple[str, dict]]:
        """The job's events as (stream entry id, event), as :meth:`JobService.watch` yields them.

        An unknown job raises here, before any event; a dropped connection is reopened from the last
        event seen, for up to ``reconnect_s`` of failed tries in a row.
        """
        first = self._events(job_id, follow, after)  # opens now: a bad id or token raises here
        return self._follow(job_id, follow, after, first)

    def _follow(self, job_id: str, follow: bool, after: str, resp: Any) -> Iterator[tuple[str, dict]]:
        last, failing_since = after, None
        while True:
            opened = time.monotonic()
            try:
                with resp:
                    for kind, entry_id, data in _frames(resp):
                        if kind == "end":
                            return
                        if kind == "error":  # the server lost Redis: reconnect, as after a drop
                            if not follow:
                                raise UnreachableError(json.loads(data).get("error", data))
                            failing_since = failing_since or time.monotonic()
                            break
                        if entry_id:
                            last, failing_since = entry_id, None
                            yield entry_id, json.loads(data)
                if not follow:
                    return
            except (OSError, http.client.HTTPException, json.JSONDecodeError):
                pass  # dropped mid-stream: reconnect below from the last event seen
            if failing_since is not None and time.monotonic() - opened > _HEALTHY_S:
                failing_since = None  # that stream stood long enough: this drop is a new outage
            failing_since = failing_since or time.monotonic()
            while True:
                if time.monotonic() - failing_since > self.reconnect_s:
                    raise UnreachableError(
                        f"{self.url}: lost the event stream of {job_id} for {self.reconnect_s:.0f} s; "
                        f"run `alexnet-dist watch {job_id}` again"
                    )
                time.sleep(1.0)
                try:
                    resp = self._events(job_id, follow, last)
                    break
                except UnreachableError:
                    continue

    def _events(self, job_id: str, follow: bool, after: str) -> Any:
        headers = {"Accept": "text/event-stream", "Last-Event-ID": after}
        query = {} if follow else {"follow": "false"}
        return self._open("GET", f"/jobs/{_quote(job_id)}/events", query=query, headers=headers)

    # -- plumbing --------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._open(method, path, **kwargs) as resp:
            return json.loads(resp.read())

    def _open(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, Any] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        url = f"{self.url}/api/v1{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, data=body, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise _error(err) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, socket.timeout | TimeoutError):
                reason = f"no answer in {self.timeout:.0f} s"
            raise UnreachableError(
                f"{self.url}: API server unreachable ({reason}); check ALEXNET_DIST_SERVER and that "
                "`alexnet-dist server` is running"
            ) from None


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def _record(d: dict[str, Any]) -> JobRecord:
    return JobRecord.from_dict(d)


def _error(err: urllib.error.HTTPError) -> AlexNetDistError:
    """The server's error as the package's exception, with its message."""
    try:
        body = json.loads(err.read() or b"{}")
    except ValueError:
        body = {}
    message = body.get("error") if isinstance(body, dict) else None
    if not isinstance(message, str):  # not one of ours (FastAPI's own validation error, a proxy's page)
        detail = body.get("detail") if isinstance(body, dict) else None
        message = f"{err.url}: HTTP {err.code} {err.reason}" + (f" ({json.dumps(detail)})" if detail else "")
    kind = _KINDS.get(str(body.get("kind")) if isinstance(body, dict) else "")
    if kind is None:
        kind = _BY_STATUS.get(err.code, QueueError)
    return kind(message)


def _frames(resp: Any) -> Iterator[tuple[str, str, str]]:
    """SSE frames as (event type, id, data); comments (heartbeats) and ``retry:`` lines skipped."""
    kind, entry_id, data = "message", "", []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield kind, entry_id, "\n".join(data)
            kind, entry_id, data = "message", "", []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "id":
            entry_id = value
        elif field == "data":
            data.append(value)
