"""The dispatcher: launches the queued jobs its policy chooses, each as a Ray Job, then follows them.

One instance is active at a time, through a Redis lock holding a random token with a TTL that the holder
renews every pass; a second instance waits and takes over within one TTL when the first dies. Every job
change it makes carries the token (see store.py), so a dispatcher that lost the lock changes nothing.

Which jobs to launch is the policy's choice (:mod:`alexnet_dist.service.policy`, a pure function); this
module gathers the policy's inputs and carries out its decisions. A launch is two steps, each safe to
repeat: claim the job (QUEUED -> LAUNCHING, atomic), then submit the Ray Job under the submission id
``{job id}-{attempt}``, which Ray accepts once. A dispatcher that dies between the two leaves a LAUNCHING
job that the next one finds on start and submits; a duplicate id means it was launched already. So a
crash loses no job and launches none twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable

import redis

from alexnet_dist.data.manifest import load_manifest
from alexnet_dist.errors import AlexNetDistError, ClusterError, QueueError
from alexnet_dist.service.launcher import Launcher, LaunchStatus, default_entrypoint
from alexnet_dist.service.policy import (
    Demand,
    Job,
    Launch,
    Policy,
    PolicyConfig,
    Preempt,
    estimate_seconds,
    plan,
)
from alexnet_dist.service.resources import Quota, add_usage, decay_usage
from alexnet_dist.service.store import JobRecord, JobState, JobStore
from alexnet_dist.spec import JobSpec

__all__ = ["Dispatcher"]

log = logging.getLogger(__name__)

# A stopping Ray Job still reads RUNNING until Ray's grace period after SIGTERM ends: ask Ray to stop it
# once, and again only if it still runs this long after.
_RESTOP_AFTER_S = 30.0
_MAX_LOST = 5  # a job lost with the cluster this many times (head restarts, nodes lost) fails

# Renew only when the lock is still ours; release likewise (never delete another holder's lock).
_RENEW = """if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0"""
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def throughput_key(spec: JobSpec) -> str:
    """Runs whose steps take the same time: the same network, scaling and device kind."""
    s = spec.scaling
    return f"{spec.model.preset}:{s.workers}x{s.devices}:{spec.train.batch_size}"


def _job(rec: JobRecord, remaining: float | None = None, est: float | None = None) -> Job:
    """The record as the policy sees it."""
    spec = rec.spec
    return Job(
        rec.id,
        Demand.of(spec),
        rec.priority,
        team=rec.team,
        preemptible=spec.scheduling.preemptible,
        started=rec.started or None,
        est_seconds=est,
        remaining_seconds=remaining,
        borrowed=rec.borrowed,
        stopping=bool(rec.yield_requested or rec.cancel_requested),
    )


class Dispatcher:
    """Each pass (:meth:`step`): follow the launched jobs, then launch what ``policy`` chooses.

    ``entrypoint(job id, attempt)`` is the Ray Job's command line and ``env`` its environment
    (:func:`~alexnet_dist.service.launcher.job_env`).
    """

    def __init__(
        self,
        store: JobStore,
        launcher: Launcher,
        *,
        policy: Policy = plan,
        env: dict[str, str] | None = None,
        entrypoint: Callable[[str, int], str] = default_entrypoint,
        interval_s: float = 1.0,
        lock_ttl_s: float = 10.0,
        scan: int = 100,
        yield_timeout_s: float = 300.0,
        quotas: dict[str, Quota] | None = None,
        usage_half_life_s: float = 6 * 3600.0,
        min_run_s: float = 600.0,
        endpoint_url: str | None = None,
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.policy = policy
        self.env = dict(env or {})
        self.entrypoint = entrypoint
        self.interval_s = interval_s
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.scan = scan  # queued jobs (from the head of the queue) the policy sees per pass
        self.yield_timeout_s = yield_timeout_s  # a job asked to yield that has not by then is stopped
        self.quotas = dict(quotas or {})
        self.usage_half_life_s = usage_half_life_s
        self.policy_config = PolicyConfig(min_run_seconds=min_run_s)
        self.endpoint_url = endpoint_url  # S3, for the manifests that give a queued job's step count
        self._samples: dict[str, int | None] = {}  # manifest URL -> its samples (read once)
        self.token = uuid.uuid4().hex
        self.launches = 0  # Ray Job submissions made by this instance
        self._stopped: dict[str, float] = {}  # submission id -> when this instance last asked Ray to stop it
        client = store.client
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    # -- the lock --------------------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Take the lock, or renew it if ours; False while another dispatcher holds it."""
        key = self.store.keys.dispatcher_lock
        try:
            if self._renew(keys=[key], args=[self.token, self.lock_ttl_ms]):
                return True
            return bool(self.store.client.set(key, self.token, nx=True, px=self.lock_ttl_ms))
        except Exception as err:
            raise QueueError(f"dispatcher lock: Redis error ({err}); check ALEXNET_DIST_REDIS_URL") from None

    def release(self) -> None:
        self._release(keys=[self.store.keys.dispatcher_lock], args=[self.token])

    def holds_lock(self) -> bool:
        return self.store.client.get(self.store.keys.dispatcher_lock) == self.token

    # -- following launched jobs -----------------------------------------------------------------------

    def reconcile(self) -> None:
        """On taking the lock: settle jobs whose Ray state and Redis state disagree after a crash."""
        known = self.launcher.statuses()
        for rec in self.store.queued(limit=10_000):
            st = known.get(rec.submission_id)
            if st is not None and st.live:  # launched, then the record went back (e.g. a lost write)
                msg = f"Ray job {rec.submission_id} found running; adopted"
                self.store.transition(rec, JobState.RUNNING, message=msg, lock_token=self.token)
        self.follow(known)

    def follow(self, known: dict[str, LaunchStatus] | None = None) -> None:
        """Bring every LAUNCHING/RUNNING job in line with its Ray Job."""
        active = self.store.active()
        for rec in active:
            if known is not None:
                st = known.get(rec.submission_id)
            else:
                st = self.launcher.status(rec.submission_id)
            self._settle(rec, st)
        ids = {r.submission_id for r in active}
        self._stopped = {sid: t for sid, t in self._stopped.items() if sid in ids}

    def _settle(self, rec: JobRecord, st: LaunchStatus | None) -> None:
        q, token, sid = self.store, self.token, rec.submission_id
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
        asked = rec.yield_requested and not rec.cancel_requested  # asked to yield its room to another job
        if st is None:
            if asked:
                q.preempted(rec, lock_token=token, why=f"preempted: Ray job {sid} not found on the cluster")
            else:
                self._lost(rec, f"Ray job {sid} not found on the cluster")
        elif st.live:
            if rec.cancel_requested:
                self._stop(rec.id, sid)
            elif asked and time.time() - rec.yield_requested > self.yield_timeout_s:
                self._stop(rec.id, sid)  # did not yield in time: stopped; resumes from its newest checkpoint
        elif st.state == "SUCCEEDED":
            if rec.yielded:
                q.preempted(rec, lock_token=token, why="preempted: checkpointed and gave its room up")
            else:
                q.transition(rec, JobState.SUCCEEDED, message="finished", lock_token=token)
                self._record_throughput(q.get(rec.id))
        elif st.state == "STOPPED":
            if asked:
                why = f"preempted: stopped after not yielding within {self.yield_timeout_s:g} s"
                q.preempted(rec, lock_token=token, why=why)
            else:
                why = "cancelled" if rec.cancel_requested else f"Ray job {sid} stopped outside the service"
                q.transition(rec, JobState.CANCELLED, message=why, lock_token=token)
        elif rec.node_lost:  # its run lost a node (it said so before exiting): the cluster's fault
            self._lost(rec, f"Ray job {sid}: {rec.node_lost}")
        elif asked:  # died while asked to yield: a preemption, never one of its retries
            q.preempted(rec, lock_token=token, why=f"preempted: Ray job {sid} ended before yielding")
        else:
            self._failed(rec, f"Ray job {sid} failed: {st.message}".strip())

    def _stop(self, job_id: str, sid: str) -> None:
        now = time.monotonic()
        if now - self._stopped.get(sid, -_RESTOP_AFTER_S) < _RESTOP_AFTER_S:
            return
        log.info("job %s: stopping Ray job %s", job_id, sid)
        self.launcher.stop(sid)
        self._stopped[sid] = now

    def _lost(self, rec: JobRecord, why: str) -> None:
        """The attempt was lost with the cluster: its Ray Job vanished (the head restarted, its state was
        lost) or a node under its run died. Not the job's failure, so a new attempt from the newest
        checkpoint, its retries untouched; it waits in the queue until the cluster has room for it. A job
        lost ``_MAX_LOST`` times fails, so a broken cluster cannot loop it for ever."""
        if rec.cancel_requested or rec.lost >= _MAX_LOST:
            self._failed(rec, f"{why} ({rec.lost + 1} times)" if rec.lost else why)
            return
        msg = f"{why}; queued again as attempt {rec.attempt + 1} (not counted as a failure)"
        self.store.transition(
            rec,
            JobState.QUEUED,
            attempt=rec.attempt + 1,
            message=msg[:500],
            fields={"lost": rec.lost + 1, "node_lost": "", "started": 0, "borrowed": 0},
            lock_token=self.token,
        )

    def _failed(self, rec: JobRecord, why: str) -> None:
        q = self.store
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

    # -- launching -------------------------------------------------------------------------------------

    def _submit(self, rec: JobRecord) -> None:
        sid = rec.submission_id
        if not self.holds_lock():  # paused past the TTL: the new holder launches it (fewer duplicate calls)
            return
        self.launcher.submit(sid, self.entrypoint(rec.id, rec.attempt), self.env)
        self.launches += 1
        log.info("job %s: launched as Ray job %s", rec.id, sid)
        msg = f"Ray job {sid} submitted"
        fields = {"started": repr(time.time())}
        self.store.transition(rec, JobState.RUNNING, message=msg, fields=fields, lock_token=self.token)

    def _launch(self, rec: JobRecord, *, borrowed: bool = False) -> bool:
        """Claim the job (QUEUED -> LAUNCHING) and submit it; False if the claim failed."""
        message = "launching on borrowed room" if borrowed else "launching"
        fields = {"borrowed": int(borrowed)}
        if not self.store.transition(
            rec, JobState.LAUNCHING, message=message, fields=fields, lock_token=self.token,
            allowed=[JobState.QUEUED],
        ):  # fmt: skip
            return False  # cancelled meanwhile, or we lost the lock
        self._submit(self.store.get(rec.id))
        return True

    def _usage(self, active: list[JobRecord], now: float) -> dict[str, float]:
        """The teams' device-seconds decayed to ``now``, plus what running jobs used since the last pass."""
        usage, at = self.store.usage()
        elapsed = now - at if at else 0.0
        usage = decay_usage(usage, elapsed, self.usage_half_life_s)
        for rec in active:
            if rec.state is JobState.RUNNING and rec.started:
                used = Demand.of(rec.spec).device_seconds(min(elapsed, now - rec.started))
                usage = add_usage(usage, rec.team, used)
        return usage

    def _record_throughput(self, rec: JobRecord) -> None:
        """A finished run's seconds per step, for the ETAs of later runs like it (a running mean of 4)."""
        result = rec.result or {}
        steps, seconds = result.get("steps"), result.get("train_seconds")
        if not steps or not seconds:
            return
        key, client = throughput_key(rec.spec), self.store.client
        old = client.hget(self.store.keys.throughput, key)
        pace = seconds / steps if old is None else 0.75 * float(old) + 0.25 * seconds / steps
        client.hset(self.store.keys.throughput, key, repr(pace))

    def _steps(self, spec: JobSpec) -> int | None:
        """A run's training steps: epochs x steps an epoch (its manifest's samples / the global batch)."""
        url = spec.data.train
        if url not in self._samples:
            try:
                self._samples[url] = load_manifest(url, endpoint_url=self.endpoint_url).num_samples
            except AlexNetDistError:
                self._samples[url] = None  # no estimate for it; asked again by the next dispatcher only
        samples = self._samples[url]
        if not samples:
            return None
        per_epoch = samples // spec.train.batch_size
        if spec.train.max_steps_per_epoch:
            per_epoch = min(per_epoch, spec.train.max_steps_per_epoch)
        return per_epoch * spec.train.epochs

    def _estimate(self, rec: JobRecord, paces: dict[str, str]) -> float | None:
        """How long a queued job will train: its steps at the pace earlier runs like it measured."""
        spec = rec.spec
        pace = paces.get(throughput_key(spec))
        return estimate_seconds(self._steps(spec), float(pace)) if pace else None

    def _remaining(self, rec: JobRecord, now: float) -> float | None:
        """A running job's time left, from its last step event: the steps left at its measured pace."""
        entries = self.store.client.xrevrange(self.store.keys.events(rec.id), count=20)
        for _, fields in entries:
            event = json.loads(fields.get("data", "{}"))
            if event.get("type") != "step" or not event.get("images_per_s"):
                continue
            per_epoch, epochs = event["steps_per_epoch"], event["epochs"]
            left = per_epoch * epochs - (per_epoch * (event["epoch"] - 1) + event["step"])
            seconds_per_step = rec.spec.train.batch_size / event["images_per_s"]
            return max(0.0, left * seconds_per_step - (now - event.get("time", now)))
        return None

    def launch_ready(self) -> int:
        """Carry out the policy's decisions for this pass (launches, requests to yield), and record why
        each queued job waits; returns how many jobs were claimed and launched."""
        now = time.time()
        cluster = self.launcher.nodes()
        active = self.store.active()
        records = self.store.queued(limit=self.scan)
        usage = self._usage(active, now)
        running = [_job(r, self._remaining(r, now)) for r in active]
        paces = self.store.client.hgetall(self.store.keys.throughput)
        waiting = {r.id: _job(r, est=self._estimate(r, paces)) for r in records}  # in queue order
        by_id = {r.id: r for r in records}
        context = dict(now=now, quotas=self.quotas, usage=usage, config=self.policy_config)
        launched = 0
        replan = True
        result: object = ()
        while replan:
            replan = False
            result = self.policy(cluster, running, list(waiting.values()), **context)
            for decision in result:
                if isinstance(decision, Preempt):
                    try:
                        self.request_yield(decision.job_id, why=f"room for {decision.for_job}")
                    except QueueError as err:
                        log.warning("%s", err)
                    continue
                if not isinstance(decision, Launch):
                    raise TypeError(f"{decision!r}: not a decision this dispatcher carries out")
                job = waiting.pop(decision.job_id)
                if not self._launch(by_id[job.id], borrowed=decision.borrowed):
                    replan = True  # the room the policy gave this job is free after all: plan the rest again
                    break
                running.append(job)
                launched += 1
        pending = {
            job_id: {
                "reason": p.reason,
                "position": p.position,
                "eta_start": p.eta_start,
                "eta_finish": p.eta_finish,
                "why": p.why.value,
            }  # fmt: skip
            for job_id, p in getattr(result, "pending", {}).items()
            if job_id in waiting
        }
        self.store.store_pending(pending, usage, now)
        return launched

    def request_yield(self, job_id: str, *, why: str) -> bool:
        """Ask a running job to checkpoint at its next step boundary and give its room up."""
        rec = self.store.get(job_id)
        if rec.state is not JobState.RUNNING or rec.yield_requested:
            return False
        if not rec.spec.scheduling.preemptible:
            raise QueueError(f"job {job_id}: not preemptible (scheduling.preemptible = false)")
        log.info("job %s: asked to yield (%s)", job_id, why)
        return self.store.request_yield(rec, lock_token=self.token, why=why)

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
                except (ClusterError, QueueError, redis.ConnectionError, redis.TimeoutError) as err:
                    # Redis or Ray away (a restart, a network cut): wait, and take up the work when back
                    log.warning("dispatcher: %s; retrying in %.1fs", err, self.interval_s)
                stop.wait(self.interval_s)
        finally:
            if leading:
                try:
                    self.release()
                except Exception:  # shutting down anyway; the TTL frees the lock
                    pass
