"""The scheduling policy on plain values (no Redis, no Ray): placement per node, priority order, fair share
and quotas, the reservation that keeps a big job from starving (simulated), preemption's choice, usage
decay, the reasons a waiting job is given, and ETAs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from alexnet_dist.errors import ConfigError
from alexnet_dist.service.policy import (
    Demand,
    Job,
    Launch,
    Plan,
    PolicyConfig,
    Preempt,
    Wait,
    estimate_seconds,
    fits,
    plan,
)
from alexnet_dist.service.resources import (
    Quota,
    add_usage,
    assign,
    count,
    decay_usage,
    device_seconds,
    free_of,
    take,
)
from alexnet_dist.spec import parse_spec

CPU1 = Demand(workers=1, cpus=1.0, gpus=0.0)
PAIR = Demand(workers=1, cpus=1.0, gpus=2.0)  # one worker holding a GPU pair, as in the paper
GPU1 = Demand(workers=1, cpus=1.0, gpus=1.0)
NODE = [{"CPU": 16.0, "GPU": 4.0}]  # one node of four GPUs


def job(job_id: str, demand: Demand = CPU1, priority: int = 0, **kw: object) -> Job:
    return Job(job_id, demand, priority, **kw)  # type: ignore[arg-type]


def launched(p: Plan) -> list[str]:
    assert all(isinstance(d, Launch) for d in p)
    return [d.job_id for d in p]


def preempted(p: Plan) -> list[str]:
    return sorted(d.job_id for d in p.decisions if isinstance(d, Preempt))


# -- placement and order (the greedy policy's behaviour, kept) -------------------------------------------


def test_fits_places_workers_per_node() -> None:
    nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]
    assert fits(nodes, [], Demand(workers=2, cpus=1.0, gpus=2.0))
    assert not fits(nodes, [], Demand(workers=3, cpus=1.0, gpus=2.0))
    assert fits(nodes, [PAIR], PAIR) and not fits(nodes, [PAIR, PAIR], PAIR)
    assert not fits([{"CPU": 8.0, "GPU": 1.0}] * 4, [], PAIR)  # a GPU pair must share a node
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
    assert str(Demand.of(spec)) == "4 workers x (1.5 CPU, 2 GPU)"


def test_highest_priority_first_and_fifo_within_a_priority() -> None:
    cluster = [{"CPU": 2.0}]  # room for two of the four
    queued = [job("a", priority=1), job("b", priority=5), job("c", priority=1), job("d", priority=5)]
    assert launched(plan(cluster, [], queued)) == ["b", "d"]
    assert launched(plan([{"CPU": 3.0}], [], queued)) == ["b", "d", "a"]  # "a" came before "c"
    assert launched(plan([{"CPU": 8.0}], [], queued)) == ["b", "d", "a", "c"]


def test_a_smaller_job_passes_a_big_one_that_can_never_fit() -> None:
    big = job("big", Demand(workers=4, cpus=1.0, gpus=0.0), priority=9)
    queued = [big, job("low", priority=1), job("lower", priority=0), job("last", priority=0)]
    p = plan([{"CPU": 2.0}], [], queued)  # big needs 4 CPUs of 2: it reserves nothing
    assert launched(p) == ["low", "lower"] and p.reserved_for == "last"
    assert p.pending["big"].why is Wait.TOO_SMALL
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
    # The totals minus what our running jobs hold: one CPU is left, whatever Ray reports as free. "two"
    # holds the reservation, and "one" fits beside it once r1 ends.
    assert launched(plan(cluster, running, [job("two", Demand(2, 1.0, 0.0)), job("one")])) == ["one"]
    assert launched(plan(cluster, [*running, job("r2", PAIR)], [job("pair", PAIR), job("one")])) == []


def test_a_shrunk_cluster_launches_nothing_new() -> None:
    running = [job("r", Demand(workers=4, cpus=1.0, gpus=0.0))]  # placed when there were 4 CPUs
    assert launched(plan([{"CPU": 2.0}], running, [job("one")])) == []


@pytest.mark.parametrize("cluster", [[], [{}], [{"GPU": 8.0}]])
def test_no_cpus_no_launch(cluster: list[dict[str, float]]) -> None:
    p = plan(cluster, [], [job("a"), job("b", priority=3)])
    assert p.decisions == () and {w.why for w in p.pending.values()} == {Wait.TOO_SMALL}


def test_plan_is_pure_and_iterates_its_decisions() -> None:
    cluster = [{"CPU": 2.0, "GPU": 2.0}]
    running = [job("r")]
    queued = [job("a", priority=0), job("b", priority=2)]
    before = (repr(cluster), list(running), list(queued))
    first = plan(cluster, running, queued)
    assert plan(cluster, running, queued) == first and list(first) == [Launch("b")]
    assert (repr(cluster), running, queued) == before


# -- rule 1: fair share and quota standing ---------------------------------------------------------------


def test_less_used_team_goes_first_at_one_priority_but_priority_comes_first() -> None:
    queued = [job("a", team="x"), job("b", team="y"), job("c", team="y", priority=5), job("d", team="x")]
    p = plan([{"CPU": 2.0}], [], queued, usage={"x": 100.0, "y": 10.0})
    assert launched(p) == ["c", "b"]  # priority first, then y (less usage) before x
    assert [(k, w.position) for k, w in p.pending.items()] == [("a", 1), ("d", 2)]  # FIFO within x
    assert launched(plan([{"CPU": 2.0}], [], queued, usage={"x": 1.0, "y": 10.0})) == ["c", "a"]


def test_teams_within_quota_go_before_teams_at_it() -> None:
    running = [job("r", team="x")]
    quotas = {"x": Quota(cpus=1.0)}  # x holds its 1 CPU: at its quota
    queued = [job("a", team="x"), job("b", team="y")]
    assert launched(plan([{"CPU": 2.0}], running, queued, quotas=quotas)) == ["b"]
    assert plan([{"CPU": 2.0}], running, queued, quotas=quotas).pending["a"].position == 1
    # The fair share does not lift a team past one within its quota: x used less, still goes after.
    assert launched(plan([{"CPU": 2.0}], running, queued, quotas=quotas, usage={"y": 9e9})) == ["b"]


# -- rule 3: the reservation and the starvation bound ----------------------------------------------------


def test_only_jobs_that_fit_beside_the_reservation_or_end_before_it_backfill() -> None:
    cluster = [{"CPU": 16.0, "GPU": 8.0}]
    running = [job("r", Demand(1, 1.0, 6.0), remaining_seconds=100.0)]  # 2 GPUs free now
    big = job("big", Demand(1, 1.0, 6.0), priority=5)  # starts at 100 s; leaves 2 GPUs beside it
    p = plan(cluster, running, [big, job("s1", GPU1), job("s2", GPU1), job("s3", GPU1)])
    assert launched(p) == ["s1", "s2"] and p.reserved_for == "big" and p.pending["s3"].why is Wait.NO_ROOM
    assert p.pending["big"].eta_start == 100.0

    running = [job("r", Demand(1, 1.0, 2.0), remaining_seconds=100.0)]  # on 4 GPUs, 2 free
    big = job("big", Demand(1, 1.0, 4.0), priority=5)  # needs all four: nothing fits beside it
    short, long_, blind = (
        job(n, GPU1, est_seconds=e) for n, e in [("short", 90), ("long", 200), ("?", None)]
    )
    p = plan(NODE, running, [big, long_, blind, short])
    assert launched(p) == ["short"]  # ends at 90 s, before big can start at 100 s
    assert p.pending["long"].why is Wait.RESERVED and p.pending["?"].why is Wait.RESERVED


def _greedy(
    cluster: list[dict[str, float]], running: list[Job], queued: list[Job], now: float
) -> list[Launch]:
    """The policy before the reservation: launch, in priority order, whatever fits."""
    free = free_of(cluster)
    for j in running:
        take(free, list(j.nodes or ()), j.demand)
    picks = [(j, assign(free, j.demand)) for j in sorted(queued, key=lambda j: -j.priority)]
    return [Launch(j.id, nodes=tuple(spots)) for j, spots in picks if spots]


@dataclass
class Run:
    """What a simulation saw: each job's start, and where and when each reserving job was promised a start."""

    starts: dict[str, float] = field(default_factory=dict)
    promised: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # id -> (t0, eta at t0)


def _simulate(
    arrivals: list[tuple[float, Job]],
    passes: int,
    step: float,
    policy=plan,
    tell: bool = True,
    cluster: list[dict[str, float]] = NODE,
) -> Run:
    """Run ``policy`` every ``step`` seconds. Jobs end exactly as estimated, which the policy is told only
    with ``tell``; a launched job's workers go where the policy counted them (Launch.nodes) and stay."""
    queue: list[Job] = []
    running: dict[str, tuple[Job, float, list[tuple[int, int]]]] = {}
    free = free_of(cluster)
    out = Run()
    pending = list(arrivals)
    for n in range(passes):
        now = n * step
        queue += [j for t, j in pending if t <= now]
        pending = [(t, j) for t, j in pending if t > now]
        for jid, (j, t0, spots) in list(running.items()):
            if t0 + (j.est_seconds or 0.0) <= now:
                take(free, spots, j.demand, release=True)
                del running[jid]
        run = [
            Job(
                j.id,
                j.demand,
                j.priority,
                started=t0,
                nodes=tuple(spots),
                remaining_seconds=t0 + j.est_seconds - now,
            )
            if tell
            else Job(j.id, j.demand, j.priority, started=t0, nodes=tuple(spots))
            for j, t0, spots in running.values()
        ]
        seen = queue if tell else [Job(j.id, j.demand, j.priority) for j in queue]
        p = policy(cluster, run, seen, now=now)
        if isinstance(p, Plan) and p.reserved_for and p.reserved_for not in out.promised:
            out.promised[p.reserved_for] = (now, p.pending[p.reserved_for].eta_start)
        for d in p:
            j = next(q for q in queue if q.id == d.job_id)
            queue.remove(j)
            spots = list(d.nodes)  # the dispatcher pins the workers where the policy counted them
            assert all(count(free[i], j.demand) >= k for i, k in spots), f"{j.id}: launched without room"
            take(free, spots, j.demand)
            running[j.id] = (j, now, spots)
            out.starts[j.id] = now
    return out


def _up(t: float, step: float = 10.0) -> float:
    return -(-t // step) * step  # the first pass at or after t


def test_a_stream_of_small_jobs_cannot_pass_a_big_one_forever() -> None:
    rng = random.Random(7)
    # One small 1-GPU job every 10 s, each 20-200 s long: 11 GPUs wanted on average, 4 there. Greedy
    # backfill always finds a free GPU for one, so 4 GPUs are never free together for the big job.
    small = [(10.0 * i, job(f"s{i}", GPU1, est_seconds=float(rng.randint(20, 200)))) for i in range(100)]
    arrivals = [*small[:5], (45.0, job("big", Demand(1, 1.0, 4.0), est_seconds=100.0)), *small[5:]]
    assert "big" not in _simulate(arrivals, passes=100, step=10.0, policy=_greedy).starts  # 1000 s starved
    run = _simulate(arrivals, passes=100, step=10.0)
    t0, promised = run.promised["big"]  # when it took the reservation, and the start it was promised
    assert promised is not None and run.starts["big"] == _up(promised)
    # The bound: no later than the latest end of the jobs running at t0 (a pass rounds it up).
    ran = [(run.starts[j.id], run.starts[j.id] + j.est_seconds) for _, j in small if j.id in run.starts]
    assert promised <= max(end for start, end in ran if start <= t0 < end)
    backfilled = [(start, end) for start, end in ran if t0 < start < run.starts["big"]]
    assert backfilled and all(end <= run.starts["big"] for _, end in backfilled)  # small ones did pass


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    "cluster",
    [NODE, NODE * 2, [{"CPU": 16.0, "GPU": 8.0}, {"CPU": 8.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 4.0}]],
    ids=["one-node", "two-nodes", "mixed-nodes"],
)
def test_every_reserved_job_starts_by_its_promise(seed: int, cluster: list[dict[str, float]]) -> None:
    rng = random.Random(seed)
    shapes = [GPU1, PAIR, Demand(2, 1.0, 1.0), Demand(1, 2.0, 0.0)]  # and one in seven big
    bigs = [Demand(1, 1.0, 4.0), Demand(2, 1.0, 2.0), Demand(1, 1.0, 3.0)]
    arrivals = [
        (10.0 * i + rng.choice([0, 3, 7]), job(f"j{i}", rng.choice(bigs if rng.random() < 0.15 else shapes)))
        for i in range(150)
    ]
    arrivals = [(t, Job(j.id, j.demand, est_seconds=float(rng.randint(10, 300)))) for t, j in arrivals]
    run = _simulate(arrivals, passes=200, step=10.0, cluster=cluster)
    kept = [(jid, eta) for jid, (_, eta) in run.promised.items() if eta is not None and eta < 1990.0]
    assert len(kept) >= 5  # enough reservations were made and kept to mean something
    assert all(run.starts[jid] <= _up(eta) for jid, eta in kept)


def test_without_estimates_the_big_job_waits_only_for_the_jobs_running_when_it_came() -> None:
    small = [(10.0 * i, job(f"s{i}", GPU1, est_seconds=float(20 + 37 * i % 180))) for i in range(100)]
    arrivals = [*small[:5], (45.0, job("big", Demand(1, 1.0, 4.0), est_seconds=100.0)), *small[5:]]
    run = _simulate(arrivals, passes=100, step=10.0, tell=False)  # the policy sees no estimates
    t0, promised = run.promised["big"]
    assert promised is None  # so no backfill: nothing may start that could outlast the wait
    ran = [(run.starts[j.id], run.starts[j.id] + j.est_seconds) for _, j in small if j.id in run.starts]
    assert run.starts["big"] == _up(max(end for start, end in ran if start <= t0 < end))
    assert not [start for start, _ in ran if t0 < start < run.starts["big"]]


def test_the_first_jobs_eta_is_when_it_starts() -> None:
    running = [job("a", PAIR, remaining_seconds=100.0), job("b", PAIR, remaining_seconds=300.0)]
    p = plan(NODE, running, [job("x", Demand(2, 1.0, 2.0), est_seconds=50.0)], now=1000.0)
    assert (p.pending["x"].eta_start, p.pending["x"].eta_finish) == (1300.0, 1350.0)
    arrivals = [(0.0, job("a", PAIR, est_seconds=100.0)), (0.0, job("b", PAIR, est_seconds=300.0))]
    run = _simulate([*arrivals, (10.0, job("x", Demand(2, 1.0, 2.0), est_seconds=50.0))], 40, 10.0)
    assert run.promised["x"] == (10.0, 300.0) and run.starts["x"] == 300.0


def test_running_jobs_placed_where_ray_put_them() -> None:
    two = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]
    # First fit would put r on node 0, leaving node 1's pair free; it is on node 1, so node 0's is free.
    p = plan(two, [job("r", PAIR, nodes=((1, 1),))], [job("x", Demand(2, 1.0, 2.0)), job("y", PAIR)])
    assert launched(p) == [] and p.pending["y"].why is Wait.RESERVED  # y would take x's pair on node 0
    p = plan(two, [job("r", PAIR, nodes=((1, 1),))], [job("y", PAIR)])
    assert launched(p) == ["y"]


# -- rule 4: quotas and borrowing ------------------------------------------------------------------------


def test_a_launch_past_the_quota_is_borrowed() -> None:
    quotas = {"vision": Quota(gpus=2.0)}
    p = plan(NODE, [], [job("a", PAIR, team="vision"), job("b", PAIR, team="vision")], quotas=quotas)
    assert p.decisions == (Launch("a", borrowed=False), Launch("b", borrowed=True))
    assert plan(NODE, [], [job("c", PAIR, team="nlp")], quotas=quotas).decisions == (Launch("c"),)  # no quota


def test_a_team_that_may_not_borrow_waits_at_its_quota() -> None:
    quotas = {"vision": Quota(gpus=2.0, may_borrow=False)}
    running = [job("r", PAIR, team="vision")]
    p = plan(NODE, running, [job("a", PAIR, team="vision"), job("b", PAIR, team="nlp")], quotas=quotas)
    assert launched(p) == ["b"]
    assert p.pending["a"].why is Wait.QUOTA and p.reserved_for is None
    assert p.pending["a"].reason == (
        "team vision at its quota (2/2 GPU, needs 2); it starts as the team's own jobs end"
    )


def test_quotas_reject_negative_limits() -> None:
    with pytest.raises(ConfigError, match="quota gpus=-1"):
        Quota(gpus=-1)


# -- rule 5: preemption ----------------------------------------------------------------------------------


def running_job(job_id: str, demand: Demand, priority: int = 0, **kw: object) -> Job:
    kw.setdefault("started", 0.0)
    return Job(job_id, demand, priority, preemptible=True, **kw)  # type: ignore[arg-type]


NOW = 1000.0  # every running_job has run 1000 s, past the default min_run_seconds of 600


def test_preempts_the_lowest_priority_and_does_not_launch_in_the_same_pass() -> None:
    running = [running_job("p1", PAIR, 1), running_job("p2", PAIR, 2)]
    p = plan(NODE, running, [job("high", PAIR, 5)], now=NOW)
    assert p.decisions == (Preempt("p1", for_job="high"),)
    assert p.pending["high"].why is Wait.PREEMPTING and p.pending["high"].eta_start == NOW


def test_preempts_the_fewest_jobs_at_the_lowest_priority() -> None:
    running = [running_job("one1", GPU1), running_job("one2", GPU1), running_job("two", PAIR)]
    assert preempted(plan(NODE, running, [job("high", PAIR, 5)], now=NOW)) == ["two"]  # one job, not two
    running = [running_job("one1", GPU1), running_job("one2", GPU1), running_job("two", PAIR, 1)]
    assert preempted(plan(NODE, running, [job("high", PAIR, 5)], now=NOW)) == ["one1", "one2"]  # lower first


def test_preempts_borrowed_jobs_first_but_not_needlessly() -> None:
    cluster = [{"CPU": 8.0, "GPU": 4.0}]
    cpu_borrowed = running_job("cpu", Demand(1, 4.0, 0.0), 0, team="y", borrowed=True)  # frees no GPU
    lent = running_job("lent", PAIR, 3, team="y", borrowed=True)
    running = [cpu_borrowed, running_job("own", PAIR, 0), lent]
    assert preempted(plan(cluster, running, [job("high", PAIR, 5)], now=NOW)) == ["lent"]  # borrowed first
    running = [cpu_borrowed, running_job("g1", PAIR), running_job("g2", PAIR, started=10.0)]
    p = plan(cluster, running, [job("high", PAIR, 5)], now=NOW)
    assert preempted(p) == ["g2"]  # the youngest; "cpu" frees no GPU, so it is spared


@pytest.mark.parametrize(
    "victim",
    [
        Job("fixed", Demand(1, 1.0, 4.0), 0, preemptible=False, started=0.0),  # not preemptible
        Job("young", Demand(1, 1.0, 4.0), 0, preemptible=True, started=NOW - 599.0),  # under min_run_seconds
        Job("ageless", Demand(1, 1.0, 4.0), 0, preemptible=True),  # started unknown
        Job("peer", Demand(1, 1.0, 4.0), 5, preemptible=True, started=0.0),  # same priority
        Job("going", Demand(1, 1.0, 4.0), 0, preemptible=True, started=0.0, stopping=True),  # asked already
        Job("default", Demand(1, 1.0, 4.0)),  # the dispatcher's jobs today: never preempted
    ],
)
def test_never_preempts(victim: Job) -> None:
    p = plan(NODE, [victim], [job("high", PAIR, 5)], now=NOW)
    assert p.decisions == () and p.pending["high"].why is Wait.FIRST


def test_min_run_seconds_is_configurable() -> None:
    young = running_job("young", Demand(1, 1.0, 4.0), started=NOW - 100.0)
    assert plan(NODE, [young], [job("high", PAIR, 5)], now=NOW).decisions == ()
    cfg = PolicyConfig(min_run_seconds=60.0)
    assert preempted(plan(NODE, [young], [job("high", PAIR, 5)], now=NOW, config=cfg)) == ["young"]


def test_no_preemption_when_the_wait_is_short_enough() -> None:
    low = running_job("low", Demand(1, 1.0, 4.0), remaining_seconds=60.0)
    cfg = PolicyConfig(preempt_wait_s=120.0)
    assert plan(NODE, [low], [job("high", PAIR, 5)], now=NOW, config=cfg).decisions == ()
    assert preempted(plan(NODE, [low], [job("high", PAIR, 5)], now=NOW)) == ["low"]


def test_a_team_within_its_quota_reclaims_borrowed_room_at_any_priority() -> None:
    running = [running_job("lent", PAIR, 9, team="y", borrowed=True), running_job("owned", PAIR, 9, team="y")]
    head = job("mine", PAIR, 0, team="x")
    assert preempted(plan(NODE, running, [head], now=NOW, quotas={"x": Quota(gpus=4.0)})) == ["lent"]
    assert plan(NODE, running, [head], now=NOW).decisions == ()  # no quota, no claim on borrowed room


def test_a_borrowing_job_preempts_only_borrowed_jobs_or_its_own_teams() -> None:
    running = [running_job("theirs", PAIR, 0, team="y"), running_job("ours", PAIR, 0, team="x")]
    head = job("more", PAIR, 5, team="x")  # x's quota is 0 GPU: it would borrow
    assert preempted(plan(NODE, running, [head], now=NOW, quotas={"x": Quota(gpus=0.0)})) == ["ours"]


def test_a_preempted_job_makes_room_over_passes_and_backfill_keeps_off_it() -> None:
    cluster = [{"CPU": 16.0, "GPU": 6.0}]
    queued = [job("high", Demand(1, 1.0, 4.0), 5), job("small", PAIR), job("more", PAIR)]
    low = running_job("low", Demand(1, 1.0, 4.0))
    first = plan(cluster, [low], queued, now=NOW)
    assert first.decisions == (Preempt("low", "high"), Launch("small"))  # small fits beside high
    stopping = Job("low", low.demand, preemptible=True, started=0.0, stopping=True)
    second = plan(cluster, [stopping, job("small", PAIR)], queued[::2], now=NOW + 5)
    assert second.decisions == () and second.pending["high"].why is Wait.FIRST  # no second Preempt
    assert second.pending["more"].why is Wait.NO_ROOM
    assert launched(plan(cluster, [job("small", PAIR)], queued[::2], now=NOW + 30)) == ["high"]


# -- rule 6: usage ---------------------------------------------------------------------------------------


def test_usage_decays_by_half_every_half_life() -> None:
    usage = {"x": 800.0, "y": 8.0}
    assert decay_usage(usage, 3600.0, half_life_s=3600.0) == {"x": 400.0, "y": 4.0}
    assert decay_usage(usage, 7200.0, half_life_s=3600.0) == {"x": 200.0, "y": 2.0}
    assert decay_usage(usage, 0.0, half_life_s=3600.0) == usage and usage == {"x": 800.0, "y": 8.0}
    with pytest.raises(ConfigError, match="half-life"):
        decay_usage(usage, 1.0, half_life_s=0.0)


def test_usage_adds_device_seconds() -> None:
    assert device_seconds(workers=4, cpus=1.0, gpus=2.0, seconds=10.0) == 80.0  # 4 workers x 2 GPUs
    assert device_seconds(workers=2, cpus=3.0, gpus=0.0, seconds=10.0) == 60.0  # a CPU job counts CPUs
    assert Demand(4, 1.0, 2.0).device_seconds(10.0) == 80.0
    usage = {"x": 1.0}
    assert add_usage(usage, "y", 5.0) == {"x": 1.0, "y": 5.0} and add_usage(usage, "x", 2.0) == {"x": 3.0}
    assert usage == {"x": 1.0}


# -- rule 7: reasons -------------------------------------------------------------------------------------


def test_reasons_say_what_is_needed_and_what_is_free() -> None:
    running = [job("r", Demand(1, 1.0, 2.0))]
    queued = [job("head", Demand(2, 1.0, 2.0), 5), job("next", Demand(2, 1.0, 2.0))]
    p = plan(NODE, running, queued)
    assert p.pending["head"].reason == (
        "first in line; needs 2 workers x (1 CPU, 2 GPU); room now for 1 (2 of 4 GPU free); "
        "waits for 1 running job to end; when is unknown (no estimates)"
    )
    assert p.pending["next"].reason == (
        "needs 2 workers x (1 CPU, 2 GPU); room now for 1 (2 of 4 GPU free); 1 job ahead of it "
        "(1 of a higher priority)"
    )
    assert [w.position for w in p.pending.values()] == [1, 2]


def test_a_job_that_can_never_fit_says_so() -> None:
    p = plan(NODE, [], [job("wide", Demand(3, 1.0, 2.0)), job("fat", Demand(1, 1.0, 8.0))])
    assert p.pending["wide"].reason == (
        "cluster too small: at most 2 of its 3 workers x (1 CPU, 2 GPU) fit on the idle cluster; "
        "ask for 2 workers or fewer"
    )
    assert p.pending["fat"].reason == (
        "cluster too small: no node has 1 CPU and 8 GPU (the largest has 16 CPU, 4 GPU); "
        "ask for smaller workers"
    )


def test_a_job_held_back_by_the_reservation_is_told_what_would_let_it_start() -> None:
    running = [job("r", PAIR, remaining_seconds=600.0)]
    queued = [job("big", Demand(1, 1.0, 4.0), 5), job("long", PAIR, est_seconds=900.0), job("blind", PAIR)]
    p = plan(NODE, running, queued)
    assert p.pending["big"].reason.endswith("waits for 1 running job to end, in about 10 min")
    assert p.pending["long"].reason == (
        "room reserved for job big (first in line at priority 5); it could start now if it ended within "
        "10 min, but needs about 15 min"
    )
    assert p.pending["blind"].reason.endswith(
        "; give it an estimate: it may start now if it ends within 10 min"
    )


def test_a_preempting_and_a_borrowing_job_say_so() -> None:
    p = plan(NODE, [running_job("low", Demand(1, 1.0, 4.0))], [job("high", PAIR, 5)], now=NOW)
    assert p.pending["high"].reason == "first in line; asked low to yield for it; it starts once they have"
    running = [job("r", Demand(1, 1.0, 4.0))]
    p = plan(NODE, running, [job("b", PAIR, team="vision")], quotas={"vision": Quota(gpus=2.0)})
    assert "quota" not in p.pending["b"].reason  # within it: 0 + 2 <= 2
    p = plan(NODE, running, [job("b", PAIR, team="vision")], quotas={"vision": Quota(gpus=1.0)})
    assert p.pending["b"].reason.endswith(
        "; team vision is past its quota (0/1 GPU, needs 2): it borrows idle room, after others"
    )


# -- rule 8: ETAs ----------------------------------------------------------------------------------------


def test_etas_follow_the_queue_as_running_jobs_end() -> None:
    running = [job("r1", PAIR, remaining_seconds=100.0), job("r2", PAIR, remaining_seconds=300.0)]
    queued = [
        job("x", Demand(2, 1.0, 2.0), 5, est_seconds=50.0),  # needs both: at 300, ends 350
        job("y", PAIR, est_seconds=100.0),  # after x: at 350, ends 450
        job("z", PAIR),  # beside y at 350; no estimate, so no finish and it never frees its room
        job("w", Demand(1, 1.0, 4.0)),  # needs z's room: unknown
    ]
    p = plan(NODE, running, queued, now=1000.0)
    etas = {k: (w.eta_start, w.eta_finish) for k, w in p.pending.items()}
    assert etas == {"x": (1300.0, 1350.0), "y": (1350.0, 1450.0), "z": (1350.0, None), "w": (None, None)}


def test_etas_are_unknown_without_estimates_and_bounded_in_depth() -> None:
    p = plan(NODE, [job("r", Demand(1, 1.0, 4.0))], [job("a", PAIR)])
    assert (p.pending["a"].eta_start, p.pending["a"].eta_finish) == (None, None)
    running = [job("r", Demand(1, 1.0, 4.0), remaining_seconds=10.0)]
    queued = [job(f"q{i}", PAIR, est_seconds=10.0) for i in range(6)]
    p = plan(NODE, running, queued, config=PolicyConfig(eta_depth=3))
    assert [w.eta_start for w in p.pending.values()] == [10.0, 10.0, 20.0, None, None, None]


def test_estimate_seconds() -> None:
    assert estimate_seconds(1000, 0.25) == 250.0
    assert estimate_seconds(-5, 0.25) == 0.0  # past the end: nothing left
    assert estimate_seconds(None, 0.25) is None and estimate_seconds(10, None) is None
    assert estimate_seconds(10, 0.0) is None  # no step measured yet
