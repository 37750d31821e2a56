"""Training throughput of the two-tower AlexNet against torchvision's AlexNet and a grouped reference.

One training step = forward + backward + SGD(momentum) step, batch 32 at 227 px, on the CPU. The models
are timed in interleaved rounds (A, B, C, A, B, C, ...) so a busy machine slows all of them alike, and
the median step time of each is reported. Also times ReLU+LRN alone: our fused CPU kernel, our torch-op
formulation (GPUs, no C compiler) and torch.nn.LocalResponseNorm; and max-pooling alone: our C kernel
against ``F.max_pool2d``.

Prints one JSON object. Targets: two-tower overhead <= 5% against the grouped single-module
reference; >= 0.9x torchvision's AlexNet (0.71 GMACs a forward against our 0.72).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision

from alexnet_dist.kernels import lrn as lrn_kernel
from alexnet_dist.kernels import maxpool as maxpool_kernel
from alexnet_dist.model.network import MaxPool2d, build_model, local_response_norm, relu_lrn
from alexnet_dist.model.reference import GroupedAlexNet


def step_fn(model: torch.nn.Module, batch: int, size: int) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def lrn_fn(kind: str, batch: int) -> Callable[[], None]:
    """ReLU then LRN on conv1's maps (96x55x55), forward and backward, three ways."""
    x = (torch.randn(batch, 96, 55, 55) * 10).requires_grad_()
    g = torch.randn(batch, 96, 55, 55)
    torch_lrn = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)  # torch divides alpha by n
    fns = {
        "fused": lambda: relu_lrn(x, 5, 1e-4, 0.75, 2.0),  # the C kernel where it builds
        "torch_ops": lambda: local_response_norm(F.relu(x), 5, 1e-4, 0.75, 2.0),  # the band-conv formulation
        "torch": lambda: torch_lrn(F.relu(x)),
    }

    def run() -> None:
        fns[kind]().backward(g)

    return run


def pool_fn(kind: str, batch: int) -> Callable[[], None]:
    """Max-pool 3x3 stride 2 on conv1's maps after ReLU (96x55x55), forward and backward, two ways."""
    x = torch.randn(batch, 96, 55, 55).clamp_(min=0).requires_grad_()
    g = torch.randn(batch, 96, 27, 27)
    fns = {
        "kernel": lambda: MaxPool2d(3, 2)(x),  # the C kernel where it builds
        "torch": lambda: F.max_pool2d(x, 3, 2),
    }

    def run() -> None:
        fns[kind]().backward(g)

    return run


def timed_rounds(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = build_model("paper", num_classes=1000)
    grouped = GroupedAlexNet(1000, ours.config, cpu_kernels=True).copy_from(ours)
    tv = torchvision.models.alexnet(num_classes=1000)
    t = timed_rounds(
        {
            "two_tower": step_fn(ours, args.batch, 227),
            "grouped_reference": step_fn(grouped, args.batch, 227),
            "torchvision": step_fn(tv, args.batch, 224),
        },
        args.rounds,
        warmup=1,
    )
    lrn = timed_rounds({k: lrn_fn(k, args.batch) for k in ("fused", "torch_ops", "torch")}, 5, 1)
    pool = timed_rounds({k: pool_fn(k, args.batch) for k in ("kernel", "torch")}, 5, 1)
    ips = {k: args.batch / v for k, v in t.items()}
    result = {
        "benchmark": "model_train_step",
        "batch": args.batch,
        "threads": args.threads,
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "ratio_vs_torchvision": round(ips["two_tower"] / ips["torchvision"], 3),
        "two_tower_overhead_vs_grouped": round(ips["grouped_reference"] / ips["two_tower"] - 1, 3),
        "fused_lrn_kernel": lrn_kernel.available(),
        "max_pool_kernel": maxpool_kernel.available(),
        "relu_lrn_conv1_fwd_bwd_s": {k: round(v, 4) for k, v in lrn.items()},
        "lrn_speedup_vs_torch": round(lrn["torch"] / lrn["fused"], 2),
        "max_pool_conv1_fwd_bwd_s": {k: round(v, 4) for k, v in pool.items()},
        "targets": {"ratio_vs_torchvision": ">= 0.9", "two_tower_overhead_vs_grouped": "<= 0.05"},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
