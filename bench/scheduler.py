"""Scheduling policy cost: milliseconds per ``plan`` pass with 10,000 queued jobs beside 100 running ones,
against the same pass with 100 queued (the baseline, measured in the same run), and their ratio: how a
pass's cost grows with the queue. Every queued job gets a decision or a Pending (reason, position, ETA),
so jobs/s counts both.

    .venv/bin/python bench/scheduler.py [--queued 10000] [--baseline 100] [--running 100] [--repeat 7]

The cluster is 25 nodes of 32 CPUs and 8 GPUs; jobs are 1-4 workers of a GPU pair, one GPU or CPUs only,
at 10 priorities from 6 teams (half with quotas), most with estimates, as a busy shared cluster has them.
The target is a pass under 50 ms at 10,000 queued. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from alexnet_dist.service.policy import Demand, Job, Launch, Preempt, plan
from alexnet_dist.service.resources import Quota

NODES = [{"CPU": 32.0, "GPU": 8.0} for _ in range(25)]
SHAPES = [Demand(w, 1.0, g) for w in (1, 2, 4) for g in (1.0, 2.0)] + [Demand(2, 4.0, 0.0)]
TEAMS = [f"team{i}" for i in range(6)]
QUOTAS = {t: Quota(gpus=40.0) for t in TEAMS[:3]}
NOW = 100_000.0


def workload(n_running: int, n_queued: int, seed: int = 0) -> tuple[list[Job], list[Job]]:
    rng = random.Random(seed)
    running = [
        Job(
            f"r{i}",
            rng.choice(SHAPES[:4]),
            rng.randint(0, 9),
            team=rng.choice(TEAMS),
            preemptible=rng.random() < 0.5,
            started=NOW - rng.uniform(0, 7200),
            remaining_seconds=rng.uniform(60, 7200) if rng.random() < 0.8 else None,
        )
        for i in range(n_running)
    ]
    queued = [
        Job(
            f"q{i}",
            rng.choice(SHAPES),
            rng.randint(0, 9),
            team=rng.choice(TEAMS),
            est_seconds=rng.uniform(300, 20_000) if rng.random() < 0.8 else None,
        )
        for i in range(n_queued)
    ]
    queued.sort(key=lambda j: -j.priority)  # the store's queue order: priority, then FIFO
    return running, queued


def timed(running: list[Job], queued: list[Job], repeat: int) -> dict[str, float]:
    usage = {t: 1000.0 * i for i, t in enumerate(TEAMS)}
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        p = plan(NODES, running, queued, now=NOW, quotas=QUOTAS, usage=usage)
        times.append(time.perf_counter() - t0)
    assert len(p.decisions) - sum(isinstance(d, Preempt) for d in p) + len(p.pending) == len(queued)
    ms = statistics.median(times) * 1e3
    return {
        "queued": len(queued),
        "ms_per_pass": round(ms, 3),
        "jobs_per_s": round(len(queued) / (ms / 1e3), 1),
        "launches": sum(isinstance(d, Launch) for d in p),
        "preemptions": sum(isinstance(d, Preempt) for d in p),
        "with_eta": sum(w.eta_start is not None for w in p.pending.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--baseline", type=int, default=100)
    ap.add_argument("--running", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    running, queued = workload(args.running, args.queued)
    small = timed(running, queued[:: max(1, args.queued // args.baseline)][: args.baseline], args.repeat)
    big = timed(running, queued, args.repeat)
    print(
        json.dumps(
            {
                "bench": "scheduler.plan",
                "running": args.running,
                "nodes": len(NODES),
                "figure": big,
                "baseline": small,
                "ratio_ms": round(big["ms_per_pass"] / small["ms_per_pass"], 2),
                "ratio_queued": round(big["queued"] / small["queued"], 2),
                "target_ms": 50.0,
                "meets_target": big["ms_per_pass"] < 50.0,
            }
        )
    )


if __name__ == "__main__":
    main()
