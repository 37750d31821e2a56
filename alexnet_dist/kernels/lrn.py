"""The fused ReLU + LRN kernel for CPU tensors (``csrc/lrn.c``), built at install, called via ctypes.

Why C and not torch ops: on the CPU the LRN is memory-bound, and a chain of torch ops makes a pass over
memory per op (ReLU, square, the 1x1 band conv, pow, multiply; as many again backward). The kernel does
each direction in one pass over its inputs and outputs (bench/model.py measures both).

Built by :mod:`alexnet_dist.kernels.library` (``-ffast-math``: the square roots vectorise). Without the
built library, :func:`available` is False and the model uses its torch formulation: slower, same numbers.
"""

from __future__ import annotations

import ctypes

import torch

from alexnet_dist.kernels import library

__all__ = ["available", "relu_lrn"]


_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
SIGNATURES: library.Signatures = {
    "lrn_forward": ([_ptr, _ptr, _i64, _i64, _i64, _i32, _f32, _f32, _f32, _i32, _i32], _i32),
    "lrn_backward": ([_ptr, _ptr, _ptr, _i64, _i64, _i64, _i32, _f32, _f32, _f32, _i32, _i32], _i32),
}


def _load() -> ctypes.CDLL | None:
    return library.load("lrn", SIGNATURES)


def available() -> bool:
    return _load() is not None


def supports(x: torch.Tensor) -> bool:
    """The kernel takes float32 NCHW-contiguous CPU tensors; anything else goes the torch way."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and x.is_contiguous()


def _threads() -> int:
    return torch.get_num_threads()  # as many as torch's own ops use (1 in a 1-CPU Ray worker)


class _ReluLRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, relu: bool):
        lib = _load()
        if lib is None or not supports(x):
            raise RuntimeError("relu_lrn: needs the compiled kernel and a float32 NCHW CPU tensor")
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        if lib.lrn_forward(x.data_ptr(), y.data_ptr(), n, c, h * w, size, alpha, beta, k, relu, _threads()):
            raise MemoryError("LRN kernel: could not allocate its work buffers")
        ctx.save_for_backward(x)  # s is recomputed backward: cheaper than storing and reading it
        ctx.args = (size, alpha, beta, k, relu)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        size, alpha, beta, k, relu = ctx.args
        grad = grad.contiguous()
        dx = torch.empty_like(x)
        n, c, h, w = x.shape
        pointers = (x.data_ptr(), grad.data_ptr(), dx.data_ptr())
        if _load().lrn_backward(*pointers, n, c, h * w, size, alpha, beta, k, relu, _threads()):
            raise MemoryError("LRN kernel: could not allocate its work buffers")
        return dx, None, None, None, None, None


def relu_lrn(
    x: torch.Tensor, size: int, alpha: float, beta: float, k: float, *, relu: bool = True
) -> torch.Tensor:
    """``lrn(relu(x))`` (or ``lrn(x)`` with ``relu=False``) in one pass each way.

    Needs :func:`available` and :func:`supports`; ``alexnet_dist.model.network.relu_lrn`` checks both."""
    return _ReluLRN.apply(x, size, alpha, beta, k, relu)
