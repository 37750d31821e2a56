"""Where rank 0's metrics go: a list of sinks, each a small object with ``emit(event)`` and ``close()``.

An event is a JSON-able dict with a ``type`` (``resumed``, ``step``, ``epoch``, ``lr_decay``, ``final``).
The loop knows only the list; a new output is a new class, added by :func:`make_sinks`: rank 0 writes to
stdout, TensorBoard event files beside the run's checkpoints (:mod:`~alexnet_dist.training.tensorboard`),
the job's Redis events when it belongs to a job, and MLflow when a tracking URI is configured
(:mod:`~alexnet_dist.training.tracking`). A sink never raises into training: a lost metric must not
kill a run.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

from alexnet_dist.events import EventTarget
from alexnet_dist.training.tensorboard import TensorBoardSink, tensorboard_url
from alexnet_dist.training.tracking import EXTRA_HINT, MlflowSink, mlflow_installed

log = logging.getLogger(__name__)

__all__ = ["MetricSink", "MlflowSink", "RedisSink", "StdoutSink", "Sinks", "TensorBoardSink", "make_sinks"]


class MetricSink(Protocol):
    def emit(self, event: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class StdoutSink:
    """One ``[alexnet-dist] {json}`` line per event: Ray forwards a worker's stdout to the driver's log."""

    def emit(self, event: dict[str, Any]) -> None:
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in event.items()}
        print(f"[alexnet-dist] {json.dumps(shown)}", flush=True)

    def close(self) -> None:
        pass


END_WAIT_S = 60.0  # how long a finished run waits for an unreachable Redis to take its last events


class RedisSink:
    """The job's event stream and live channel in Redis (what ``watch``, ``status`` and plots read)."""

    def __init__(self, target: EventTarget) -> None:
        self.publisher = target.publisher()

    def emit(self, event: dict[str, Any]) -> None:
        self.publisher.publish(event)

    def close(self) -> None:
        # The run's last events wait for a Redis that is away at the end, as its result does (the
        # driver retries that for longer), rather than be dropped at once.
        self.publisher.close(wait_s=END_WAIT_S)


class Sinks:
    """Every sink of the run, called in order; empty on ranks other than 0."""

    def __init__(self, sinks: list[MetricSink]) -> None:
        self.sinks = sinks

    def __call__(self, event: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def make_sinks(config: dict[str, Any], rank: int) -> Sinks:
    """Rank 0 writes to stdout and TensorBoard; to the job's events in Redis when the run belongs to a job;
    to MLflow when ``config["mlflow_tracking_uri"]`` is set (without the extra: one warning, no MLflow)."""
    if rank != 0:
        return Sinks([])
    endpoint = config.get("s3_endpoint_url")
    sinks: list[MetricSink] = [
        StdoutSink(),
        TensorBoardSink(tensorboard_url(config), config["spec"], endpoint_url=endpoint),
    ]
    if config.get("events"):
        sinks.append(RedisSink(EventTarget.from_dict(config["events"])))
    uri = config.get("mlflow_tracking_uri")
    if uri and not mlflow_installed():
        log.warning("MLflow tracking URI %s is set but mlflow is not installed (%s); not logging to MLflow",
                    uri, EXTRA_HINT)  # fmt: skip
    elif uri:
        sinks.append(MlflowSink(uri, spec_json=config["spec"], run_name=config["run_name"],
                                model_url=config["model_url"], experiment=config.get("mlflow_experiment"),
                                endpoint_url=endpoint))  # fmt: skip
    return Sinks(sinks)
