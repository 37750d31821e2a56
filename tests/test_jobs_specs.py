"""Every spec in jobs/ submits as it is once its data is built, and the commands in its comments work.

For the specs whose data can be built here (Fashion-MNIST), the `alexnet-dist shards build` command the
spec's header gives is run (on a few images) in a copy of the repository's layout, and `submit`'s check of
the manifests (:func:`check_data`) then passes on the spec as it is.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from alexnet_dist.cli import app
from alexnet_dist.data.build.writer import BuildOptions, build
from alexnet_dist.service.operations import check_data
from alexnet_dist.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPECS = sorted((ROOT / "jobs").glob("*.toml"))
BUILDABLE = {"fashion-mnist.toml", "smoke.toml"}  # Fashion-MNIST, from /usr/share/datasets/fashion-mnist
RECIPES = {"imagenet-paper.toml"}  # ILSVRC2012 on S3: checked field by field instead
COMMAND = re.compile(r"(?<![\w/:.-])alexnet-dist ([^`|)\n]+)")


def commands(spec: Path) -> list[tuple[str, dict]]:
    """Each `alexnet-dist ...` command in the spec's comments, parsed by the real CLI: (command, params)."""
    text = "\n".join(
        line.lstrip("#").strip() for line in spec.read_text().splitlines() if line.startswith("#")
    )
    text = text.replace("\\\n", " ")  # shell line continuations
    root = typer.main.get_command(app)
    out = []
    for match in COMMAND.finditer(text):
        tokens = shlex.split(match.group(1))
        cmd, path = root, ["alexnet-dist"]
        while hasattr(cmd, "commands"):  # a group: the next token names its command
            name = tokens.pop(0)
            assert name in cmd.commands, f"{spec.name}: `{match.group(0)}`: no command {name!r}"
            cmd, path = cmd.commands[name], [*path, name]
        ctx = cmd.make_context(" ".join(path), tokens)  # a usage error (unknown option) fails here
        out.append((" ".join(path[1:]), ctx.params))
    return out


def test_every_spec_is_checked_here() -> None:
    assert {p.name for p in SPECS} == BUILDABLE | RECIPES


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_each_spec_loads_from_the_repo_root_and_its_commands_parse(
    spec: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    loaded = load_spec(Path("jobs") / spec.name)
    assert loaded.scaling.workers >= 1 and loaded.scaling.devices  # stated, never defaulted
    for url in (loaded.data.train, loaded.data.val):
        assert "://" in url or url.startswith(str(ROOT) + "/"), url  # relative paths: from the repo root
    found = commands(spec)
    assert {"submit", "watch"} <= {name for name, _ in found}  # the header says how to run it
    for name, params in found:
        if name in ("submit", "spec validate"):
            assert params.get("spec_path", params.get("path")) == Path("jobs") / spec.name
        if name == "watch":
            assert params["job_id"] == "$JOB"  # the id submit printed, not the spec's name


@pytest.mark.parametrize("name", sorted(BUILDABLE))
def test_a_fashion_mnist_spec_passes_submits_check_once_its_header_built_the_data(
    name: str, tmp_path: Path, fashion_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = ROOT / "jobs" / name
    (params,) = [p for cmd, p in commands(spec) if cmd == "shards build"]
    assert params["source"] == fashion_mnist_dir and params["fmt"] == "fashion-mnist"
    opts = BuildOptions(resize_to=params["resize_to"], shard_size=params["shard_size"], limit=40, processes=1)
    manifest_dir = tmp_path / params["manifest_dir"] if params["manifest_dir"] else None
    built = build(fashion_mnist_dir, str(tmp_path / params["out"]), opts, fmt="fashion-mnist",
                  manifest_dir=manifest_dir)  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the layout of the repository root, with only the data in it
    loaded = load_spec(spec)
    assert sorted(m.url for m in built) == sorted([loaded.data.train, loaded.data.val])
    check_data(loaded, endpoint_url=None)


def test_the_imagenet_spec_is_the_papers_recipe() -> None:
    spec = load_spec(ROOT / "jobs" / "imagenet-paper.toml", base=ROOT)
    assert (spec.model.preset, spec.model.num_classes, spec.scaling.devices) == ("paper", 1000, "gpu-pair")
    assert (spec.train.epochs, spec.train.batch_size, spec.optim.lr) == (90, 128, 0.01)
    assert (spec.optim.momentum, spec.optim.weight_decay, spec.optim.schedule) == (0.9, 0.0005, "plateau")
    assert spec.data.train.startswith("s3://") and spec.data.train.endswith("/imagenet-train.json")
    (params,) = [p for cmd, p in commands(ROOT / "jobs" / "imagenet-paper.toml") if cmd == "shards build"]
    assert spec.data.train.removesuffix("/imagenet-train.json") == params["out"] and params["fmt"] == "ilsvrc"
