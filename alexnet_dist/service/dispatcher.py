"""The dispatcher: takes queued jobs that fit the cluster and runs each as a Ray Job, then follows it.

One instance is active at a time, through a Redis lock holding a random token with a TTL that the holder
renews every pass; a second instance waits and takes over within one TTL when the first dies. Every job
change it makes carries the token (see queue.py), so a dispatcher that lost the lock changes nothing.

A launch is two steps, each safe to repeat: claim the job (QUEUED -> LAUNCHING, atomic), then submit the
Ray Job under the submission id ``{job id}-{attempt}``, which Ray accepts once. A dispatcher that dies
between the two leaves a LAUNCHING job that the next one finds on start and submits; a duplicate id
means it was launched already. So a crash loses no job and launches none twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from alexnet_dist.errors import ClusterError, QueueError
from alexnet_dist.service.store import JobRecord, JobState, JobStore
from alexnet_dist.settings import Settings

__all__ = [
    "Demand",
    "Dispatcher",
    "LaunchStatus",
    "Launcher",
    "RayJobsLauncher",
    "default_entrypoint",
    "fits",
    "job_env",
]

log = logging.getLogger(__name__)

_LIVE = ("PENDING", "RUNNING")
_RESTOP_AFTER_S = 30.0  # a stop request is repeated only if the Ray Job still runs this long after it

# Renew only when the lock is still ours; release likewise (never delete another holder's lock).
_RENEW = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@dataclass(frozen=True)
class LaunchStatus:
    state: str  # Ray's JobStatus: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED
    message: str = ""


class Launcher(Protocol):
    """What the dispatcher needs from the cluster; :class:`RayJobsLauncher` is the real one."""

    def submit(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> None: ...
    def status(self, submission_id: str) -> LaunchStatus | None: ...  # None: the cluster never saw it
    def statuses(self) -> dict[str, LaunchStatus]: ...  # every submission the cluster knows
    def stop(self, submission_id: str) -> None: ...
    def logs(self, submission_id: str) -> str: ...
    def nodes(self) -> list[dict[str, float]]: ...  # total resources of each alive node


def _use_cluster_token() -> None:
    """Send the local cluster's auth token, as ``ray.init(address="auto")`` and ``ray start`` do.

    Ray 2.60 turns token auth on for clusters started with ``ray start --head``, but its
    ``JobSubmissionClient`` sends the token (``~/.ray/auth_token``, ``RAY_AUTH_TOKEN``) only when
    ``RAY_AUTH_MODE=token``; without it every call is refused as "Missing authentication token".
    An explicit ``RAY_AUTH_MODE`` (e.g. ``disabled``) is respected; Ray does the reading.
    """
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token auth
        return
    quiet = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its "token authentication is enabled" warning is no news to a client
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


class RayJobsLauncher:
    """Ray Jobs through the dashboard's REST API (``JobSubmissionClient``)."""

    def __init__(self, dashboard_url: str) -> None:
        from ray.job_submission import JobSubmissionClient

        _use_cluster_token()
        self.url = dashboard_url
        try:
            self._client = JobSubmissionClient(dashboard_url)
        except (ConnectionError, RuntimeError, OSError) as err:
            raise ClusterError(
                f"{dashboard_url}: Ray dashboard unreachable ({type(err).__name__}); check "
                "ALEXNET_DIST_RAY_DASHBOARD and that the Ray head runs with the dashboard (ray[default])"
            ) from None

    def _fail(self, what: str, err: Exception) -> ClusterError:
        text = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        return ClusterError(f"{what}: Ray refused or is unreachable ({text}); check {self.url}")

    def submit(self, submission_id: str, entrypoint: str, env: dict[str, str]) -> None:
        try:
            self._client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env}
            )
        except Exception as err:
            if "already exists" in str(err):  # launched before: the submission id makes launching once
                log.info("Ray job %s: already submitted", submission_id)
                return
            raise self._fail(f"Ray job {submission_id}", err) from None

    def status(self, submission_id: str) -> LaunchStatus | None:
        try:
            info = self._client.get_job_info(submission_id)
        except Exception as err:
            if "does not exist" in str(err):
                return None
            raise self._fail(f"Ray job {submission_id}", err) from None
        return LaunchStatus(str(info.status.value), info.message or "")

    def statuses(self) -> dict[str, LaunchStatus]:
        try:
            jobs = self._client.list_jobs()
        except Exception as err:
            raise self._fail("Ray jobs", err) from None
        return {
            j.submission_id: LaunchStatus(str(j.status.value), j.message or "")
            for j in jobs
            if j.submission_id
        }

    def stop(self, submission_id: str) -> None:
        try:
            self._client.stop_job(submission_id)
        except Exception as err:
            if "does not exist" not in str(err):
                raise self._fail(f"Ray job {submission_id}", err) from None

    def logs(self, submission_id: str) -> str:
        try:
            return self._client.get_job_logs(submission_id)
        except Exception as err:
            raise self._fail(f"Ray job {submission_id}", err) from None

    def nodes(self) -> list[dict[str, float]]:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.url, filters=[("state", "=", "ALIVE")])
        except Exception as err:
            raise self._fail("Ray nodes", err) from None
        return [dict(n.resources_total) for n in nodes]


@dataclass(frozen=True)
class Demand:
    """What a job holds while it runs: ``workers`` bundles of (CPU, GPU), each on one node."""

    workers: int
    cpus: float
    gpus: float

    @classmethod
    def of(cls, record: JobRecord) -> Demand:
        s = record.spec.scaling
        return cls(workers=s.workers, cpus=s.cpus_per_worker, gpus=float(s.gpus_per_worker))


def _place(free: list[list[float]], d: Demand) -> bool:
    """First-fit each worker onto a node (a worker's GPU pair must share a node); updates ``free``."""
    for _ in range(d.workers):
        for node in free:
            if node[0] >= d.cpus - 1e-9 and node[1] >= d.gpus - 1e-9:
                node[0] -= d.cpus
                node[1] -= d.gpus
                break
        else:
            return False
    return True


def fits(nodes: list[dict[str, float]], running: Iterable[Demand], candidate: Demand) -> bool:
    """Whether ``candidate`` fits once the jobs already running are placed on the nodes' totals.

    Counting from totals minus our own jobs (not Ray's momentary free resources) keeps a job that was just
    launched, and has not yet reserved its workers, from being counted as free room.
    """
    free = [[n.get("CPU", 0.0), n.get("GPU", 0.0)] for n in nodes]
    for d in running:
        _place(free, d)  # a job that no longer fits (cluster shrank) takes what it can
    return _place(free, candidate)


def default_entrypoint(job_id: str, attempt: int) -> str:
    return f"alexnet-dist run-job {job_id} --attempt {attempt}"


def job_env(settings: Settings) -> dict[str, str]:
    """Environment of the Ray Job's driver: what `run-job` needs to find Redis, the store and S3."""
    env = {
        "ALEXNET_DIST_REDIS_URL": settings.redis_url,
        "ALEXNET_DIST_REDIS_PREFIX": settings.redis_prefix,
        "ALEXNET_DIST_STORAGE": settings.storage_root,
    }
    if settings.s3_endpoint_url:
        env["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.aws_region:
        env["AWS_REGION"] = settings.aws_region
    return env


class Dispatcher:
    def __init__(
        self,
        queue: JobStore,
        launcher: Launcher,
        *,
        env: dict[str, str] | None = None,
        entrypoint: Callable[[str, int], str] = default_entrypoint,
        interval_s: float = 1.0,
        lock_ttl_s: float = 10.0,
        scan: int = 100,
    ) -> None:
        self.queue = queue
        self.launcher = launcher
        self.env = dict(env or {})
        self.entrypoint = entrypoint
        self.interval_s = interval_s
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.scan = scan  # queued jobs looked at per pass when searching for one that fits
        self.token = uuid.uuid4().hex
        self.launches = 0  # Ray Job submissions made by this instance
        self._stopped: dict[str, float] = {}  # submission id -> when this instance last asked Ray to stop it
        client = queue.client
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    # -- the lock --------------------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Take the lock, or renew it if ours; False while another dispatcher holds it."""
        key = self.queue.keys.dispatcher_lock
        try:
            if self._renew(keys=[key], args=[self.token, self.lock_ttl_ms]):
                return True
            return bool(self.queue.client.set(key, self.token, nx=True, px=self.lock_ttl_ms))
        except Exception as err:
            raise QueueError(f"dispatcher lock: Redis error ({err}); check ALEXNET_DIST_REDIS_URL") from None

    def release(self) -> None:
        self._release(keys=[self.queue.keys.dispatcher_lock], args=[self.token])

    # -- one pass --------------------------------------------------------------------------------------

    def reconcile(self) -> None:
        """On taking the lock: settle jobs whose Ray state and Redis state disagree after a crash."""
        known = self.launcher.statuses()
        for rec in self.queue.queued(limit=10_000):
            st = known.get(rec.submission_id)
            if st is not None and st.state in _LIVE:  # launched, then the record went back (e.g. lost write)
                msg = f"Ray job {rec.submission_id} found running; adopted"
                self.queue.transition(rec, JobState.RUNNING, message=msg, lock_token=self.token)
        self.follow(known)

    def follow(self, known: dict[str, LaunchStatus] | None = None) -> None:
        """Bring every LAUNCHING/RUNNING job in line with its Ray Job."""
        active = self.queue.active()
        for rec in active:
            if known is not None:
                st = known.get(rec.submission_id)
            else:
                st = self.launcher.status(rec.submission_id)
            self._settle(rec, st)
        ids = {r.submission_id for r in active}
        self._stopped = {sid: t for sid, t in self._stopped.items() if sid in ids}

    def _settle(self, rec: JobRecord, st: LaunchStatus | None) -> None:
        q, token, sid = self.queue, self.token, rec.submission_id
        if rec.state is JobState.LAUNCHING:
            if st is None:  # claimed but never submitted (a dispatcher died in between): submit now
                if rec.cancel_requested:
                    q.transition(rec, JobState.CANCELLED, message="cancelled before launch", lock_token=token)
                    return
                self._submit(rec)
                return
            if not q.transition(rec, JobState.RUNNING, message=f"Ray job {sid} found", lock_token=token):
                return
            rec = q.get(rec.id)
        if st is None:
            self._failed(rec, f"Ray job {sid} not found on the cluster")
        elif st.state in _LIVE:
            if rec.cancel_requested:
                self._stop(rec.id, sid)
        elif st.state == "SUCCEEDED":
            q.transition(rec, JobState.SUCCEEDED, message="finished", lock_token=token)
        elif st.state == "STOPPED":
            why = "cancelled" if rec.cancel_requested else f"Ray job {sid} stopped outside the service"
            q.transition(rec, JobState.CANCELLED, message=why, lock_token=token)
        else:
            self._failed(rec, f"Ray job {sid} failed: {st.message}".strip())

    def _stop(self, job_id: str, sid: str) -> None:
        # A stopping Ray Job reads RUNNING for a few seconds (SIGTERM, then SIGKILL after Ray's grace
        # period): ask once, and again only if it is still running well after that.
        now = time.monotonic()
        if now - self._stopped.get(sid, -_RESTOP_AFTER_S) < _RESTOP_AFTER_S:
            return
        log.info("job %s: stopping Ray job %s", job_id, sid)
        self.launcher.stop(sid)
        self._stopped[sid] = now

    def _failed(self, rec: JobRecord, why: str) -> None:
        q = self.queue
        if rec.cancel_requested:
            q.transition(rec, JobState.CANCELLED, message=f"cancelled ({why})", lock_token=self.token)
        elif rec.retries_left > 0:
            # Same job id, so the same Ray Train run name: the new attempt resumes from its newest checkpoint.
            msg = f"{why}; retrying as attempt {rec.attempt + 1} ({rec.retries_left - 1} retries left)"
            q.transition(
                rec,
                JobState.QUEUED,
                attempt=rec.attempt + 1,
                message=msg[:500],
                fields={"retries_left": rec.retries_left - 1},
                lock_token=self.token,
            )
        else:
            q.transition(rec, JobState.FAILED, message=why[:500], lock_token=self.token)

    def holds_lock(self) -> bool:
        return self.queue.client.get(self.queue.keys.dispatcher_lock) == self.token

    def _submit(self, rec: JobRecord) -> None:
        sid = rec.submission_id
        if not self.holds_lock():  # paused past the TTL: the new holder launches it (fewer duplicate calls)
            return
        self.launcher.submit(sid, self.entrypoint(rec.id, rec.attempt), self.env)
        self.launches += 1
        log.info("job %s: launched as Ray job %s", rec.id, sid)
        self.queue.transition(
            rec, JobState.RUNNING, message=f"Ray job {sid} submitted", lock_token=self.token
        )

    def launch_ready(self) -> int:
        """Claim and launch the highest-priority queued jobs that fit; returns how many were launched."""
        nodes = self.launcher.nodes()
        running = [Demand.of(r) for r in self.queue.active()]
        launched = 0
        for rec in self.queue.queued(limit=self.scan):
            demand = Demand.of(rec)
            if not fits(nodes, running, demand):
                continue  # a smaller job further down may still fit (backfill)
            if not self.queue.transition(
                rec, JobState.LAUNCHING, message="launching", lock_token=self.token, allowed=[JobState.QUEUED]
            ):
                continue  # cancelled meanwhile, or we lost the lock
            self._submit(self.queue.get(rec.id))
            running.append(demand)
            launched += 1
        return launched

    def step(self) -> None:
        self.follow()
        self.launch_ready()

    # -- the service -----------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Wait for the lock, reconcile, then follow and launch every ``interval_s`` until ``stop`` is set."""
        stop = stop or threading.Event()
        leading = False
        try:
            while not stop.is_set():
                try:
                    if self.acquire():
                        if not leading:
                            log.info("dispatcher %s: active; reconciling", self.token[:8])
                            self.reconcile()
                            leading = True
                        self.step()
                    elif leading:
                        log.warning("dispatcher %s: lost the lock; waiting", self.token[:8])
                        leading = False
                except (ClusterError, QueueError) as err:
                    log.warning("dispatcher: %s; retrying in %.1fs", err, self.interval_s)
                stop.wait(self.interval_s)
        finally:
            if leading:
                try:
                    self.release()
                except Exception:  # shutting down anyway; the TTL frees the lock
                    pass
