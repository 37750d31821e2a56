"""Check that this interpreter's environment satisfies alexnet-dist's requirements and pins.

Run by ``cluster/install.sh check`` (so by the Dockerfile and by tests/test_cluster.py):

    python cluster/check_requirements.py pyproject.toml cluster/constraints.txt

It checks every dependency in pyproject.toml (and the requirements its extras pull in, e.g. the dashboard
of ``ray[default]`` that the dispatcher's Ray Jobs API needs), every exact pin in the constraints file,
and that ``alexnet_dist`` is imported from this environment. One line per problem; exit 1 on any.
Standalone on purpose: it must run before anything of the package is known to work.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import sys
from pathlib import Path

import tomllib

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def check_requirement(req: Requirement, problems: list[str], *, source: str) -> int:
    """Check ``req`` and one level of the requirements its extras add; return how many were checked."""
    version = _installed(req.name)
    if version is None:
        problems.append(f"{req.name}: not installed (required by {source}: {req})")
        return 1
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        problems.append(f"{req.name}: {version} installed, {source} needs {req}")
    checked = 1
    for extra in sorted(req.extras):
        env = {**default_environment(), "extra": extra}
        for line in md.requires(req.name) or []:
            sub = Requirement(line)
            if sub.marker is not None and "extra" in str(sub.marker) and sub.marker.evaluate(env):
                checked += check_requirement(sub, problems, source=f"{req.name}[{extra}]")
    return checked


def read_pins(path: Path) -> list[Requirement]:
    pins = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            pins.append(Requirement(line))
    return pins


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: check_requirements.py PYPROJECT CONSTRAINTS", file=sys.stderr)
        return 2
    pyproject, constraints = Path(argv[1]), Path(argv[2])
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    problems: list[str] = []
    checked = sum(check_requirement(Requirement(d), problems, source=pyproject.name) for d in deps)
    pins = read_pins(constraints)
    for pin in pins:
        version = _installed(pin.name)
        if version is None or not pin.specifier.contains(version, prereleases=True):
            problems.append(f"{pin.name}: {version or 'not installed'}, {constraints.name} pins {pin}")
    spec = importlib.util.find_spec("alexnet_dist")
    origin = spec.origin if spec is not None else None
    if origin is None:
        problems.append("alexnet_dist: not importable; run `cluster/install.sh package`")
    elif not Path(origin).resolve().is_relative_to(Path(sys.prefix).resolve()):
        problems.append(f"alexnet_dist: imported from {origin}, outside this environment ({sys.prefix})")
    for p in problems:
        print(f"check: {p}", file=sys.stderr)
    if problems:
        return 1
    print(
        f"check: {checked} requirements satisfied ({len(deps)} direct), {len(pins)} pins matched, "
        f"alexnet_dist from {origin}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
