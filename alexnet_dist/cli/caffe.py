"""CLI: ``alexnet-dist import-caffe``: a Caffe AlexNet (``bvlc_alexnet.caffemodel``) -> a model file."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from alexnet_dist.cli.app import app
from alexnet_dist.errors import ConfigError


def parse_mean(text: str) -> tuple[float, float, float]:
    """``"104,117,123"`` -> (104.0, 117.0, 123.0): the mean pixel in B, G, R order on 0-255."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"--mean {text}: needs three numbers B,G,R on 0-255, e.g. --mean 104,117,123")
    return values  # type: ignore[return-value]


@app.command("import-caffe")
def import_caffe(
    caffemodel: Path = typer.Argument(..., help="Caffe binary model, e.g. bvlc_alexnet.caffemodel"),
    output: Path = typer.Option(..., "--output", "-o", help="model file to write, e.g. alexnet.pt"),
    mean: str | None = typer.Option(
        None, help="mean pixel B,G,R on 0-255 (default: the file's mean_value, else 104.0,116.7,122.7)"
    ),
    mean_file: Path | None = typer.Option(None, help="Caffe mean image (imagenet_mean.binaryproto)"),
    classes: Path | None = typer.Option(
        None,
        help="class names, one per line (Caffe's synset_words.txt) (default: ImageNet names if 1000)",
    ),
    resize: int | None = typer.Option(
        None, help="warp images to this square before the centre crop (default 256; 227: classification.cpp)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Import Caffe's bvlc_alexnet (or a Caffe AlexNet of its layout) into the two-tower network."""
    from alexnet_dist.interop.caffe import load_caffemodel  # torch: imported only by this command
    from alexnet_dist.model.file import read_class_names, save_model_file
    from alexnet_dist.model.network import count_parameters

    console = Console(stderr=True)
    names = read_class_names(classes) if classes is not None else None
    with console.status(f"reading {caffemodel} ..."):
        model, meta = load_caffemodel(
            caffemodel,
            mean=parse_mean(mean) if mean else None,
            mean_file=mean_file,
            classes=names,
            resize=resize,
        )
    with console.status(f"writing {output} ..."):
        save_model_file(output, model, meta)
    src, cfg, pre = meta["source"], meta["config"], meta["preprocess"]
    summary = {
        "output": str(output),
        "bytes": output.stat().st_size,
        "parameters": count_parameters(model),
        "num_classes": meta["num_classes"],
        "encoding": src["encoding"],
        "layers": src["layers"],
        "caffe_lrn": src["caffe_lrn"],
        "preprocess": pre,
        "mean_from": src["mean_from"],
        "class_names": src["class_names"],
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{caffemodel.name} ({src['encoding']}) -> {output}")
    for column in ("ours", "caffe layer", "per tower", "kernel/stride/pad"):
        table.add_column(column)
    for i, ours in enumerate(("conv1", "conv2", "conv3", "conv4", "conv5")):
        geometry = f"{cfg['kernels'][i]}/{cfg['strides'][i]}/{cfg['paddings'][i]}"
        table.add_row(ours, src["layers"][ours], f"2 x {cfg['channels'][i] // 2}", geometry)
    for ours in ("fc6", "fc7"):
        table.add_row(ours, src["layers"][ours], f"2 x {cfg['fc_units'] // 2}", "")
    table.add_row("fc8", src["layers"]["fc8"], f"{meta['num_classes']} (one layer)", "")
    out = Console()
    out.print(table)
    lrn = src["caffe_lrn"]
    out.print(
        f"LRN across both towers: size {lrn['local_size']}, Caffe alpha {lrn['alpha']:g} "
        f"(ours {cfg['lrn_alpha']:g} on the plain sum), beta {lrn['beta']:g}, k {lrn['k']:g}"
    )
    out.print(
        f"input: {pre['channel_order']} 0-{pre['scale']:g} minus mean {[round(m, 2) for m in pre['mean']]} "
        f"({src['mean_from']}), warp to {pre['resize']}x{pre['resize']}, centre crop {pre['crop']}"
    )
    out.print(
        f"{summary['parameters']:,} parameters, {meta['num_classes']} classes ({src['class_names']}); "
        f"wrote {output} ({summary['bytes'] / 2**20:.1f} MiB)"
    )
