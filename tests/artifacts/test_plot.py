"""`alexnet-dist plot`: learning curves from a job's events in a real redis-server, or from checkpoints.

The curves of a job really trained on Ray are checked in tests/test_classify.py (the slow module that
trains one); here the events and checkpoints are written through the same code paths training uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from alexnet_dist.artifacts.plot import curves_from_history, plot_curves
from alexnet_dist.cli import app
from alexnet_dist.errors import DataError, NotFoundError
from alexnet_dist.service.connection import connect
from alexnet_dist.service.events import job_publisher
from alexnet_dist.service.keys import Keys
from alexnet_dist.service.store import JobStore
from alexnet_dist.spec import parse_spec
from alexnet_dist.training.checkpoint import checkpoint_dir_name, write_checkpoint

PREFIX = "plot-test:"


def _spec():
    return parse_spec(
        {
            "name": "curves",
            "data": {"train": "/nowhere/train.json", "val": "/nowhere/test.json"},
            "model": {"preset": "small", "num_classes": 10},
            "scaling": {"workers": 1, "devices": "cpu"},
        }
    )


def _epoch(epoch: int, loss: float, top1: float | None, lr: float) -> dict:
    event = {"type": "epoch", "epoch": epoch, "epochs": 3, "train_loss": loss, "lr": lr}
    if top1 is not None:
        event.update(val_top1_error=top1, val_top5_error=top1 / 4, val_samples=1000)
    return event


def _plot(args: list[str], redis_url: str):
    return CliRunner().invoke(
        app, ["plot", *args], env={"ALEXNET_DIST_REDIS_URL": redis_url, "ALEXNET_DIST_REDIS_PREFIX": PREFIX}
    )


def _colour_pixels(png: Path, rgb: tuple[int, int, int]) -> int:
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - np.array(rgb)).sum(axis=1) < 30).sum())


TAB_RED, TAB_GREEN = (214, 39, 40), (44, 160, 44)  # matplotlib's tab:red (top-1) and tab:green (lr)


def test_plot_job_from_its_events_in_redis(redis_url, tmp_path) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    job, _ = queue.submit(_spec())
    events = job_publisher(redis_url, Keys(PREFIX), job.id)
    events.publish({"type": "step", "epoch": 1, "loss": 2.3})  # not an epoch: ignored
    events.publish(_epoch(1, 1.50, 0.40, 0.01))
    events.publish(_epoch(2, 0.90, 0.30, 0.01))  # a crash in epoch 3, then a resume trains epoch 2 again:
    events.publish(_epoch(2, 0.80, 0.25, 0.001))  # the last report of an epoch wins
    events.publish(_epoch(3, 0.60, 0.20, 0.0001))
    events.close()
    out = tmp_path / "curves.png"
    result = _plot([job.id, "-o", str(out), "--json"], redis_url)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["epochs"] == [1, 2, 3]
    assert doc["train_loss"] == [1.5, 0.8, 0.6]
    assert doc["val_top1_error"] == [0.4, 0.25, 0.2]
    assert doc["val_top5_error"] == [0.1, 0.0625, 0.05]
    assert doc["lr"] == [0.01, 0.001, 0.0001]
    assert doc["source"] == f"job {job.id} (QUEUED)"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out).size == (1200, 380)
    # the curves are drawn: the top-1 line (red) and the learning-rate line (green) cover pixels
    assert _colour_pixels(out, TAB_RED) > 200 and _colour_pixels(out, TAB_GREEN) > 200

    table = _plot([job.id, "-o", str(tmp_path / "again.png")], redis_url)
    assert table.exit_code == 0 and "3 epoch(s)" in table.stdout and "0.2000" in table.stdout


def test_plot_job_falls_back_to_its_stored_result(redis_url, tmp_path) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    job, _ = queue.submit(_spec())
    queue.client.delete(queue.keys.events(job.id))  # no events left (trimmed, or another Redis)
    history = [{k: v for k, v in _epoch(e, 2.0 / e, 0.5 / e, 0.01).items() if k != "type"} for e in (1, 2)]
    queue.store_result(job.id, {"top1_error": 0.2, "history": [*history, {"final": {"top1_error": 0.2}}]})
    result = _plot([job.id, "-o", str(tmp_path / "c.png"), "--json"], redis_url)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train_loss"] == [2.0, 1.0]


def test_plot_job_without_epochs_or_unknown_job_is_an_error(redis_url, tmp_path) -> None:
    queue = JobStore(connect(redis_url), prefix=PREFIX)
    job, _ = queue.submit(_spec())
    result = _plot([job.id, "-o", str(tmp_path / "c.png")], redis_url)
    assert isinstance(result.exception, DataError) and "no finished epoch" in str(result.exception)
    assert not (tmp_path / "c.png").exists()
    result = _plot(["no-such-job", "-o", str(tmp_path / "c.png")], redis_url)
    assert isinstance(result.exception, NotFoundError)
    assert str(result.exception).startswith("no-such-job: no such job")


def _checkpoint(run: Path, step: int, history: list[dict]) -> Path:
    directory = run / checkpoint_dir_name(step)
    directory.mkdir(parents=True)
    zero = torch.zeros(1)
    write_checkpoint(
        directory,
        {
            "format": 1,
            "model": {"w": zero},
            "optimizer": {},
            "schedule": {},
            "epoch": len(history),
            "step": 0,
            "global_step": step,
            "data": {},
            "spec": _spec().to_json(),
            "history": history,
        },
    )
    return directory


def test_plot_from_run_folder_checkpoint_or_model_json_without_redis(tmp_path) -> None:
    run = tmp_path / "run"
    h1 = [{k: v for k, v in _epoch(1, 1.0, 0.5, 0.01).items() if k != "type"}]
    h2 = [*h1, {k: v for k, v in _epoch(2, 0.5, 0.3, 0.01).items() if k != "type"}]
    old = _checkpoint(run, 10, h1)
    _checkpoint(run, 20, h2)  # the newest: its history is the whole run
    (run / "model.json").write_text("{}")
    unreachable = "redis://127.0.0.1:1/0"  # Redis is never asked for a folder
    for target, epochs in (
        (run, [1, 2]),
        (run / "model.json", [1, 2]),
        (old, [1]),
        (f"file://{run}", [1, 2]),
    ):
        result = _plot([str(target), "-o", str(tmp_path / "c.png"), "--json"], unreachable)
        assert result.exit_code == 0, (target, result.output)
        assert json.loads(result.stdout)["epochs"] == epochs
    result = _plot([str(tmp_path / "missing" / "run"), "-o", str(tmp_path / "c.png")], unreachable)
    assert isinstance(result.exception, NotFoundError)


def test_curves_keep_gaps_where_validation_was_skipped(tmp_path) -> None:
    history = [_epoch(1, 1.0, None, 0.1), _epoch(2, 0.8, 0.3, 0.1), _epoch(3, 0.7, None, 0.01)]
    curves = curves_from_history(history)
    assert curves.val_top1_error == [None, 0.3, None] and curves.train_loss == [1.0, 0.8, 0.7]
    assert plot_curves(curves, tmp_path / "gaps.png").stat().st_size > 10_000
    with pytest.raises(NotFoundError, match="no such folder"):
        plot_curves(curves, tmp_path / "nope" / "x.png")
