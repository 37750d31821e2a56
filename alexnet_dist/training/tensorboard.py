"""TensorBoard event files for every run, written by rank 0 beside the run's checkpoints.

The files live in ``<run url>/tensorboard/`` (a local folder, or an ``s3://`` prefix), one file per process
that ran the run; TensorBoard merges a folder's files into one run. Scalars (see :data:`SCALARS`): the
train loss, learning rate and throughput of every logged step, each epoch's train loss and validation
errors, the final top-1/top-5 errors; the spec as JSON in a text summary.

Invariants:

- every scalar's step is the run's global step, ``(epoch - 1) * steps_per_epoch + step``, so a resumed run
  continues its curves. A file starts with a ``SessionLog.START`` at the first step it will write
  (0, or the resumed step + 1): TensorBoard then drops what an earlier process logged after the
  checkpoint it resumed from, and no step is shown twice;
- writing never raises into training: a failure logs one warning and the run goes on. Local files are
  flushed, and S3 objects re-uploaded whole, at every event but a step event, at most ``sync_every_s``
  apart otherwise, and on close, so a crash loses little. S3 uploads run on a background thread, so a
  slow or unreachable store never stalls a step.

Events are encoded with tensorboardX's protocol buffers and written as TFRecords (no TensorFlow).
TensorBoard without TensorFlow reads an ``s3://`` logdir with boto3 (the standard AWS credentials); for
an S3-compatible store, ``S3_ENDPOINT=http://host:9000 tensorboard --logdir s3://bucket/runs/NAME/tensorboard``
(``AWS_ENDPOINT_URL`` works too, unless TensorFlow is installed).
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from alexnet_dist import storage

log = logging.getLogger(__name__)

__all__ = ["SCALARS", "SPEC_TAG", "Background", "StepClock", "TensorBoardSink", "WarnOnce", "metric_points",
           "tensorboard_url"]  # fmt: skip

# For each event type, the event's fields written as scalars, and their tags (MLflow uses the same keys).
SCALARS: dict[str, dict[str, str]] = {
    "step": {"loss": "train/loss", "lr": "train/lr", "images_per_s": "train/images_per_s"},
    "epoch": {
        "train_loss": "epoch/train_loss",
        "val_top1_error": "epoch/val_top1_error",
        "val_top5_error": "epoch/val_top5_error",
        "lr": "epoch/lr",
        "images_per_s": "epoch/images_per_s",
    },
    "lr_decay": {"lr": "epoch/lr_decay"},
    "final": {"top1_error": "final/top1_error", "top5_error": "final/top5_error"},
}
SPEC_TAG = "spec"  # the text summary holding the spec's JSON
# Event types after which the files are synced at once; step events wait for ``sync_every_s``.
_SYNC_NOW = frozenset({"resumed", "epoch", "lr_decay", "final", "yielded"})


def tensorboard_url(config: dict[str, Any]) -> str:
    """``<run url>/tensorboard``: the run's folder is the one its model file goes to."""
    return config["model_url"].rsplit("/", 1)[0] + "/tensorboard"


def metric_points(event: dict[str, Any]) -> list[tuple[str, float]]:
    """The event's scalars as (tag, value); fields that are absent, None or not numbers are left out."""
    fields = SCALARS.get(event.get("type", ""), {})
    return [
        (tag, float(event[name]))
        for name, tag in fields.items()
        if isinstance(event.get(name), (int, float)) and not isinstance(event.get(name), bool)
    ]


@dataclass
class StepClock:
    """The run's global step as the events tell it: a step event at ``(epoch, step)`` is step
    ``(epoch - 1) * steps_per_epoch + step``; an epoch ends at ``epoch * steps_per_epoch``; ``resumed``
    gives the step the run restarts from; ``final`` its total ``steps``."""

    steps_per_epoch: int | None = None
    global_step: int = 0

    def advance(self, event: dict[str, Any]) -> int:
        kind = event.get("type")
        if kind == "step":
            self.steps_per_epoch = int(event["steps_per_epoch"])
            self.global_step = (int(event["epoch"]) - 1) * self.steps_per_epoch + int(event["step"])
        elif kind in ("resumed", "yielded"):
            self.global_step = int(event["global_step"])
        elif kind == "epoch" and self.steps_per_epoch:
            self.global_step = int(event["epoch"]) * self.steps_per_epoch
        elif kind == "final" and isinstance(event.get("steps"), int):
            self.global_step = event["steps"]
        return self.global_step


class WarnOnce:
    """One warning per sink for its first failure (later ones go to the debug log): metrics may be lost,
    training goes on."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.warned = False
        self._lock = threading.Lock()

    def __call__(self, doing: str, err: BaseException) -> None:
        with self._lock:
            first, self.warned = not self.warned, True
        if first:
            log.warning("%s: %s failed (%s: %s); training goes on, some metrics may be missing",
                        self.what, doing, type(err).__name__, err)  # fmt: skip
        else:
            log.debug("%s: %s failed again (%s)", self.what, doing, err)


class Background:
    """One daemon thread running jobs in the order they were submitted; a job that raises is reported to
    ``warn`` and the next one runs. Started on the first job, so a sink that never uploads has no thread."""

    def __init__(self, name: str, warn: WarnOnce) -> None:
        self.name, self.warn = name, warn
        self._jobs: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, doing: str, job: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put((doing, job))

    def _run(self) -> None:
        while (item := self._jobs.get()) is not None:
            doing, job = item
            try:
                job()
            except Exception as err:  # a lost metric must not kill the run, nor this thread
                self.warn(doing, err)

    def close(self, timeout_s: float) -> bool:
        """Run what is queued (up to ``timeout_s``), then stop; False when jobs were still running."""
        if self._thread is None:
            return True
        self._jobs.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("%s: still writing after %.0f s; giving up on what is left", self.name, timeout_s)
            return False
        return True


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _event_file_name() -> str:
    """TensorBoard's ``events.out.tfevents.<seconds>.<host>`` and, so that two processes of one host in one
    second neither collide nor sort out of order, the microseconds and the pid."""
    now = time.time()
    return (f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}."
            f"{int(now * 1e6) % 1_000_000:06d}.{os.getpid()}")  # fmt: skip


class TensorBoardSink:
    """Rank 0's TensorBoard event file for this process of the run (see the module docstring)."""

    def __init__(
        self,
        logdir: str,
        spec_json: str,
        *,
        endpoint_url: str | None = None,
        sync_every_s: float = 30.0,
        close_timeout_s: float = 120.0,
    ) -> None:
        self.logdir = logdir.rstrip("/")
        self.spec_json = spec_json
        self.endpoint_url = endpoint_url
        self.sync_every_s, self.close_timeout_s = sync_every_s, close_timeout_s
        self.clock = StepClock()
        self.warn = WarnOnce(f"tensorboard {self.logdir}")
        self.file_url: str | None = None  # the event file, once opened
        self._file: IO[bytes] | None = None  # local: the open file; S3: an in-memory copy of the object
        self._on_s3 = False
        self._last_sync = time.monotonic()
        self._pending: bytes | None = None  # S3: the newest snapshot not yet uploaded
        self._lock = threading.Lock()
        self._uploads = Background("tensorboard-upload", self.warn)

    # --- the sink ---------------------------------------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        try:
            step = self.clock.advance(event)
            if self._file is None:
                self._open(event)
            points = metric_points(event)
            if points:
                self._write(_scalars_event(points, step))
            due = time.monotonic() - self._last_sync >= self.sync_every_s
            if event.get("type") in _SYNC_NOW or due:
                self._sync()
        except Exception as err:
            self.warn(f"writing a {event.get('type')} event", err)

    def close(self) -> None:
        try:
            if self._file is not None:
                self._sync()
                if not self._on_s3:
                    self._file.close()
        except Exception as err:
            self.warn("closing the event file", err)
        self._uploads.close(self.close_timeout_s)

    # --- the file ---------------------------------------------------------------------------------------

    def _open(self, first: dict[str, Any]) -> None:
        """A new event file; its first step is 0, or the step after the one the run resumed from."""
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        start = self.clock.global_step + 1 if first.get("type") == "resumed" else 0
        loc = storage.parse_url(self.logdir)
        name = _event_file_name()
        if loc.scheme == "s3":
            self._on_s3, self._file = True, io.BytesIO()
            self.file_url = storage.join(self.logdir, name)
        else:
            Path(loc.key).mkdir(parents=True, exist_ok=True)
            path = Path(loc.key) / name
            for attempt in range(100):  # a name taken already: never overwrite another process's file
                try:
                    self._file = open(path.with_name(f"{name}.{attempt}" if attempt else name), "xb")
                    break
                except FileExistsError:
                    continue
            if self._file is None:
                raise FileExistsError(f"{path}: every event file name is taken")
            self.file_url = self._file.name
        self._write(Event(wall_time=time.time(), step=start, file_version="brain.Event:2"))
        # Earlier processes' events from ``start`` on are orphans of a crash: TensorBoard drops them here.
        self._write(Event(wall_time=time.time(), step=start, session_log=SessionLog(status=SessionLog.START)))
        self._write(_text_event(SPEC_TAG, _spec_markdown(self.spec_json), start))

    def _write(self, event: Any) -> None:
        assert self._file is not None
        data = _record(event.SerializeToString())
        with self._lock:
            self._file.write(data)

    def _sync(self) -> None:
        """Local: flush the file. S3: upload the whole object again, on the background thread."""
        assert self._file is not None
        self._last_sync = time.monotonic()
        if not self._on_s3:
            self._file.flush()
            return
        with self._lock:
            queued = self._pending is not None
            self._pending = self._file.getvalue()  # type: ignore[attr-defined]
        if not queued:
            self._uploads.submit(f"uploading {self.file_url}", self._upload)

    def _upload(self) -> None:
        with self._lock:
            data, self._pending = self._pending, None
        if data is not None and self.file_url is not None:
            storage.write_bytes(self.file_url, data, endpoint_url=self.endpoint_url)


def _scalars_event(points: list[tuple[str, float]], step: int) -> Any:
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=tag, simple_value=value) for tag, value in points]
    return Event(wall_time=time.time(), step=step, summary=Summary(value=values))


def _text_event(tag: str, text: str, step: int) -> Any:
    """A text summary as TensorBoard's text plugin reads it: a string tensor, plugin ``text``."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.plugin_text_pb2 import TextPluginData
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboardX.proto.tensor_pb2 import TensorProto
    from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

    content = TextPluginData(version=0).SerializeToString()
    plugin = SummaryMetadata.PluginData(plugin_name="text", content=content)
    tensor = TensorProto(dtype="DT_STRING", string_val=[text.encode()],
                         tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]))  # fmt: skip
    value = Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin), tensor=tensor)
    return Event(wall_time=time.time(), step=step, summary=Summary(value=[value]))


def _spec_markdown(spec_json: str) -> str:
    """The spec, indented JSON in a fenced block (the text plugin renders Markdown)."""
    return "```json\n" + json.dumps(json.loads(spec_json), indent=2) + "\n```"
