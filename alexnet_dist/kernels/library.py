"""Small C kernels (``alexnet_dist/csrc``) built on first use and loaded with ctypes.

Why ctypes and not torch C++ extensions: the files include no torch headers, so each compiles in well
under a second with the system's C compiler and needs no ninja. A library is built once per machine and
kind of CPU (``-march=native``) into ``~/.cache/alexnet-dist`` (or ``$XDG_CACHE_HOME``), written to a
temporary name and renamed, so Ray workers starting together never load a half-written library. ctypes
releases the GIL during each call. Without a compiler (or a header a kernel needs), :func:`load` returns
None once, with a warning, and callers keep their pure-torch path: slower, same numbers.

(``CC`` and ``XDG_CACHE_HOME`` are read here, not in settings.py: they are the build's, not the service's.)
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
import threading
from pathlib import Path
from typing import Any

__all__ = ["load"]

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread")
_loaded: dict[str, ctypes.CDLL | None] = {}
_lock = threading.Lock()


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


def _build(compiler: str, source: Path, flags: tuple[str, ...], libs: tuple[str, ...]) -> Path:
    recipe = " ".join((*flags, *libs, _cpu_model(), platform.machine())).encode()
    digest = hashlib.sha256(source.read_bytes() + recipe).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", tmp, *libs], check=True, capture_output=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


Signatures = dict[str, tuple[list[Any], Any]]  # function -> (argtypes, restype)


def load(
    name: str, signatures: Signatures, *, extra_flags: tuple[str, ...] = (), libs: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
    """``csrc/<name>.c`` as a loaded library with its functions typed, or None (logged once) when it
    cannot be built here."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        try:
            if not compiler:
                raise FileNotFoundError("no C compiler (cc/gcc) on PATH")
            path = _build(compiler, CSRC / f"{name}.c", FLAGS + extra_flags, libs)
            lib: ctypes.CDLL | None = ctypes.CDLL(str(path))
            for function, (argtypes, restype) in signatures.items():
                getattr(lib, function).argtypes = argtypes
                getattr(lib, function).restype = restype
        except (OSError, subprocess.CalledProcessError) as err:
            detail = err.stderr.decode(errors="replace")[-300:] if hasattr(err, "stderr") else err
            log.warning("C kernel %s unavailable (%s); using the torch path", name, detail)
            lib = None
        _loaded[name] = lib
        return lib
