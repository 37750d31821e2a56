"""Resource arithmetic for the scheduling policy: where a job's workers fit on the nodes, what a team
holds against its quota, and each team's decayed usage. Plain numbers in, plain numbers out: no Redis, no
Ray, no clock (times are arguments), and nothing about decisions (that is
:mod:`alexnet_dist.service.policy`).

Room is counted per node as ``[CPU, GPU]`` left (a :data:`Free`). A job's workers are alike, so filling
node by node, first fit, places as many of them as any order would; a worker's CPUs and GPUs (a GPU pair)
share one node.

Usage is in device-seconds (:func:`device_seconds`): workers x GPUs per worker x seconds, or x CPUs for a
job without GPUs, so a GPU-hour weighs the same whoever spends it. It decays exponentially with a
half-life (as Slurm's PriorityDecayHalfLife): heavy use a week ago weighs less than light use today. The
dispatcher keeps ``usage`` (Redis) and calls :func:`decay_usage` with the seconds since it last did and
:func:`add_usage` with what each running job used meanwhile.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from alexnet_dist.errors import ConfigError
from alexnet_dist.spec import JobSpec

__all__ = [
    "Cluster",
    "Demand",
    "Free",
    "Hold",
    "Holding",
    "Quota",
    "Spots",
    "add_usage",
    "assign",
    "count",
    "decay_usage",
    "device_seconds",
    "duration",
    "fits",
    "free_of",
    "project_starts",
    "room",
    "room_words",
    "start_time",
    "take",
    "too_small_words",
]

Cluster = Sequence[Mapping[str, float]]  # the total resources of each alive node: {"CPU": 8.0, "GPU": 2.0}
Free = list[list[float]]  # [CPU, GPU] left on each node
Spots = list[tuple[int, int]]  # where a job's workers are: (node index, workers on it)

EPS = 1e-9  # resources are floats (fractional CPUs): compare with a little slack
_ALL = 1 << 30  # "any number of workers" (a worker needing neither CPU nor GPU)


@dataclass(frozen=True)
class Holding:
    """What some jobs hold in all: workers, CPUs and GPUs (each worker's times the workers)."""

    workers: int = 0
    cpus: float = 0.0
    gpus: float = 0.0

    def __add__(self, other: Holding) -> Holding:
        return Holding(self.workers + other.workers, self.cpus + other.cpus, self.gpus + other.gpus)


@dataclass(frozen=True)
class Demand:
    """What a job holds while it runs: ``workers`` bundles of (CPU, GPU), each on one node."""

    workers: int
    cpus: float
    gpus: float

    @classmethod
    def of(cls, spec: JobSpec) -> Demand:
        s = spec.scaling
        return cls(workers=s.workers, cpus=s.cpus_per_worker, gpus=float(s.gpus_per_worker))

    def holding(self) -> Holding:
        return Holding(self.workers, self.workers * self.cpus, self.workers * self.gpus)

    def device_seconds(self, seconds: float) -> float:
        return device_seconds(self.workers, self.cpus, self.gpus, seconds)

    def __str__(self) -> str:  # "2 workers x (1 CPU, 2 GPU)"
        each = f"{self.cpus:g} CPU" + (f", {self.gpus:g} GPU" if self.gpus > 0 else "")
        return f"{self.workers} worker{'s' if self.workers != 1 else ''} x ({each})"


@dataclass(frozen=True)
class Quota:
    """A team's limits (None: no limit on that resource). A team with no quota has no limits.

    ``may_borrow``: whether the team's jobs may run past the limits on room no one else is using (as a
    Kueue ClusterQueue borrows from its cohort). Such a launch is marked borrowed, and borrowed jobs are the
    first preempted when a team within its quota needs the room. Without it, a job that would pass the
    limits waits for the team's own jobs to end.
    """

    workers: int | None = None
    cpus: float | None = None
    gpus: float | None = None
    may_borrow: bool = True

    def __post_init__(self) -> None:
        for name in ("workers", "cpus", "gpus"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"quota {name}={value}: a limit cannot be negative; use 0 or leave it out")

    def _limits(self, held: Holding) -> list[tuple[float, float, str]]:
        pairs = [(held.workers, self.workers, "workers"), (held.cpus, self.cpus, "CPU")]
        pairs.append((held.gpus, self.gpus, "GPU"))
        return [(float(h), float(limit), unit) for h, limit, unit in pairs if limit is not None]

    def admits(self, held: Holding) -> bool:
        """Whether ``held`` is within every limit."""
        return all(h <= limit + EPS for h, limit, _ in self._limits(held))

    def reached(self, held: Holding) -> bool:
        """Whether ``held`` is at or past some limit: the team stands "at its quota"."""
        return any(h >= limit - EPS for h, limit, _ in self._limits(held))

    def describe(self, held: Holding, extra: Holding | None = None) -> str:
        """The tightest limit as a user reads it: ``"8/8 GPU"`` (held/limit); with ``extra`` (a job's
        demand), the limit that job would pass: ``"6/8 GPU, needs 4"``."""
        rows = self._limits(held)
        if not rows:
            return "no quota"
        if extra is not None:
            wanted = {"workers": float(extra.workers), "CPU": extra.cpus, "GPU": extra.gpus}
            over = [(h, limit, unit) for h, limit, unit in rows if h + wanted[unit] > limit + EPS]
            if over:
                h, limit, unit = over[-1]  # GPU before CPU before workers: the scarcest first
                return f"{h:g}/{limit:g} {unit}, needs {wanted[unit]:g}"
        h, limit, unit = max(rows, key=lambda r: r[0] / r[1] if r[1] > 0 else float("inf"))
        return f"{h:g}/{limit:g} {unit}"


# -- placement -------------------------------------------------------------------------------------------


def free_of(cluster: Cluster) -> Free:
    """Each node's totals as room: ``[CPU, GPU]``."""
    return [[float(node.get("CPU", 0.0)), float(node.get("GPU", 0.0))] for node in cluster]


def count(node: list[float], d: Demand) -> int:
    """How many of ``d``'s workers fit in one node's room."""
    n = _ALL
    if d.cpus > EPS:
        n = int((node[0] + EPS) / d.cpus)
    if d.gpus > EPS:
        n = min(n, int((node[1] + EPS) / d.gpus))
    return n


def room(free: Free, d: Demand) -> int:
    """How many of ``d``'s workers fit in ``free`` (at most all of them)."""
    n = 0
    for node in free:
        n += count(node, d)
        if n >= d.workers:
            return d.workers
    return n


def assign(free: Free, d: Demand, *, partial: bool = False, beside: Free | None = None) -> Spots | None:
    """First-fit ``d``'s workers node by node, taking the room from ``free`` (and from ``beside`` on the
    same nodes, when given). None, taking nothing, when they do not all fit; with ``partial``, take what
    fits instead."""
    spots: Spots = []
    need = d.workers
    for i, node in enumerate(free):
        k = count(node, d) if beside is None else min(count(node, d), count(beside[i], d))
        if k > 0:
            k = min(k, need)
            spots.append((i, k))
            need -= k
            if need == 0:
                break
    if need > 0 and not partial:
        return None
    take(free, spots, d)
    if beside is not None:
        take(beside, spots, d)
    return spots


def take(free: Free, spots: Spots, d: Demand, *, release: bool = False) -> None:
    """Hold ``d``'s workers at ``spots`` in ``free`` (or give them back with ``release``)."""
    sign = 1.0 if release else -1.0
    for i, k in spots:
        free[i][0] += sign * k * d.cpus
        free[i][1] += sign * k * d.gpus


def fits(cluster: Cluster, running: Iterable[Demand], candidate: Demand) -> bool:
    """Whether ``candidate`` fits once the jobs already running are placed on the nodes' totals.

    Counting from totals minus our own jobs (not Ray's momentary free resources) keeps a job that was just
    launched, and has not yet reserved its workers, from being counted as free room.
    """
    free = free_of(cluster)
    for d in running:
        assign(free, d, partial=True)  # a job that no longer fits (cluster shrank) takes what it can
    return assign(free, candidate) is not None


# -- over time: room as jobs end -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hold:
    """Room a job holds: where (as modelled), for what, and until when (None: unknown)."""

    spots: Spots
    demand: Demand
    end: float | None
    since: float  # when it started: jobs of unknown end are taken to end oldest first


def start_time(free: Free, holds: Sequence[Hold], d: Demand, now: float) -> tuple[float | None, Free, int]:
    """When ``d`` can start as ``holds`` end (by end, unknown ends last), the room left beside it then,
    and how many of them it waits for. The time is None when it waits for an unknown end."""
    trial = [node.copy() for node in free]
    at: float | None = now
    waited = 0
    for h in sorted(holds, key=lambda h: (h.end is None, h.end or 0.0, h.since)):
        if room(trial, d) >= d.workers:
            break
        take(trial, h.spots, h.demand, release=True)
        at = None if h.end is None else max(now, h.end)
        waited += 1
    assign(trial, d, partial=True)
    return at, trial, waited


def project_starts(
    free: Free, holds: Sequence[Hold], waiting: Sequence[tuple[str, Demand, float | None]], now: float
) -> dict[str, float]:
    """Each waiting ``(key, demand, seconds it runs)``'s start, in order and never before the one before
    it: once enough holds (and the waiting ones placed before it, when they have a run time) have ended for
    it to fit. One that waits for an unknown end gets no start and takes no room."""
    cur = [node.copy() for node in free]
    cpus, gpus = sum(n[0] for n in cur), sum(n[1] for n in cur)  # in all: most misses need no node scan
    events = [(h.end, n, h.spots, h.demand) for n, h in enumerate(holds) if h.end is not None]
    heapq.heapify(events)
    seq = len(events)
    t = now
    stuck: set[Demand] = set()  # did not fit with no ends left to wait for: never will
    starts: dict[str, float] = {}
    for key, d, seconds in waiting:
        if not events and d in stuck:
            continue
        want_cpus, want_gpus = d.workers * d.cpus, d.workers * d.gpus
        while True:
            spots = assign(cur, d) if cpus + EPS >= want_cpus and gpus + EPS >= want_gpus else None
            if spots is not None or not events:
                break
            end, _, where, dem = heapq.heappop(events)
            take(cur, where, dem, release=True)
            k = sum(n for _, n in where)
            cpus, gpus, t = cpus + k * dem.cpus, gpus + k * dem.gpus, max(t, end)
        if spots is None:
            stuck.add(d)
            continue
        cpus, gpus = cpus - want_cpus, gpus - want_gpus
        starts[key] = t
        if seconds is not None:
            heapq.heappush(events, (t + seconds, seq, spots, d))
            seq += 1
    return starts


# -- usage -----------------------------------------------------------------------------------------------


def device_seconds(workers: int, cpus: float, gpus: float, seconds: float) -> float:
    """Device-seconds used in ``seconds``: workers x GPUs (CPUs for a job without GPUs) x seconds."""
    return workers * (gpus if gpus > 0 else cpus) * max(0.0, seconds)


def decay_usage(usage: Mapping[str, float], elapsed_s: float, half_life_s: float) -> dict[str, float]:
    """``usage`` after ``elapsed_s`` more seconds of decay: halved every ``half_life_s``."""
    if half_life_s <= 0:
        raise ConfigError(f"usage half-life {half_life_s}s: must be positive, e.g. 604800 (a week)")
    factor = 0.5 ** (max(0.0, elapsed_s) / half_life_s)
    return {team: used * factor for team, used in usage.items()}


def add_usage(usage: Mapping[str, float], team: str, used: float) -> dict[str, float]:
    """``usage`` with ``used`` more device-seconds for ``team``: a new dict, ``usage`` is not changed."""
    out = dict(usage)
    out[team] = out.get(team, 0.0) + max(0.0, used)
    return out


# -- in words (for the policy's reasons) -----------------------------------------------------------------


def duration(seconds: float) -> str:
    """``"40 s"``, ``"12 min"``, ``"2 h 5 min"``."""
    if seconds < 90:
        return f"{max(0.0, seconds):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h} h {m} min"


def too_small_words(totals: Free, d: Demand) -> str:
    """Why ``d`` can never fit on the idle cluster ``totals``, and what to ask for instead."""
    if not any(count(node, d) for node in totals):
        big = max(totals, key=lambda n: (n[1], n[0]), default=[0.0, 0.0])
        each = f"{d.cpus:g} CPU" + (f" and {d.gpus:g} GPU" if d.gpus > 0 else "")
        largest = f"the largest has {big[0]:g} CPU, {big[1]:g} GPU" if totals else "the cluster has no nodes"
        return f"cluster too small: no node has {each} ({largest}); ask for smaller workers"
    k = room(totals, d)
    return f"cluster too small: at most {k} of its {d} fit on the idle cluster; ask for {k} workers or fewer"


def room_words(free: Free, totals: Free, d: Demand) -> str:
    """What ``d`` needs and how much of it is free: ``"needs 2 workers x (1 CPU, 2 GPU); room now for 1
    (2 of 8 GPU free)"``."""
    unit, name = (1, "GPU") if d.gpus > 0 else (0, "CPU")
    have, total = sum(n[unit] for n in free), sum(n[unit] for n in totals)
    return f"needs {d}; room now for {room(free, d)} ({have:g} of {total:g} {name} free)"
