"""The C kernels' libraries: built once when the package is installed, loaded with ctypes at run time.

``python -m alexnet_dist.kernels.library`` (run by ``make setup``, the Dockerfile and
``cluster/install.sh``) compiles every ``csrc/<name>.c`` with the system's C compiler into ``lib/`` beside
this file and records how in ``lib/BUILD.json``. Nothing is compiled at run time, so a training node needs
no compiler. Why ctypes and not torch C++ extensions: the sources include no torch headers, so each
compiles in well under a second without ninja, and ctypes releases the GIL during each call.

``--portable`` builds for the machine's architecture at a baseline (x86-64-v2, armv8-a) for an image that
runs on other CPUs; the default is ``-march=native``, and such a build is used only on the same kind of
CPU. A library that is missing, was built from another version of its source, or for another CPU is not
loaded: :func:`load` returns None once, with a warning, and callers keep their torch or Python path
(slower, same numbers).

(``CC`` is read here, not in settings.py: it is the build's, not the service's.)
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KERNELS", "Recipe", "build_all", "load"]

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
LIB = Path(__file__).parent / "lib"
BUILD_FILE = LIB / "BUILD.json"
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread")
_PORTABLE = {"x86_64": "-march=x86-64-v2", "aarch64": "-march=armv8-a", "arm64": "-march=armv8-a"}


@dataclass(frozen=True)
class Recipe:
    """How one kernel is compiled beyond :data:`FLAGS`."""

    flags: tuple[str, ...] = ()
    libs: tuple[str, ...] = ()
    optional: bool = False  # a missing system header (libjpeg) skips it instead of failing the build


KERNELS: dict[str, Recipe] = {
    "lrn": Recipe(flags=("-ffast-math",), libs=("-lm",)),  # fast-math: the square roots vectorise
    "maxpool": Recipe(),
    "jpeg_crop": Recipe(libs=("-ljpeg",), optional=True),
}

_loaded: dict[str, ctypes.CDLL | None] = {}
_lock = threading.Lock()

Signatures = dict[str, tuple[list[Any], Any]]  # function -> (argtypes, restype)


def _cpu() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        found = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
        if found:
            return hashlib.sha256("\n".join(found).encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.processor() or "unknown"


def _source_digest(name: str) -> str:
    return hashlib.sha256((CSRC / f"{name}.c").read_bytes()).hexdigest()[:16]


def _compile(compiler: str, name: str, recipe: Recipe, march: str, out: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, march, *recipe.flags, str(CSRC / f"{name}.c"), "-o", tmp, *recipe.libs]
        subprocess.run(cmd, check=True, capture_output=True)
        os.replace(tmp, out)  # a process loading it meanwhile never sees a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_all(*, portable: bool = False, compiler: str | None = None) -> dict[str, Any]:
    """Compile every kernel into ``lib/`` and write ``lib/BUILD.json``; returns what it recorded.

    Raises ``RuntimeError`` naming the kernel when a required one does not compile.
    """
    compiler = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc/gcc) on PATH; install gcc (Debian: gcc libc6-dev)")
    machine = platform.machine()
    march = _PORTABLE.get(machine, "") if portable else "-march=native"
    LIB.mkdir(exist_ok=True)
    built: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, recipe in KERNELS.items():
        try:
            _compile(compiler, name, recipe, march, LIB / f"{name}.so")
            built[name] = _source_digest(name)
        except subprocess.CalledProcessError as err:
            detail = err.stderr.decode(errors="replace").strip().splitlines()
            line = detail[0] if detail else f"exit {err.returncode}"
            if not recipe.optional:
                raise RuntimeError(f"{CSRC / name}.c: does not compile ({line})") from None
            skipped[name] = line
    record = {
        "machine": machine,
        "cpu": "portable" if portable else _cpu(),
        "march": march,
        "compiler": compiler,
        "kernels": built,
        "skipped": skipped,
    }
    BUILD_FILE.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _build_record() -> dict[str, Any] | None:
    try:
        return json.loads(BUILD_FILE.read_text())
    except (OSError, ValueError):
        return None


def _why_not(name: str, record: dict[str, Any] | None) -> str | None:
    """Why the built library of ``name`` cannot be used here, or None when it can."""
    if record is None:
        return "not built"
    if name not in record.get("kernels", {}):
        return record.get("skipped", {}).get(name, "not built")
    if record["kernels"][name] != _source_digest(name):
        return "built from another version of its source"
    if record.get("machine") != platform.machine():
        return f"built for {record.get('machine')}"
    if record.get("cpu") not in ("portable", _cpu()):
        return "built with -march=native for another CPU"
    return None


def load(name: str, signatures: Signatures) -> ctypes.CDLL | None:
    """``lib/<name>.so`` loaded with its functions typed, or None (logged once) when it cannot be used."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib: ctypes.CDLL | None = None
        why = _why_not(name, _build_record())
        if why is None:
            try:
                lib = ctypes.CDLL(str(LIB / f"{name}.so"))
                for function, (argtypes, restype) in signatures.items():
                    getattr(lib, function).argtypes = argtypes
                    getattr(lib, function).restype = restype
            except (OSError, AttributeError) as err:
                why, lib = str(err), None
        if lib is None:
            log.warning(
                "C kernel %s unavailable (%s); using the torch path. Build the kernels with "
                "`python -m alexnet_dist.kernels.library` (make setup does)",
                name,
                why,
            )
        _loaded[name] = lib
        return lib


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alexnet_dist.kernels.library", description=__doc__)
    parser.add_argument("--portable", action="store_true", help="baseline -march for images run elsewhere")
    args = parser.parse_args(argv)
    try:
        record = build_all(portable=args.portable)
    except RuntimeError as err:
        print(f"alexnet-dist kernels: error: {err}", file=sys.stderr)
        return 1
    skipped = "".join(f"; {k} skipped ({v})" for k, v in record["skipped"].items())
    print(f"alexnet-dist kernels: built {', '.join(record['kernels'])} ({record['march']}) in {LIB}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
