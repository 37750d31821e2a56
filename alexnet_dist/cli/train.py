"""CLI: ``alexnet-dist train SPEC`` runs a job in the foreground on Ray (no queue)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

import typer
from rich.console import Console
from rich.table import Table

from alexnet_dist.cli.app import app
from alexnet_dist.settings import load_settings
from alexnet_dist.spec import load_spec


@app.command()
def train(
    spec_path: Path = typer.Argument(..., metavar="SPEC", help="job spec (TOML), e.g. jobs/smoke.toml"),
    set_: list[str] = typer.Option([], "--set", help="override a field: --set train.epochs=3"),
    run_name: str | None = typer.Option(
        None, "--run-name", help="Ray Train run name (default: the spec's name)"
    ),
    fresh: bool = typer.Option(False, "--fresh", help="refuse to continue a run that has checkpoints"),
    local: bool = typer.Option(
        False,
        "--local",
        help="train in this process, without Ray (checkpoints in a local folder); for N workers on one "
        "node: torchrun --nproc-per-node N -m alexnet_dist.training.local SPEC",
    ),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Train SPEC on the Ray cluster at RAY_ADDRESS (or a local Ray), or here with --local; resumes the
    run if it exists."""
    spec = load_spec(spec_path, set_)
    settings = load_settings()
    json_out = _stdout_for_json_only() if as_json else None
    if local:
        from alexnet_dist.training.local import run_local as run
    else:
        from alexnet_dist.training.driver import run_training as run
    result = run(spec, run_name=run_name or spec.name, settings=settings, resume=not fresh)
    if json_out is not None:
        json_out.write(json.dumps(result.to_dict()) + "\n")
        json_out.flush()
        return
    console = Console()
    table = Table(title=f"{spec.name}: final evaluation")
    table.add_column("metric")
    table.add_column("value", justify="right")
    view = "ten-crop" if result.ten_crop else "central crop"
    table.add_row(f"top-1 error ({view})", f"{result.top1_error:.4f}")
    table.add_row(f"top-5 error ({view})", f"{result.top5_error:.4f}")
    table.add_row("validation images", str(result.val_samples))
    table.add_row("epochs / steps", f"{result.epochs} / {result.steps}")
    table.add_row("training time", f"{result.train_seconds:.1f} s (wall {result.seconds:.1f} s)")
    table.add_row("images/s (last epoch)", f"{result.images_per_s:.0f}")
    table.add_row("model", result.model_url)
    table.add_row("checkpoint", str(result.checkpoint_url))
    console.print(table)


def _stdout_for_json_only() -> TextIO:
    """A stream on the process's stdout for the JSON result alone; everything else written from here on,
    the Ray workers' log lines Ray forwards to this driver included, goes to stderr (fd 1 is pointed at
    fd 2), so ``train --json | jq`` reads one JSON object."""
    real = sys.stdout
    try:
        fd, err_fd = real.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not file descriptors (a test runner's buffers)
        return real
    real.flush()
    saved = os.dup(fd)
    os.dup2(err_fd, fd)  # sys.stdout, Ray's forwarding and C code all write to fd 1: now stderr
    return os.fdopen(saved, "w")
