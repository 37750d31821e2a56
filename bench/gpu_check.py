"""The GPU check: one command that proves and measures the GPU path on a machine with a CUDA GPU.

    python bench/gpu_check.py OUT_DIR [--dry-run] [--parts numerics,step,profile,loader,loop]
    make gpu-check OUT=OUT_DIR

Five parts, each writing ``OUT_DIR/<part>.json``, then ``OUT_DIR/summary.json`` (docs/gpu.md explains
every figure and its target):

- ``numerics``: the paper network on (cuda:0, cuda:0) against a float64 CPU copy with the same weights:
  float32 with TF32 off, then bf16 autocast + channels-last (looser tolerance), then on (cuda:0, cpu) so
  activations cross between devices at conv3, fc6, fc7 and fc8 as in the paper's two-GPU layout;
- ``step``: training-step images/s (bf16, channels-last) at batch 128, 256 and 512 against torchvision's
  AlexNet on the same GPU and batch in the same run, and the TFLOP/s that implies;
- ``profile``: torch.profiler over a few steps: the top kernels by CUDA time, and LRN's share of a step
  (from the profile, and by timing the step with LRN left out);
- ``loader``: shards of 256 px JPEGs written here (an ILSVRC-layout tree through ``shards build``'s
  writer), the loader's images/s with 7 and 14 worker processes against the step rate, decoding in the
  workers (``crop``) and on the GPU (``device``: nvJPEG);
- ``loop``: the real training loop through the local runner (no Ray): 2 epochs of the paper preset with
  a mid-epoch checkpoint; a second run killed one step after a mid-epoch checkpoint (in a child process,
  the loop's fault hook), then resumed: it must continue where it stopped and end with the uninterrupted
  run's weights; and the end-to-end images/s (with each decoder) against the bare step rate.

Without CUDA, or with ``--dry-run``, every part runs on the CPU at tiny sizes (a minute on 2 cores) and
every file says ``"device": "cpu", "dry_run": true``: it exercises the script, it measures no GPU.
Each part records its own failure (a failing part hides no other's figures). Exit status 0 when every
part ran and its correctness checks held; performance targets are reported, and gate the exit status
only with ``--strict``. Needs torch and torchvision, numpy, pillow and pydantic (spec validation); no
Ray, Redis, boto3 or network (bench/gpu_wheels.sh fetches the wheels a bare GPU box lacks).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent  # the repository: the package runs from it, uninstalled
PARTS = ("numerics", "step", "profile", "loader", "loop")

# Tolerances on ||got - ref|| / ||ref|| against the float64 CPU reference (METHOD: float32 lands far under
# 1e-3). bf16 operands round to 8 bits (2^-9 relative); a weight gradient is a sum over every position of
# the batch with heavy cancellation, so its relative error grows far past the rounding (conv1's weight
# gradient: 0.26 on the CPU's bf16 path): the global gradient is gated at 0.15, any one tensor at 0.5, which
# a wrong gradient (error ~1 and more) still fails.
TOLERANCE = {
    "fp32": {"output": 1e-3, "grad_global": 1e-3, "grad_worst": 1e-3},
    "bf16": {"output": 3e-2, "grad_global": 0.15, "grad_worst": 0.5},
}
TARGETS = {
    "step_vs_torchvision": 0.9,  # our step >= 0.9x torchvision's AlexNet at the same batch and precision
    "images_per_s_b256": 30_000.0,  # bf16 training step at batch 256 on one H200 (aiming at 50,000)
    "images_per_s_b256_aim": 50_000.0,
    "loop_vs_step": 0.8,  # end to end through the loop and loader >= 0.8x the bare step
}


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: GPU sizes fit one H200 in well under 8 minutes; DRY runs in about a minute
    on 2 CPU cores."""

    numerics_batch: int
    step_batches: tuple[int, ...]
    step_warmup: int  # untimed steps (cuDNN's benchmark search, allocator warm-up)
    step_rounds: int  # timed rounds, the models interleaved; the median round counts
    step_iters: int  # steps per timed round
    classes: int  # of the synthetic ILSVRC tree (fake WordNet ids)
    train_images: int
    val_images: int
    shard_size: int  # samples per shard
    loader_batch: int
    loader_workers: tuple[int, ...]
    loop_preset: str
    loop_batch: int
    loop_loader_workers: int
    loop_log_every: int
    profile_batch: int
    profile_steps: int


GPU_SIZES = Sizes(
    numerics_batch=8,
    step_batches=(128, 256, 512),
    step_warmup=10,
    step_rounds=5,
    step_iters=10,
    classes=100,
    train_images=25_600,
    val_images=1_000,
    shard_size=256,
    loader_batch=128,
    loader_workers=(7, 14),
    loop_preset="paper",
    loop_batch=128,
    loop_loader_workers=14,
    loop_log_every=10,
    profile_batch=256,
    profile_steps=5,
)
DRY_SIZES = Sizes(
    numerics_batch=2,
    step_batches=(2, 4),
    step_warmup=1,
    step_rounds=2,
    step_iters=1,
    classes=4,
    train_images=64,
    val_images=16,
    shard_size=8,
    loader_batch=4,
    loader_workers=(1, 2),
    loop_preset="small",
    loop_batch=8,
    loop_loader_workers=0,
    loop_log_every=2,
    profile_batch=2,
    profile_steps=2,
)


@dataclass
class Check:
    """One run of the check: where it writes, what it runs on, and figures parts pass to later parts."""

    out: Path
    work: Path  # shards, checkpoints, logs: never under out (what comes back from a device is small)
    dry: bool
    device: torch.device
    sizes: Sizes
    processes: int  # CPU processes for building shards
    figures: dict[str, Any] = field(default_factory=dict)
    _shards: dict[str, Any] | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        """What a training step runs in here: the loop ignores bf16 and channels-last on the CPU."""
        return "bf16" if self.cuda else "fp32"

    def shards(self) -> dict[str, Any]:
        if self._shards is None:
            self._shards = build_shards(self.work / "data", self.sizes, self.processes)
        return self._shards


def say(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.__stdout__, flush=True)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (NaN when got has a NaN or an Inf: it never passes)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("nan")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-300))


def within(value: float | None, limit: float) -> bool:
    return value is not None and math.isfinite(value) and value <= limit


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def backend_flags(*, tf32: bool | None = None, benchmark: bool | None = None) -> Iterator[None]:
    """Set TF32 and cuDNN's benchmark mode for a block; restore what was there after it."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    try:
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        if benchmark is not None:
            torch.backends.cudnn.benchmark = benchmark
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = saved


def time_rounds(
    fns: dict[str, Callable[[], None]], device: torch.device, *, warmup: int, rounds: int, iters: int
) -> dict[str, dict[str, float]]:
    """Seconds per call of each function: the median and spread over rounds of ``iters`` calls, the
    functions interleaved round by round so a change in the machine's state touches all alike. CUDA
    events on the GPU (the work is asynchronous), the host clock after a synchronize on the CPU."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1000 / iters)
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                times[name].append((time.perf_counter() - t0) / iters)
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "rounds": len(v)}
        for k, v in times.items()
    }


# --------------------------------------------------------------------------------------------------
# models and steps


def _well_scaled(model: nn.Module, seed: int = 0) -> nn.Module:
    """He-normal weights and small random biases: the paper's N(0, 0.01) init shrinks the signal about
    tenfold a layer, so its logits barely depend on the input and would make a weak numerics check."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.01)
    return model


def forward_macs(model: nn.Module, image_size: int, device: torch.device) -> int:
    """Multiply-accumulates of one image's forward pass, from the shapes every Conv2d and Linear sees."""
    total = 0

    def hook(m: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out[0].numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += out[0].numel() * m.in_features

    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, 3, image_size, image_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def train_step(
    model: nn.Module, batch: int, size: int, device: torch.device, *, precision: str, seed: int = 0
) -> Callable[[], None]:
    """One training step as the loop runs it (autocast, channels-last, fused SGD) on random data."""
    channels_last = precision == "bf16"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=g, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def _lrn_modules(model: nn.Module) -> list[nn.Module]:
    from alexnet_dist.model.network import LocalResponseNorm

    return [m for m in model.modules() if isinstance(m, LocalResponseNorm)]


@contextlib.contextmanager
def lrn_replaced(
    model: nn.Module, make: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]
):
    """Every tower's ReLU+LRN replaced by ``make(original)`` for a block (the model's code is not touched:
    the replacement is an attribute of the module instance)."""
    mods = _lrn_modules(model)
    for m in mods:
        m.relu_forward = make(m.relu_forward)
    try:
        yield len(mods)
    finally:
        for m in mods:
            del m.relu_forward


# --------------------------------------------------------------------------------------------------
# a. numerics


def _forward_backward(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bf16: bool, channels_last: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    d0 = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    x = x.to(d0)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(d0.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    F.cross_entropy(out.float(), y.to(out.device)).backward()
    grads = {
        n: (p.grad.detach().double().cpu() if p.grad is not None else None)
        for n, p in model.named_parameters()
    }
    return out.detach().double().cpu(), grads


def part_numerics(c: Check) -> dict[str, Any]:
    from alexnet_dist.model.network import build_model

    torch.manual_seed(0)
    base = _well_scaled(build_model("paper", num_classes=1000))
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    reference = copy.deepcopy(base).double().eval()
    dev, cpu = c.device, torch.device("cpu")
    cases = [
        ("fp32", (dev, dev), False, False),
        ("bf16_channels_last", (dev, dev), True, True),
        ("fp32_crossing", (dev, cpu), False, False),
    ]
    batch = c.sizes.numerics_batch
    results: dict[str, Any] = {}
    passed = True
    for i, (name, devices, bf16, channels_last) in enumerate(cases):
        say(f"numerics: {name} on {devices[0]}, {devices[1]} (batch {batch})")
        g = torch.Generator().manual_seed(100 + i)  # fresh inputs for every case
        x = torch.randn(batch, 3, 227, 227, generator=g, dtype=torch.float64)
        y = torch.randint(0, 1000, (batch,), generator=g)
        ref_out, ref_grads = _forward_backward(reference, x, y, bf16=False, channels_last=False)
        model = build_model("paper", num_classes=1000, devices=devices)
        model.load_state_dict(state)
        model.eval()  # no dropout: its masks differ between devices
        with backend_flags(tf32=False):
            out, grads = _forward_backward(model, x.float(), y, bf16=bf16, channels_last=channels_last)
        missing = sorted(n for n, v in grads.items() if v is None)
        per_tensor = {n: rel_error(v, ref_grads[n]) for n, v in grads.items() if v is not None}
        flat = torch.cat([grads[n].flatten() for n in per_tensor])
        flat_ref = torch.cat([ref_grads[n].flatten() for n in per_tensor])
        worst_name = max(per_tensor, key=lambda n: (not math.isfinite(per_tensor[n]), per_tensor[n]))
        tol = TOLERANCE["bf16" if bf16 else "fp32"]
        row = {
            "devices": [str(d) for d in devices],
            "crossing": devices[0] != devices[1],
            "bf16": bf16,
            "channels_last": channels_last,
            "tf32": False,
            "batch": batch,
            "output_rel_error": rel_error(out, ref_out),
            "grad_rel_error_global": rel_error(flat, flat_ref),
            "grad_rel_error_worst": per_tensor[worst_name],
            "grad_worst_tensor": worst_name,
            "missing_grads": missing,
            "tolerance": tol,
        }
        row["passed"] = (
            not missing
            and within(row["output_rel_error"], tol["output"])
            and within(row["grad_rel_error_global"], tol["grad_global"])
            and within(row["grad_rel_error_worst"], tol["grad_worst"])
        )
        passed = passed and row["passed"]
        results[name] = row
        say(
            f"numerics: {name}: output {row['output_rel_error']:.2e}, gradients "
            f"{row['grad_rel_error_global']:.2e} (worst {row['grad_rel_error_worst']:.2e}, {worst_name}): "
            f"{'ok' if row['passed'] else 'OUT OF TOLERANCE'}"
        )
        del model
        _free(c)
    return {"reference": "float64 on the CPU, same weights and inputs", "cases": results, "passed": passed}


def _free(c: Check) -> None:
    if c.cuda:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# b. step rate against torchvision


def part_step(c: Check) -> dict[str, Any]:
    import torchvision

    from alexnet_dist.model.network import build_model

    dev, s = c.device, c.sizes
    ours_macs = forward_macs(build_model("paper", num_classes=1000, devices=(dev, dev)), 227, dev)
    tv_macs = forward_macs(torchvision.models.alexnet(num_classes=1000).to(dev), 224, dev)
    # A training step: the forward, then the backward's two products per layer (input and weight
    # gradients), so about 3x the forward's MACs, 2 FLOPs each.
    flops = {"ours": 6 * ours_macs, "torchvision": 6 * tv_macs}
    rows = []
    for batch in s.step_batches:
        say(f"step: batch {batch}, {c.precision}{', channels-last' if c.cuda else ''}")
        torch.manual_seed(0)
        models = {
            "ours": (build_model("paper", num_classes=1000, devices=(dev, dev)), 227),
            "torchvision": (torchvision.models.alexnet(num_classes=1000).to(dev), 224),
        }
        if c.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        with backend_flags(benchmark=c.cuda):
            fns = {
                k: train_step(m, batch, size, dev, precision=c.precision) for k, (m, size) in models.items()
            }
            t = time_rounds(fns, dev, warmup=s.step_warmup, rounds=s.step_rounds, iters=s.step_iters)
        ips = {k: batch / v["median_s"] for k, v in t.items()}
        row = {
            "batch": batch,
            "images_per_s": ips,
            "ratio_vs_torchvision": ips["ours"] / ips["torchvision"],
            "tflops": {k: flops[k] * ips[k] / 1e12 for k in ips},
            "step_ms": {k: 1000 * v["median_s"] for k, v in t.items()},
            "step_ms_spread": {k: [1000 * v["min_s"], 1000 * v["max_s"]] for k, v in t.items()},
            "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if c.cuda else None,
        }
        rows.append(row)
        say(
            f"step: batch {batch}: ours {ips['ours']:,.0f} images/s, torchvision {ips['torchvision']:,.0f} "
            f"(ratio {row['ratio_vs_torchvision']:.3f}), {row['tflops']['ours']:.1f} TFLOP/s"
        )
        del models, fns
        _free(c)
    c.figures["step_images_per_s"] = {r["batch"]: r["images_per_s"]["ours"] for r in rows}
    return {
        "precision": c.precision,
        "channels_last": c.cuda,
        "image_size": {"ours": 227, "torchvision": 224},
        "forward_macs_per_image": {"ours": ours_macs, "torchvision": tv_macs},
        "train_flops_per_image": flops,
        "optimizer": "SGD momentum 0.9, weight decay 5e-4, fused",
        "rows": rows,
        "passed": all(r["images_per_s"]["ours"] > 0 for r in rows),
    }


# --------------------------------------------------------------------------------------------------
# e. where a step's time goes


def _lrn_share_from_profile(events: Any, cuda: bool) -> dict[str, float]:
    """LRN's time in a profile: the forward ranges we annotated and the LRN autograd nodes' backward."""
    from torch.autograd import DeviceType

    def spent(e: Any) -> float:
        return float(e.device_time_total if cuda else e.cpu_time_total)

    fwd = bwd = 0.0
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if e.key == "alexnet_dist::relu_lrn":
            fwd += spent(e)
        elif "LRN" in e.key and e.key.endswith("Backward") and not e.key.startswith("autograd::"):
            bwd += spent(e)
    return {"forward_us": fwd, "backward_us": bwd}


def _annotation(e: Any) -> bool:
    """A range we (or the profiler) marked, not work: counting it would count its kernels twice."""
    return bool(getattr(e, "is_user_annotation", False)) or e.key.startswith(
        ("ProfilerStep", "alexnet_dist::")
    )


def part_profile(c: Check) -> dict[str, Any]:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from alexnet_dist.model.network import build_model

    dev, s = c.device, c.sizes
    torch.manual_seed(0)
    model = build_model("paper", num_classes=1000, devices=(dev, dev))
    step = train_step(model, s.profile_batch, 227, dev, precision=c.precision)

    def annotated(orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def relu_lrn(x: torch.Tensor) -> torch.Tensor:
            with record_function("alexnet_dist::relu_lrn"):
                return orig(x)

        return relu_lrn

    def no_lrn(orig: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return F.relu

    with backend_flags(benchmark=c.cuda):
        say(f"profile: {s.profile_steps} steps at batch {s.profile_batch}")

        def without_lrn() -> None:  # the step with ReLU in place of ReLU+LRN: LRN's share by difference
            with lrn_replaced(model, no_lrn):
                step()

        # interleaved rounds of both, so a change in the machine's load touches both alike
        timed = time_rounds(
            {"with_lrn": step, "without_lrn": without_lrn},
            dev,
            warmup=s.step_warmup,
            rounds=max(s.step_rounds, 3),
            iters=s.step_iters,
        )
        ablation = timed["without_lrn"]
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.cuda else [])
        with lrn_replaced(model, annotated):
            step()  # the annotated path once before the profile (warmed up above)
            synchronize(dev)
            with profile(activities=activities) as prof:
                for _ in range(s.profile_steps):
                    step()
                synchronize(dev)
    events = prof.key_averages()
    n = s.profile_steps
    if c.cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not _annotation(e)]
        total_us = sum(float(e.self_device_time_total) for e in kernels)
        top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:15]
        rows = [
            {
                "kernel": e.key[:160],
                "ms_per_step": e.self_device_time_total / 1000 / n,
                "share": e.self_device_time_total / max(total_us, 1e-9),
                "calls_per_step": e.count / n,
            }
            for e in top
        ]
    else:
        ops = [e for e in events if e.device_type == DeviceType.CPU and not _annotation(e)]
        total_us = sum(float(e.self_cpu_time_total) for e in ops)
        top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
        rows = [
            {
                "op": e.key[:160],
                "ms_per_step": e.self_cpu_time_total / 1000 / n,
                "share": e.self_cpu_time_total / max(total_us, 1e-9),
                "calls_per_step": e.count / n,
            }
            for e in top
        ]
    lrn = _lrn_share_from_profile(events, c.cuda)
    step_s = timed["with_lrn"]["median_s"]
    busy_s = total_us / 1e6 / n
    result = {
        "batch": s.profile_batch,
        "precision": c.precision,
        "steps_profiled": n,
        "step_ms": 1000 * step_s,
        "step_ms_without_lrn": 1000 * ablation["median_s"],
        "lrn_share_by_ablation": 1 - ablation["median_s"] / step_s,
        "lrn_share_of_profiled_time": (lrn["forward_us"] + lrn["backward_us"]) / max(total_us, 1e-9),
        "lrn_profiled_ms_per_step": {k.removesuffix("_us"): v / 1000 / n for k, v in lrn.items()},
        ("kernel_ms_per_step" if c.cuda else "op_self_ms_per_step"): 1000 * busy_s,
        "top": rows,
        "passed": bool(rows) and step_s > 0,
    }
    if c.cuda:
        result["gpu_busy_fraction"] = busy_s / step_s  # kernel time over the timed step: idle gaps show here
    say(
        f"profile: step {1000 * step_s:.2f} ms, LRN {100 * result['lrn_share_by_ablation']:.1f}% by "
        f"ablation, {100 * result['lrn_share_of_profiled_time']:.1f}% of profiled time; "
        f"top: {rows[0] if rows else None}"
    )
    return result


# --------------------------------------------------------------------------------------------------
# c. shards and the loader


def synthetic_photo(seed: int, h: int, w: int, tint: tuple[int, int, int]) -> Any:
    """An RGB uint8 image with a photo's mix of content: smooth colour fields (a class tint in them), mid-
    scale texture and sensor-like noise, each at a random strength, so JPEG sizes spread like real ones."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((4, 5, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    mid = Image.fromarray((rng.random((h // 6, w // 6, 3)) * 255).astype(np.uint8)).resize(
        (w, h), Image.BILINEAR
    )
    a = rng.uniform(0.1, 0.5)
    img = (1 - a) * (0.7 * np.asarray(coarse, np.float32) + 0.3 * np.asarray(tint, np.float32))
    img += a * np.asarray(mid, np.float32)
    img += rng.normal(0.0, rng.uniform(3.0, 16.0), (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_source_image(task: tuple[str, int, int, int, tuple[int, int, int]]) -> None:
    from PIL import Image

    path, seed, h, w, tint = task
    Image.fromarray(synthetic_photo(seed, h, w, tint)).save(path, quality=95)


def _run_pool(fn: Callable[[Any], Any], tasks: list[Any], processes: int) -> None:
    if processes <= 1:
        for t in tasks:
            fn(t)
        return
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for _ in pool.imap_unordered(fn, tasks, chunksize=16):
            pass


def write_ilsvrc_tree(root: Path, *, classes: int, train: int, val: int, processes: int) -> dict[str, int]:
    """``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` (ILSVRC-2012's layout, val sorted into
    class folders), with fake WordNet ids; sources are 256 high and 256-340 wide, as a photo scaled to 256."""
    tasks = []
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            label = i % classes
            wnid = f"n{label + 1:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            seed = (0 if split == "train" else 1_000_000) + i
            tint = ((label * 67) % 256, (label * 131) % 256, (label * 197) % 256)
            name = f"{wnid}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{i + 1:08d}.JPEG"
            tasks.append((str(folder / name), seed, 256, 256 + (seed * 37) % 85, tint))
    (root / "LOC_synset_mapping.txt").write_text("".join(f"n{i + 1:08d} class {i}\n" for i in range(classes)))
    _run_pool(_write_source_image, tasks, processes)
    return {"train": train, "val": val}


def build_shards(work: Path, sizes: Sizes, processes: int) -> dict[str, Any]:
    """An ILSVRC-layout tree of synthetic photos, then ``shards build``'s writer on it (256 px, q 90)."""
    import tarfile

    from alexnet_dist.data.build.writer import BuildOptions, build

    t0 = time.perf_counter()
    source = work / "ilsvrc"
    shutil.rmtree(work, ignore_errors=True)
    say(
        f"shards: writing {sizes.train_images:,} train and {sizes.val_images:,} val source images "
        f"({sizes.classes} classes, {processes} processes)"
    )
    write_ilsvrc_tree(
        source, classes=sizes.classes, train=sizes.train_images, val=sizes.val_images, processes=processes
    )
    t1 = time.perf_counter()
    opts = BuildOptions(resize_to=256, quality=90, shard_size=sizes.shard_size, processes=processes)
    manifests = {m.split: m for m in build(source, str(work / "shards"), opts, fmt="ilsvrc")}
    t2 = time.perf_counter()
    shutil.rmtree(source)
    train = manifests["train"]
    jpeg_sizes = []
    for shard in train.shards[:4]:  # a thousand images at GPU sizes: enough for the mean
        with tarfile.open(shard.url) as tar:
            jpeg_sizes += [m.size for m in tar.getmembers() if m.name.endswith(".jpg")]
    info = {
        "train": train.url,
        "val": manifests["val"].url,
        "train_images": train.num_samples,
        "val_images": manifests["val"].num_samples,
        "classes": len(train.classes),
        "train_shards": len(train.shards),
        "image_size": train.image_size,
        "quality": 90,
        "mean_jpeg_kb": statistics.mean(jpeg_sizes) / 1024,
        "mean_sample_kb": sum(s.bytes for s in train.shards) / train.num_samples / 1024,
        "source_seconds": t1 - t0,
        "build_seconds": t2 - t1,
    }
    say(
        f"shards: {info['train_images']:,} train in {info['train_shards']} shards, mean JPEG "
        f"{info['mean_jpeg_kb']:.1f} KB (sample {info['mean_sample_kb']:.1f} KB); source {t1 - t0:.1f} s, "
        f"build {t2 - t1:.1f} s"
    )
    return info


def _step_reference(c: Check, batch: int) -> tuple[int | None, float | None]:
    """Part b's rate at ``batch``, or at the nearest batch it measured (the batch is reported)."""
    rates = c.figures.get("step_images_per_s") or {}
    if not rates:
        return None, None
    nearest = min(rates, key=lambda b: (abs(b - batch), -b))
    return nearest, rates[nearest]


def _decoders() -> list[str]:
    """The loader's decoders worth timing: the default (CPU workers decode each view), and "device"
    (workers send the JPEGs; the training device decodes a batch at once: nvJPEG on CUDA) where it exists."""
    from alexnet_dist.data.decoders import DECODERS

    return [d for d in ("crop", "device") if d in DECODERS]


def part_loader(c: Check) -> dict[str, Any]:
    from alexnet_dist.data.loader import LoaderConfig, make_loader
    from alexnet_dist.data.manifest import load_manifest
    from alexnet_dist.kernels import jpeg as jpeg_kernel

    shards = c.shards()
    manifest = load_manifest(shards["train"])
    s = c.sizes
    ref_batch, step_rate = _step_reference(c, s.loader_batch)
    rows = []
    for decoder in _decoders():
        for workers in s.loader_workers:
            say(f"loader: {decoder} decoder, {workers} workers, batch {s.loader_batch}, one epoch of "
                f"{manifest.num_samples:,} images")  # fmt: skip
            cfg = LoaderConfig(
                batch_size=s.loader_batch,
                crop=227,
                mode="train",
                seed=0,
                num_workers=workers,
                shuffle_buffer=5000,
                pca_lighting=0.1,
                decoder=decoder,
                device=str(c.device),
            )
            loader = make_loader(manifest, cfg, rank=0, world_size=1)
            loader.set_epoch(0)
            images = after_first = 0
            t0 = time.perf_counter()
            t_first = t0
            for i, batch in enumerate(loader):
                n = int(batch.images.shape[0])
                images += n
                if i == 0:
                    synchronize(c.device)
                    t_first = time.perf_counter()
                else:
                    after_first += n
            synchronize(c.device)  # the device decoder's work is asynchronous on CUDA
            t_end = time.perf_counter()
            steady = after_first / max(t_end - t_first, 1e-9)
            row = {
                "decoder": decoder,
                "workers": workers,
                "batches": len(loader),
                "images": images,
                "images_on": str(batch.images.device) if images else None,
                "seconds": t_end - t0,
                "first_batch_s": t_first - t0,
                "images_per_s": images / max(t_end - t0, 1e-9),
                "images_per_s_after_first_batch": steady,
                "vs_step": steady / step_rate if step_rate else None,
            }
            rows.append(row)
            say(
                f"loader: {decoder}, {workers} workers: {steady:,.0f} images/s after the first batch "
                f"({row['first_batch_s']:.2f} s to it)"
                + (f", {row['vs_step']:.2f}x the step at batch {ref_batch}" if step_rate else "")
            )
    return {
        "shards": shards,
        "batch": s.loader_batch,
        "crop": 227,
        "decoders": _decoders(),
        "jpeg_crop_kernel": jpeg_kernel.available(),
        "cpu_count": os.cpu_count(),
        "step_reference": {"batch": ref_batch, "images_per_s": step_rate},
        "rows": rows,
        "passed": bool(rows) and all(r["images"] > 0 for r in rows),
    }


# --------------------------------------------------------------------------------------------------
# d. the loop end to end, a crash and a resume


class _Tee(io.TextIOBase):
    """Collects what the loop prints (its stdout sink's event lines)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return len(s)

    def text(self) -> str:
        return "".join(self.parts)


def parse_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("[alexnet-dist] "):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line.removeprefix("[alexnet-dist] ")))
    return events


def steady_rate(events: list[dict[str, Any]]) -> float | None:
    """Median images/s over the loop's logging windows, leaving out each epoch's first (loader start)."""
    windows = [e for e in events if e.get("type") == "step"]
    firsts: dict[int, int] = {}
    for e in windows:
        firsts.setdefault(e["epoch"], e["step"])
    rates = [e["images_per_s"] for e in windows if e["step"] != firsts[e["epoch"]]]
    return statistics.median(rates) if rates else None


def _newest_checkpoint(run_dir: Path) -> Path:
    """The newest ``checkpoint_<global step>_<time ns>`` folder of a run."""
    found = [p for p in run_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint_\d+_\d+", p.name)]
    if not found:
        raise RuntimeError(f"{run_dir}: no checkpoint")
    return max(found, key=lambda p: tuple(int(x) for x in p.name.split("_")[1:]))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from alexnet_dist.training.checkpoint import read_checkpoint

    return read_checkpoint(_newest_checkpoint(run_dir))["model"]


def _run_local_captured(
    spec: Any, run_name: str, storage: Path, log: Path
) -> tuple[Any, list[dict[str, Any]]]:
    from alexnet_dist.settings import Settings
    from alexnet_dist.training.local import run_local

    tee = _Tee()
    try:
        with contextlib.redirect_stdout(tee):
            result = run_local(spec, run_name=run_name, settings=Settings(storage_root=f"file://{storage}"))
    finally:
        log.write_text(tee.text())
    return result, parse_events(tee.text())


def child_main(args_path: str) -> int:
    """``gpu_check.py _child ARGS.json``: one local run with the loop's fault hook armed (it exits)."""
    sys.path.insert(0, str(ROOT))
    from alexnet_dist.settings import Settings
    from alexnet_dist.spec import JobSpec
    from alexnet_dist.training.local import run_local

    args = json.loads(Path(args_path).read_text())
    spec = JobSpec.from_json(args["spec"])
    run_local(
        spec, run_name=args["run_name"], settings=Settings(storage_root=args["storage"]), fault=args["fault"]
    )
    return 0


def _loop_spec(
    c: Check, shards: dict[str, Any], storage: Path, every: int, *, exact: bool, decoder: str | None = None
) -> Any:
    from alexnet_dist.spec import TrainSpec, load_spec

    s = c.sizes
    overrides = {
        "data.train": shards["train"],
        "data.val": shards["val"],
        "data.loader_workers": s.loop_loader_workers,
        "model.preset": s.loop_preset,
        "model.num_classes": 1000,
        "train.epochs": 2,
        "train.batch_size": s.loop_batch,
        "train.log_every_steps": s.loop_log_every,
        "scaling.workers": 1,
        "scaling.devices": "gpu" if c.cuda else "cpu",
        "scaling.cpus_per_worker": os.cpu_count() or 1,
        "checkpoint.storage": str(storage),
        "checkpoint.every_steps": every,
        "checkpoint.keep": 10,
    }
    if decoder is not None:
        overrides["data.decoder"] = decoder
    if exact and c.cuda and "deterministic" in TrainSpec.model_fields:
        overrides["train.deterministic"] = True
    return load_spec(
        ROOT / "jobs" / "imagenet-paper.toml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    )


def _checkpoint_at(run_dir: Path, global_step: int) -> Path:
    found = sorted(run_dir.glob(f"checkpoint_{global_step:010d}_*"))
    if not found:
        raise RuntimeError(f"{run_dir}: no checkpoint at global step {global_step}")
    return found[-1]


def _resume_trial(
    c: Check, shards: dict[str, Any], storage: Path, steps: int, every: int, *, exact: bool
) -> dict:
    """An uninterrupted run; a run killed one step after epoch 2's mid-epoch checkpoint (in a child
    process: the loop's fault hook exits it); that run resumed in this process; and what must hold."""
    from alexnet_dist.training.checkpoint import read_checkpoint

    tag = "exact" if exact else "plain"
    spec = _loop_spec(c, shards, storage, every, exact=exact)
    t0 = time.perf_counter()
    say(f"loop: uninterrupted run ({tag})")
    ref, ref_events = _run_local_captured(
        spec, f"uninterrupted-{tag}", storage, c.work / f"uninterrupted-{tag}.log"
    )
    t1 = time.perf_counter()

    kill_at = steps + every + 1  # one step past epoch 2's mid-epoch checkpoint
    say(f"loop: a second run, killed at global step {kill_at} (child process)")
    run = f"resumed-{tag}"
    marker = c.work / f"killed-{tag}"
    args = c.work / f"child-{tag}.json"
    fault = {"rank": 0, "global_step": kill_at, "marker": str(marker)}
    args.write_text(
        json.dumps({"spec": spec.to_json(), "run_name": run, "storage": f"file://{storage}", "fault": fault})
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(c.work / f"killed-{tag}.log", "w") as log:
        child = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "_child", str(args)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT), timeout=600,
        )  # fmt: skip
    killed_at = _newest_checkpoint(storage / run).name
    t2 = time.perf_counter()

    say(f"loop: the killed run resumed ({tag})")
    res, res_events = _run_local_captured(spec, run, storage, c.work / f"{run}.log")
    t3 = time.perf_counter()

    resumed = next((e for e in res_events if e.get("type") == "resumed"), None)
    a, b = _weights(storage / f"uninterrupted-{tag}"), _weights(storage / run)
    base = read_checkpoint(_checkpoint_at(storage / f"uninterrupted-{tag}", steps + every))["model"]
    flat = {
        n: torch.cat([w[k].double().flatten() for k in a])
        for n, w in (("ref", a), ("res", b), ("base", base))
    }
    # How far the resumed run's weights are from the uninterrupted run's, against how far the
    # uninterrupted run moved them after the resume point: ~0 for a resume that continued where it stopped
    # (0 exactly where the runs repeat themselves), ~1 or more for one that lost its place, its data
    # position or its optimizer state. (Against the weights themselves any difference would look tiny.)
    vs_update = float(
        (flat["res"] - flat["ref"]).norm() / (flat["ref"] - flat["base"]).norm().clamp_min(1e-300)
    )
    bit_exact = all(torch.equal(a[k], b[k]) for k in a)
    ref_hist = [h for h in ref.history if "final" not in h]
    res_hist = [h for h in res.history if "final" not in h]
    checks = {
        "child_killed": child.returncode != 0 and marker.exists(),
        "resumed_where_killed": resumed is not None
        and (resumed["epoch"], resumed["step"], resumed["global_step"]) == (1, every, steps + every),
        "steps_continue": res.steps == ref.steps == 2 * steps,
        "history_complete": len(res_hist) == len(ref_hist) == 2,
        "ten_crop": res.ten_crop and res.val_samples == shards["val_images"],
        "weights_match": bit_exact if exact else within(vs_update, 0.5),
    }
    if exact:
        checks["history_matches"] = [h.get("val_top1_error") for h in res_hist] == [
            h.get("val_top1_error") for h in ref_hist
        ]
    return {
        "mode": tag,
        "killed_at_global_step": kill_at,
        "child_returncode": child.returncode,
        "newest_checkpoint_after_kill": killed_at,
        "resumed_event": resumed,
        "uninterrupted": {"steps": ref.steps, "history": ref_hist, "top1_error": ref.top1_error,
                          "top5_error": ref.top5_error, "seconds": t1 - t0},
        "resumed": {"steps": res.steps, "history": res_hist, "top1_error": res.top1_error,
                    "top5_error": res.top5_error, "ten_crop": res.ten_crop, "val_samples": res.val_samples,
                    "seconds_killed_run": t2 - t1, "seconds_resumed_run": t3 - t2},
        "weights": {"bit_exact": bit_exact, "diff_vs_update_after_resume": vs_update,
                    "max_abs_diff": max(float((a[k].double() - b[k].double()).abs().max()) for k in a)},
        # Not gated: the loop's train_loss of the epoch a run resumed in averages only the steps after
        # the resume (the loss sum before it is not in the checkpoint), so it differs from the
        # uninterrupted run's even when the weights are bit for bit the same.
        "train_loss_epochs": {"uninterrupted": [h.get("train_loss") for h in ref_hist],
                              "resumed": [h.get("train_loss") for h in res_hist]},
        "checks": checks,
        "_runs": (ref, ref_events),
    }  # fmt: skip


def part_loop(c: Check) -> dict[str, Any]:
    from alexnet_dist.data.loader import LoaderConfig, make_loader
    from alexnet_dist.data.manifest import load_manifest
    from alexnet_dist.model.config import PRESETS
    from alexnet_dist.model.network import build_model
    from alexnet_dist.spec import TrainSpec

    s, dev = c.sizes, c.device
    shards = c.shards()
    crop = PRESETS[s.loop_preset].image_size
    workers = s.loop_loader_workers
    cfg = LoaderConfig(batch_size=s.loop_batch, crop=crop, mode="train", seed=0, num_workers=workers)
    steps = len(make_loader(load_manifest(shards["train"]), cfg, rank=0, world_size=1))
    if steps < 4:
        raise RuntimeError(f"{steps} steps an epoch: too few for a mid-epoch checkpoint and a kill after it")
    every = steps // 2
    storage = c.work / "runs"
    shutil.rmtree(storage, ignore_errors=True)  # a reused --work-dir must not resume an old run
    storage.mkdir(parents=True, exist_ok=True)
    # The CPU loop repeats itself bit for bit; on CUDA only with train.deterministic (cuDNN's deterministic
    # algorithms), which is slower: the end-to-end rate then comes from a plain run of its own.
    deterministic = "deterministic" in TrainSpec.model_fields
    say(f"loop: {s.loop_preset} preset, batch {s.loop_batch}, 2 epochs of {steps} steps, checkpoint every "
        f"{every}, {workers} loader workers, on {dev}")  # fmt: skip
    trial, exact_error = None, None
    if not c.cuda or deterministic:
        try:
            trial = _resume_trial(c, shards, storage, steps, every, exact=True)
        except Exception as err:
            if not c.cuda:
                raise
            exact_error = f"{type(err).__name__}: {err}"[:1000]
            say(f"loop: the deterministic runs failed ({exact_error}); again without")
        torch.use_deterministic_algorithms(False)  # whatever the deterministic runs left set
        torch.backends.cudnn.deterministic = False
    if trial is None:
        trial = _resume_trial(c, shards, storage, steps, every, exact=False)
    e2e_run, e2e_events = trial.pop("_runs")
    e2e_name = f"uninterrupted-{trial['mode']}"
    if c.cuda and trial["mode"] == "exact":
        say("loop: a plain (non-deterministic) run for the end-to-end rate")
        plain = _loop_spec(c, shards, storage, every, exact=False)
        e2e_run, e2e_events = _run_local_captured(plain, "speed", storage, c.work / "speed.log")
        e2e_name = "speed"

    device_e2e = None
    if "device" in _decoders():
        say("loop: a plain run with data.decoder = device (the JPEGs decoded on the training device)")
        spec = _loop_spec(c, shards, storage, every, exact=False, decoder="device")
        run, events = _run_local_captured(spec, "speed-device", storage, c.work / "speed-device.log")
        device_e2e = {"run": "speed-device", "images_per_s_epochs": [h["images_per_s"] for h in run.history
                      if "images_per_s" in h], "images_per_s_steady": steady_rate(events)}  # fmt: skip

    say("loop: the bare step at the loop's batch")
    torch.manual_seed(0)
    bare_model = build_model(s.loop_preset, num_classes=1000, devices=(dev, dev))
    with backend_flags(benchmark=c.cuda):
        step = train_step(bare_model, s.loop_batch, crop, dev, precision=c.precision)
        bare = time_rounds({"step": step}, dev, warmup=s.step_warmup, rounds=s.step_rounds,
                           iters=max(s.step_iters, 5))["step"]  # fmt: skip
    del bare_model, step
    _free(c)
    bare_rate = s.loop_batch / bare["median_s"]
    epoch_rates = [h["images_per_s"] for h in e2e_run.history if "images_per_s" in h]
    steady = steady_rate(e2e_events)
    checks = trial["checks"]
    result = {
        "preset": s.loop_preset,
        "spec": "jobs/imagenet-paper.toml with overrides",
        "batch": s.loop_batch,
        "steps_per_epoch": steps,
        "epochs": 2,
        "checkpoint_every_steps": every,
        "loader_workers": workers,
        "devices": "gpu (both towers on cuda:0)" if c.cuda else "cpu",
        "deterministic_spec_field": deterministic,
        "exact_error": exact_error,
        **trial,
        "end_to_end": {
            "run": e2e_name,
            "images_per_s_epochs": epoch_rates,
            "images_per_s_steady": steady,
            "bare_step_images_per_s": bare_rate,
            "vs_bare_step_steady": steady / bare_rate if steady else None,
            "vs_bare_step_epoch": (epoch_rates[-1] / bare_rate) if epoch_rates else None,
        },
        "end_to_end_device_decoder": device_e2e
        and {
            **device_e2e,
            "vs_bare_step_steady": device_e2e["images_per_s_steady"] / bare_rate
            if device_e2e["images_per_s_steady"]
            else None,
        },
        "passed": all(checks.values()),
    }
    e2e = result["end_to_end"]
    say(f"loop: resume checks ({trial['mode']}) {checks}; end to end {steady or 0:,.0f} images/s steady, "
        f"{(epoch_rates or [0])[-1]:,.0f} over the last epoch, bare step {bare_rate:,.0f} "
        f"({(e2e['vs_bare_step_steady'] or 0):.2f}x)")  # fmt: skip
    return result


# --------------------------------------------------------------------------------------------------
# the run


PART_FUNCTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "numerics": part_numerics,
    "step": part_step,
    "profile": part_profile,
    "loader": part_loader,
    "loop": part_loop,
}


def run_part(c: Check, name: str) -> dict[str, Any]:
    say(f"{name}: start")
    t0 = time.perf_counter()
    doc: dict[str, Any] = {"part": name, "device": c.device.type, "dry_run": c.dry}
    try:
        doc.update(PART_FUNCTIONS[name](c))
    except Exception as err:  # one part's failure is recorded; the others still run
        doc["passed"] = False
        doc["error"] = f"{type(err).__name__}: {err}"[:2000]
        doc["traceback"] = traceback.format_exc()[-6000:]
        say(f"{name}: FAILED: {doc['error']}")
        _free(c)
    _free(c)  # the part's tensors are gone with its frame: give the cached blocks back
    doc["seconds"] = time.perf_counter() - t0
    (c.out / f"{name}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    say(f"{name}: {'passed' if doc['passed'] else 'FAILED'} in {doc['seconds']:.1f} s")
    return doc


def _imported_distributions() -> list[str]:
    """Installed distributions this process imported from (what a bare GPU box must have)."""
    from importlib import metadata

    owners = metadata.packages_distributions()
    names = {d for mod in list(sys.modules) for d in owners.get(mod.partition(".")[0], [])}
    return sorted(names, key=str.lower)


def _kernels(build: bool) -> dict[str, Any]:
    """The CPU kernels' state; built first where they never were (a fresh copy of the tree) and a C
    compiler is there. Without them the CPU paths fall back to torch ops (same numbers, slower)."""
    build_file = ROOT / "alexnet_dist" / "kernels" / "lib" / "BUILD.json"
    info: dict[str, Any] = {"built_here": False}
    if build and not build_file.exists() and (shutil.which("cc") or shutil.which("gcc")):
        say("kernels: building the CPU kernels (python -m alexnet_dist.kernels.library)")
        try:
            done = subprocess.run(
                [sys.executable, "-m", "alexnet_dist.kernels.library"],
                cwd=str(ROOT),
                capture_output=True,
                text=True,
                timeout=180,
            )
            info.update(built_here=done.returncode == 0, build_output=(done.stdout + done.stderr)[-2000:])
        except (OSError, subprocess.TimeoutExpired) as err:
            info["build_output"] = str(err)
    from alexnet_dist.kernels import jpeg, lrn, maxpool

    info.update(lrn=lrn.available(), maxpool=maxpool.available(), jpeg_crop=jpeg.available())
    return info


def _targets(parts: dict[str, dict[str, Any]], dry: bool) -> dict[str, Any]:
    """The performance targets against what was measured; on a CPU dry run none applies."""
    step_rows = parts.get("step", {}).get("rows", [])
    ratios = {r["batch"]: r["ratio_vs_torchvision"] for r in step_rows}
    b256 = next((r["images_per_s"]["ours"] for r in step_rows if r["batch"] == 256), None)
    loop = parts.get("loop", {})
    e2e_by = {"crop": (loop.get("end_to_end") or {}).get("vs_bare_step_steady"),
              "device": (loop.get("end_to_end_device_decoder") or {}).get("vs_bare_step_steady")}  # fmt: skip
    e2e = max((v for v in e2e_by.values() if v is not None), default=None)

    def met(value: float | None, limit: float) -> bool | None:
        return None if dry or value is None else value >= limit

    return {
        "applies": not dry,
        "step_vs_torchvision": {
            "target": TARGETS["step_vs_torchvision"],
            "measured": ratios,
            "met": None
            if dry or not ratios
            else all(v >= TARGETS["step_vs_torchvision"] for v in ratios.values()),
        },
        "images_per_s_b256": {
            "target": TARGETS["images_per_s_b256"],
            "aim": TARGETS["images_per_s_b256_aim"],
            "measured": b256,
            "met": met(b256, TARGETS["images_per_s_b256"]),
        },
        "loop_vs_step": {
            "target": TARGETS["loop_vs_step"],
            "measured": e2e,
            "by_decoder": e2e_by,
            "met": met(e2e, TARGETS["loop_vs_step"]),
        },
    }


def _headline(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The few figures people look for first, from the parts' files."""
    out: dict[str, Any] = {}
    if cases := parts.get("numerics", {}).get("cases"):
        out["numerics"] = {
            k: {"output": v["output_rel_error"], "grad": v["grad_rel_error_global"], "passed": v["passed"]}
            for k, v in cases.items()
        }
    if rows := parts.get("step", {}).get("rows"):
        out["step"] = {
            r["batch"]: {
                "ours": r["images_per_s"]["ours"],
                "torchvision": r["images_per_s"]["torchvision"],
                "ratio": r["ratio_vs_torchvision"],
                "tflops": r["tflops"]["ours"],
            }
            for r in rows
        }
    if "lrn_share_by_ablation" in parts.get("profile", {}):
        out["lrn_share"] = parts["profile"]["lrn_share_by_ablation"]
    if rows := parts.get("loader", {}).get("rows"):
        out["loader"] = {f"{r['decoder']}/{r['workers']}": r["images_per_s_after_first_batch"] for r in rows}
        out["mean_jpeg_kb"] = parts["loader"]["shards"]["mean_jpeg_kb"]
    if e2e := parts.get("loop", {}).get("end_to_end"):
        out["loop"] = {
            "steady": e2e["images_per_s_steady"],
            "bare_step": e2e["bare_step_images_per_s"],
            "ratio": e2e["vs_bare_step_steady"],
            "device_decoder_ratio": (parts["loop"].get("end_to_end_device_decoder") or {}).get(
                "vs_bare_step_steady"
            ),
            "resume_checks": parts["loop"]["checks"],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(argv[1])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for the JSON files (created)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, even where CUDA is")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--work-dir", type=Path, help="shards and checkpoints (default: a temporary folder)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder")
    ap.add_argument("--budget-s", type=float, default=450.0, help="parts not started by then are skipped")
    ap.add_argument("--strict", action="store_true", help="exit 1 also when a performance target is missed")
    ap.add_argument("--no-build-kernels", action="store_true", help="never build the CPU kernels")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; use {', '.join(PARTS)}")
    sys.path.insert(0, str(ROOT))
    # cuBLAS repeats its sums only with a fixed workspace, read when CUDA starts: set before it does, for
    # the loop's deterministic runs (harmless otherwise).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    t_start = time.perf_counter()
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = DRY_SIZES if dry else GPU_SIZES
    c = Check(
        out=args.out, work=work, dry=dry, device=device, sizes=sizes, processes=max(1, os.cpu_count() or 1)
    )
    env = {
        "device": device.type,
        "dry_run": dry,
        "gpu": torch.cuda.get_device_name(0) if not dry else None,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "sizes": asdict(sizes),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    with contextlib.suppress(Exception):
        import torchvision

        env["torchvision"] = torchvision.__version__
    say(
        f"{'CPU dry run' if dry else 'GPU check on ' + str(env['gpu'])}: torch {env['torch']}, "
        f"parts {parts}, out {args.out}, work {work}"
    )
    try:
        env["kernels"] = _kernels(not args.no_build_kernels)
    except Exception as err:
        env["kernels"] = {"error": f"{type(err).__name__}: {err}"}
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in parts:
            if time.perf_counter() - t_start > args.budget_s:
                results[name] = {
                    "part": name,
                    "passed": False,
                    "skipped": f"over the {args.budget_s:.0f} s budget",
                }
                say(f"{name}: skipped (over the {args.budget_s:.0f} s budget)")
                continue
            results[name] = run_part(c, name)
    finally:
        if not args.keep_work and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    targets = _targets(results, dry)
    passed = all(r.get("passed") for r in results.values())
    missed = [k for k, v in targets.items() if isinstance(v, dict) and v.get("met") is False]
    summary = {
        **env,
        "passed": passed,
        "parts": {
            k: {
                "passed": bool(v.get("passed")),
                "seconds": v.get("seconds"),
                "error": v.get("error") or v.get("skipped"),
            }
            for k, v in results.items()
        },
        "headline": _headline(results),
        "targets": targets,
        "targets_missed": missed,
        "imported_distributions": _imported_distributions(),
        "seconds": time.perf_counter() - t_start,
    }
    if dry:
        summary["note"] = "CPU dry run: exercises the check at tiny sizes; no figure here is a GPU figure"
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    states = ", ".join(f"{k}={v['passed']}" for k, v in summary["parts"].items())
    say(
        f"done in {summary['seconds']:.0f} s: {'all parts passed' if passed else 'FAILED'} ({states})"
        + (f"; targets missed: {missed}" if missed else "")
    )
    print(
        json.dumps({"passed": passed, "headline": summary["headline"], "targets_missed": missed}, default=str)
    )
    return 0 if passed and not (args.strict and missed) else 1


if __name__ == "__main__":
    sys.exit(main())
