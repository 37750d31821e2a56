"""The epoch plan: which shards each rank's streams read and how many batches each yields, as pure arithmetic.

Everything is computed from (manifest, config, epoch, world size) alone, identically on every rank, before a
byte is read (:func:`plan_epoch`):

1. shard order: training shuffles the manifest's shards with (seed, epoch); evaluation keeps their order;
2. shards go to ranks, then to each rank's streams (one per loader worker), each time to the one with the
   fewest samples so far: loads stay balanced by the manifest's counts, and each sample has one owner;
3. quotas: a stream yields ``n // B`` batches when training (drop_last) or ``ceil(n / B)`` in evaluation;
   training trims the ranks' totals to the smallest, so every rank yields the same ``len`` and DDP never
   waits; evaluation pads the shorter ranks with one-sample batches of label ``PAD_LABEL`` (-1) at the end,
   so every rank also has the same ``len`` while each real sample is evaluated exactly once.

Resuming mid-epoch needs only the number of batches consumed: :func:`round_robin_position` turns it back
into each stream's progress and the stream that comes next.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alexnet_dist.data.manifest import Manifest, ShardInfo
from alexnet_dist.errors import DataError

if TYPE_CHECKING:  # for annotations only: the loader imports this module
    from alexnet_dist.data.loader import LoaderConfig


@dataclass(frozen=True)
class StreamPlan:
    rank: int
    stream: int
    shards: tuple[ShardInfo, ...]
    quota: int  # batches this stream yields this epoch

    @property
    def samples(self) -> int:
        return sum(s.count for s in self.shards)


@dataclass(frozen=True)
class EpochPlan:
    streams: tuple[tuple[StreamPlan, ...], ...]  # [rank][stream]
    length: int  # batches every rank yields (padding included)


def _spread(shards: list[ShardInfo], bins: int) -> list[list[ShardInfo]]:
    """Each shard, in order, to the bin with the fewest samples (ties: lowest index)."""
    out: list[list[ShardInfo]] = [[] for _ in range(bins)]
    load = [0] * bins
    for shard in shards:
        b = min(range(bins), key=lambda i: (load[i], i))
        out[b].append(shard)
        load[b] += shard.count
    return out


def plan_epoch(manifest: Manifest, cfg: LoaderConfig, epoch: int, world_size: int) -> EpochPlan:
    shards = list(manifest.shards)
    if cfg.mode == "train":
        random.Random(f"{cfg.seed}:{epoch}").shuffle(shards)
    nstreams, bsz = max(1, cfg.num_workers), cfg.batch_size
    per_rank = [_spread(r, nstreams) for r in _spread(shards, world_size)]
    counts = [[sum(s.count for s in ss) for ss in rank] for rank in per_rank]
    if cfg.last_dropped:
        quotas = [[n // bsz for n in rank] for rank in counts]
        length = min(sum(q) for q in quotas)
        if cfg.max_batches is not None:
            length = min(length, cfg.max_batches)
        if length == 0:
            raise DataError(
                f"{manifest.url}: some rank of {world_size} gets no full batch of {bsz}; use smaller shards "
                "(shards build --shard-size), fewer workers or a smaller batch"
            )
        for q in quotas:  # trim the biggest streams first until the rank's total is `length`
            while sum(q) > length:
                q[max(range(len(q)), key=lambda i: (q[i], -i))] -= 1
    else:
        quotas = [[math.ceil(n / bsz) for n in rank] for rank in counts]
        length = max(sum(q) for q in quotas)
        if cfg.max_batches is not None:
            length = min(length, cfg.max_batches)
            for q in quotas:
                while sum(q) > length:
                    q[max(range(len(q)), key=lambda i: (q[i], -i))] -= 1
    streams = tuple(
        tuple(StreamPlan(r, w, tuple(per_rank[r][w]), quotas[r][w]) for w in range(nstreams))
        for r in range(world_size)
    )
    return EpochPlan(streams, length)


def round_robin_position(quotas: list[int], consumed: int) -> tuple[list[int], int]:
    """After ``consumed`` round-robin batches over streams with these quotas: (done per stream, next)."""
    done, w, n = [0] * len(quotas), 0, len(quotas)
    for _ in range(min(consumed, sum(quotas))):
        while done[w] >= quotas[w]:
            w = (w + 1) % n
        done[w] += 1
        w = (w + 1) % n
    for _ in range(n):  # the next stream that still has batches
        if done[w] < quotas[w]:
            break
        w = (w + 1) % n
    return done, w
