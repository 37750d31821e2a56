"""The files under cluster/ that the tests in this folder read, and two readers shared by them.

Not a test module: `test_kuberay.py` and `test_commands.py` both need the YAML reader and the
README's command lines, and every file needs the paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]  # tests/cluster/ -> the repository
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
COMPOSE_FILES = [CLUSTER / "compose.yaml", CLUSTER / "compose.gpu.yaml"]
README = CLUSTER / "README.md"
RECIPE = ROOT / "jobs" / "imagenet-paper.toml"


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def shell_commands(text: str) -> list[str]:
    """Command lines in a README or comments: lines (after any `#` or `$ `) that start with a known CLI."""
    out = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip().lstrip("#").strip().removeprefix("$ ")
        if re.match(r"^(alexnet-dist|ray|kubectl|docker)\s", line):
            out.append(line)
    return out
