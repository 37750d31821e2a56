"""The package's import contract (pyproject.toml, import-linter): kept by the tree, broken by a plant.

Each planted import is written into a copy of the package, which import-linter then reads instead of ours.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(package_root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run(
        [str(LINT), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=package_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_package_keeps_its_contracts() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "planted", "report"),
    [
        # the model reaching up into the CLI
        (
            "model/network.py",
            "import alexnet_dist.cli.app",
            "alexnet_dist.model is not allowed to import alexnet_dist.cli",
        ),
        # the service importing training: it must launch an entrypoint instead
        (
            "service/dispatcher.py",
            "import alexnet_dist.training.driver",
            "alexnet_dist.service is not allowed to import alexnet_dist.training",
        ),
        # a training worker pulling in the Caffe decoder
        (
            "training/loop.py",
            "import alexnet_dist.interop.caffe",
            "alexnet_dist.training is not allowed to import alexnet_dist.interop",
        ),
        # a cycle inside a layer: the manifest importing what verifies it
        (
            "data/manifest.py",
            "import alexnet_dist.data.verify",
            "No cycles are allowed in alexnet_dist.data.",
        ),
    ],
)
def test_a_planted_import_breaks_the_contract(tmp_path: Path, module: str, planted: str, report: str) -> None:
    shutil.copytree(ROOT / "alexnet_dist", tmp_path / "alexnet_dist", ignore=shutil.ignore_patterns("lib"))
    target = tmp_path / "alexnet_dist" / module
    target.write_text(target.read_text() + f"\n{planted}  # planted by the test\n")
    done = lint(tmp_path)
    assert done.returncode != 0
    assert "broken." in done.stdout and "0 broken" not in done.stdout
    assert report in done.stdout, done.stdout[-2000:]
    if "cycles" not in report:  # the layers report names the importer and the planted import
        importer = "alexnet_dist." + module.removesuffix(".py").replace("/", ".")
        assert f"{importer} -> {planted.split()[-1]}" in done.stdout
