"""The training loop every worker runs: setup, one epoch, validate, finish, as steps one can read alone.

Every worker holds the two towers of AlexNet on its own pair of devices (section 3.2): two GPUs on a GPU
node (``scaling.devices = "gpu-pair"``), one GPU for both (``"gpu"``), or the CPU.
DistributedDataParallel joins the workers (data parallel). Ray's ``prepare_model`` would move the whole
model to one device, so we wrap it ourselves: ``DistributedDataParallel(model, device_ids=None)``.

The global batch (``train.batch_size``, 128 in the paper) is split evenly: each of N workers runs
batch_size / N samples a step and DDP averages the gradients, so one step of N workers equals one step
of one worker with the whole batch (tests/training checks that).

Resumption is exact: the sample order is a pure function of (seed, epoch, world size), each sample's
augmentation of (seed, epoch, key), and dropout is reseeded every step from (seed, global step, rank).
A checkpoint (every epoch end, and every ``checkpoint.every_steps`` steps) therefore continues the run
where it stopped, mid-epoch included.

The loop sees its runner only through a :class:`~alexnet_dist.training.session.Session` (rank, devices,
the checkpoint to resume from, reporting) and its outputs only through :mod:`~alexnet_dist.training.sinks`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from alexnet_dist.data.batch import PAD_LABEL
from alexnet_dist.events import YieldSignal
from alexnet_dist.model.config import AlexNetConfig, model_config
from alexnet_dist.model.network import AlexNet
from alexnet_dist.spec import JobSpec
from alexnet_dist.training.devices import configure_gpu, data_parallel
from alexnet_dist.training.evaluation import EvalResult, evaluate
from alexnet_dist.training.inputs import DeviceFeed
from alexnet_dist.training.resumption import checkpoint_due, resume, save, yield_requested
from alexnet_dist.training.schedule import LRSchedule
from alexnet_dist.training.session import RaySession, Session
from alexnet_dist.training.sinks import Sinks, make_sinks

log = logging.getLogger(__name__)

__all__ = ["Progress", "Worker", "run_worker", "train_loop_per_worker", "training_loss"]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs; ``config`` is JSON-able (the spec travels as JSON)."""
    run_worker(config, RaySession())


def run_worker(config: dict[str, Any], session: Session) -> None:
    """Train ``config["spec"]`` on this worker to the end, resuming from the session's checkpoint."""
    w = setup(config, session)
    resume(w)
    while w.progress.epoch < w.spec.train.epochs:
        totals = train_epoch(w)
        if w.yielded:
            break
        end_epoch(w, *totals)
        if w.progress.epoch < w.spec.train.epochs and yield_requested(w):
            save(w, metrics={"yielded": 1}, background=False)
            w.yielded = True
            break
    if w.yielded:
        p = w.progress
        w.sinks({"type": "yielded", "epoch": p.epoch, "step": p.step, "global_step": p.global_step})
    else:
        finish(w)
    w.sinks.close()


@dataclass
class Progress:
    """Where the run stands: what a checkpoint restores."""

    epoch: int = 0  # epochs finished
    step: int = 0  # steps done in the current epoch
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    train_seconds: float = 0.0  # time in training steps, summed over the run's epochs


@dataclass
class Worker:
    """One worker's run: what :func:`setup` builds, and the progress the loop carries."""

    spec: JobSpec
    config: dict[str, Any]
    session: Session
    sinks: Sinks
    devices: tuple[torch.device, torch.device]
    cfg: AlexNetConfig
    model: AlexNet
    net: torch.nn.Module  # the model, or DDP around it
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    train_loader: Any
    eval_loader: Callable[[str], Any]  # mode ("val" or "ten_crop") -> a loader over the validation set
    train_manifest: Any
    autocast: Any
    feed: DeviceFeed
    progress: Progress = field(default_factory=Progress)
    last_checkpoint: float = field(default_factory=time.monotonic)  # when the newest checkpoint was taken
    yield_signal: YieldSignal | None = None  # rank 0's way to hear that the service wants the room back
    yielded: bool = False  # the run checkpointed and stopped for the service

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world(self) -> int:
        return self.session.world_size

    @property
    def on_gpu(self) -> bool:
        return self.devices[0].type == "cuda"

    def evaluate(self, mode: str) -> EvalResult:
        m = self.train_manifest
        return evaluate(self.model, self.eval_loader(mode), m.mean, m.std, devices=self.devices,
                        autocast=self.autocast, world=self.world, feed=self.feed)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# setup


def setup(config: dict[str, Any], session: Session) -> Worker:
    """The network on this worker's devices (identical initial weights on every rank), DDP, the optimizer,
    the loaders over this rank's share, the schedule, and rank 0's sinks."""
    from alexnet_dist.data.loader import LoaderConfig, make_loader
    from alexnet_dist.data.manifest import load_manifest

    spec = JobSpec.from_json(config["spec"])
    rank, world = session.rank, session.world_size
    d0, d1 = session.devices(spec.scaling.devices)
    on_gpu = d0.type == "cuda"
    if on_gpu:
        configure_gpu(spec)
    else:
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    endpoint = config.get("s3_endpoint_url")
    sinks = make_sinks(config, rank)

    train_manifest = load_manifest(spec.data.train, endpoint_url=endpoint)
    val_manifest = load_manifest(spec.data.val, endpoint_url=endpoint)
    cfg = model_config(spec)
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = AlexNet(spec.model.num_classes, config=cfg, devices=(d0, d1))
    if on_gpu and spec.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = data_parallel(model, spec, world, on_gpu)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=spec.optim.lr,
        momentum=spec.optim.momentum,
        weight_decay=spec.optim.weight_decay,
        fused=True,  # one kernel over all parameters, not a loop over tensors
    )
    common = dict(
        crop=cfg.image_size,
        seed=spec.seed,
        num_workers=spec.data.loader_workers,
        max_bad_fraction=spec.data.max_bad_fraction,
        pin_memory=on_gpu,  # page-locked batches: their copies to the GPU run asynchronously
        decoder=spec.data.decoder,
        device=str(d0),  # where the "device" decoder decodes
        read_ahead=spec.data.read_ahead,
        read_ahead_chunk=spec.data.read_ahead_chunk_mb << 20,
    )
    train_loader = make_loader(
        train_manifest,
        LoaderConfig(
            batch_size=spec.per_worker_batch,
            mode="train",
            shuffle_buffer=spec.data.shuffle_buffer,
            pca_lighting=spec.data.pca_lighting,
            max_batches=spec.train.max_steps_per_epoch,
            drop_last=True,
            **common,
        ),
        rank=rank,
        world_size=world,
        endpoint_url=endpoint,
    )
    eval_batch = max(spec.per_worker_batch, 64)

    def eval_loader(mode: str):
        return make_loader(
            val_manifest,
            LoaderConfig(
                batch_size=eval_batch,
                mode=mode,
                shuffle_buffer=0,
                pca_lighting=0.0,
                drop_last=False,
                **common,
            ),  # fmt: skip
            rank=rank,
            world_size=world,
            endpoint_url=endpoint,
        )

    schedule = LRSchedule.from_spec(spec.optim, steps_per_epoch=len(train_loader), epochs=spec.train.epochs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu and spec.train.bf16)
    feed = DeviceFeed(train_manifest.mean, train_manifest.std, (d0, d1),
                      channels_last=on_gpu and spec.train.channels_last)  # fmt: skip
    signal = YieldSignal.from_dict(config["yield"]) if config.get("yield") and rank == 0 else None
    return Worker(spec, config, session, sinks, (d0, d1), cfg, model, net, optimizer, schedule,
                  train_loader, eval_loader, train_manifest, autocast, feed, yield_signal=signal)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# one epoch


def _step_seed(seed: int, global_step: int, rank: int) -> int:
    # Dropout masks depend only on where the run is, not on how it got there (exact resumption).
    return (seed * 1_000_003 + global_step * 7919 + rank * 104_729) % (2**63)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the real samples (PAD_LABEL rows pad a short stream: no loss, no gradient)."""
    return F.cross_entropy(logits, labels, ignore_index=PAD_LABEL, label_smoothing=label_smoothing)


def _seed_devices(seed: int, devices: tuple[torch.device, torch.device]) -> None:
    """Seed the generators dropout draws from on ``devices``. Not ``torch.manual_seed``: with CUDA built
    in but not started (CPU workers) it records a stack trace per call for a lazy CUDA seed."""
    torch.default_generator.manual_seed(seed)
    for device in {d for d in devices if d.type == "cuda"}:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def train_epoch(w: Worker) -> tuple[torch.Tensor, int, float]:
    """The rest of the current epoch's steps: (this rank's loss sum, its real samples, seconds)."""

    spec, p, (d0, _) = w.spec, w.progress, w.devices
    steps_per_epoch = len(w.train_loader)
    w.train_loader.set_epoch(p.epoch)
    if p.step:
        w.train_loader.load_state_dict({"epoch": p.epoch, "batches": p.step, "seed": spec.seed})
    w.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=d0)  # summed on the device: no sync a step
    seen = 0
    t_epoch = time.perf_counter()
    t_log, seen_log = t_epoch, 0
    for batch in w.feed(w.train_loader):
        for g in w.optimizer.param_groups:
            g["lr"] = w.schedule.lr_at(p.global_step)
        _seed_devices(_step_seed(spec.seed, p.global_step, w.rank), w.devices)
        with w.autocast:
            loss = training_loss(w.net(*batch.inputs), batch.labels, spec.train.label_smoothing)
        w.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        w.optimizer.step()
        p.step += 1
        p.global_step += 1
        _maybe_die(w.config.get("fault"), w.rank, p.global_step)
        loss_sum += loss.detach().double() * batch.valid  # loss is a mean over the batch
        seen += batch.valid
        if p.step % spec.train.log_every_steps == 0 or p.step == steps_per_epoch:
            now = time.perf_counter()
            w.sinks(
                {
                    "type": "step",
                    "epoch": p.epoch + 1,
                    "epochs": spec.train.epochs,
                    "step": p.step,
                    "steps_per_epoch": steps_per_epoch,
                    "loss": float(loss.item()),
                    "lr": w.optimizer.param_groups[0]["lr"],
                    "images_per_s": (seen - seen_log) * w.world / max(now - t_log, 1e-9),
                }
            )
            t_log, seen_log = now, seen
        if p.step < steps_per_epoch and p.step % spec.train.log_every_steps == 0 and yield_requested(w):
            save(w, metrics={"yielded": 1}, background=False)  # the process ends next: upload it now
            w.yielded = True
            break
        if p.step < steps_per_epoch and checkpoint_due(w):
            save(w)
    return loss_sum, seen, time.perf_counter() - t_epoch


def _maybe_die(fault: dict[str, Any] | None, rank: int, global_step: int) -> None:
    """Fault injection for the resumption tests: a real process death, once per marker file."""
    if (
        fault
        and fault["rank"] == rank
        and fault["global_step"] == global_step
        and not os.path.exists(fault["marker"])
    ):
        with open(fault["marker"], "w") as f:
            f.write(str(global_step))
        os._exit(1)


# --------------------------------------------------------------------------------------------------
# validate


def end_epoch(w: Worker, loss_sum: torch.Tensor, seen: int, epoch_seconds: float) -> None:
    """Validate (central crop, counts summed over ranks) when due, record the epoch, checkpoint."""
    spec, p = w.spec, w.progress
    p.train_seconds += epoch_seconds
    stats = {"epoch": p.epoch + 1, "epochs": spec.train.epochs, "lr": w.optimizer.param_groups[0]["lr"]}
    if (p.epoch + 1) % spec.train.val_every_epochs == 0 or p.epoch + 1 == spec.train.epochs:
        val = w.evaluate("val")
        stats.update(val_top1_error=val.top1_error, val_top5_error=val.top5_error, val_samples=val.samples)
        if w.schedule.observe(val.top1_error):
            w.sinks({"type": "lr_decay", "epoch": p.epoch + 1, "lr": w.schedule.lr})
    stats.update(
        train_loss=_all_mean(loss_sum, seen, w.world),
        images_per_s=seen * w.world / max(epoch_seconds, 1e-9),
        seconds=epoch_seconds,
        train_seconds=p.train_seconds,
    )
    p.history.append(stats)
    w.sinks({"type": "epoch", **stats})
    p.epoch, p.step = p.epoch + 1, 0
    save(w, metrics={k: v for k, v in stats.items() if isinstance(v, (int, float))})


def _all_mean(total: torch.Tensor, count: int, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        t = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=total.device)])
        dist.all_reduce(t)  # on the device the sum lives on: NCCL on a GPU, gloo on the CPU
        total, count = t[0], int(t[1])
    return float(total) / max(count, 1)


# --------------------------------------------------------------------------------------------------
# finish


def finish(w: Worker) -> None:
    """The final evaluation (section 4.1: ten crops, softmax averaged), the model file, the last report."""
    spec, p = w.spec, w.progress
    mode = "ten_crop" if spec.train.ten_crop_eval else "val"
    final = w.evaluate(mode)
    last = p.history[-1] if p.history else {}
    result = {
        "top1_error": final.top1_error,
        "top5_error": final.top5_error,
        "ten_crop": mode == "ten_crop",
        "val_samples": final.samples,
        "val_top1_error": last.get("val_top1_error"),
        "val_top5_error": last.get("val_top5_error"),
        "epochs": spec.train.epochs,
        "steps": p.global_step,
        "train_seconds": p.train_seconds,
        "images_per_s": last.get("images_per_s", 0.0),
        "model_url": w.config["model_url"],
    }
    if w.rank == 0:
        _write_model_file(w, result)
        w.sinks({"type": "final", **result})
    # The driver reads the result and the per-epoch history from these metrics, not by loading the
    # final checkpoint (model and optimizer: hundreds of MB for the paper's network, from S3).
    epochs_history = json.dumps([h for h in p.history if "final" not in h])
    p.history.append({"final": result})
    save(w, finished=True, metrics={"final": json.dumps(result), "history": epochs_history})


def _write_model_file(w: Worker, result: dict[str, Any]) -> None:
    """The model file and its JSON sidecar beside the run's checkpoints."""
    from alexnet_dist import storage
    from alexnet_dist.model.file import model_file_bytes, model_file_meta

    url, endpoint = w.config["model_url"], w.config.get("s3_endpoint_url")
    source = {
        "job": w.spec.name,
        "run": w.config["run_name"],
        "top1_error": result["top1_error"],
        "top5_error": result["top5_error"],
        "ten_crop": result["ten_crop"],
    }
    meta = model_file_meta(w.cfg, w.spec, w.train_manifest, source)
    storage.write_bytes(url, model_file_bytes(w.model.state_dict(), meta), endpoint_url=endpoint)
    sidecar = {**{k: v for k, v in meta.items() if k != "config"}, "preset": w.cfg.name, "result": result}
    storage.write_bytes(url.removesuffix(".pt") + ".json", json.dumps(sidecar, indent=1).encode(),
                        endpoint_url=endpoint)  # fmt: skip
