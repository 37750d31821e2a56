"""Learning curves of a run as a PNG: training loss, validation top-1 / top-5 error, learning rate.

The per-epoch figures come from the job's ``epoch`` events in Redis (a running job's too), else from its
stored result; or, without Redis, from the ``history`` the newest checkpoint of a run holds (give a
checkpoint folder, a run folder, or its ``model.pt`` / ``model.json``, locally or as an s3:// URL).
A resumed run may report an epoch twice (the epoch a crash interrupted is trained again): the last
report of each epoch wins. Drawn with matplotlib's Agg canvas: no display, no global backend switch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from alexnet_dist.errors import DataError, JobNotFoundError, NotFoundError
from alexnet_dist.settings import Settings

__all__ = ["Curves", "curves_from_history", "load_history", "plot_curves"]

_SERIES = ("train_loss", "val_top1_error", "val_top5_error", "lr")


@dataclass(frozen=True)
class Curves:
    """One value per epoch; None where an epoch has no such figure (validation every k epochs)."""

    epochs: list[int]
    train_loss: list[float | None]
    val_top1_error: list[float | None]
    val_top5_error: list[float | None]
    lr: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def curves_from_history(history: list[dict[str, Any]]) -> Curves:
    """Per-epoch dicts (events or checkpoint history) -> curves sorted by epoch, the last report winning."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for entry in history:
        epoch = entry.get("epoch")
        if isinstance(epoch, int) and not isinstance(epoch, bool) and "final" not in entry:
            by_epoch[epoch] = entry
    epochs = sorted(by_epoch)
    columns = {name: [_number(by_epoch[e].get(name)) for e in epochs] for name in _SERIES}
    return Curves(epochs=epochs, **columns)


def _history_from_checkpoints(where: str, *, endpoint_url: str | None) -> tuple[str, list[dict[str, Any]]]:
    from alexnet_dist.artifacts.classify import load_checkpoint_state, newest_checkpoint_url

    url = where.rstrip("/")
    name = url.rsplit("/", 1)[-1]
    if name.endswith((".pt", ".json")):  # model.pt / model.json: the run folder holds the checkpoints
        url = url.rsplit("/", 1)[0]
        name = url.rsplit("/", 1)[-1]
    ckpt = url if name.startswith("checkpoint_") else newest_checkpoint_url(url, endpoint_url=endpoint_url)
    if ckpt is None:
        raise NotFoundError(
            f"{where}: no checkpoint_* folder there to read the history from; give a run "
            "folder, a checkpoint or a job id"
        )
    state = load_checkpoint_state(ckpt, endpoint_url=endpoint_url)
    return ckpt, list(state.get("history") or [])


def _history_from_job(job_id: str, *, settings: Settings) -> tuple[str, list[dict[str, Any]]]:
    from alexnet_dist.service.connection import connect
    from alexnet_dist.service.events import read_events
    from alexnet_dist.service.store import JobStore

    queue = JobStore(connect(settings.redis_url), prefix=settings.redis_prefix)
    try:
        rec = queue.get(job_id)
    except JobNotFoundError:
        raise NotFoundError(
            f"{job_id}: no such job, file or folder; give a job id, a run or checkpoint folder, or a URL"
        ) from None
    history = [e for _, e in read_events(queue.client, queue.keys, job_id) if e.get("type") == "epoch"]
    if not history and rec.result:
        history = list(rec.result.get("history") or [])
    return f"job {job_id} ({rec.state.value})", history


def load_history(target: str, *, settings: Settings) -> tuple[str, list[dict[str, Any]]]:
    """(where the figures came from, per-epoch dicts) for a job id, a run/checkpoint folder or a URL."""
    path = Path(target).expanduser()
    if target.startswith(("s3://", "file://")):
        return _history_from_checkpoints(target, endpoint_url=settings.s3_endpoint_url)
    if path.exists():
        return _history_from_checkpoints(str(path.absolute()), endpoint_url=None)
    if "/" in target:
        raise NotFoundError(f"{target}: not found; give a job id, a run or checkpoint folder, or a URL")
    return _history_from_job(target, settings=settings)


def plot_curves(curves: Curves, output: str | Path, *, title: str = "") -> Path:
    """Write the three panels (loss; top-1/top-5 error in %; learning rate, log scale) as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves.epochs:
        raise DataError(f"{title or 'run'}: no finished epoch to plot yet; try again after the first epoch")
    fig = Figure(figsize=(12, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, err_ax, lr_ax = fig.subplots(1, 3)

    def draw(ax: Any, values: list[float | None], label: str, scale: float = 1.0, **style: Any) -> None:
        pts = [(e, v * scale) for e, v in zip(curves.epochs, values, strict=True) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label, **style)

    draw(loss_ax, curves.train_loss, "training loss", color="tab:blue")
    loss_ax.set_title("training loss (cross-entropy)")
    draw(err_ax, curves.val_top1_error, "top-1", 100.0, color="tab:red")
    draw(err_ax, curves.val_top5_error, "top-5", 100.0, color="tab:orange")
    err_ax.set_title("validation error (central crop), %")
    err_ax.legend()
    draw(lr_ax, curves.lr, "learning rate", color="tab:green")
    lr_ax.set_title("learning rate")
    if any(v is not None and v > 0 for v in curves.lr):
        lr_ax.set_yscale("log")  # step decays by 10x (section 5) read best on a log axis
    for ax in (loss_ax, err_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    output = Path(output)
    if output.parent and not output.parent.exists():
        raise NotFoundError(f"{output.parent}: no such folder for the plot; create it or choose another -o")
    fig.savefig(output, format="png")
    return output
