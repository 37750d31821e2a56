"""CLI: ``alexnet-dist export MODEL -o FILE`` (ONNX or TorchScript, with the preprocessing inside).

torch and the exporters are imported inside the command: every other command starts without them.
"""

from __future__ import annotations

from pathlib import Path

import typer

from alexnet_dist.cli.app import app
from alexnet_dist.errors import ConfigError
from alexnet_dist.settings import load_settings


def _size(n: int) -> str:
    """A file size for people: bytes, KB or MB (powers of 1000)."""
    if n < 1000:
        return f"{n} bytes"
    return f"{n / 1e3:.1f} KB" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def _local_file(source: str) -> Path | None:
    """The local file ``LoadedModel.source`` names ("PATH", "file://PATH", "job J -> URL"), if any."""
    where = source.rsplit(" -> ", 1)[-1].removeprefix("file://")
    if "://" in where:
        return None
    path = Path(where)
    return path.resolve() if path.is_file() else None


@app.command("export")
def export(
    model: str = typer.Argument(
        ..., help="job id, model file (.pt, .caffemodel), checkpoint or run folder, or s3:// / file:// URL"
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="file to write: .onnx, or .pt / .ts (TorchScript)"
    ),
    fmt: str | None = typer.Option(
        None, "--format", "-f", help="onnx or torchscript (default: from the suffix of --output)"
    ),
    opset: int | None = typer.Option(None, "--opset", help="ONNX opset to target (default 18)"),
) -> None:
    """Export a trained model to ONNX or TorchScript for use outside this package.

    The graph takes a float32 batch [N, 3, S, S] of preprocessed crops and returns logits.
    Mean, std, resize, crop size and class names are stored in the file:
    ONNX metadata_props, or preprocess.json in the TorchScript file.
    """
    from rich.console import Console

    from alexnet_dist.artifacts.export import OPSET, export_model, format_for_path

    chosen = format_for_path(output, fmt)  # a bad format fails before the model is loaded
    if opset is not None and chosen != "onnx":
        raise ConfigError(f"--opset {opset}: only for ONNX; {output} is written as {chosen}")

    from alexnet_dist.artifacts.classify import load_model

    err = Console(stderr=True)
    with err.status(f"loading {model} ..."):
        loaded = load_model(model, settings=load_settings())
    read = _local_file(loaded.source)
    if read is not None and read == output.expanduser().resolve():  # MODEL, or a run folder's model.pt
        raise ConfigError(f"{output}: is the model file MODEL names; write the export to another file")
    with err.status(f"exporting to {chosen} ..."):
        path = export_model(loaded, output, chosen, opset=OPSET if opset is None else opset)
    cfg = loaded.model.config
    shape = f"[N, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}]"
    typer.echo(
        f"wrote {path} ({chosen}, {_size(path.stat().st_size)}): {loaded.source}, "
        f"input {shape} float32 -> logits [N, {loaded.model.num_classes}]"
    )
