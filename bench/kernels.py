"""What each C kernel buys end to end: the same work with the kernel and without it, in one run.

- ``jpeg_crop`` (kernels/csrc/jpeg_crop.c): the training loader over shards of 256 px JPEGs, each view's
  crop decoded into its slot (decoder "crop") against whole-image decodes and a crop copy ("whole");
- ``maxpool`` (kernels/csrc/maxpool.c): a training step of the small preset (batch 64, 32 px) and of the
  paper's network (batch 32, 227 px), pooling in C against torch's ``max_pool2d``;
- ``lrn`` (kernels/csrc/lrn.c), for comparison: the paper network's step with the fused ReLU+LRN against
  the torch formulation.

Each side runs in a fresh process (a kernel is switched off before its first use, so nothing of it is
loaded), in rounds that alternate the sides, so a drift of the machine hits both alike; the median of
``--repeat`` rounds is reported. A kernel pays for itself when ``ratio`` (with / without) is clearly above 1.

    .venv/bin/python bench/kernels.py [--repeat 3] [--images 4000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench_data():
    """bench/data.py's shard writer and timer (a script, so loaded by path)."""
    spec = importlib.util.spec_from_file_location("bench_data", HERE / "data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_data"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _switch_off(kernel: str) -> None:
    from alexnet_dist.kernels import library

    library._loaded[kernel] = None  # as if its library were missing: the torch / Python path runs


def child_loader(shards: str, images: int, workers: int, batch: int, decoder: str) -> dict:
    from alexnet_dist.data.loader import LoaderConfig, make_loader
    from alexnet_dist.data.manifest import load_manifest

    bd = _bench_data()
    m = load_manifest(shards)
    cfg = LoaderConfig(batch_size=batch, crop=227, mode="train", seed=0, num_workers=workers, decoder=decoder)
    rate = bd.time_batches(b.images.shape[0] for b in make_loader(m, cfg, rank=0, world_size=1))
    return {"images_per_s": rate.steady, "cpu_us_per_image": rate.cpu_us}


def child_step(preset: str, batch: int, steps: int, off: str | None) -> dict:
    if off:
        _switch_off(off)
    import torch

    from alexnet_dist.model.network import build_model

    torch.manual_seed(0)
    model = build_model(preset, num_classes=10)
    size = model.config.image_size
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):  # warm-up: allocator, kernels' first calls
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return {"images_per_s": batch * steps / (time.perf_counter() - t0)}


def run_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(name: str, with_args: list[str], without_args: list[str], repeat: int) -> dict:
    on, off = [], []
    for _ in range(repeat):
        on.append(run_child(*with_args)["images_per_s"])
        off.append(run_child(*without_args)["images_per_s"])
    m_on, m_off = statistics.median(on), statistics.median(off)
    return {
        "images_per_s_with": round(m_on, 1),
        "images_per_s_without": round(m_off, 1),
        "ratio": round(m_on / m_off, 3),
        "runs_with": [round(r, 1) for r in on],
        "runs_without": [round(r, 1) for r in off],
        "what": name,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "loader":
            shards, images, workers, batch, decoder = rest
            result = child_loader(shards, int(images), int(workers), int(batch), decoder)
        else:
            preset, batch, steps, off = rest
            result = child_step(preset, int(batch), int(steps), None if off == "-" else off)
        print(json.dumps(result))
        return

    bd = _bench_data()
    out: dict = {"benchmark": "kernels_end_to_end", "repeat": args.repeat, "cpus": 2}
    with tempfile.TemporaryDirectory() as tmp:
        jpegs = bd.make_jpegs(args.images, 256)
        manifest = bd.write_shards(Path(tmp) / "shards", jpegs, 1000, 256)
        path = Path(manifest.url)
        path.write_text(manifest.to_json())
        loader = ["loader", str(path), str(args.images), str(args.workers), "64"]
        what = "training loader, 256 px JPEGs, batch 64"
        out["jpeg_crop"] = compare(what, [*loader, "crop"], [*loader, "whole"], args.repeat)
    small, paper = ["step", "small", "64", "60"], ["step", "paper", "32", "8"]
    out["maxpool_small"] = compare(
        "small preset step, batch 64", [*small, "-"], [*small, "maxpool"], args.repeat
    )
    out["maxpool_paper"] = compare(
        "paper network step, batch 32", [*paper, "-"], [*paper, "maxpool"], args.repeat
    )
    out["lrn_paper"] = compare("paper network step, batch 32", [*paper, "-"], [*paper, "lrn"], args.repeat)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
