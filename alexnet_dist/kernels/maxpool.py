"""Overlapping max-pooling for CPU tensors (``csrc/maxpool.c``), built at install, called via ctypes.

Why: torch's CPU ``max_pool2d`` branches on every comparison (half of them mispredicted on real
activations) and keeps an int64 index per output. The kernel keeps one byte per output (the argmax's place
in its window) and vectorises across an output row. Its outputs and gradients equal torch's bit for bit
(same scan order, same tie and NaN rule; tests/model). Without the built library, :func:`available` is
False and the model uses ``torch.nn.functional.max_pool2d``.
"""

from __future__ import annotations

import ctypes

import torch
from torch.autograd.function import once_differentiable

from alexnet_dist.kernels import library

__all__ = ["available", "max_pool", "supports"]

_i64, _i32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
SIGNATURES: library.Signatures = {
    "maxpool_forward": ([_ptr, _ptr, _ptr, _i64, _i32, _i32, _i32, _i32, _i32], _i32),
    "maxpool_backward": ([_ptr, _ptr, _ptr, _i64, _i32, _i32, _i32, _i32, _i32], _i32),
}
MAX_KERNEL = 15  # the argmax's place in a k x k window must fit in a byte


def _load() -> ctypes.CDLL | None:
    return library.load("maxpool", SIGNATURES)


def available() -> bool:
    return _load() is not None


def supports(x: torch.Tensor, kernel: int, stride: int) -> bool:
    """float32 NCHW-contiguous CPU tensors at least a window big; anything else goes the torch way."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.is_contiguous()
        and 1 <= kernel <= MAX_KERNEL
        and stride >= 1
        and min(x.shape[2:]) >= kernel
        and x.numel() > 0
    )


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
        n, c, h, w = x.shape
        oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
        y = x.new_empty((n, c, oh, ow))
        idx = torch.empty((n, c, oh, ow), dtype=torch.uint8)
        args = (n * c, h, w, kernel, stride, torch.get_num_threads())
        if _load().maxpool_forward(x.data_ptr(), y.data_ptr(), idx.data_ptr(), *args):
            raise ValueError(f"max_pool: kernel {kernel}, stride {stride} do not fit a {h}x{w} map")
        ctx.save_for_backward(idx)
        ctx.args = (x.shape, kernel, stride)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (idx,) = ctx.saved_tensors
        shape, kernel, stride = ctx.args
        grad = grad.contiguous()
        dx = grad.new_empty(shape)
        n, c, h, w = shape
        args = (n * c, h, w, kernel, stride, torch.get_num_threads())
        if _load().maxpool_backward(grad.data_ptr(), idx.data_ptr(), dx.data_ptr(), *args):
            raise ValueError(f"max_pool: kernel {kernel}, stride {stride} do not fit a {h}x{w} map")
        return dx, None, None


def max_pool(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """``F.max_pool2d(x, kernel, stride)`` (no padding, floor mode). Needs :func:`available` and
    :func:`supports`; ``alexnet_dist.model.MaxPool2d`` checks both."""
    return _MaxPool.apply(x, kernel, stride)
