"""The scheduling policy: which queued jobs to launch, as a pure function of the cluster and the jobs.

``plan(cluster, running, queued) -> decisions`` reads no Redis and calls no Ray: the dispatcher gathers
the inputs, asks the policy, and carries out the decisions (claiming each job atomically first). So a
policy is tested with plain values, and another one (preemption, quotas) is a new function of the same
shape (:class:`Policy`) handed to the dispatcher, not an edit inside its loop.

The rule of :func:`plan`: highest priority first, first come first served within a priority; every job
that fits is launched once the running jobs and those already chosen in this plan are placed, so a
smaller job further down may start past a big one that does not fit yet (greedy backfill).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from alexnet_dist.spec import JobSpec

__all__ = ["Cluster", "Decision", "Demand", "Job", "Launch", "Policy", "fits", "plan"]

Cluster = Sequence[Mapping[str, float]]  # the total resources of each alive node: {"CPU": 8.0, "GPU": 2.0}

_EPS = 1e-9  # resources are floats (fractional CPUs): compare with a little slack


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


@dataclass(frozen=True)
class Job:
    """A job as the policy sees it."""

    id: str
    demand: Demand
    priority: int = 0  # higher runs first


@dataclass(frozen=True)
class Launch:
    """Start this queued job now."""

    job_id: str


Decision = Launch  # the kinds of decision a policy makes; a preempting policy adds its own


class Policy(Protocol):
    """Decides from the cluster's totals, the running jobs and the queued ones (in submission order)."""

    def __call__(self, cluster: Cluster, running: Sequence[Job], queued: Sequence[Job]) -> list[Decision]: ...


def _free(cluster: Cluster) -> list[list[float]]:
    return [[node.get("CPU", 0.0), node.get("GPU", 0.0)] for node in cluster]


def _place(free: list[list[float]], d: Demand) -> bool:
    """First-fit each worker onto a node (a worker's GPU pair must share a node); updates ``free``.

    On False, ``free`` holds the workers placed before the one that did not fit.
    """
    for _ in range(d.workers):
        for node in free:
            if node[0] >= d.cpus - _EPS and node[1] >= d.gpus - _EPS:
                node[0] -= d.cpus
                node[1] -= d.gpus
                break
        else:
            return False
    return True


def fits(cluster: Cluster, running: Iterable[Demand], candidate: Demand) -> bool:
    """Whether ``candidate`` fits once the jobs already running are placed on the nodes' totals.

    Counting from totals minus our own jobs (not Ray's momentary free resources) keeps a job that was just
    launched, and has not yet reserved its workers, from being counted as free room.
    """
    free = _free(cluster)
    for d in running:
        _place(free, d)  # a job that no longer fits (cluster shrank) takes what it can
    return _place(free, candidate)


def plan(cluster: Cluster, running: Sequence[Job], queued: Sequence[Job]) -> list[Decision]:
    """Launch, in priority order (stable, so ``queued``'s order breaks ties), every job that fits.

    Room is counted as :func:`fits` counts it, with each job chosen here placed after the running ones.
    """
    free = _free(cluster)
    for job in running:
        _place(free, job.demand)  # a job that no longer fits (cluster shrank) takes what it can
    decisions: list[Decision] = []
    for job in sorted(queued, key=lambda j: -j.priority):
        trial = [node.copy() for node in free]  # a job that does not fit leaves no partial placement
        if _place(trial, job.demand):
            free = trial
            decisions.append(Launch(job.id))
    return decisions
