"""The fused ReLU + LRN kernel for CPU tensors (``csrc/lrn.c``), compiled on first use, called via ctypes.

Why C and not torch ops: on the CPU the LRN is memory-bound, and a chain of torch ops makes a pass over
memory per op (ReLU, square, the 1x1 band conv, pow, multiply; as many again backward). The kernel does
each direction in one pass over its inputs and outputs (bench/model.py measures both).

Why ctypes and not a torch C++ extension: the file includes no torch headers, so it compiles in well
under a second with the system's C compiler and needs no ninja. It is built once per machine and kind of
CPU (``-march=native``) into ``~/.cache/alexnet-dist`` (or ``$XDG_CACHE_HOME``), written to a temporary
name and renamed, so Ray workers starting together never load a half-written library. Without a C
compiler, :func:`available` is False and the model uses its torch formulation: slower, same numbers.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["available", "relu_lrn"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "lrn.c"
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fPIC", "-shared", "-pthread")
_lib: ctypes.CDLL | None = None
_failed = False


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "alexnet-dist"


def _build(compiler: str) -> Path:
    digest = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_model().encode() + platform.machine().encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"lrn-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    try:
        if not compiler:
            raise FileNotFoundError("no C compiler (cc/gcc) on PATH")
        lib = ctypes.CDLL(str(_build(compiler)))  # CDLL releases the GIL during calls
    except (OSError, subprocess.CalledProcessError) as err:
        detail = err.stderr.decode(errors="replace")[-300:] if hasattr(err, "stderr") else err
        log.warning("fused CPU LRN kernel unavailable (%s); using the torch formulation", detail)
        _failed = True
        return None
    i64, i32, f32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.lrn_forward.argtypes = [ptr, ptr, i64, i64, i64, i32, f32, f32, f32, i32, i32]
    lib.lrn_backward.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, f32, f32, f32, i32, i32]
    lib.lrn_forward.restype = lib.lrn_backward.restype = ctypes.c_int
    _lib = lib
    return lib


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

    Needs :func:`available` and :func:`supports`; ``alexnet_dist.model.relu_lrn`` checks both."""
    return _ReluLRN.apply(x, size, alpha, beta, k, relu)
