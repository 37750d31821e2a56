"""The scheduling policy: which queued jobs to launch or preempt, as a pure function of its inputs.

``plan(cluster, running, queued, *, now, quotas, usage, config) -> Plan`` reads no Redis, calls no Ray and
reads no clock (``now`` is an argument): the dispatcher gathers the inputs, asks the policy, and carries out
the decisions (claiming each job atomically first). So a policy is tested with plain values, and another
one is a new function of the same shape (:class:`Policy`), not an edit inside the dispatcher's loop. The
arithmetic of nodes, quotas and usage is :mod:`alexnet_dist.service.resources`.

=  ===========================================================================  ==========================
#  rule                                                                         where
=  ===========================================================================  ==========================
1  Order: priority (high first); at one priority, teams within their quota      :func:`queue_order`
   before teams at it, then less decayed usage (fair share), then queue order.
2  Gang placement: all of a job's workers start or none; each worker's CPUs     :func:`fits`,
   and GPUs (a GPU pair) on one node, first fit, counted from the nodes'        ``resources.assign``
   totals minus what the running jobs hold (not Ray's momentary free room).
3  Reservation: the first job in order that cannot start holds its room from    :func:`plan`,
   when enough running jobs will have ended. A later job starts only if it      ``resources.start_time``
   fits beside it, or if its estimate ends it before then (Slurm's backfill).
4  Quotas: a launch that takes a team past its quota is borrowed, or waits if   ``_borrows``
   the quota forbids borrowing. No quota: no limit.
5  Preemption: when the reserved job would wait (over ``preempt_wait_s``), ask  :func:`may_preempt`,
   the fewest, least valuable jobs to yield (borrowed, then lowest priority,    :func:`choose_victims`
   largest, youngest); never a non-preemptible one or one younger than
   ``min_run_seconds``. The job launches on a later pass, once they are gone.
6  Usage: device-seconds, halved every half-life.                               ``resources.decay_usage``
7  Every waiting job gets a reason a user can act on, and its position.         ``_pending``
8  ETA: each waiting job, in order, starts once enough running jobs (and the    ``resources.project_starts``
   jobs before it, by their estimates) have ended for it to fit; else None.     :func:`estimate_seconds`
=  ===========================================================================  ==========================

The bound rule 3 buys: once a job holds the reservation at time t0, no launch after t0 delays it. It starts
no later than the latest end among the jobs running at t0 and the jobs backfilled since that promised to end
earlier, while their estimates hold, no job ahead of it in order (higher priority, or at its priority a team
with less usage) arrives, and workers run where the policy counted them (exact on one node; on several, when
the dispatcher pins ``Launch.nodes`` and passes ``Job.nodes`` back; otherwise the policy models running jobs
as packed first fit and a start can slip past its promise, though no job was seen to starve).
``tests/service/test_policy.py`` simulates it.

With no teams, quotas, estimates or preemptible jobs, :func:`plan` launches what the greedy policy before
it did, except that a job that fits the cluster is no longer passed over forever (rule 3).

Wiring, for the dispatcher. Pass one clock's ``now`` (seconds); the nodes' totals in a stable order (node
indexes appear in ``Launch.nodes`` and ``Job.nodes``); as ``running`` every job holding room (LAUNCHING,
RUNNING, and yielding ones with ``stopping=True``), with ``started``, ``preemptible`` (the spec's),
``borrowed`` (as recorded at its launch), ``remaining_seconds`` (from its progress, :func:`estimate_seconds`)
and, if known, ``nodes``; ``queued`` in queue order with ``est_seconds``; the teams' ``quotas`` and decayed
``usage`` (``resources.decay_usage`` and ``add_usage`` each pass). Then carry out the decisions in order:
``Launch``: claim and submit, recording ``borrowed`` on the job; ``Preempt``: ask the job to yield once
(checkpoint, back to its place in the queue) and pass it as ``stopping`` until it has gone; ``for_job``
launches on a later pass, once the room is free. ``pending`` (reason, position, ETAs, for the jobs passed in,
in the policy's order) is for users. Iterating a :class:`Plan` yields its decisions, so a loop that only
launches keeps working while no job is preemptible.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from alexnet_dist.service import resources
from alexnet_dist.service.resources import EPS, Cluster, Demand, Free, Hold, Holding, Quota, assign, room

__all__ = ["Cluster", "Decision", "Demand", "Job", "Launch", "Pending", "Plan", "Policy", "PolicyConfig"]
__all__ += ["Preempt", "Quota", "Wait", "choose_victims", "estimate_seconds", "fits", "may_preempt", "plan"]
__all__ += ["queue_order"]

fits = resources.fits  # one home for placement; the policy's callers find it here too


@dataclass(frozen=True)
class Job:
    """A job as the policy sees it, running or queued. Only ``id`` and ``demand`` are required."""

    id: str
    demand: Demand
    priority: int = 0  # higher runs first
    team: str = ""  # whose quota and usage it counts against
    preemptible: bool = False  # whether it may be asked to yield (checkpoint, back to the queue)
    started: float | None = None  # running: when it started (``now``'s clock); None: unknown
    est_seconds: float | None = None  # how long it runs (queued) or ran in all (running), if known
    remaining_seconds: float | None = None  # running: time left; None: started + est_seconds - now
    borrowed: bool = False  # running: launched past its team's quota (from Launch.borrowed)
    stopping: bool = False  # running: already asked to yield or stop; its room counts as free now
    nodes: tuple[tuple[int, int], ...] | None = None  # running: (index in ``cluster``, workers there), as
    # Ray placed them; None: taken to be first fit, in the order ``running`` lists the jobs (start order)


@dataclass(frozen=True)
class Launch:
    """Start this queued job now; ``borrowed``: it runs past its team's quota (keep that on the job).

    ``nodes``: where the policy counted its workers, (index in ``cluster``, workers). Pinning them there
    (and passing them back as :attr:`Job.nodes`) makes rule 3's bound exact; otherwise they are advice.
    """

    job_id: str
    borrowed: bool = False
    nodes: tuple[tuple[int, int], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Preempt:
    """Ask this running job to yield (checkpoint, back to the queue) to make room for ``for_job``."""

    job_id: str
    for_job: str


Decision = Launch | Preempt


class Wait(str, Enum):
    """Why a queued job is not launched in this pass."""

    TOO_SMALL = "too-small"  # it can never fit, even on the idle cluster
    QUOTA = "quota"  # its team is at its quota and may not borrow
    FIRST = "first"  # first in line: holds the reservation, waits for running jobs to end
    PREEMPTING = "preempting"  # first in line: jobs were asked to yield for it
    RESERVED = "reserved"  # it fits now, but would delay the job holding the reservation
    NO_ROOM = "no-room"  # not enough free room now


@dataclass(frozen=True)
class Pending:
    """A queued job's place: why it waits (a sentence), its position (1 = next), and when it should run."""

    why: Wait
    reason: str
    position: int
    eta_start: float | None = None  # ``now``'s clock; None: unknown (no estimates, or past eta_depth)
    eta_finish: float | None = None  # eta_start + est_seconds


@dataclass(frozen=True)
class PolicyConfig:
    min_run_seconds: float = 600.0  # a job runs this long before it may be preempted (no thrashing)
    preempt_wait_s: float = 0.0  # preempt only when the first job would otherwise wait longer than this
    eta_depth: int = 1000  # waiting jobs given an ETA per pass (a placement each; Slurm bounds its
    # backfill depth alike); the rest still get a reason and a position


@dataclass(frozen=True)
class Plan:
    """One pass's decisions, and every queued job not launched (in order). Iterating yields the decisions."""

    decisions: tuple[Decision, ...] = ()
    pending: Mapping[str, Pending] = field(default_factory=dict)
    reserved_for: str | None = None  # the job holding the reservation (rule 3)

    def __iter__(self) -> Iterator[Decision]:
        return iter(self.decisions)


class Policy(Protocol):
    """Decides from the cluster's totals, the running jobs and the queued ones (in queue order)."""

    def __call__(
        self,
        cluster: Cluster,
        running: Sequence[Job],
        queued: Sequence[Job],
        *,
        now: float = 0.0,
        quotas: Mapping[str, Quota] | None = None,
        usage: Mapping[str, float] | None = None,
    ) -> Plan: ...


def estimate_seconds(steps_left: int | None, seconds_per_step: float | None) -> float | None:
    """How long a job has left: steps left x measured seconds per step; None when either is unknown."""
    if steps_left is None or seconds_per_step is None or seconds_per_step <= 0:
        return None
    return max(0, steps_left) * seconds_per_step


# -- rules 1 and 4: order and quotas ---------------------------------------------------------------------


def queue_order(queued: Sequence[Job], at_quota: Mapping[str, bool], usage: Mapping[str, float]) -> list[int]:
    """Rule 1: the indexes of ``queued`` by priority, then teams within quota (``at_quota`` False) before
    teams at it, then less decayed usage, then queue order."""
    keys = [(-j.priority, at_quota.get(j.team, False), usage.get(j.team, 0.0)) for j in queued]
    return sorted(range(len(queued)), key=keys.__getitem__)  # stable: queue order breaks ties


def _borrows(job: Job, quota: Quota | None, held: Holding) -> bool:
    """Rule 4: whether launching ``job`` now takes its team past its quota."""
    return quota is not None and not quota.admits(held + job.demand.holding())


# -- rule 5: preemption ----------------------------------------------------------------------------------


def may_preempt(head: Job, borrows: bool, reclaims: bool, victim: Job, now: float, cfg: PolicyConfig) -> bool:
    """Whether ``victim`` may be asked to yield for ``head`` (which would launch borrowed if ``borrows``).

    Never a non-preemptible job, one already stopping, or one younger than ``min_run_seconds`` (or of
    unknown age). A lower-priority job may be preempted, except that a head that would itself borrow takes
    room only from borrowed jobs or its own team's. A head whose team has a quota and is within it
    (``reclaims``) also takes back borrowed room from other teams at any priority: a quota is a promise.
    """
    if not victim.preemptible or victim.stopping or victim.started is None:
        return False
    if now - victim.started < cfg.min_run_seconds - EPS:
        return False
    if victim.priority < head.priority:
        return not borrows or victim.borrowed or victim.team == head.team
    return reclaims and victim.borrowed and victim.team != head.team


def choose_victims(free: Free, candidates: Sequence[tuple[Job, resources.Spots]], d: Demand) -> list[Job]:
    """The fewest, least valuable running jobs whose room, added to ``free``, lets ``d`` fit ([] if none do).

    Least valuable first: borrowed before owned, then lowest priority; among equals the largest first (so
    the fewest), then the youngest (least work lost). Take them in that order until ``d`` fits, then spare
    each taken one, most valuable first, that the rest can do without (Kueue's minimal-preemption pass).
    """
    if room(free, d) >= d.workers:
        return []
    unit = 1 if d.gpus > 0 else 0  # size by what ``d`` is short of
    ranked = sorted(
        candidates,
        key=lambda c: (
            not c[0].borrowed,
            c[0].priority,
            -c[0].demand.holding().gpus if unit else -c[0].demand.holding().cpus,
            -(c[0].started or 0.0),
        ),
    )
    trial = [node.copy() for node in free]
    chosen: list[tuple[Job, resources.Spots]] = []
    for job, spots in ranked:
        resources.take(trial, spots, job.demand, release=True)
        chosen.append((job, spots))
        if room(trial, d) >= d.workers:
            break
    else:
        return []
    for job, spots in reversed(chosen[:-1]):  # the last one taken was needed: d did not fit before it
        resources.take(trial, spots, job.demand)
        if room(trial, d) >= d.workers:
            chosen.remove((job, spots))
        else:
            resources.take(trial, spots, job.demand, release=True)
    return [job for job, _ in chosen]


# -- rules 3 and 8: reservation and ETAs -----------------------------------------------------------------


def _end(job: Job, now: float) -> float | None:
    """When a running job ends (``now``'s clock), None if unknown: stopping jobs end now."""
    if job.stopping:
        return now
    if job.remaining_seconds is not None:
        return now + max(0.0, job.remaining_seconds)
    if job.started is not None and job.est_seconds is not None:
        return max(now, job.started + job.est_seconds)
    return None


# -- the policy ------------------------------------------------------------------------------------------

_OPEN, _NEVER, _FULL, _BESIDE = range(4)  # what a demand met in this pass: see ``seen`` in plan


def plan(
    cluster: Cluster,
    running: Sequence[Job],
    queued: Sequence[Job],
    *,
    now: float = 0.0,
    quotas: Mapping[str, Quota] | None = None,
    usage: Mapping[str, float] | None = None,
    config: PolicyConfig = PolicyConfig(),
) -> Plan:
    """One pass of rules 1-8 over ``queued`` (in queue order) beside ``running``: see the module's table."""
    quotas = quotas or {}
    usage = usage or {}
    totals = resources.free_of(cluster)
    free = [node.copy() for node in totals]
    held: list[tuple[Job, Hold]] = []
    team: dict[str, Holding] = {}
    for job in running:  # a job that no longer fits (cluster shrank) takes what it can
        if job.nodes is None:
            spots = assign(free, job.demand, partial=True) or []
        else:
            spots = [(i, k) for i, k in job.nodes if 0 <= i < len(free)]
            resources.take(free, spots, job.demand)
        held.append(
            (job, Hold(spots, job.demand, _end(job, now), now if job.started is None else job.started))
        )
        team[job.team] = team.get(job.team, Holding()) + job.demand.holding()
    at_quota = {t: q.reached(team.get(t, Holding())) for t, q in quotas.items()}
    order = queue_order(queued, at_quota, usage)

    decisions: list[Decision] = []
    waits: dict[str, tuple[Wait, Job, str]] = {}  # in order: job id -> (why, job, its quota's words)
    # What a demand met, so the next job asking the same is decided without placing it: room only
    # shrinks during the scan, so a demand that did not fit (in the free room, or beside the head) never
    # will. The team's quota verdict holds until that team launches.
    seen: dict[Demand, int] = {}
    verdicts: dict[str, dict[Demand, tuple[bool, str]]] = {t: {} for t in quotas}
    launched: list[Hold] = []
    head: Job | None = None
    at: float | None = None  # when the head can start (rule 3); None: unknown
    beside: Free = []  # the room left beside the head when it starts
    victims: list[Job] = []
    waited = 0
    for i in order:
        job = queued[i]
        d = job.demand
        met = seen.get(d)
        if met is None:
            seen[d] = met = _NEVER if room(totals, d) < d.workers else _OPEN
        if met == _NEVER:
            waits[job.id] = (Wait.TOO_SMALL, job, "")
            continue
        borrows, words = False, ""
        quota = quotas.get(job.team)
        if quota is not None:
            verdict = verdicts[job.team].get(d)
            if verdict is None:
                held_now = team.get(job.team, Holding())
                borrows = _borrows(job, quota, held_now)
                verdict = (borrows, quota.describe(held_now, d.holding()) if borrows else "")
                verdicts[job.team][d] = verdict
            borrows, words = verdict
            if borrows and not quota.may_borrow:
                waits[job.id] = (Wait.QUOTA, job, words)
                continue
        short = at is not None and job.est_seconds is not None and now + job.est_seconds <= at
        if met == _FULL or (met == _BESIDE and not short):
            waits[job.id] = (Wait.NO_ROOM, job, words)  # _pending tells RESERVED apart
            continue
        if head is None or short:
            spots = assign(free, d)  # nothing reserved yet, or it ends before the head can start
        else:
            spots = assign(free, d, beside=beside)
        if spots is not None:
            decisions.append(Launch(job.id, borrowed=borrows, nodes=tuple(spots)))
            team[job.team] = team.get(job.team, Holding()) + d.holding()
            if quota is not None:
                verdicts[job.team].clear()
            end = None if job.est_seconds is None else now + job.est_seconds
            launched.append(Hold(spots, d, end, now))
            continue
        if head is not None:
            seen[d] = _BESIDE if not short and room(free, d) >= d.workers else _FULL
            waits[job.id] = (Wait.NO_ROOM, job, words)
            continue
        head = job  # rule 3: the first job in order that cannot start holds the reservation
        seen[d] = _FULL
        at, beside, waited = resources.start_time(free, [*(h for _, h in held), *launched], d, now)
        if at is None or at - now > config.preempt_wait_s:
            reclaims = quota is not None and not borrows
            eligible = [(j, h.spots) for j, h in held if may_preempt(job, borrows, reclaims, j, now, config)]
            soon = [node.copy() for node in free]  # the room once the stopping jobs are gone
            for j, h in held:
                if j.stopping:
                    resources.take(soon, h.spots, j.demand, release=True)
            victims = choose_victims(soon, eligible, d)
            if victims:
                decisions.extend(Preempt(v.id, job.id) for v in victims)
                for j, h in held:
                    if any(j is v for v in victims):
                        resources.take(soon, h.spots, j.demand, release=True)
                assign(soon, d, partial=True)
                at, beside = now, soon
        waits[job.id] = (Wait.PREEMPTING if victims else Wait.FIRST, job, words)

    ends = [Hold(h.spots, h.demand, now, h.since) if j in victims else h for j, h in held] + launched
    pending = _pending(waits, free, totals, ends, victims, now, at, head, waited, config)
    return Plan(tuple(decisions), pending, head.id if head else None)


# -- rule 7: reasons -------------------------------------------------------------------------------------


def _pending(
    waits: Mapping[str, tuple[Wait, Job, str]],
    free: Free,
    totals: Free,
    ends: Sequence[Hold],
    victims: Sequence[Job],
    now: float,
    at: float | None,
    head: Job | None,
    waited: int,
    config: PolicyConfig,
) -> dict[str, Pending]:
    """Rules 7 and 8: each waiting job's reason, position and ETA, in order."""
    placeable = [job for why, job, _ in waits.values() if why not in (Wait.TOO_SMALL, Wait.QUOTA)]
    starts = resources.project_starts(
        free, ends, [(j.id, j.demand, j.est_seconds) for j in placeable[: config.eta_depth]], now
    )
    if head is not None:
        starts.pop(head.id, None)
        if at is not None:
            starts[head.id] = at
    gap = resources.duration(at - now) if at is not None else ""
    room_now: dict[Demand, tuple[str, bool]] = {}  # what it needs and what is free; whether it fits now
    out: dict[str, Pending] = {}
    higher, level = 0, None
    no_room, first, too_small = Wait.NO_ROOM, Wait.FIRST, Wait.TOO_SMALL  # the loop runs per queued job
    for position, (why, job, quota) in enumerate(waits.values(), start=1):
        if job.priority != level:
            higher, level = position - 1, job.priority
        d = job.demand
        if why is no_room or why is first:
            known = room_now.get(d)
            if known is None:
                known = room_now[d] = (resources.room_words(free, totals, d), room(free, d) >= d.workers)
            needs, fits_now = known
            if why is first:
                ran = f"{waited} running job{'s' if waited != 1 else ''}"
                when = f", in about {gap}" if at is not None else "; when is unknown (no estimates)"
                reason = f"first in line; {needs}; waits for {ran} to end{when}"
            elif fits_now and head is not None:  # it was held back by the reservation
                why, reason = Wait.RESERVED, _held_back(head, job, at, now, gap)
            else:
                n = position - 1
                ahead = f"{n} job{'s' if n != 1 else ''} ahead of it" if n else "nothing ahead of it"
                reason = (
                    f"{needs}; {ahead} ({higher} of a higher priority)" if higher else f"{needs}; {ahead}"
                )
        elif why is too_small:
            reason = resources.too_small_words(totals, d)
        elif why is Wait.QUOTA:
            reason = f"team {job.team} at its quota ({quota}); it starts as the team's own jobs end"
        else:
            ids = ", ".join(v.id for v in victims)
            reason = f"first in line; asked {ids} to yield for it; it starts once they have"
        if quota and why is not Wait.QUOTA:
            reason += f"; team {job.team} is past its quota ({quota}): it borrows idle room, after others"
        start = starts.get(job.id)
        finish = start + job.est_seconds if start is not None and job.est_seconds is not None else None
        out[job.id] = Pending(why, reason, position, start, finish)
    return out


def _held_back(head: Job, job: Job, at: float | None, now: float, gap: str) -> str:
    """Why ``job``, which fits now, waits for ``head`` (rule 3), and what would let it start."""
    reason = f"room reserved for job {head.id} (first in line at priority {head.priority})"
    if at is None or at <= now:
        return reason + "; it fits now but would delay that job"
    if job.est_seconds is None:
        return reason + f"; give it an estimate: it may start now if it ends within {gap}"
    est = resources.duration(job.est_seconds)
    return reason + f"; it could start now if it ended within {gap}, but needs about {est}"
