"""CLI: ``alexnet-dist classify MODEL IMAGE...`` (top-5 classes per image) and ``alexnet-dist plot JOB``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from alexnet_dist.cli.app import app
from alexnet_dist.errors import ConfigError
from alexnet_dist.settings import load_settings


@app.command("classify")
def classify(
    model: str = typer.Argument(
        ..., help="job id, model file (.pt, .caffemodel), checkpoint or run folder, or s3:// / file:// URL"
    ),
    images: list[Path] = typer.Argument(..., help="image files (JPEG, PNG, or anything PIL reads)"),
    ten_crop: bool = typer.Option(
        False, "--ten-crop", help="average the softmax of ten crops (corners, centre, mirrored), section 4.1"
    ),
    top: int = typer.Option(5, "--top", help="how many classes to show per image"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object: model, results per image"),
) -> None:
    """Classify image files: each one's top-5 classes with probabilities.

    An unreadable or non-image file gets its own error line; the others are still classified, and the
    command then exits with status 1.
    """
    from alexnet_dist.artifacts.classify import classify_images, load_model

    if top < 1:
        raise ConfigError(f"--top {top}: must be at least 1")
    err = Console(stderr=True)
    with err.status(f"loading {model} ..."):
        loaded = load_model(model, settings=load_settings())
    with err.status(f"classifying {len(images)} image(s) ..."):
        results = classify_images(loaded, images, ten_crop=ten_crop, top_k=top)
    failed = [r for r in results if r.error]
    if as_json:
        doc = {
            "model": loaded.source,
            "num_classes": loaded.model.num_classes,
            "ten_crop": ten_crop,
            "results": [r.to_dict() for r in results],
        }
        sys.stdout.write(json.dumps(doc) + "\n")
    else:
        mode = "ten crops" if ten_crop else "central crop"
        console = Console()
        console.print(
            f"model: {loaded.source} ({loaded.model.num_classes} classes, {mode})",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )
        table = Table()
        for column, justify in (
            ("image", "left"),
            ("#", "right"),
            ("class", "left"),
            ("probability", "right"),
        ):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        for r in results:
            for rank, p in enumerate(r.top, 1):
                shown = escape(r.image) if rank == 1 else ""  # paths and names are text, not rich markup
                table.add_row(shown, str(rank), escape(p.name), f"{p.probability:.4f}")
            if r.top:
                table.add_section()
        console.print(table)
    for r in failed:
        sys.stderr.write(f"alexnet-dist: error: {r.error}\n")  # one line each, never wrapped
    if failed:
        raise typer.Exit(1)


@app.command("plot")
def plot(
    job: str = typer.Argument(..., help="job id, or a run / checkpoint folder or URL (no Redis needed)"),
    output: Path = typer.Option(Path("curves.png"), "--output", "-o", help="PNG file to write"),
    as_json: bool = typer.Option(False, "--json", help="also print the plotted figures as JSON"),
) -> None:
    """Plot a run's learning curves: training loss, top-1/top-5 validation error, learning rate."""
    from alexnet_dist.artifacts.plot import curves_from_history, load_history, plot_curves

    source, history = load_history(job, settings=load_settings())
    curves = curves_from_history(history)
    plot_curves(curves, output, title=f"{job}: learning curves")
    if as_json:
        sys.stdout.write(json.dumps({"source": source, "output": str(output), **curves.to_dict()}) + "\n")
        return
    last = len(curves.epochs) - 1
    top1 = next((v for v in reversed(curves.val_top1_error) if v is not None), None)
    shown = f", last validation top-1 error {top1:.4f}" if top1 is not None else ""
    Console().print(
        f"wrote {output}: {len(curves.epochs)} epoch(s) of {source} (epoch {curves.epochs[last]}{shown})",
        highlight=False,
        soft_wrap=True,
    )
