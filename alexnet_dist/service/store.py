"""The job store in Redis: records, states, the priority queue, the index, events and results.

Every state change is one Lua script that compares the current state and attempt and then writes the
record, the queue, the active set and a ``state`` event together. So a change is all-or-nothing, and two
dispatchers racing for one job cannot both move it out of QUEUED. A dispatcher's changes also carry its
lock token, checked in the same script (fencing): a dispatcher that lost the lock can no longer change jobs.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import redis

from alexnet_dist.errors import ConfigError, JobNotFoundError, QueueError, UnreachableError
from alexnet_dist.events import STREAM_MAXLEN, encode_event
from alexnet_dist.service.keys import Keys
from alexnet_dist.spec import JobSpec

__all__ = ["ACTIVE", "TERMINAL", "JobStore", "JobRecord", "JobState", "new_job_id"]


class JobState(str, Enum):
    QUEUED = "QUEUED"  # waiting in the priority queue for room on the cluster
    LAUNCHING = "LAUNCHING"  # taken by the dispatcher; its Ray Job may not be submitted yet
    RUNNING = "RUNNING"  # its Ray Job was submitted (pending or running on the cluster)
    SUCCEEDED = "SUCCEEDED"  # the Ray Job finished; the result is in the record
    FAILED = "FAILED"  # the last attempt failed and no retries were left
    CANCELLED = "CANCELLED"  # cancelled by a user (its Ray Job stopped)
    PREEMPTED = "PREEMPTED"  # yielded its room to another job at a checkpoint; back to QUEUED at once


ACTIVE = frozenset({JobState.LAUNCHING, JobState.RUNNING})
TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
_MAX_PRIORITY = 2**52  # scores are doubles: beyond this, priorities would round together

# KEYS: job, queue, index, seq, client, events, live, changes
# ARGV: job id, use client key ('1'/'0'), queue score, stream maxlen, event JSON, then field/value pairs
# Returns {1, id} when queued, {0, existing id} for a known client key, {-1, ''} if the id is taken.
_SUBMIT = """
if ARGV[2] == '1' then
  local existing = redis.call('GET', KEYS[5])
  if existing then return {0, existing} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {-1, ''} end
local seq = redis.call('INCR', KEYS[4])
local member = string.format('%016d:%s', seq, ARGV[1])
redis.call('HSET', KEYS[1], 'seq', seq, 'queue_member', member, unpack(ARGV, 6))
redis.call('ZADD', KEYS[2], ARGV[3], member)
redis.call('ZADD', KEYS[3], seq, ARGV[1])
if ARGV[2] == '1' then redis.call('SET', KEYS[5], ARGV[1]) end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[5])
redis.call('PUBLISH', KEYS[7], ARGV[5])
redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[4], '*', 'job', KEYS[1], 'data', ARGV[5])
return {1, ARGV[1]}
"""

# KEYS: job, queue, active, events, live, lock, changes
# ARGV: allowed states (' A B '), new state ('' keeps it), expected attempt ('' any), lock token ('' none),
#       queue score, stream maxlen, event JSON ('' none), then field/value pairs
# Returns {1, old state} on success, {0, current state} on a mismatch, {-1, ''} if there is no such job,
# {-2, ''} if the lock token is not the current one.
_TRANSITION = """
if ARGV[4] ~= '' and redis.call('GET', KEYS[6]) ~= ARGV[4] then return {-2, ''} end
local cur = redis.call('HMGET', KEYS[1], 'state', 'attempt', 'queue_member')
if not cur[1] then return {-1, ''} end
if not string.find(ARGV[1], ' ' .. cur[1] .. ' ', 1, true) then return {0, cur[1]} end
if ARGV[3] ~= '' and cur[2] ~= ARGV[3] then return {0, cur[1]} end
if #ARGV > 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 8)) end
local to = ARGV[2]
if to ~= '' then
  redis.call('HSET', KEYS[1], 'state', to)
  if to == 'QUEUED' then redis.call('ZADD', KEYS[2], ARGV[5], cur[3])
  else redis.call('ZREM', KEYS[2], cur[3]) end
  if to == 'LAUNCHING' or to == 'RUNNING' then redis.call('SADD', KEYS[3], KEYS[1])
  else redis.call('SREM', KEYS[3], KEYS[1]) end
end
if ARGV[7] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'data', ARGV[7])
  redis.call('PUBLISH', KEYS[5], ARGV[7])
  redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[6], '*', 'job', KEYS[1], 'data', ARGV[7])
end
return {1, cur[1]}
"""


def new_job_id(name: str) -> str:
    """``{name}-{8 hex}``: readable in ``list`` and unique enough for one service (2^32 per name)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    state: JobState
    attempt: int  # 1 for the first launch; +1 for every retry or resume
    priority: int
    retries_left: int  # relaunches the dispatcher may still make after a failure
    spec_json: str
    created: float  # unix seconds
    updated: float
    seq: int  # submission order
    message: str = ""
    client_key: str = ""
    cancel_requested: bool = False
    result: dict[str, Any] | None = None
    user: str = ""  # who submitted it, and their team (from the submitter's identity)
    team: str = ""
    started: float = 0.0  # unix seconds its current attempt started running (0: not running)
    yield_requested: float = 0.0  # when the dispatcher asked it to yield (0: not asked)
    yielded: bool = False  # its run checkpointed and stopped because it was asked to yield
    preemptions: int = 0  # times it yielded its room (never counted against its retries)
    borrowed: bool = False  # this attempt was launched past its team's quota (the first to be preempted)
    lost: int = 0  # times an attempt was lost with the cluster (head restart, node lost): never failures
    node_lost: str = ""  # set by the attempt's run when a node under it died: why (the dispatcher requeues)

    @property
    def spec(self) -> JobSpec:
        return JobSpec.from_json(self.spec_json)

    @property
    def submission_id(self) -> str:
        """The Ray Job submission id of the current attempt: Ray refuses a second job with the same id."""
        return f"{self.id}-{self.attempt}"

    def to_dict(self, *, spec: bool = True) -> dict[str, Any]:
        """The record as JSON-able values; ``spec=False`` leaves the spec out (for listings)."""
        out = asdict(self)
        out["state"] = self.state.value
        spec_json = out.pop("spec_json")
        if spec:
            out["spec"] = json.loads(spec_json)
        out["submission_id"] = self.submission_id
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobRecord:
        """The inverse of :meth:`to_dict` (with the spec): a record that came back as JSON (the API's)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"spec_json", "state"}
        kept = {k: v for k, v in d.items() if k in names}
        spec_json = JobSpec.model_validate(d["spec"]).to_json()  # the store's own form of it
        return cls(**kept, state=JobState(d["state"]), spec_json=spec_json)

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> JobRecord:
        return cls(
            id=h["id"],
            name=h["name"],
            state=JobState(h["state"]),
            attempt=int(h["attempt"]),
            priority=int(h["priority"]),
            retries_left=int(h["retries_left"]),
            spec_json=h["spec"],
            created=float(h["created"]),
            updated=float(h["updated"]),
            seq=int(h.get("seq", 0)),
            message=h.get("message", ""),
            client_key=h.get("client_key", ""),
            cancel_requested=h.get("cancel_requested") == "1",
            result=json.loads(h["result"]) if h.get("result") else None,
            user=h.get("user", ""),
            team=h.get("team", ""),
            started=float(h.get("started", 0.0)),
            yield_requested=float(h.get("yield_requested", 0.0)),
            yielded=h.get("yielded") == "1",
            preemptions=int(h.get("preemptions", 0)),
            borrowed=h.get("borrowed") == "1",
            lost=int(h.get("lost", 0)),
            node_lost=h.get("node_lost", ""),
        )


def _pairs(fields: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in fields.items():
        out += [k, v if isinstance(v, str) else json.dumps(v) if isinstance(v, dict) else str(v)]
    return out


class JobStore:
    """Jobs in one Redis under one key prefix. ``client`` must decode responses (see connection.connect)."""

    def __init__(self, client: redis.Redis, *, prefix: str = "alexnet:") -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._submit = client.register_script(_SUBMIT)
        self._transition = client.register_script(_TRANSITION)

    # -- writing ---------------------------------------------------------------------------------------

    def submit(
        self,
        spec: JobSpec,
        *,
        priority: int | None = None,
        client_key: str | None = None,
        job_id: str | None = None,
        user: str = "",
        team: str = "",
    ) -> tuple[JobRecord, bool]:
        """Queue a job; returns (record, created). The same ``client_key`` again returns the first job."""
        prio = spec.priority if priority is None else priority
        if abs(prio) > _MAX_PRIORITY:
            raise ConfigError(f"priority={prio}: out of range; use a value within +-{_MAX_PRIORITY}")
        if client_key is not None and not client_key.strip():
            raise ConfigError("client key: empty; pass a non-empty key or none")
        for _ in range(8):  # a random id may collide with an older job's (one in 2^32 per name)
            created, got = self._submit_once(
                spec, prio, client_key, job_id or new_job_id(spec.name), user, team
            )
            if created != -1:
                return self.get(got), bool(created)
            if job_id is not None:
                raise ConfigError(f"job {job_id}: the id is taken; submit without an id or choose another")
        raise QueueError(f"job {spec.name}: no free id after 8 tries; try again")

    def _submit_once(
        self, spec: JobSpec, prio: int, client_key: str | None, jid: str, user: str, team: str
    ) -> tuple[int, str]:
        now = time.time()
        fields = {
            "id": jid,
            "name": spec.name,
            "state": JobState.QUEUED.value,
            "attempt": 1,
            "priority": prio,
            "retries_left": spec.retries,
            "spec": spec.to_json(),
            "created": repr(now),
            "updated": repr(now),
            "message": "queued",
            "client_key": client_key or "",
            "cancel_requested": 0,
            "user": user,
            "team": team,
        }
        event = encode_event({"type": "state", "state": "QUEUED", "attempt": 1, "message": "queued"}, now=now)
        k = self.keys
        keys = [k.job(jid), k.queue, k.index, k.seq, k.client(client_key or ""), k.events(jid), k.live(jid),
                k.changes]  # fmt: skip
        args = [jid, "1" if client_key else "0", -prio, STREAM_MAXLEN, event, *_pairs(fields)]
        return self._run(self._submit, keys, args)

    def transition(
        self,
        record: JobRecord,
        to: JobState | None,
        *,
        message: str,
        allowed: Iterable[JobState] | None = None,
        attempt: int | None = None,
        fields: dict[str, Any] | None = None,
        lock_token: str | None = None,
    ) -> bool:
        """Move ``record`` to ``to`` if it is still in its state and attempt (or in ``allowed``).

        ``attempt`` sets a new attempt number. Returns False when the job changed meanwhile or the lock
        token is stale; the caller re-reads and decides again.
        """
        states = {record.state} if allowed is None else set(allowed)
        new_attempt = record.attempt if attempt is None else attempt
        now = time.time()
        extra = {"updated": repr(now), "message": message, "attempt": new_attempt, **(fields or {})}
        event = ""
        if to is not None:
            ev = {"type": "state", "state": to.value, "attempt": new_attempt, "message": message}
            event = encode_event(ev, now=now)
        k = self.keys
        keys = [
            k.job(record.id),
            k.queue,
            k.active,
            k.events(record.id),
            k.live(record.id),
            k.dispatcher_lock,
            k.changes,
        ]
        allowed_arg = " " + " ".join(s.value for s in states) + " "
        args = [
            allowed_arg,
            "" if to is None else to.value,
            str(record.attempt),
            lock_token or "",
            -record.priority,
            STREAM_MAXLEN,
            event,
            *_pairs(extra),
        ]
        code, _ = self._run(self._transition, keys, args)
        if code == -1:
            raise JobNotFoundError(f"job {record.id}: not found; check the id with `alexnet-dist list`")
        return code == 1

    def cancel(self, job_id: str) -> JobRecord:
        """Cancel now if queued; otherwise flag it for the dispatcher, which stops the Ray Job."""
        for _ in range(20):  # optimistic: re-read when the dispatcher moved the job meanwhile
            rec = self.get(job_id)
            if rec.state in TERMINAL:
                raise QueueError(f"job {job_id}: already {rec.state.value}; nothing to cancel")
            if rec.state is JobState.QUEUED:
                ok = self.transition(rec, JobState.CANCELLED, message="cancelled while queued")
            else:
                ok = self.transition(rec, None, message="cancel requested", fields={"cancel_requested": 1})
            if ok:
                return self.get(job_id)
        raise QueueError(f"job {job_id}: kept changing while cancelling; try again")

    def resume(self, job_id: str) -> JobRecord:
        """Queue a FAILED or CANCELLED job again as a new attempt; training resumes from its checkpoint."""
        rec = self.get(job_id)
        if rec.state not in (JobState.FAILED, JobState.CANCELLED):
            raise QueueError(f"job {job_id}: {rec.state.value}; only FAILED or CANCELLED jobs can be resumed")
        ok = self.transition(
            rec,
            JobState.QUEUED,
            attempt=rec.attempt + 1,
            message=f"resumed as attempt {rec.attempt + 1}",
            fields={"cancel_requested": 0, "retries_left": rec.spec.retries},
        )
        if not ok:
            raise QueueError(f"job {job_id}: changed while resuming; check `alexnet-dist status {job_id}`")
        return self.get(job_id)

    def request_yield(self, record: JobRecord, *, lock_token: str, why: str) -> bool:
        """Ask a RUNNING job to checkpoint at its next step boundary and give its room up (the dispatcher's
        preemption); False when it is no longer running this attempt or the token is stale."""
        fields = {"yield_requested": repr(time.time())}
        message = f"asked to yield: {why}"[:500]
        return self.transition(record, None, message=message, fields=fields, lock_token=lock_token)

    def mark_yielded(self, job_id: str, attempt: int) -> bool:
        """Record that ``attempt``'s run checkpointed and stopped because it was asked to yield."""
        rec = self.get(job_id)
        if rec.attempt != attempt or rec.state is not JobState.RUNNING:
            return False
        return self.transition(rec, None, message="yielded at a checkpoint", fields={"yielded": 1})

    def mark_node_lost(self, job_id: str, attempt: int, why: str) -> bool:
        """Record that ``attempt``'s run stopped because a Ray node under it died (``why``, one line)."""
        rec = self.get(job_id)
        if rec.attempt != attempt or rec.state is not JobState.RUNNING:
            return False
        return self.transition(rec, None, message=why[:500], fields={"node_lost": why[:500]})

    def preempted(self, record: JobRecord, *, lock_token: str, why: str) -> bool:
        """RUNNING -> PREEMPTED -> QUEUED at the job's original place in its priority, as a new attempt
        that resumes from the newest checkpoint; its retries are untouched."""
        if not self.transition(record, JobState.PREEMPTED, message=why[:500], lock_token=lock_token):
            return False
        rec = self.get(record.id)
        return self.transition(
            rec,
            JobState.QUEUED,
            attempt=rec.attempt + 1,
            message=f"queued again after preemption as attempt {rec.attempt + 1}",
            fields={
                "yield_requested": 0,
                "yielded": 0,
                "started": 0,
                "borrowed": 0,
                "preemptions": rec.preemptions + 1,
            },  # fmt: skip
            lock_token=lock_token,
        )

    def pending(self) -> dict[str, dict[str, Any]]:
        """Why each queued job waits, as the dispatcher's last pass saw it: reason, position, ETAs."""
        raw = self._call(self.client.hgetall, self.keys.pending)
        return {job_id: json.loads(value) for job_id, value in raw.items()}

    def usage(self) -> tuple[dict[str, float], float]:
        """Each team's decayed device-seconds, and when they were last decayed (0: never)."""
        raw = self._call(self.client.hgetall, self.keys.usage)
        at = float(raw.pop(".at", 0.0))
        return {team: float(v) for team, v in raw.items()}, at

    def store_pending(self, pending: dict[str, dict[str, Any]], usage: dict[str, float], at: float) -> None:
        """The pass's waiting reasons and the teams' usage, replaced together."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.pending, self.keys.usage)
        if pending:
            pipe.hset(self.keys.pending, mapping={k: json.dumps(v) for k, v in pending.items()})
        pipe.hset(self.keys.usage, mapping={**{k: repr(v) for k, v in usage.items()}, ".at": repr(at)})
        self._call(pipe.execute)

    def store_result(self, job_id: str, result: dict[str, Any]) -> None:
        """Keep the final result in the record and publish it on the results channel."""
        rec = self.get(job_id)
        payload = {"job_id": job_id, "name": rec.name, "attempt": rec.attempt, **result}
        data = json.dumps(payload)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(
                self.keys.job(job_id), mapping={"result": json.dumps(result), "updated": repr(time.time())}
            )
            pipe.publish(self.keys.results, data)
            change = {"job": self.keys.job(job_id), "data": encode_event({"type": "result", **payload})}
            pipe.xadd(self.keys.changes, change, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise UnreachableError(f"job {job_id}: result not stored, Redis unreachable ({err})") from None

    # -- reading ---------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        h = self._call(self.client.hgetall, self.keys.job(job_id))
        if not h:
            raise JobNotFoundError(f"job {job_id}: not found; check the id with `alexnet-dist list`")
        return JobRecord.from_hash(h)

    def records(self, ids: list[str]) -> list[JobRecord]:
        """The records of ``ids`` that exist, in that order (one round trip)."""
        pipe = self.client.pipeline(transaction=False)
        for jid in ids:
            pipe.hgetall(self.keys.job(jid))
        hashes = self._call(pipe.execute)
        return [JobRecord.from_hash(h) for h in hashes if h]

    def ids(self) -> list[str]:
        """Every job id, in submission order."""
        return self._call(self.client.zrange, self.keys.index, 0, -1)

    def list(self, state: JobState | None = None, *, limit: int | None = None) -> list[JobRecord]:
        """Jobs in submission order (newest last), optionally of one state."""
        records = self.records(self.ids())
        if state is not None:
            records = [r for r in records if r.state is state]
        return records[-limit:] if limit else records

    def queued(self, limit: int = 100) -> list[JobRecord]:
        """QUEUED jobs in the order they are served: highest priority first, FIFO within a priority."""
        members = self._call(self.client.zrange, self.keys.queue, 0, limit - 1)
        return self.records([m.split(":", 1)[1] for m in members])

    def active(self) -> list[JobRecord]:
        """Jobs in LAUNCHING or RUNNING."""
        job_keys = self._call(self.client.smembers, self.keys.active)
        return self.records(sorted(k.removeprefix(self.keys.job("")) for k in job_keys))

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in JobState}
        for r in self.list():
            out[r.state.value] += 1
        return out

    # -- plumbing --------------------------------------------------------------------------------------

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> tuple[int, str]:
        code, value = self._call(script, keys=keys, args=args)
        return int(code), value

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise UnreachableError(
                f"Redis unreachable ({err}); check ALEXNET_DIST_REDIS_URL and that redis-server is running"
            ) from None
