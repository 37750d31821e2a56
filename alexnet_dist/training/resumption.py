"""Where a worker's run stops and starts again: resuming from a checkpoint, writing one, and the two
questions every rank answers together at a step (is a checkpoint due; did the service ask us to yield).

Every function here is called by every rank at the same step: ``save`` reports (a barrier), and the two
questions agree through one all-reduce, so the ranks never disagree about where the run stands.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

import torch

from alexnet_dist.training.checkpoint import checkpoint_dir_name, load_newest_good, write_checkpoint

if TYPE_CHECKING:
    from alexnet_dist.training.loop import Worker

log = logging.getLogger(__name__)

__all__ = ["align_optimizer_state", "checkpoint_due", "resume", "save", "yield_requested"]


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Lay every per-parameter state tensor (momentum) out as its parameter is.

    ``load_state_dict`` keeps the saved tensors' strides, and fused SGD walks a parameter and its momentum
    buffer as flat memory: a channels-last weight with an NCHW buffer (a run resumed on another layout or
    device type) would be updated with the wrong momentum. The values are kept; only the layout changes.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                is_like = isinstance(value, torch.Tensor) and value.shape == param.shape
                if is_like and value.stride() != param.stride():
                    optimizer.state[param][key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def resume(w: Worker) -> None:
    """Continue from the session's newest good checkpoint, if there is one."""
    restored = load_newest_good(w.session.latest_checkpoint())
    if restored is None:
        return
    ckpt, state = restored
    w.model.load_state_dict(state["model"])
    w.optimizer.load_state_dict(state["optimizer"])
    align_optimizer_state(w.optimizer)
    w.schedule.load_state_dict(state["schedule"])
    p = w.progress
    p.epoch, p.step, p.global_step = state["epoch"], state["step"], state["global_step"]
    p.history, p.train_seconds = list(state.get("history", [])), float(state.get("train_seconds", 0.0))
    saved_world = state["data"].get("world_size", w.world)
    if saved_world != w.world and p.step:
        log.warning("world size changed (%s -> %s): restarting epoch %d from its start", saved_world,
                    w.world, p.epoch)  # fmt: skip
        p.global_step -= p.step
        p.step = 0
    w.sinks({"type": "resumed", "epoch": p.epoch, "step": p.step, "global_step": p.global_step,
             "from": ckpt.path})  # fmt: skip


def save(
    w: Worker,
    *,
    finished: bool = False,
    metrics: dict[str, Any] | None = None,
    background: bool | None = None,
) -> None:
    """Every rank calls this (reporting is a barrier); rank 0 writes the checkpoint.

    Mid-run checkpoints upload in the background when the spec allows it (the runner deletes the folder
    once uploaded); the final one is uploaded before this returns.
    """
    p, spec = w.progress, w.spec
    metrics = {"epoch": p.epoch, "step": p.step, "global_step": p.global_step, **(metrics or {})}
    w.last_checkpoint = time.monotonic()
    if background is None:
        background = spec.checkpoint.async_upload and not finished
    if w.rank != 0:
        w.session.report(metrics, None, None)
        return
    tmp = tempfile.mkdtemp(prefix="alexnet-ckpt-")
    try:
        write_checkpoint(
            tmp,
            {
                "format": 1,
                "model": w.model.state_dict(),
                "optimizer": w.optimizer.state_dict(),
                "schedule": w.schedule.state_dict(),
                "epoch": p.epoch,
                "step": p.step,
                "global_step": p.global_step,
                "data": {"epoch": p.epoch, "batches": p.step, "seed": spec.seed, "world_size": w.world},
                "rng": {"torch": torch.get_rng_state()},
                "spec": spec.to_json(),
                "history": p.history,
                "train_seconds": p.train_seconds,
                "finished": finished,
            },
        )
        w.session.report(metrics, tmp, checkpoint_dir_name(p.global_step), background=background)
    finally:
        if not background:
            shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_due(w: Worker) -> bool:
    """Whether every rank checkpoints after this step: every ``every_steps`` steps, or (checked on log
    steps only, so the ranks' agreement costs one tiny all-reduce there) once ``every_minutes`` passed."""
    spec, p = w.spec, w.progress
    every = spec.checkpoint.every_steps
    if every and p.step % every == 0:
        return True
    minutes = spec.checkpoint.every_minutes
    if not minutes or p.step % spec.train.log_every_steps:
        return False
    due = time.monotonic() - w.last_checkpoint >= minutes * 60
    if w.world > 1:  # rank clocks differ: checkpoint when any rank's is due, all at this same step
        import torch.distributed as dist

        flag = torch.tensor([int(due)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        due = bool(flag.numpy()[0])  # a host tensor: no device to wait for
    return due


def yield_requested(w: Worker) -> bool:
    """Whether the service asked this run to yield: rank 0 reads it, every rank agrees at this step."""
    if not w.config.get("yield"):  # the same on every rank: not run by the service, nothing to hear
        return False
    asked = w.yield_signal is not None and w.rank == 0 and w.yield_signal.requested()
    if w.world > 1:
        import torch.distributed as dist

        flag = torch.tensor([int(asked)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        asked = bool(flag.numpy()[0])
    return asked
