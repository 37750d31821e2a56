"""CLI commands: ``alexnet-dist shards build SOURCE OUT`` and ``alexnet-dist shards verify MANIFEST``.

``build`` writes ``OUT/<dataset>-<split>-NNNNNN.tar`` and ``OUT/<dataset>-<split>.json`` per split, with a
copy of each manifest in ``--manifest-dir`` (default ``shards/``). For Fashion-MNIST both splits are
built unless ``--split`` names one: ``fashion-mnist-train.json`` and ``fashion-mnist-test.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from alexnet_dist.cli.app import app
from alexnet_dist.errors import ConfigError, DataError
from alexnet_dist.settings import load_settings

shards_app = typer.Typer(help="Build and check WebDataset shards.", no_args_is_help=True)
app.add_typer(shards_app, name="shards")
console = Console(stderr=True)


@shards_app.command("build")
def build(
    source: Annotated[
        Path, typer.Argument(help="ImageFolder, ILSVRC2012 folder or Fashion-MNIST idx folder")
    ],
    out: Annotated[str, typer.Argument(help="output folder or s3://bucket/prefix")],
    fmt: Annotated[str | None, typer.Option("--format", help="imagefolder | ilsvrc | fashion-mnist")] = None,
    split: Annotated[str | None, typer.Option(help="build only this split (train, val, test)")] = None,
    resize_to: Annotated[
        int, typer.Option(help="shorter side to N, central NxN crop (section 2); 0 = keep")
    ] = 256,
    quality: Annotated[int, typer.Option(help="JPEG quality")] = 90,
    shard_size: Annotated[int, typer.Option(help="samples per shard")] = 1000,
    shard_bytes: Annotated[
        int | None, typer.Option(help="target bytes per shard (overrides --shard-size)")
    ] = None,
    processes: Annotated[int, typer.Option(help="encoding processes")] = 2,
    limit: Annotated[int | None, typer.Option(help="only the first N samples of each split")] = None,
    manifest_dir: Annotated[
        Path | None, typer.Option(help="also copy the manifests here (default: only beside the shards)")
    ] = None,
    stats_from: Annotated[str | None, typer.Option(help="copy mean/std/PCA from this manifest")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifests' summary as JSON")] = False,
) -> None:
    """Encode SOURCE into tar shards plus a manifest per split."""
    from alexnet_dist.data.build import writer as shard_writer  # numpy, PIL: only for this command
    from alexnet_dist.data.manifest import load_manifest

    if not 1 <= quality <= 100:
        raise ConfigError(f"--quality {quality}: use 1..100")
    if shard_size < 1 or processes < 1:
        raise ConfigError("--shard-size and --processes must be at least 1")
    settings = load_settings()
    opts = shard_writer.BuildOptions(
        resize_to=resize_to or None, quality=quality, shard_size=shard_size, shard_bytes=shard_bytes,
        processes=processes, limit=limit,
    )  # fmt: skip
    reference = load_manifest(stats_from, endpoint_url=settings.s3_endpoint_url) if stats_from else None
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=as_json,
    ) as bar:  # fmt: skip
        tasks: dict[str, int] = {}

        def tick(split_name: str, n: int, total: int) -> None:
            if split_name not in tasks:
                tasks[split_name] = bar.add_task(f"{split_name} samples", total=total)
            bar.advance(tasks[split_name], n)

        manifests = shard_writer.build(
            source, out, opts, fmt=fmt, split=split, manifest_dir=manifest_dir, stats_from=reference,
            endpoint_url=settings.s3_endpoint_url, progress=tick,
        )  # fmt: skip
    rows = [
        {"split": m.split, "manifest": m.url, "shards": len(m.shards), "samples": m.num_samples,
         "bytes": sum(s.bytes for s in m.shards), "classes": len(m.classes),
         "source_failures": m.extra.get("source_failures", 0)}
        for m in manifests
    ]  # fmt: skip
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table("split", "manifest", "shards", "samples", "MB", "classes")
    for r in rows:
        mb = f"{r['bytes'] / 1e6:.1f}"
        table.add_row(r["split"], r["manifest"], str(r["shards"]), str(r["samples"]), mb, str(r["classes"]))
    Console().print(table)


@shards_app.command("verify")
def verify(
    manifest: Annotated[str, typer.Argument(help="manifest URL or path")],
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Read every shard: sizes, checksums, decodes and labels; exit non-zero if anything is bad."""
    from alexnet_dist.data.manifest import load_manifest
    from alexnet_dist.data.verify import verify_manifest

    settings = load_settings()
    m = load_manifest(manifest, endpoint_url=settings.s3_endpoint_url)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                  disable=as_json) as bar:  # fmt: skip
        task = bar.add_task("shards", total=len(m.shards))
        report = verify_manifest(m, endpoint_url=settings.s3_endpoint_url,
                                            progress=lambda: bar.advance(task))  # fmt: skip
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        table = Table("shard", "key", "problem")
        for bad in report.bad:
            table.add_row(bad.shard, bad.key, bad.problem)
        if report.bad:
            Console().print(table)
        Console().print(
            f"{report.samples} samples in {report.shards} shards: {report.good} good, {len(report.bad)} bad"
        )
    if report.bad:
        raise DataError(
            f"{manifest}: {len(report.bad)} bad samples in {len(report.bad_shards)} shards; see above"
        )
