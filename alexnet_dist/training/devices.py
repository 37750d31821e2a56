"""How a worker uses its devices: cuDNN and TF32 as the spec asks, and DDP around the two-tower model."""

from __future__ import annotations

import os

import torch

from alexnet_dist.model.network import AlexNet
from alexnet_dist.spec import JobSpec

__all__ = ["configure_gpu", "data_parallel"]


def configure_gpu(spec: JobSpec) -> None:
    """cuDNN and TF32 as the spec asks: benchmark mode for the fixed shapes of a run, unless the run must
    be deterministic; TF32 for float32 convolutions and matmuls unless exact float32 is asked for."""
    deterministic = spec.train.deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = spec.train.tf32
    torch.backends.cudnn.allow_tf32 = spec.train.tf32
    if deterministic:
        # cuBLAS needs a fixed workspace for repeatable results; it reads this when it starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def data_parallel(model: AlexNet, spec: JobSpec, world: int, on_gpu: bool) -> torch.nn.Module:
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    # On the CPU one bucket: overlapping the all-reduce with backward buys nothing when every core
    # computes, and each gloo all-reduce has a fixed cost however small. Gradients live in the buckets.
    net = DistributedDataParallel(
        model,
        device_ids=None,
        output_device=None,
        gradient_as_bucket_view=True,
        bucket_cap_mb=None if on_gpu else 25,
    )
    if spec.train.grad_compression == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        net.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return net
