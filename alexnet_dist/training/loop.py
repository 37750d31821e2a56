"""Distributed training on Ray Train: the per-worker loop and the driver that builds the TorchTrainer.

Every Ray Train worker holds the two towers of AlexNet on its own pair of devices (section 3.2): two
GPUs on a GPU node (``scaling.devices = "gpu-pair"``), one GPU for both (``"gpu"``), or the CPU.
DistributedDataParallel joins the workers (data parallel). Ray's ``prepare_model`` would move the whole
model to one device, so we wrap it ourselves: ``DistributedDataParallel(model, device_ids=None)``.

The global batch (``train.batch_size``, 128 in the paper) is split evenly: each of N workers runs
batch_size / N samples a step and DDP averages the gradients, so one step of N workers equals one step
of one worker with the whole batch (tests/test_train.py checks that).

Resumption is exact: the sample order is a pure function of (seed, epoch, world size), each sample's
augmentation of (seed, epoch, key), and dropout is reseeded every step from (seed, global step, rank).
A checkpoint (every epoch end, and every ``checkpoint.every_steps`` steps) therefore continues the run
where it stopped, mid-epoch included.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from alexnet_dist.errors import ClusterError, ConfigError
from alexnet_dist.events import EventTarget
from alexnet_dist.model.network import PRESETS, AlexNet, AlexNetConfig
from alexnet_dist.settings import Settings
from alexnet_dist.spec import JobSpec
from alexnet_dist.training.checkpoint import (
    checkpoint_dir_name,
    load_newest_good,
    write_checkpoint,
)
from alexnet_dist.training.evaluation import evaluate
from alexnet_dist.training.schedule import LRSchedule

log = logging.getLogger(__name__)

__all__ = ["TrainResult", "build_trainer", "run_training", "train_loop_per_worker"]


@dataclass(frozen=True)
class TrainResult:
    top1_error: float  # final evaluation: ten-crop when ``ten_crop`` (section 4.1), else central crop
    top5_error: float
    ten_crop: bool
    val_top1_error: float | None  # the last per-epoch validation (central crop)
    val_top5_error: float | None
    val_samples: int
    epochs: int
    steps: int
    seconds: float  # wall time of fit(), including Ray start-up and restarts
    train_seconds: float  # time spent in training steps, summed over the run's epochs
    images_per_s: float  # training throughput of the last epoch, all workers together
    model_url: str
    checkpoint_url: str | None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Inside a Ray Train worker


def _devices(mode: str) -> tuple[torch.device, torch.device]:
    if mode == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    import ray.train.torch

    devs = ray.train.torch.get_devices()
    if mode == "gpu-pair":
        if len(devs) < 2:
            raise ClusterError(f"scaling.devices='gpu-pair' but this worker got {len(devs)} GPU(s)")
        return devs[0], devs[1]
    return devs[0], devs[0]


def model_config(spec: JobSpec) -> AlexNetConfig:
    """The network a spec trains: its preset, with the spec's dropout when it sets one."""
    cfg = PRESETS[spec.model.preset]
    if spec.model.dropout is not None:
        cfg = AlexNetConfig.from_dict({**cfg.to_dict(), "dropout": spec.model.dropout})
    return cfg


def _step_seed(seed: int, global_step: int, rank: int) -> int:
    # Dropout masks depend only on where the run is, not on how it got there (exact resumption).
    return (seed * 1_000_003 + global_step * 7919 + rank * 104_729) % (2**63)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the real samples (PAD_LABEL rows pad a short stream: no loss, no gradient)."""
    from alexnet_dist.data.loader import PAD_LABEL

    return F.cross_entropy(logits, labels, ignore_index=PAD_LABEL, label_smoothing=label_smoothing)


def _seed_devices(seed: int, devices: tuple[torch.device, torch.device]) -> None:
    """Seed the generators dropout draws from on ``devices``. Not ``torch.manual_seed``: with CUDA built
    in but not started (CPU workers) it records a stack trace per call for a lazy CUDA seed, ~80 us."""
    torch.default_generator.manual_seed(seed)
    for device in {d for d in devices if d.type == "cuda"}:
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _publisher(config: dict[str, Any], rank: int):
    if rank != 0 or not config.get("events"):
        return None
    from alexnet_dist.events import EventTarget

    return EventTarget.from_dict(config["events"]).publisher()


class _Reporter:
    """Rank 0's voice: log lines (forwarded by Ray to the driver) and, with Redis, job events."""

    def __init__(self, config: dict[str, Any], rank: int) -> None:
        self.rank = rank
        self.events = _publisher(config, rank)

    def __call__(self, event: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in event.items()}
        print(f"[alexnet-dist] {json.dumps(shown)}", flush=True)
        if self.events is not None:
            self.events.publish(event)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The loop every Ray Train worker runs; ``config`` is JSON-able (the spec travels as JSON)."""
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from alexnet_dist.data.augment import normalize
    from alexnet_dist.data.loader import LoaderConfig, make_loader
    from alexnet_dist.data.manifest import load_manifest

    spec = JobSpec.from_json(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    d0, d1 = _devices(spec.scaling.devices)
    on_gpu = d0.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    endpoint = config.get("s3_endpoint_url")
    report = _Reporter(config, rank)

    train_manifest = load_manifest(spec.data.train, endpoint_url=endpoint)
    val_manifest = load_manifest(spec.data.val, endpoint_url=endpoint)
    cfg = model_config(spec)
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    model = AlexNet(spec.model.num_classes, config=cfg, devices=(d0, d1))
    if on_gpu and spec.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if world > 1:
        # On the CPU one bucket (a 25 MiB cap from the first): overlapping the all-reduce with backward buys
        # nothing when both cores compute, and each gloo all-reduce costs ~1.7 ms however small (the small
        # preset's 1.8 MB split in two took 10 ms a step of 37). Gradients live in the buckets: no copy.
        net = DistributedDataParallel(
            model,
            device_ids=None,
            output_device=None,
            gradient_as_bucket_view=True,
            bucket_cap_mb=None if on_gpu else 25,
        )
        if spec.train.grad_compression == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            net.register_comm_hook(None, default_hooks.bf16_compress_hook)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=spec.optim.lr,
        momentum=spec.optim.momentum,
        weight_decay=spec.optim.weight_decay,
        fused=True,  # one kernel over all parameters: 3x faster than the per-tensor loop on the CPU
    )
    crop = cfg.image_size
    per_worker = spec.per_worker_batch
    common = dict(
        crop=crop,
        seed=spec.seed,
        num_workers=spec.data.loader_workers,
        max_bad_fraction=spec.data.max_bad_fraction,
    )
    train_loader = make_loader(
        train_manifest,
        LoaderConfig(
            batch_size=per_worker,
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
    eval_batch = max(per_worker, 64)

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
            ),
            rank=rank,
            world_size=world,
            endpoint_url=endpoint,
        )

    steps_per_epoch = len(train_loader)
    schedule = LRSchedule.from_spec(spec.optim, steps_per_epoch=steps_per_epoch, epochs=spec.train.epochs)
    mean, std = train_manifest.mean, train_manifest.std
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu and spec.train.bf16)

    # ---- resume
    epoch, step, global_step, history, train_seconds = 0, 0, 0, [], 0.0
    restored = load_newest_good(ray.train.get_checkpoint())
    if restored is not None:
        ckpt, state = restored
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
        history, train_seconds = list(state.get("history", [])), float(state.get("train_seconds", 0.0))
        if state["data"].get("world_size", world) != world and step:
            log.warning(
                "world size changed (%s -> %s): restarting epoch %d from its start",
                state["data"].get("world_size"),
                world,
                epoch,
            )
            global_step -= step
            step = 0
        report(
            {"type": "resumed", "epoch": epoch, "step": step, "global_step": global_step, "from": ckpt.path}
        )

    def save(finished: bool = False, metrics: dict[str, Any] | None = None) -> None:
        """Every rank calls this (ray.train.report is a barrier); rank 0 writes the checkpoint."""
        metrics = {"epoch": epoch, "step": step, "global_step": global_step, **(metrics or {})}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(
                tmp,
                {
                    "format": 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "epoch": epoch,
                    "step": step,
                    "global_step": global_step,
                    "data": {"epoch": epoch, "batches": step, "seed": spec.seed, "world_size": world},
                    "rng": {"torch": torch.get_rng_state()},
                    "spec": spec.to_json(),
                    "history": history,
                    "train_seconds": train_seconds,
                    "finished": finished,
                },
            )
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=checkpoint_dir_name(global_step),
            )

    # ---- train
    while epoch < spec.train.epochs:
        train_loader.set_epoch(epoch)
        if step:
            train_loader.load_state_dict({"epoch": epoch, "batches": step, "seed": spec.seed})
        net.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        seen = 0
        t_epoch = time.perf_counter()
        t_log, seen_log = t_epoch, 0
        for batch in train_loader:
            for g in optimizer.param_groups:
                g["lr"] = schedule.lr_at(global_step)
            _seed_devices(_step_seed(spec.seed, global_step, rank), (d0, d1))
            x = normalize(
                batch.images,
                batch.lighting,
                mean,
                std,
                device=d0,
                channels_last=on_gpu and spec.train.channels_last,
            )
            y = batch.labels.to(d0, non_blocking=True)
            with autocast:
                loss = training_loss(net(x), y, spec.train.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            global_step += 1
            _maybe_die(config.get("fault"), rank, global_step)
            n_valid = int((y >= 0).sum())
            loss_sum += loss.detach().double().cpu() * n_valid  # loss is a mean over the batch
            seen += n_valid
            if step % spec.train.log_every_steps == 0 or step == steps_per_epoch:
                now = time.perf_counter()
                report(
                    {
                        "type": "step",
                        "epoch": epoch + 1,
                        "epochs": spec.train.epochs,
                        "step": step,
                        "steps_per_epoch": steps_per_epoch,
                        "loss": float(loss.item()),
                        "lr": optimizer.param_groups[0]["lr"],
                        "images_per_s": (seen - seen_log) * world / max(now - t_log, 1e-9),
                    }
                )
                t_log, seen_log = now, seen
            if (
                spec.checkpoint.every_steps
                and step % spec.checkpoint.every_steps == 0
                and step < steps_per_epoch
            ):
                save()
        epoch_seconds = time.perf_counter() - t_epoch
        train_seconds += epoch_seconds
        # ---- validate (central crop), counts summed over ranks
        stats = {"epoch": epoch + 1, "epochs": spec.train.epochs, "lr": optimizer.param_groups[0]["lr"]}
        if (epoch + 1) % spec.train.val_every_epochs == 0 or epoch + 1 == spec.train.epochs:
            val = evaluate(
                model, eval_loader("val"), mean, std, devices=(d0, d1), autocast=autocast, world=world
            )
            stats.update(
                val_top1_error=val.top1_error, val_top5_error=val.top5_error, val_samples=val.samples
            )
            if schedule.observe(val.top1_error):
                report({"type": "lr_decay", "epoch": epoch + 1, "lr": schedule.lr})
        mean_loss = _all_mean(loss_sum, seen, world)
        stats.update(
            train_loss=mean_loss,
            images_per_s=seen * world / max(epoch_seconds, 1e-9),
            seconds=epoch_seconds,
            train_seconds=train_seconds,
        )
        history.append(stats)
        report({"type": "epoch", **stats})
        epoch, step = epoch + 1, 0
        save(metrics={k: v for k, v in stats.items() if isinstance(v, (int, float))})

    # ---- final evaluation (section 4.1: ten crops, softmax averaged)
    mode = "ten_crop" if spec.train.ten_crop_eval else "val"
    final = evaluate(model, eval_loader(mode), mean, std, devices=(d0, d1), autocast=autocast, world=world)
    last = history[-1] if history else {}
    result = {
        "top1_error": final.top1_error,
        "top5_error": final.top5_error,
        "ten_crop": mode == "ten_crop",
        "val_samples": final.samples,
        "val_top1_error": last.get("val_top1_error"),
        "val_top5_error": last.get("val_top5_error"),
        "epochs": spec.train.epochs,
        "steps": global_step,
        "train_seconds": train_seconds,
        "images_per_s": last.get("images_per_s", 0.0),
        "model_url": config["model_url"],
    }
    if rank == 0:
        from alexnet_dist import storage
        from alexnet_dist.model.file import model_file_bytes, model_file_meta

        source = {
            "job": spec.name,
            "run": config["run_name"],
            "top1_error": final.top1_error,
            "top5_error": final.top5_error,
            "ten_crop": mode == "ten_crop",
        }
        meta = model_file_meta(cfg, spec, train_manifest, source)
        storage.write_bytes(
            config["model_url"], model_file_bytes(model.state_dict(), meta), endpoint_url=endpoint
        )
        sidecar = {**{k: v for k, v in meta.items() if k != "config"}, "preset": cfg.name, "result": result}
        storage.write_bytes(
            config["model_url"].removesuffix(".pt") + ".json",
            json.dumps(sidecar, indent=1).encode(),
            endpoint_url=endpoint,
        )
        report({"type": "final", **result})
    # The driver reads the result and the per-epoch history from these metrics, not by loading the
    # final checkpoint (model and optimizer: ~0.7 GB for the paper's network, from S3).
    epochs_history = json.dumps([h for h in history if "final" not in h])
    history.append({"final": result})
    save(finished=True, metrics={"final": json.dumps(result), "history": epochs_history})
    report.close()


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


def _all_mean(total: torch.Tensor, count: int, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([float(total), float(count)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0] / max(t[1], 1.0))
    return float(total) / max(count, 1)


# --------------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class _Storage:
    url: str  # file:///abs/path or s3://bucket/prefix: where runs live
    storage_path: str  # what RunConfig wants: an absolute path, or bucket/prefix for S3
    filesystem: Any  # a pyarrow filesystem for S3, else None


def resolve_storage(url: str, *, settings: Settings) -> _Storage:
    if url.startswith("s3://"):
        import pyarrow.fs as pafs

        bucket_prefix = url[len("s3://") :].strip("/")
        if not bucket_prefix:
            raise ConfigError(f"checkpoint.storage={url!r}: needs a bucket, e.g. s3://my-bucket/runs")
        kwargs: dict[str, Any] = {}
        if settings.s3_endpoint_url:
            scheme, _, host = settings.s3_endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        if settings.aws_region:
            kwargs["region"] = settings.aws_region
        return _Storage(url.rstrip("/"), bucket_prefix, pafs.S3FileSystem(**kwargs))
    if "://" in url and not url.startswith("file://"):
        raise ConfigError(f"checkpoint.storage={url!r}: use s3://bucket/prefix, file:///path or a local path")
    path = os.path.abspath(url.removeprefix("file://"))
    os.makedirs(path, exist_ok=True)
    return _Storage(f"file://{path}", path, None)


def build_trainer(
    spec: JobSpec,
    *,
    run_name: str,
    settings: Settings,
    events: EventTarget | None = None,
    fault: dict[str, Any] | None = None,
):
    """The TorchTrainer for ``spec``: N workers, each with its device pair, checkpoints in storage.

    ``fault`` (tests only) makes one worker die with ``os._exit`` at a global step, once:
    ``{"rank": 1, "global_step": 5, "marker": "/tmp/x"}`` (the marker file records that it happened).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    store = resolve_storage(spec.checkpoint.storage or settings.storage_root, settings=settings)
    gpus = spec.scaling.gpus_per_worker
    resources = {"CPU": spec.scaling.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    config = {
        "spec": spec.to_json(),
        "run_name": run_name,
        "events": events.to_dict() if events is not None else None,
        "s3_endpoint_url": settings.s3_endpoint_url,
        "model_url": f"{store.url}/{run_name}/model.pt",
        "fault": fault,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=store.storage_path,
            storage_filesystem=store.filesystem,
            failure_config=FailureConfig(max_failures=spec.retries),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
        ),
    ), config


def run_training(
    spec: JobSpec,
    *,
    run_name: str,
    settings: Settings,
    events: EventTarget | None = None,
    resume: bool = True,
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``spec`` on the Ray cluster at ``settings.ray_address`` (or a local one) and return the result.

    Starting the same ``run_name`` again resumes from its newest good checkpoint; ``resume=False`` refuses
    to reuse a run that already has checkpoints.
    """
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=settings.ray_address, log_to_driver=True, configure_logging=False)
        except (ConnectionError, RuntimeError) as err:
            raise ClusterError(
                f"Ray at {settings.ray_address or 'local'}: cannot connect ({err}); "
                "check RAY_ADDRESS or start one with `ray start --head`"
            ) from None
    trainer, config = build_trainer(spec, run_name=run_name, settings=settings, events=events, fault=fault)
    if not resume:
        _refuse_existing_run(config, settings)
    t0 = time.perf_counter()
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        first = (str(err).strip().splitlines() or ["?"])[0]
        raise ClusterError(
            f"training run {run_name!r} failed after {spec.retries} retries ({first}); "
            f"its checkpoints are kept: run it again to resume"
        ) from err
    if result.error is not None:
        raise ClusterError(f"training run {run_name!r} failed: {result.error}")
    final = json.loads(result.metrics["final"])
    ckpt = result.checkpoint
    history = json.loads(result.metrics["history"])
    return TrainResult(
        top1_error=final["top1_error"],
        top5_error=final["top5_error"],
        ten_crop=final["ten_crop"],
        val_top1_error=final["val_top1_error"],
        val_top5_error=final["val_top5_error"],
        val_samples=final["val_samples"],
        epochs=final["epochs"],
        steps=final["steps"],
        seconds=time.perf_counter() - t0,
        train_seconds=final["train_seconds"],
        images_per_s=final["images_per_s"],
        model_url=final["model_url"],
        checkpoint_url=_checkpoint_url(ckpt),
        history=history,
    )


def _checkpoint_url(ckpt: Any) -> str | None:
    if ckpt is None:
        return None
    fs_name = type(ckpt.filesystem).__name__ if ckpt.filesystem is not None else ""
    return f"s3://{ckpt.path}" if "S3" in fs_name else f"file://{ckpt.path}"


def _refuse_existing_run(config: dict[str, Any], settings: Settings) -> None:
    from alexnet_dist import storage

    run_url = config["model_url"].rsplit("/", 1)[0]
    if any(
        "checkpoint_" in u for u in storage.list_prefix(run_url + "/", endpoint_url=settings.s3_endpoint_url)
    ):
        raise ConfigError(
            f"{run_url}: run {config['run_name']!r} already has checkpoints; resume it, or "
            "choose another name (--set name=...)"
        )
