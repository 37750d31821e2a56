"""The operations users invoke on jobs: submit, list, get, cancel, resume, result, watch and logs.

One layer that the CLI calls, and the HTTP API will call, so the two cannot drift apart: each operation
validates what it is given, reads or changes the store (every change one of its atomic scripts), and
raises the package's exceptions (:mod:`alexnet_dist.errors`). Nothing here prints or exits; the caller
turns results into output and exceptions into exit codes or HTTP statuses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from alexnet_dist.data.manifest import load_manifest
from alexnet_dist.errors import (
    AlexNetDistError,
    AmbiguousJobError,
    ClusterError,
    ConfigError,
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
    QueueError,
    UnreachableError,
)
from alexnet_dist.events import YieldSignal
from alexnet_dist.service.events import read_events
from alexnet_dist.service.launcher import Launcher
from alexnet_dist.service.store import TERMINAL, JobRecord, JobState, JobStore
from alexnet_dist.spec import JobSpec

log = logging.getLogger(__name__)

__all__ = ["JobService", "check_data", "follow_text", "outcome_error", "wait_for"]

_TERMINAL = frozenset(s.value for s in TERMINAL)


def outcome_error(rec: JobRecord) -> JobFailedError | None:
    """The error that reports a job's unhappy end (FAILED or CANCELLED); None otherwise."""
    if rec.state in (JobState.FAILED, JobState.CANCELLED):
        return JobFailedError(f"job {rec.id}: {rec.state.value}: {rec.message}")
    return None


def wait_for(
    rec: JobRecord, get: Callable[[str], JobRecord], *, timeout_s: float | None, poll_s: float
) -> JobRecord:
    """Poll ``get`` until the job has ended: its record if it SUCCEEDED, else :class:`JobFailedError`;
    :class:`JobNotFinishedError` once ``timeout_s`` has passed (the CLI's and the API client's ``wait``)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while rec.state not in TERMINAL:
        if deadline is not None and time.monotonic() >= deadline:
            raise JobNotFinishedError(
                f"job {rec.id}: still {rec.state.value} after {timeout_s:g} s; wait longer or "
                f"`alexnet-dist watch {rec.id}`"
            )
        time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
        rec = get(rec.id)
    error = outcome_error(rec)
    if error is not None:
        raise error
    return rec


def follow_text(read: Callable[[], str], ended: Callable[[], bool], *, poll_s: float) -> Iterator[str]:
    """A growing text (a Ray Job's log): what is there, then each new part, until ``ended()``; one last
    read after the end so the final lines are not lost. A cluster error before the end is taken as "no
    log yet" (a queued job has no Ray Job)."""
    sent = 0
    while True:
        done = ended()
        try:
            text = read()
        except ClusterError:
            if done:
                raise
            text = ""
        if len(text) > sent:
            yield text[sent:]
            sent = len(text)
        if done:
            return
        time.sleep(poll_s)


def check_data(spec: JobSpec, *, endpoint_url: str | None) -> None:
    """The manifests must exist and name as many classes as the model has outputs."""
    for field in ("train", "val"):
        url = getattr(spec.data, field)
        try:
            manifest = load_manifest(url, endpoint_url=endpoint_url)
        except AlexNetDistError as err:
            raise ConfigError(f"data.{field}: {err}") from None
        if len(manifest.classes) != spec.model.num_classes:
            raise ConfigError(
                f"data.{field}: {url} has {len(manifest.classes)} classes but model.num_classes="
                f"{spec.model.num_classes}; set model.num_classes={len(manifest.classes)}"
            )


class JobService:
    """The operations on one job store.

    ``endpoint_url`` is the S3 endpoint the manifests are read from at submit. ``launcher`` makes the
    cluster client on first use: connecting to Ray is slow, and only :meth:`logs` needs it.
    """

    def __init__(
        self,
        store: JobStore,
        *,
        endpoint_url: str | None = None,
        launcher: Callable[[], Launcher] | None = None,
        watch_block_ms: int = 1000,
        reconnect_s: float = 300.0,
    ) -> None:
        self.store = store
        self.reconnect_s = reconnect_s  # how long watch waits for an unreachable Redis before giving up
        self.endpoint_url = endpoint_url
        self._make_launcher = launcher
        self._launcher: Launcher | None = None
        self.watch_block_ms = watch_block_ms  # longest wait for new events before checking the job's state

    # -- what users do ---------------------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        *,
        priority: int | None = None,
        client_key: str | None = None,
        user: str = "",
        team: str = "",
    ) -> tuple[JobRecord, bool]:
        """Queue a job for ``user`` of ``team`` (the caller's identity, never the spec's); returns (record,
        created). Nothing is queued if the spec's manifests are wrong."""
        check_data(spec, endpoint_url=self.endpoint_url)
        return self.store.submit(spec, priority=priority, client_key=client_key, user=user, team=team)

    def pending(self) -> dict[str, dict[str, Any]]:
        """Why each queued job waits (reason, position, ETAs), as the dispatcher's last pass saw it."""
        return self.store.pending()

    def list(self, state: JobState | None = None, *, limit: int | None = None) -> list[JobRecord]:
        """Jobs in submission order (newest last), optionally only of ``state``, only the newest ``limit``."""
        return self.store.list(state, limit=limit)

    def resolve(self, ref: str, *, visible: Callable[[JobRecord], bool] | None = None) -> JobRecord:
        """The job ``ref`` names: its id, a prefix of one id, or a name only one job has (as ``kubectl``
        and ``docker`` take a unique prefix). ``visible`` limits the candidates (a server's caller may
        not learn other teams' ids from an "ambiguous" message)."""
        try:
            rec = self.store.get(ref)
            if visible is None or visible(rec):
                return rec
        except JobNotFoundError:
            pass
        ids = [i for i in self.store.ids() if i != ref and (i.startswith(ref) or i.rsplit("-", 1)[0] == ref)]
        found = [r for r in self.store.records(ids) if visible is None or visible(r)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise JobNotFoundError(f"job {ref}: not found; check the id with `alexnet-dist list`")
        shown = ", ".join(r.id for r in found[:10]) + (
            f" and {len(found) - 10} more" if len(found) > 10 else ""
        )
        raise AmbiguousJobError(
            f"job {ref}: ambiguous, {len(found)} jobs match ({shown}); give more of the id"
        )

    def get(self, ref: str) -> JobRecord:
        return self.resolve(ref)

    def cancel(self, ref: str) -> JobRecord:
        """Cancel at once if queued; otherwise flag it, and the dispatcher stops its Ray Job."""
        return self.store.cancel(self.resolve(ref).id)

    def resume(self, ref: str) -> JobRecord:
        """Queue a FAILED or CANCELLED job again as a new attempt; it continues from its newest checkpoint."""
        return self.store.resume(self.resolve(ref).id)

    def result(self, ref: str) -> dict[str, Any]:
        """The final result; :class:`JobFailedError` if the job failed or was cancelled,
        :class:`JobNotFinishedError` while it has not ended."""
        rec = self.resolve(ref)
        if rec.state is JobState.SUCCEEDED and rec.result is not None:
            return {"job_id": rec.id, **rec.result}
        raise outcome_error(rec) or JobNotFinishedError(
            f"job {rec.id}: {rec.state.value}, no result yet; follow it with `alexnet-dist watch {rec.id}`"
        )

    def wait(self, ref: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> JobRecord:
        """Block until the job has ended; its record (SUCCEEDED) or :class:`JobFailedError`;
        :class:`JobNotFinishedError` when ``timeout_s`` passes first."""
        return wait_for(self.resolve(ref), self.store.get, timeout_s=timeout_s, poll_s=poll_s)

    def watch(self, ref: str, *, follow: bool = True, after: str = "0-0") -> Iterator[tuple[str, dict]]:
        """The job's events as (stream entry id, event): its stream after ``after``, then, when following,
        new ones until the job has ended. Safe to stop and start again (pass the last id as ``after``).

        An unknown job raises here, before any event. (The HTTP server streams with
        :func:`~alexnet_dist.service.events.follow_events`, its asyncio twin.)
        """
        return self._events(self.resolve(ref).id, follow, after)

    def _events(self, job_id: str, follow: bool, after: str) -> Iterator[tuple[str, dict]]:
        last = after
        state = ""  # of the newest state event seen: a resumed job's stream holds an earlier attempt's end

        def drain(block_ms: int | None) -> Iterator[tuple[str, dict]]:
            nonlocal last, state
            for entry_id, event in read_events(
                self.store.client, self.store.keys, job_id, after=last, block_ms=block_ms
            ):
                last = entry_id
                if event.get("type") == "state":
                    state = str(event.get("state"))
                yield entry_id, event

        yield from drain(None)
        failing_since: float | None = None
        while follow and state not in _TERMINAL:
            try:
                yield from drain(self.watch_block_ms)
                ended = self.store.get(job_id).state in TERMINAL
                failing_since = None
            except (redis.ConnectionError, redis.TimeoutError, UnreachableError) as err:
                # Redis restarting or cut off: wait for it and go on after the last event seen
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > self.reconnect_s:
                    raise UnreachableError(
                        f"job {job_id}: Redis unreachable for {self.reconnect_s:.0f} s ({err}); run "
                        f"`alexnet-dist watch {job_id}` again once it is back"
                    ) from None
                log.warning("job %s: Redis unreachable (%s); following again when it is back", job_id, err)
                time.sleep(1.0)
                continue
            if state not in _TERMINAL and ended:
                yield from drain(None)  # the end's state event is written with the state: read it too
                return

    def logs(self, ref: str, *, attempt: int | None = None) -> str:
        """The driver log of the job's Ray Job for ``attempt`` (default: the current one)."""
        rec = self.resolve(ref)
        return self._cluster().logs(f"{rec.id}-{attempt or rec.attempt}")

    def follow_logs(self, ref: str, *, poll_s: float = 2.0) -> Iterator[str]:
        """The current attempt's log as it grows, until the job has ended."""
        rec = self.resolve(ref)
        return follow_text(
            lambda: self._cluster().logs(rec.submission_id),
            lambda: self.store.get(rec.id).state in TERMINAL,
            poll_s=poll_s,
        )

    def _cluster(self) -> Launcher:
        if self._launcher is None:
            if self._make_launcher is None:
                raise ConfigError("job logs: no cluster to read them from; pass a launcher to JobService")
            self._launcher = self._make_launcher()
        return self._launcher

    # -- what a Ray Job's driver does ------------------------------------------------------------------

    def current_attempt(self, job_id: str, attempt: int) -> JobRecord:
        """The job's record if ``attempt`` is still its current one: a superseded attempt must not train.
        A Ray Job starting while Redis restarts waits for it (up to ``reconnect_s``) rather than fail."""
        rec = _while_unreachable(
            lambda: self.store.get(job_id), f"job {job_id}: record not read yet", within_s=self.reconnect_s
        )
        if rec.attempt != attempt:
            raise QueueError(
                f"job {job_id}: attempt {attempt} is stale (current {rec.attempt}); not running it"
            )
        return rec

    def store_result(self, job_id: str, result: dict[str, Any], *, retry_s: float = 900.0) -> None:
        """Keep the final result in the record and publish it on the results channel. A run's result is
        hours of work: while Redis is unreachable it is tried again (every few seconds, for up to
        ``retry_s``) rather than lost; then :class:`UnreachableError`."""
        _while_unreachable(
            lambda: self.store.store_result(job_id, result),
            f"job {job_id}: result not stored yet",
            within_s=retry_s,
            max_wait_s=15.0,
        )

    def yield_signal(self, job_id: str, redis_url: str) -> YieldSignal:
        """Where the job's run hears that the dispatcher wants its room back (its record's field)."""
        return YieldSignal(redis_url, self.store.keys.job(job_id), "yield_requested")

    def node_lost(self, job_id: str, attempt: int, why: str) -> None:
        """The run of ``attempt`` stopped because a node under it died: the dispatcher queues it again
        without spending a retry."""
        self.store.mark_node_lost(job_id, attempt, why)

    def yielded(self, job_id: str, attempt: int) -> None:
        """The run of ``attempt`` checkpointed and stopped when asked to: the dispatcher queues it again."""
        self.store.mark_yielded(job_id, attempt)


def _while_unreachable(
    call: Callable[[], Any], what: str, *, within_s: float, max_wait_s: float = 1.0
) -> Any:
    """``call()``, tried again while Redis is unreachable: after 1 s, then waits doubling up to
    ``max_wait_s``, for up to ``within_s`` in all; then its :class:`UnreachableError`."""
    deadline = time.monotonic() + within_s
    wait = 1.0
    while True:
        try:
            return call()
        except UnreachableError as err:
            if time.monotonic() + wait > deadline:
                raise
            log.warning("%s (%s); trying again in %.0f s", what, err, wait)
            time.sleep(wait)
            wait = min(wait * 2, max_wait_s)
