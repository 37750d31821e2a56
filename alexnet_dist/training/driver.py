"""The Ray Train driver: the TorchTrainer for a spec, its storage, and the run's result.

Every Ray Train worker runs :func:`alexnet_dist.training.loop.train_loop_per_worker` with a JSON-able config
(the spec travels as JSON). The trainer asks for ``scaling.workers`` workers, each with its CPUs and (on
GPU nodes) its GPUs, and keeps checkpoints under ``checkpoint.storage`` (a local path or ``s3://``).
Starting the same run name again resumes from its newest committed checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from alexnet_dist.errors import AlexNetDistError, ClusterError, ConfigError, JobYielded, NodeLostError
from alexnet_dist.events import EventTarget, YieldSignal
from alexnet_dist.ray_token import use_cluster_token
from alexnet_dist.settings import Settings
from alexnet_dist.spec import JobSpec
from alexnet_dist.training.loop import train_loop_per_worker

__all__ = [
    "TrainResult",
    "build_trainer",
    "process_group_backend",
    "resolve_storage",
    "result_from_metrics",
    "run_training",
    "worker_config",
]


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


@dataclass(frozen=True)
class _Storage:
    url: str  # file:///abs/path or s3://bucket/prefix: where runs live
    storage_path: str  # what RunConfig wants: an absolute path, or bucket/prefix for S3
    filesystem: Any  # a pyarrow filesystem for S3, else None


def resolve_storage(url: str, *, settings: Settings) -> _Storage:
    if url.startswith("s3://"):
        bucket_prefix = url[len("s3://") :].strip("/")
        if not bucket_prefix:
            raise ConfigError(f"checkpoint.storage={url!r}: needs a bucket, e.g. s3://my-bucket/runs")
        from alexnet_dist import storage
        from alexnet_dist.training.s3fs import BoundedS3FileSystem

        # The same bounds and retries as the package's own S3 client: pyarrow's defaults try 3 times
        # and wait on a silent endpoint without a limit of ours.
        kwargs: dict[str, Any] = {
            "connect_timeout": storage.CONNECT_TIMEOUT_S,
            "request_timeout": storage.READ_TIMEOUT_S,
        }
        if settings.s3_endpoint_url:
            scheme, _, host = settings.s3_endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        if settings.aws_region:
            kwargs["region"] = settings.aws_region
        fs = BoundedS3FileSystem(attempts=storage.S3_ATTEMPTS, **kwargs)
        return _Storage(url.rstrip("/"), bucket_prefix, fs)
    if "://" in url and not url.startswith("file://"):
        raise ConfigError(f"checkpoint.storage={url!r}: use s3://bucket/prefix, file:///path or a local path")
    path = os.path.abspath(url.removeprefix("file://"))
    os.makedirs(path, exist_ok=True)
    return _Storage(f"file://{path}", path, None)


def process_group_backend(spec: JobSpec) -> str:
    """The torch.distributed backend: gloo on CPUs; on GPUs NCCL for CUDA tensors and gloo for CPU ones.

    Plain ``"nccl"`` serves CUDA tensors only, and a collective on a CPU tensor would fail there.
    """
    return "cpu:gloo,cuda:nccl" if spec.scaling.gpus_per_worker else "gloo"


def worker_config(
    spec: JobSpec,
    *,
    run_name: str,
    settings: Settings,
    events: EventTarget | None = None,
    yield_signal: YieldSignal | None = None,
    fault: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], _Storage]:
    """What every worker's loop is given (JSON-able), and where the run lives."""
    store = resolve_storage(spec.checkpoint.storage or settings.storage_root, settings=settings)
    config = {
        "spec": spec.to_json(),
        "run_name": run_name,
        "events": events.to_dict() if events is not None else None,
        "yield": yield_signal.to_dict() if yield_signal is not None else None,
        "s3_endpoint_url": settings.s3_endpoint_url,
        "model_url": f"{store.url}/{run_name}/model.pt",
        "backend": process_group_backend(spec),
        "fault": fault,
        "mlflow_tracking_uri": settings.mlflow_tracking_uri,
        "mlflow_experiment": settings.mlflow_experiment,
    }
    return config, store


def build_trainer(
    spec: JobSpec,
    *,
    run_name: str,
    settings: Settings,
    events: EventTarget | None = None,
    yield_signal: YieldSignal | None = None,
    fault: dict[str, Any] | None = None,
):
    """The TorchTrainer for ``spec``: N workers, each with its device pair, checkpoints in storage.

    ``fault`` (tests only) makes one worker die with ``os._exit`` at a global step, once:
    ``{"rank": 1, "global_step": 5, "marker": "/tmp/x"}`` (the marker file records that it happened).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    config, store = worker_config(
        spec, run_name=run_name, settings=settings, events=events, yield_signal=yield_signal, fault=fault
    )
    gpus = spec.scaling.gpus_per_worker
    resources = {"CPU": spec.scaling.cpus_per_worker, **({"GPU": gpus} if gpus else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend=config["backend"]),
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
    yield_signal: YieldSignal | None = None,
    resume: bool = True,
    fault: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``spec`` on the Ray cluster at ``settings.ray_address`` (or a local one) and return the result.

    Starting the same ``run_name`` again resumes from its newest good checkpoint; ``resume=False`` refuses
    to reuse a run that already has checkpoints.
    """
    import ray

    if not ray.is_initialized():
        address = ray_address(settings)
        if address != "local":
            use_cluster_token()  # a cluster of `ray start --head` wants its token
        try:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        except (ConnectionError, RuntimeError) as err:
            raise ClusterError(
                f"Ray at {settings.ray_address or 'local'}: cannot connect ({err}); "
                "check RAY_ADDRESS or start one with `ray start --head`"
            ) from None
    trainer, config = build_trainer(
        spec, run_name=run_name, settings=settings, events=events, yield_signal=yield_signal, fault=fault
    )
    if not resume:
        refuse_existing_run(config, settings)
    t0 = time.perf_counter()
    import ray.train

    nodes = _alive_nodes()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        lost = _nodes_lost(err, nodes)
        if lost:
            raise NodeLostError(
                f"training run {run_name!r}: Ray node {', '.join(n[:12] for n in lost)} died under it; its "
                "checkpoints are kept, and it resumes from the newest once the cluster has room again"
            ) from err
        line, ours = _failure(err)
        if ours:  # it says what to do itself
            failed = f"training run {run_name!r} failed after {spec.retries} retries"
            raise ClusterError(f"{failed}: {line}") from err
        raise ClusterError(
            f"training run {run_name!r} failed after {spec.retries} retries ({line}); "
            f"its checkpoints are kept: run it again to resume"
        ) from err
    if result.error is not None:
        raise ClusterError(f"training run {run_name!r} failed: {result.error}")
    return result_from_metrics(result.metrics, time.perf_counter() - t0, _checkpoint_url(result.checkpoint))


# How long a failed run waits for the GCS to declare a dead node dead: its health check misses 5 beats
# 3 s apart (Ray's defaults), counted from the node's death, not from the run's failure.
NODE_DEATH_WAIT_S = 45.0


def _failure(err: Exception) -> tuple[str, bool]:
    """One line for a failed run, and whether it is one of this package's errors (which says what to do
    itself). A worker's error comes first, one of ours before the others (often its echo: a collective
    cut by the rank that died), then the lowest rank's: the last line of what it says. Without worker
    errors, the first line of Ray's summary."""
    found = []
    for rank, failure in sorted((getattr(err, "worker_failures", None) or {}).items()):
        lines = [ln.strip() for ln in str(failure).strip().splitlines() if ln.strip()]
        if lines:
            ours = isinstance(failure, AlexNetDistError)
            found.append((not ours, rank, lines[-1].removeprefix("alexnet_dist.errors.")))
    if not found:
        return (str(err).strip().splitlines() or ["?"])[0], False
    theirs, rank, line = min(found)
    return f"rank {rank}: {line}", not theirs


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _nodes_lost(err: Exception, before: set[str], *, probe_s: float = 3.0) -> list[str]:
    """The nodes under a failed run that died: when ``err`` says a worker's process vanished (an actor
    error, not an exception in the training code), each node such a worker ran on (``before``, the nodes
    alive at the start, when the error does not name it) that the GCS declares dead or whose raylet no
    longer answers within ``probe_s``; else []. A worker that died on a live node is no node loss."""
    import re
    import socket

    import ray
    from ray.exceptions import RayActorError

    gone = []
    for e in (getattr(err, "worker_failures", None) or {}).values():
        cause = getattr(e, "health_check_failure", e)  # Ray Train wraps a failed poll of the worker
        if isinstance(cause, RayActorError):
            gone.append(str(e))
    if not gone:
        return []
    named = {m for text in gone for m in re.findall(r"node_id='([0-9a-f]+)'", text)} & before
    try:
        nodes = {n["NodeID"]: n for n in ray.nodes()}
    except Exception:  # the GCS itself is gone: the head's fault, which the dispatcher sees on its own
        return []
    dead = []
    for node_id in sorted(named or before):
        node = nodes.get(node_id, {})
        if node.get("Alive"):
            try:
                addr = (node["NodeManagerAddress"], int(node["NodeManagerPort"]))
                with socket.create_connection(addr, timeout=probe_s):
                    continue  # its raylet answers: the node lives, only a worker died
            except (KeyError, ValueError):
                continue
            except OSError:
                pass  # refused or silent: gone, before the GCS's health check says so
        dead.append(node_id)
    # Before the attempt ends, wait (a bounded while) for the GCS to declare them dead too: the
    # dispatcher sizes the cluster from the GCS, and would relaunch onto a node that is not there.
    deadline = time.monotonic() + NODE_DEATH_WAIT_S
    while dead and time.monotonic() < deadline:
        try:
            if not any(n.get("Alive") for n in ray.nodes() if n["NodeID"] in dead):
                break
        except Exception:
            break
        time.sleep(1.0)
    return dead


def ray_address(settings: Settings, *, timeout_s: float = 5.0) -> str:
    """What ``ray.init`` is given: ``"local"`` (a fresh local Ray) without RAY_ADDRESS, whatever an
    earlier cluster left in /tmp/ray/ray_current_cluster (Ray would join that address, even a dead
    one, and retry for minutes); with RAY_ADDRESS, that address once a TCP connection to it succeeds
    within ``timeout_s``, else a :class:`ClusterError` naming it."""
    import socket

    if not settings.ray_address:
        return "local"
    if settings.ray_address in ("auto", "local") or settings.ray_address.startswith("ray://"):
        return settings.ray_address  # Ray's own lookup, or a Ray Client address it bounds itself
    host, _, port = settings.ray_address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except ValueError:
        raise ClusterError(f"RAY_ADDRESS={settings.ray_address!r}: not host:port") from None
    except OSError as err:
        raise ClusterError(
            f"Ray at {settings.ray_address}: nothing answers ({err.strerror or err}); check RAY_ADDRESS, "
            "start a head with `ray start --head`, or unset RAY_ADDRESS for a local Ray"
        ) from None
    return settings.ray_address


def result_from_metrics(metrics: dict[str, Any], seconds: float, checkpoint_url: str | None) -> TrainResult:
    """The result from the loop's last report (its ``final`` and ``history`` metrics); JobYielded when the
    run stopped at a checkpoint because it was asked to yield."""
    if metrics.get("yielded"):
        raise JobYielded(
            f"training run yielded at step {metrics.get('global_step')} ({checkpoint_url}); it resumes from "
            "there when launched again"
        )
    final = json.loads(metrics["final"])
    history = json.loads(metrics["history"])
    return TrainResult(
        top1_error=final["top1_error"],
        top5_error=final["top5_error"],
        ten_crop=final["ten_crop"],
        val_top1_error=final["val_top1_error"],
        val_top5_error=final["val_top5_error"],
        val_samples=final["val_samples"],
        epochs=final["epochs"],
        steps=final["steps"],
        seconds=seconds,
        train_seconds=final["train_seconds"],
        images_per_s=final["images_per_s"],
        model_url=final["model_url"],
        checkpoint_url=checkpoint_url,
        history=history,
    )


def _checkpoint_url(ckpt: Any) -> str | None:
    if ckpt is None:
        return None
    fs_name = type(ckpt.filesystem).__name__ if ckpt.filesystem is not None else ""
    return f"s3://{ckpt.path}" if "S3" in fs_name else f"file://{ckpt.path}"


def refuse_existing_run(config: dict[str, Any], settings: Settings) -> None:
    from alexnet_dist import storage

    run_url = config["model_url"].rsplit("/", 1)[0]
    if any(
        "checkpoint_" in u for u in storage.list_prefix(run_url + "/", endpoint_url=settings.s3_endpoint_url)
    ):
        raise ConfigError(
            f"{run_url}: run {config['run_name']!r} already has checkpoints; resume it, or "
            "choose another name (--set name=...)"
        )
