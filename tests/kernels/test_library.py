"""The kernels' libraries are built at install and only loaded at run time, never compiled there."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from alexnet_dist.kernels import library


def test_every_kernel_was_built_from_its_current_source() -> None:
    record = json.loads(library.BUILD_FILE.read_text())  # `make setup` ran the build
    assert set(record["kernels"]) | set(record["skipped"]) == set(library.KERNELS)
    for name, digest in record["kernels"].items():
        assert digest == library._source_digest(name)
        assert (library.LIB / f"{name}.so").is_file()
        assert library._why_not(name, record) is None


def test_a_library_that_does_not_match_is_not_used() -> None:
    record = json.loads(library.BUILD_FILE.read_text())
    name = next(iter(record["kernels"]))
    stale = {**record, "kernels": {**record["kernels"], name: "0" * 16}}
    assert library._why_not(name, stale) == "built from another version of its source"
    other_cpu = {**record, "cpu": "another-cpu"}
    assert library._why_not(name, other_cpu) == "built with -march=native for another CPU"
    assert library._why_not(name, {**record, "cpu": "portable"}) is None
    assert library._why_not(name, {**record, "machine": "sparc"}) == "built for sparc"
    assert library._why_not(name, None) == "not built"


def test_kernels_load_without_a_compiler_on_the_path() -> None:
    """A training node needs no compiler: with PATH empty and CC unset, every built kernel still loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "PATH")}
    code = (
        "from alexnet_dist.kernels import jpeg, lrn, maxpool\n"
        "print(lrn.available(), maxpool.available(), jpeg.available())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "PATH": ""}, capture_output=True, text=True, check=True
    )
    record = json.loads(library.BUILD_FILE.read_text())
    expected = [str(n in record["kernels"]) for n in ("lrn", "maxpool", "jpeg_crop")]
    assert out.stdout.split() == expected
    assert "lrn" in record["kernels"] and "maxpool" in record["kernels"]
