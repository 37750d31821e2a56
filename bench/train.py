"""Training throughput through the Ray Train worker path against a plain single-process PyTorch loop.

Both sides run the same model, the same shards through the same pipeline (alexnet_dist.data, decoding in
the training process) and the same step (normalize, forward, cross-entropy, backward, SGD), with one
torch thread: the Ray side is one Ray Train worker with one CPU (plus Ray's start-up, DDP-free
single-worker loop, event reporting and checkpoint at the epoch end). Each side trains two epochs and
the second is timed (the first warms up caches and, on Ray, the worker start).

Prints one JSON object: images/s of each side, their ratio and Ray's overhead, for the small preset
(Fashion-MNIST at 32 px) and for the paper's network at batch 32 (227 px crops of 256 px images).
Target: overhead at most 10%.

    python bench/train.py [--small-images 6400] [--paper-images 320]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet_dist.data.augment import normalize
from alexnet_dist.data.batch import PAD_LABEL
from alexnet_dist.data.build.writer import BuildOptions, build
from alexnet_dist.data.loader import LoaderConfig, make_loader
from alexnet_dist.data.manifest import load_manifest
from alexnet_dist.model.config import PRESETS
from alexnet_dist.model.network import AlexNet
from alexnet_dist.settings import Settings
from alexnet_dist.spec import parse_spec
from alexnet_dist.training.driver import run_training

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def make_shards(root: Path, resize: int, train: int, test: int) -> tuple[str, str]:
    urls = []
    for split, limit in (("train", train), ("test", test)):
        (m,) = build(
            FASHION_MNIST,
            str(root),
            BuildOptions(resize_to=resize, shard_size=max(32, limit // 8), limit=limit, processes=2),
            fmt="fashion-mnist",
            split=split,
        )
        urls.append(m.url)
    return urls[0], urls[1]


def plain_loop(train_url: str, preset: str, batch: int, epochs: int) -> float:
    """images/s of the last epoch of a plain single-process loop."""
    torch.set_num_threads(1)
    manifest = load_manifest(train_url)
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    model = AlexNet(10, config=cfg)
    # the optimizer train.py uses (fused: one kernel over all parameters)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
    loader = make_loader(
        manifest,
        LoaderConfig(
            batch_size=batch, crop=cfg.image_size, mode="train", seed=0, num_workers=0, shuffle_buffer=0
        ),
        rank=0,
        world_size=1,
    )
    ips = 0.0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        model.train()
        t, seen = time.perf_counter(), 0
        for b in loader:
            x = normalize(b.images, b.lighting, manifest.mean, manifest.std, device="cpu")
            loss = F.cross_entropy(model(x), b.labels, ignore_index=PAD_LABEL)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(b.labels)
        ips = seen / (time.perf_counter() - t)
    return ips


def ray_path(train_url: str, val_url: str, preset: str, batch: int, epochs: int, storage: str) -> float:
    spec = parse_spec(
        {
            "name": f"bench-{preset}",
            "data": {"train": train_url, "val": val_url, "loader_workers": 0, "shuffle_buffer": 0},
            "model": {"preset": preset, "num_classes": 10},
            "train": {"epochs": epochs, "batch_size": batch, "ten_crop_eval": False, "log_every_steps": 1000},
            "scaling": {"workers": 1, "devices": "cpu", "cpus_per_worker": 1},
            "checkpoint": {"storage": storage, "keep": 1},
            "retries": 0,
        }
    )
    result = run_training(spec, run_name=f"bench-{preset}-{time.time_ns()}", settings=Settings())
    return float(result.history[-1]["images_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-images", type=int, default=6400)
    ap.add_argument("--paper-images", type=int, default=320)
    args = ap.parse_args()
    import ray

    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    out: dict = {"benchmark": "train_throughput", "threads_per_side": 1, "target_overhead": "<= 0.10"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = {
            "small": (36, args.small_images, 128, 64),
            "paper": (256, args.paper_images, 32, 32),
        }
        for preset, (resize, n_train, n_test, batch) in cases.items():
            train_url, val_url = make_shards(root / preset, resize, n_train, n_test)
            plain = plain_loop(train_url, preset, batch, epochs=2)
            via_ray = ray_path(train_url, val_url, preset, batch, 2, str(root / "runs"))
            out[preset] = {
                "batch": batch,
                "images_per_epoch": n_train,
                "plain_images_per_s": round(plain, 1),
                "ray_images_per_s": round(via_ray, 1),
                "ratio": round(via_ray / plain, 3),
                "ray_overhead": round(1 - via_ray / plain, 3),
            }
    ray.shutdown()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
