"""The scheduling policy on plain values (no Redis, no Ray): placement per node, priority order, greedy
backfill, GPU pairs, and room counted from the nodes' totals minus the running jobs."""

from __future__ import annotations

import pytest

from alexnet_dist.service.policy import Demand, Job, Launch, fits, plan
from alexnet_dist.spec import parse_spec

CPU1 = Demand(workers=1, cpus=1.0, gpus=0.0)
PAIR = Demand(workers=1, cpus=1.0, gpus=2.0)  # one worker holding a GPU pair, as in the paper


def job(job_id: str, demand: Demand = CPU1, priority: int = 0) -> Job:
    return Job(job_id, demand, priority)


def launched(decisions: list) -> list[str]:
    assert all(isinstance(d, Launch) for d in decisions)
    return [d.job_id for d in decisions]


def test_fits_places_workers_per_node() -> None:
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]
    pair = Demand(workers=1, cpus=1.0, gpus=2.0)
    assert fits(nodes, [], Demand(workers=2, cpus=1.0, gpus=2.0))
    assert not fits(nodes, [], Demand(workers=3, cpus=1.0, gpus=2.0))
    assert fits(nodes, [pair], pair) and not fits(nodes, [pair, pair], pair)
    assert not fits([{"CPU": 8.0, "GPU": 1.0}] * 4, [], pair)  # a GPU pair must share a node
    assert fits([{"CPU": 2.0}], [], Demand(2, 1.0, 0.0)) and not fits([{"CPU": 2.0}], [], Demand(3, 1.0, 0.0))


def test_demand_of_a_spec() -> None:
    spec = parse_spec(
        {
            "name": "p",
            "data": {"train": "t.json", "val": "v.json"},
            "scaling": {"workers": 4, "devices": "gpu-pair", "cpus_per_worker": 1.5},
        }
    )
    assert Demand.of(spec) == Demand(workers=4, cpus=1.5, gpus=2.0)


def test_highest_priority_first_and_fifo_within_a_priority() -> None:
    cluster = [{"CPU": 2.0}]  # room for two of the four
    queued = [job("a", priority=1), job("b", priority=5), job("c", priority=1), job("d", priority=5)]
    assert launched(plan(cluster, [], queued)) == ["b", "d"]
    assert launched(plan([{"CPU": 3.0}], [], queued)) == ["b", "d", "a"]  # "a" came before "c"
    assert launched(plan([{"CPU": 8.0}], [], queued)) == ["b", "d", "a", "c"]


def test_a_smaller_job_backfills_past_a_big_one_that_does_not_fit() -> None:
    big = job("big", Demand(workers=4, cpus=1.0, gpus=0.0), priority=9)
    queued = [big, job("low", priority=1), job("lower", priority=0), job("last", priority=0)]
    # big needs 4 CPUs of 2 and is skipped, not waited for; the two that fit next take the room.
    assert launched(plan([{"CPU": 2.0}], [], queued)) == ["low", "lower"]
    assert launched(plan([{"CPU": 4.0}], [], queued)) == ["big"]  # it fits: nothing is left for the rest


def test_a_job_that_does_not_fit_leaves_no_partial_placement() -> None:
    three = job("three", Demand(workers=3, cpus=1.0, gpus=0.0))  # two of its three workers would fit
    two = job("two", Demand(workers=2, cpus=1.0, gpus=0.0))
    assert launched(plan([{"CPU": 2.0}], [], [three, two])) == ["two"]


def test_a_gpu_pair_goes_on_one_node() -> None:
    split = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]  # two GPUs, but on two nodes
    assert launched(plan(split, [], [job("pair", PAIR)])) == []
    assert launched(plan(split, [], [job("pair", PAIR), job("cpu")])) == ["cpu"]
    both = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 4.0}]
    two_pairs = Demand(workers=2, cpus=1.0, gpus=2.0)
    assert launched(plan(both, [], [job("x", two_pairs), job("y", PAIR), job("z", PAIR)])) == ["x", "y"]


def test_running_jobs_are_counted_from_the_totals() -> None:
    cluster = [{"CPU": 4.0, "GPU": 2.0}]
    running = [job("r1", Demand(workers=3, cpus=1.0, gpus=0.0))]
    # The cluster's totals minus what our running jobs hold: one CPU is left, whatever Ray reports as free.
    assert launched(plan(cluster, running, [job("two", Demand(2, 1.0, 0.0)), job("one")])) == ["one"]
    assert launched(plan(cluster, [*running, job("r2", PAIR)], [job("pair", PAIR), job("one")])) == []


def test_a_shrunk_cluster_launches_nothing_new() -> None:
    running = [job("r", Demand(workers=4, cpus=1.0, gpus=0.0))]  # placed when there were 4 CPUs
    assert launched(plan([{"CPU": 2.0}], running, [job("one")])) == []


@pytest.mark.parametrize("cluster", [[], [{}], [{"GPU": 8.0}]])
def test_no_cpus_no_launch(cluster: list[dict[str, float]]) -> None:
    assert plan(cluster, [], [job("a"), job("b", priority=3)]) == []


def test_plan_is_pure() -> None:
    cluster = [{"CPU": 2.0, "GPU": 2.0}]
    running = [job("r")]
    queued = [job("a", priority=0), job("b", priority=2)]
    before = (repr(cluster), list(running), list(queued))
    first = plan(cluster, running, queued)
    assert plan(cluster, running, queued) == first == [Launch("b")]
    assert (repr(cluster), running, queued) == before
