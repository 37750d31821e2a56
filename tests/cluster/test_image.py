"""The Dockerfile's install steps, run here: no Docker engine is available, so the test stages the build
context its COPY lines and .dockerignore give and runs cluster/install.sh phase by phase, exactly as its
RUN lines name them; and cluster/constraints.txt pins every dependency to the installed version.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from clusterfiles import CLUSTER, ROOT


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat.removeprefix("!").rstrip("/")
        alts = [p, p.removeprefix("**/")] if p.startswith("**/") else [p]
        if any(fnmatch.fnmatchcase(pre, a) for pre in prefixes for a in alts):
            allowed = neg
    return allowed


def dockerfile_steps() -> tuple[list[str], list[list[str]]]:
    """COPY sources (each copied to the same relative path) and the install.sh phases of each RUN."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    sources, runs = [], []
    for line in text.splitlines():
        argv = shlex.split(line, comments=True) if line.strip() else []
        if argv[:1] == ["COPY"]:
            *srcs, dest = [a for a in argv[1:] if not a.startswith("--")]
            for s in srcs:
                expected = "./" if "/" not in s else "./" + s.rsplit("/", 1)[0] + "/"
                assert dest in (expected, "./" + s), f"COPY {s} {dest}: the image must keep the repo layout"
                sources.append(s)
        elif argv[:1] == ["RUN"] and "cluster/install.sh" in argv:
            i = argv.index("cluster/install.sh")
            phases = []
            for a in argv[i + 1 :]:
                if a in ("&&", ";", "||"):
                    break
                phases.append(a)
            runs.append(phases)
    return sources, runs


@pytest.mark.slow
def test_dockerfile_install_steps_install_a_working_package(tmp_path: Path) -> None:
    sources, runs = dockerfile_steps()
    assert runs == [["deps"], ["package", "check"]]
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert not dockerignore_allows(".venv/bin/python", patterns)
    assert not dockerignore_allows(".git/config", patterns)
    # Stage the build context exactly as docker would send it for these COPY lines.
    ctx = tmp_path / "ctx"
    staged = 0
    for src in sources:
        assert dockerignore_allows(src, patterns), f"{src}: COPY'd but excluded by .dockerignore"
        origin = ROOT / src
        assert origin.exists(), f"{src}: COPY'd by the Dockerfile but missing from the checkout"
        files = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if dockerignore_allows(rel, patterns):
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, ctx / rel)
                staged += 1
    assert staged >= 10 and not list(ctx.rglob("__pycache__"))

    # A fresh venv that sees the project's .venv (its dependencies) through a .pth file: the heavy
    # downloads are `make setup`'s job; here `deps` must find every pin satisfied with no index.
    venv = tmp_path / "venv"
    # --without-pip: pip, setuptools and the rest come from the .venv, at the pinned versions.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        **os.environ,
        "PYTHON": str(py),
        "PIP_NO_INDEX": "1",
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
    }
    outputs = []
    for phases in runs:
        r = subprocess.run(
            ["bash", "cluster/install.sh", *phases],
            cwd=ctx,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, (
            f"install.sh {' '.join(phases)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
        outputs.append(r.stdout)
    report = outputs[-1]
    m = re.search(
        r"check: (\d+) requirements satisfied \((\d+) direct\), (\d+) pins matched, "
        r"alexnet_dist from (\S+)",
        report,
    )
    assert m, report
    import tomllib

    direct = len(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    pins = [
        line for line in (CLUSTER / "constraints.txt").read_text().splitlines() if line.split("#")[0].strip()
    ]
    assert int(m.group(2)) == direct and int(m.group(3)) == len(pins) and int(m.group(1)) > direct
    assert Path(m.group(4)).is_relative_to(site)  # the installed copy, not the checkout
    assert (venv / "bin" / "alexnet-dist").exists()
    # pip left the project's own editable install alone.
    assert list(Path(sysconfig.get_paths()["purelib"]).glob("alexnet_dist-*.dist-info"))


def test_constraints_pin_every_dependency_to_the_installed_version() -> None:
    import importlib.metadata as md

    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for raw in (CLUSTER / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: pins must be exact"
            pins[req.name] = spec.version
    for d in deps:
        name = Requirement(d).name
        assert name in pins, f"{name}: in pyproject.toml but not pinned in cluster/constraints.txt"
        assert md.version(name) == pins[name], f"{name}: {md.version(name)} installed, pinned {pins[name]}"
