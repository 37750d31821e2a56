"""Where rank 0's metrics go: a list of sinks, each a small object with ``emit(event)`` and ``close()``.

An event is a JSON-able dict with a ``type`` (``resumed``, ``step``, ``epoch``, ``lr_decay``, ``final``).
The loop knows only the list; a new output (TensorBoard, MLflow) is a new class here, added by
:func:`make_sinks`. A sink never raises into training: a lost metric must not kill a run.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from alexnet_dist.events import EventTarget

__all__ = ["MetricSink", "RedisSink", "StdoutSink", "Sinks", "make_sinks"]


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


class RedisSink:
    """The job's event stream and live channel in Redis (what ``watch``, ``status`` and plots read)."""

    def __init__(self, target: EventTarget) -> None:
        self.publisher = target.publisher()

    def emit(self, event: dict[str, Any]) -> None:
        self.publisher.publish(event)

    def close(self) -> None:
        self.publisher.close()


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
    """Rank 0 writes to stdout and, when the run belongs to a job, to the job's events in Redis."""
    if rank != 0:
        return Sinks([])
    sinks: list[MetricSink] = [StdoutSink()]
    if config.get("events"):
        sinks.append(RedisSink(EventTarget.from_dict(config["events"])))
    return Sinks(sinks)
