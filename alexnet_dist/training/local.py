"""Training without Ray: the same loop in one process, or in every process ``torchrun`` starts on a node.

``alexnet-dist train SPEC --local`` runs it (``torchrun --nproc-per-node N -m alexnet_dist.training.local
SPEC`` for N workers on one node). It is what a GPU box without a cluster needs to debug a spec, and it is
how the device check runs on a machine without Ray: the loop is the very function Ray Train workers run,
given a :class:`LocalSession` instead of Ray's. Checkpoints go to a local folder (``checkpoint.storage``
or the settings' storage root, as a path), named and kept as Ray Train names and keeps them, so a run
started here and resumed here continues exactly; the last ``checkpoint.keep`` are kept.

Under torchrun the process group is joined from torchrun's environment (torch reads it); each process
takes the GPU pair ``2 * local_rank``, ``2 * local_rank + 1`` (or one GPU, ``local_rank``).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alexnet_dist.errors import AlexNetDistError, ClusterError, ConfigError
from alexnet_dist.events import EventTarget, YieldSignal
from alexnet_dist.settings import Settings
from alexnet_dist.spec import JobSpec
from alexnet_dist.training.checkpoint import _sort_key, copy_with_room
from alexnet_dist.training.driver import TrainResult, refuse_existing_run, result_from_metrics, worker_config
from alexnet_dist.training.loop import run_worker

__all__ = ["LocalCheckpoint", "LocalSession", "run_local"]


class LocalCheckpoint:
    """A committed checkpoint folder of a local run (what the loop's resume reads)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path

    def siblings(self) -> list[LocalCheckpoint]:
        return [LocalCheckpoint(p) for p in _checkpoints(Path(self.path).parent)]


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's committed checkpoint folders, newest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    return sorted(found, key=lambda p: _sort_key(p.name), reverse=True)


class LocalSession:
    """One process of a local run: rank and world from the process group (one process: rank 0 of 1)."""

    def __init__(self, run_dir: Path, *, keep: int) -> None:
        import torch.distributed as dist

        self.run_dir, self.keep = run_dir, keep
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.local_rank = dist.get_node_local_rank(fallback_rank=self.rank) if self.distributed else 0
        self.last_metrics: dict[str, Any] = {}

    def devices(self, mode: str) -> tuple[torch.device, torch.device]:
        if mode == "cpu":
            return torch.device("cpu"), torch.device("cpu")
        need = 2 if mode == "gpu-pair" else 1
        first = self.local_rank * need
        if torch.cuda.device_count() < first + need:
            raise ClusterError(
                f"scaling.devices={mode!r}: process {self.local_rank} needs GPUs {first}..{first + need - 1} "
                f"but this machine has {torch.cuda.device_count()}; use fewer processes or devices='gpu'"
            )
        return torch.device("cuda", first), torch.device("cuda", first + need - 1)

    def latest_checkpoint(self) -> LocalCheckpoint | None:
        found = _checkpoints(self.run_dir)
        return LocalCheckpoint(found[0]) if found else None

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: str | None,
        name: str | None,
        *,
        background: bool = False,
    ) -> None:
        if self.distributed:  # every rank has reached this step before the checkpoint counts
            import torch.distributed as dist

            dist.barrier()
        self.last_metrics = dict(metrics)
        if checkpoint_dir is None or name is None:
            return
        copy_with_room(checkpoint_dir, self.run_dir / name)  # whole or not at all; a full disk is one line
        if background:  # the loop leaves a background upload's folder to the runner (as Ray Train does)
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        for old in _checkpoints(self.run_dir)[self.keep :]:
            shutil.rmtree(old, ignore_errors=True)


def run_local(
    spec: JobSpec,
    *,
    run_name: str,
    settings: Settings,
    events: EventTarget | None = None,
    yield_signal: YieldSignal | None = None,
    resume: bool = True,
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``spec`` in this process (or as one torchrun process) and return the result."""
    return _run_local(spec, run_name=run_name, settings=settings, events=events, yield_signal=yield_signal,
                      resume=resume, fault=fault)[0]  # fmt: skip


def _run_local(
    spec: JobSpec,
    *,
    run_name: str,
    settings: Settings,
    events: EventTarget | None,
    yield_signal: YieldSignal | None,
    resume: bool,
    fault: dict[str, Any] | None,
) -> tuple[TrainResult, int]:
    """:func:`run_local`, and this process's rank (0 unless torchrun started it)."""
    config, store = worker_config(
        spec, run_name=run_name, settings=settings, events=events, yield_signal=yield_signal, fault=fault
    )
    if not store.url.startswith("file://"):
        raise ConfigError(
            f"checkpoint.storage={store.url!r}: a local run keeps its checkpoints in a local folder; "
            "set --set checkpoint.storage=/path (or run it on Ray)"
        )
    if not resume:
        refuse_existing_run(config, settings)
    run_dir = Path(store.url.removeprefix("file://")) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    import torch.distributed as dist

    torchrun = dist.is_torchelastic_launched()  # torch reads its launcher's environment
    joined = False
    if torchrun and not dist.is_initialized():
        dist.init_process_group(backend=config["backend"])
        joined = True
    if not torchrun and spec.scaling.workers != 1:
        raise ConfigError(
            f"scaling.workers={spec.scaling.workers}: a plain local run is one process; use "
            f"`torchrun --nproc-per-node {spec.scaling.workers} -m alexnet_dist.training.local SPEC`"
        )
    session = LocalSession(run_dir, keep=spec.checkpoint.keep)
    t0 = time.perf_counter()
    try:
        run_worker(config, session)
    finally:
        if joined:
            dist.destroy_process_group()
    latest = session.latest_checkpoint()
    result = result_from_metrics(
        session.last_metrics, time.perf_counter() - t0, f"file://{latest.path}" if latest else None
    )
    return result, session.rank


def main(argv: list[str] | None = None) -> int:
    """``python -m alexnet_dist.training.local SPEC [--set k=v]``: the entry point torchrun starts."""
    import json

    from alexnet_dist.settings import load_settings
    from alexnet_dist.spec import load_spec

    ap = argparse.ArgumentParser(prog="python -m alexnet_dist.training.local")
    ap.add_argument("spec")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--run-name")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec, args.overrides)
        result, rank = _run_local(spec, run_name=args.run_name or spec.name, settings=load_settings(),
                                  events=None, yield_signal=None, resume=True, fault=None)  # fmt: skip
    except AlexNetDistError as err:
        print(f"alexnet-dist: error: {err}", file=sys.stderr)
        return err.exit_code
    if rank == 0:  # one result line for the whole torchrun job, not one a process
        print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
