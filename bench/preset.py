"""Choose the small preset: train candidate configs on in-memory Fashion-MNIST for a time budget.

Prints JSON lines: per epoch, test accuracy (central crop) and wall time, plus training images/s,
for each candidate. This runs the model alone (no Ray, no shards) with ``--threads`` torch threads, the
share of the 2 cores one Ray Train worker gets in the demo.

    python bench/preset.py --seconds 150 --threads 1 --candidate small
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from alexnet_dist.data.build.fashion_mnist import load_split
from alexnet_dist.model.config import PRESETS, AlexNetConfig
from alexnet_dist.model.network import AlexNet

CANDIDATES: dict[str, dict] = {
    "small": {},
    "stride2": {"channels": (32, 64, 96, 96, 64), "kernels": (5, 5, 3, 3, 3), "strides": (2, 1, 1, 1, 1),
                "paddings": (2, 2, 1, 1, 1), "fc_units": 512},
    "m1": {"channels": (16, 48, 64, 64, 64), "kernels": (3, 5, 3, 3, 3), "strides": (1, 1, 1, 1, 1),
           "paddings": (1, 2, 1, 1, 1), "fc_units": 256},
    "m3": {"channels": (16, 32, 48, 48, 32), "kernels": (3, 5, 3, 3, 3), "strides": (1, 1, 1, 1, 1),
           "paddings": (1, 2, 1, 1, 1), "fc_units": 256},
    "m5": {"channels": (16, 32, 48, 48, 32), "kernels": (3, 3, 3, 3, 3), "strides": (1, 1, 1, 1, 1),
           "paddings": (1, 1, 1, 1, 1), "fc_units": 512},
    "m6": {"channels": (24, 48, 64, 64, 48), "kernels": (3, 3, 3, 3, 3), "strides": (1, 1, 1, 1, 1),
           "paddings": (1, 1, 1, 1, 1), "fc_units": 512},
    "w5": {"channels": (32, 64, 128, 128, 256), "fc_units": 512},
    "m2": {"channels": (24, 64, 96, 96, 64), "kernels": (3, 5, 3, 3, 3), "strides": (1, 1, 1, 1, 1),
           "paddings": (1, 2, 1, 1, 1), "fc_units": 512},
}  # fmt: skip


def load(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split("/usr/share/datasets/fashion-mnist", split)
    x = torch.from_numpy(x.copy()).float()[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 72.9) / 90.0  # Fashion-MNIST pixel mean/std (0-255)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(y.astype("int64"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidate", default="small")
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = AlexNetConfig(
        **{
            **PRESETS["small"].to_dict(),
            **CANDIDATES[args.candidate],
            "name": args.candidate,
            "dropout": args.dropout,
        }
    )
    model = AlexNet(10, config=cfg)
    crop, stored = cfg.image_size, cfg.image_size + 4
    xtr, ytr = load("train", stored)
    xte, yte = load("test", stored)
    off = (stored - crop) // 2
    xte = xte[:, :, off : off + crop, off : off + crop]
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(xtr) // args.batch
    total = steps_per_epoch * args.epochs
    start = time.perf_counter()
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr))
        t0 = time.perf_counter()
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            dx, dy = torch.randint(0, stored - crop + 1, (2,)).tolist()
            xb = xtr[idx, :, dy : dy + crop, dx : dx + crop]
            if torch.rand(()) < 0.5:
                xb = xb.flip(3)
            for g in opt.param_groups:  # cosine over the whole run
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(model(xb), ytr[idx]).backward()
            opt.step()
            step += 1
            if time.perf_counter() - start > args.seconds:
                break
        ips = (i + 1) * args.batch / (time.perf_counter() - t0)
        model.eval()
        with torch.no_grad():
            acc = sum(
                (model(xte[j : j + 500]).argmax(1) == yte[j : j + 500]).sum().item()
                for j in range(0, 10000, 500)
            )
        print(
            json.dumps(
                {
                    "candidate": args.candidate,
                    "epoch": epoch + 1,
                    "steps": step,
                    "test_acc": acc / 1e4,
                    "train_images_per_s": round(ips, 1),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            ),
            flush=True,
        )
        if time.perf_counter() - start > args.seconds:
            break


if __name__ == "__main__":
    main()
