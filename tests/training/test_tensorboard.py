"""TensorBoard event files (and MLflow) for real runs, read back with TensorBoard's (and MLflow's) readers.

A local run asked to yield mid-epoch, then resumed, leaves one event file per process in
``<run>/tensorboard/``; TensorBoard reads one set of curves from them: every logged step once, with the
values the run emitted, the epochs' losses and errors of the run's history, the final errors of its
result, and the spec. The same run logs to MLflow (a file store). A run whose storage is S3 (a moto
server) writes its files there and TensorBoard reads them through its own S3 support
(``S3_ENDPOINT``, or boto3's ``AWS_ENDPOINT_URL``). A crashed process's steps after its checkpoint are
dropped when the run resumes; a store that fails costs one warning, never an exception.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from jobspecs import cpu_spec
from shardkit import build_fashion

from alexnet_dist.errors import JobYielded
from alexnet_dist.events import YieldSignal
from alexnet_dist.settings import Settings
from alexnet_dist.spec import JobSpec
from alexnet_dist.training import loop
from alexnet_dist.training import sinks as sinks_mod
from alexnet_dist.training.local import LocalSession, run_local
from alexnet_dist.training.tensorboard import SPEC_TAG, TensorBoardSink

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH = 8  # 256 images, batch 32
LOG_EVERY = 4


def _f32(x: float) -> float:
    """What a TensorBoard scalar holds (a float32)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


class Recorder:
    """A sink that keeps every event rank 0 emitted."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(dict(event))

    def close(self) -> None:
        pass


def record_sinks(monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any] | None = None) -> list[Recorder]:
    """Rank 0's real sinks (with ``extra`` added to the worker config) plus one recorder per run."""
    runs: list[Recorder] = []

    def make(config: dict[str, Any], rank: int) -> sinks_mod.Sinks:
        made = sinks_mod.make_sinks({**config, **(extra or {})}, rank)
        runs.append(Recorder())
        return sinks_mod.Sinks([*made.sinks, runs[-1]])

    monkeypatch.setattr(loop, "make_sinks", make)
    return runs


def read_tensorboard(logdir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def curve(acc, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def spec_texts(acc) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for e in acc.Tensors(SPEC_TAG):
        text = e.tensor_proto.string_val[0].decode()
        assert text.startswith("```json\n") and text.endswith("\n```")
        out.append((e.step, json.loads(text.removeprefix("```json\n").removesuffix("\n```"))))
    return out


def expected_step_curves(events: list[dict[str, Any]], cast=_f32) -> dict[str, list[tuple[int, float]]]:
    """The step events' scalars at their global steps, ``(epoch - 1) * steps_per_epoch + step``."""
    steps = [e for e in events if e["type"] == "step"]
    at = [(e["epoch"] - 1) * e["steps_per_epoch"] + e["step"] for e in steps]
    return {
        tag: [(s, cast(e[field])) for s, e in zip(at, steps, strict=True)]
        for tag, field in (("train/loss", "loss"), ("train/lr", "lr"), ("train/images_per_s", "images_per_s"))
    }


def assert_curves_match_the_run(acc, events, result, spec: JobSpec) -> None:
    """The scalars are the run's: its step events, its history's epochs, its result's final errors."""
    for tag, points in expected_step_curves(events).items():
        assert curve(acc, tag) == points, tag
    ends = [(i + 1) * STEPS_PER_EPOCH for i in range(len(result.history))]
    for field in ("train_loss", "val_top1_error", "val_top5_error", "lr", "images_per_s"):
        want = [(s, _f32(h[field])) for s, h in zip(ends, result.history, strict=True)]
        assert curve(acc, f"epoch/{field}") == want, field
    assert curve(acc, "final/top1_error") == [(result.steps, _f32(result.top1_error))]
    assert curve(acc, "final/top5_error") == [(result.steps, _f32(result.top5_error))]
    texts = spec_texts(acc)
    assert texts and texts[0] == (0, json.loads(spec.to_json()))


@pytest.fixture(scope="module")
def tiny(fashion_mnist_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tb")
    train = build_fashion(fashion_mnist_dir, root / "train", limit=256, shard_size=64)
    val = build_fashion(fashion_mnist_dir, root / "val", limit=64, shard_size=64, split="test")
    return {"train": train.url, "val": val.url}


def small_spec(tiny: dict[str, str], storage: str | Path, **overrides: Any) -> JobSpec:
    fields = {
        "train__epochs": 2,
        "train__log_every_steps": LOG_EVERY,
        "checkpoint__every_steps": 0,
        **overrides,
    }
    return cpu_spec(
        tiny["train"], tiny["val"], str(storage), scaling={"workers": 1, "devices": "cpu"}, **fields
    )


@pytest.fixture(scope="module")
def resumed_run(tiny, redis_server, tmp_path_factory) -> dict[str, Any]:
    """One local run that yields at step 4 (the service's preemption, through a real redis-server), then
    resumes to its end, logging to TensorBoard and to an MLflow file store."""
    tmp = tmp_path_factory.mktemp("resumed")
    mlflow_uri = f"file://{tmp / 'mlruns'}"
    spec = small_spec(tiny, tmp / "runs")
    client = redis_py.Redis.from_url(redis_server.url, decode_responses=True)
    client.hset("tb:job:r", "yield_requested", "1764000000.0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow's own switch for its file store
        runs = record_sinks(mp, {"mlflow_tracking_uri": mlflow_uri})
        signal = YieldSignal(redis_server.url, "tb:job:r")
        with pytest.raises(JobYielded, match="yielded at step 4"):
            run_local(spec, run_name="r", settings=Settings(), yield_signal=signal)
        client.hset("tb:job:r", "yield_requested", "0")
        result = run_local(spec, run_name="r", settings=Settings(), yield_signal=signal)
    client.delete("tb:job:r")
    return {"spec": spec, "result": result, "runs": [r.events for r in runs], "dir": tmp / "runs" / "r",
            "mlflow_uri": mlflow_uri}  # fmt: skip


def test_a_resumed_local_run_has_one_set_of_curves_equal_to_what_it_emitted(resumed_run) -> None:
    first, second = resumed_run["runs"]
    assert [e["type"] for e in first] == ["step", "yielded"] and first[0]["step"] == LOG_EVERY
    assert second[0]["type"] == "resumed" and second[0]["global_step"] == LOG_EVERY
    logdir = resumed_run["dir"] / "tensorboard"
    assert len(list(logdir.glob("events.out.tfevents.*"))) == 2  # one file per process
    acc = read_tensorboard(str(logdir))
    result = resumed_run["result"]
    assert result.steps == 2 * STEPS_PER_EPOCH and len(result.history) == 2
    assert_curves_match_the_run(acc, first + second, result, resumed_run["spec"])
    # every logged step once, in order, across the two processes
    assert [s for s, _ in curve(acc, "train/loss")] == [4, 8, 12, 16]
    assert [s for s, _ in spec_texts(acc)] == [0, LOG_EVERY + 1]  # each process's spec, at its first step


def test_the_same_run_is_one_mlflow_run_with_params_metrics_and_the_model(resumed_run) -> None:
    from mlflow.tracking import MlflowClient

    from alexnet_dist.training.tracking import RUN_URL_TAG, flatten_spec

    client = MlflowClient(tracking_uri=resumed_run["mlflow_uri"])
    experiment = client.get_experiment_by_name("alexnet-dist")
    (run,) = client.search_runs([experiment.experiment_id])  # the resumed process found its run
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.tags[RUN_URL_TAG] == f"file://{resumed_run['dir']}"
    spec, result = resumed_run["spec"], resumed_run["result"]
    assert run.data.params == flatten_spec(spec.to_json())
    assert run.data.params["optim.lr"] == "0.02" and run.data.params["train.epochs"] == "2"

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    events = resumed_run["runs"][0] + resumed_run["runs"][1]
    for tag, points in expected_step_curves(events, cast=float).items():  # MLflow keeps doubles
        assert history(tag) == points, tag
    assert history("epoch/val_top1_error") == [
        ((i + 1) * STEPS_PER_EPOCH, h["val_top1_error"]) for i, h in enumerate(result.history)
    ]
    assert history("final/top1_error") == [(result.steps, result.top1_error)]
    assert history("final/top5_error") == [(result.steps, result.top5_error)]
    artifacts = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id)}
    model = Path(result.model_url.removeprefix("file://"))
    assert artifacts == {
        "model.pt": model.stat().st_size,
        "model.json": model.with_suffix(".json").stat().st_size,
    }


def test_a_run_on_s3_writes_event_files_tensorboard_reads_from_s3(tiny, s3, tmp_path, monkeypatch) -> None:
    from alexnet_dist.training.driver import worker_config
    from alexnet_dist.training.loop import run_worker

    bucket = s3.make_bucket("tb-runs")
    spec = small_spec(tiny, tmp_path / "runs", train__epochs=1)
    settings = Settings(s3_endpoint_url=s3.endpoint_url)
    config, _ = worker_config(spec, run_name="s", settings=settings)
    # a Ray run on S3 storage: the run's folder, model file included, is s3://<bucket>/<prefix>/<run>/
    config["model_url"] = f"s3://{bucket}/runs/s/model.pt"
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the writer uses the settings' endpoint, nothing else
    runs = record_sinks(monkeypatch)
    session = LocalSession(tmp_path / "runs" / "s", keep=2)
    (tmp_path / "runs" / "s").mkdir(parents=True)
    run_worker(config, session)
    from alexnet_dist.training.driver import result_from_metrics

    result = result_from_metrics(session.last_metrics, 0.0, None)
    listed = s3.client().list_objects_v2(Bucket=bucket, Prefix="runs/s/tensorboard/")["Contents"]
    assert len(listed) == 1 and "/events.out.tfevents." in listed[0]["Key"]

    # TensorBoard without TensorFlow reads s3:// through boto3: at boto3's own endpoint setting ...
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    acc = read_tensorboard(f"s3://{bucket}/runs/s/tensorboard")
    assert_curves_match_the_run(acc, runs[0].events, result, spec)
    assert [s for s, _ in curve(acc, "train/loss")] == [4, 8]
    # ... or at S3_ENDPOINT, read when TensorBoard starts (so in a process of its own)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("S3_ENDPOINT", s3.endpoint_url)
    code = (
        "import json, sys\n"
        "from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n"
        "acc = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0})\n"
        "acc.Reload()\n"
        "print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, f"s3://{bucket}/runs/s/tensorboard"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    read = json.loads(done.stdout.strip().splitlines()[-1])
    assert read == {t: [list(p) for p in curve(acc, t)] for t in acc.Tags()["scalars"]}
    assert len(read) == 10


def _step(global_step: int, loss: float) -> dict[str, Any]:
    epoch, step = divmod(global_step - 1, 10)
    return {"type": "step", "epoch": epoch + 1, "step": step + 1, "steps_per_epoch": 10, "loss": loss,
            "lr": 0.1, "images_per_s": 100.0}  # fmt: skip


def test_steps_a_crashed_process_logged_after_its_checkpoint_are_dropped(tmp_path) -> None:
    logdir = str(tmp_path / "tensorboard")
    crashed = TensorBoardSink(logdir, "{}")
    for s in range(1, 8):  # logged steps 1..7, checkpoint at 5, crash after 7: flushed, never closed
        crashed.emit(_step(s, 1.0))
    crashed.emit({"type": "lr_decay", "epoch": 1, "lr": 0.01})  # a sync, as an epoch end would be
    resumed = TensorBoardSink(logdir, "{}")
    resumed.emit({"type": "resumed", "epoch": 0, "step": 5, "global_step": 5})
    for s in range(6, 13):
        resumed.emit(_step(s, 2.0))
    resumed.emit({"type": "epoch", "epoch": 1, "train_loss": 0.5, "val_top1_error": 0.25})
    resumed.close()
    acc = read_tensorboard(logdir)
    assert curve(acc, "train/loss") == [(s, 1.0 if s <= 5 else 2.0) for s in range(1, 13)]
    assert curve(acc, "epoch/train_loss") == [(10, 0.5)]
    assert curve(acc, "epoch/lr_decay") == []  # logged by the crashed process at step 7: an orphan
    assert [s for s, _ in spec_texts(acc)] == [0, 6]


def test_a_failing_store_costs_one_warning_and_never_an_exception(tmp_path, s3, caplog) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    missing_bucket = TensorBoardSink(
        "s3://no-such-bucket-tb/r/tensorboard", "{}", endpoint_url=s3.endpoint_url
    )
    for sink in (TensorBoardSink(str(blocker / "tensorboard"), "{}"), missing_bucket):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="alexnet_dist.training.tensorboard"):
            for s in range(1, 5):
                sink.emit(_step(s, 1.0))
                sink.emit({"type": "epoch", "epoch": s, "train_loss": math.nan})
            sink.close()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "training goes on" in warnings[0].getMessage()


def test_mlflow_without_the_extra_is_one_warning_and_no_sink(monkeypatch, caplog) -> None:
    monkeypatch.setattr(sinks_mod, "mlflow_installed", lambda: False)
    config = {"spec": "{}", "run_name": "r", "model_url": "file:///tmp/r/model.pt", "events": None,
              "mlflow_tracking_uri": "http://mlflow.example:5000"}  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="alexnet_dist.training.sinks"):
        made = sinks_mod.make_sinks(config, 0)
    assert [type(s).__name__ for s in made.sinks] == ["StdoutSink", "TensorBoardSink"]
    assert "pip install 'alexnet-dist[mlflow]'" in caplog.text
