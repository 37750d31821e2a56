"""`alexnet-dist spec schema | explain | validate`, run as a user runs them: the installed command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from shardkit import write_manifest

from alexnet_dist.data.manifest import ShardInfo, load_manifest, save_manifest

CLI = Path(sys.executable).parent / "alexnet-dist"
DEVICES_MISSING = (
    "scaling.devices: missing; "
    'add [scaling] devices = "gpu-pair" (the paper: one tower per GPU), "gpu" or "cpu"'
)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ALEXNET_DIST_SERVER"}
    return subprocess.run([str(CLI), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def schema_fields(schema: dict) -> dict[str, dict]:
    """Every property of the schema by its dotted path (sections and their fields), $refs resolved."""

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = {
                **schema["$defs"][node["$ref"].rsplit("/", 1)[-1]],
                **{k: v for k, v in node.items() if k != "$ref"},
            }
        return node

    out = {}
    for name, prop in schema["properties"].items():
        out[name] = prop
        for key, sub in resolve(prop).get("properties", {}).items():
            out[f"{name}.{key}"] = sub
    return out


@pytest.fixture(scope="module")
def schema() -> dict:
    proc = run("spec", "schema")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def leaf_paths(schema: dict) -> set[str]:
    sections = {p for p, node in schema_fields(schema).items() if "$ref" in node}
    return {p for p in schema_fields(schema) if p not in sections}


def manifest(path: Path, classes: int, samples: int) -> str:
    """A manifest of ``classes`` classes that claims ``samples`` images in one shard it does not have."""
    write_manifest(path, classes)
    m = load_manifest(str(path))
    shard = ShardInfo(str(path.with_suffix(".tar")), samples, 1000 * samples, "0" * 64)
    save_manifest(replace(m, shards=(shard,), num_samples=samples), str(path))
    return str(path)


def spec_file(tmp_path: Path, train: str, val: str, scaling: str = 'workers = 2\ndevices = "cpu"\n') -> Path:
    path = tmp_path / "job.toml"
    path.write_text(
        f'name = "check"\n[data]\ntrain = "{train}"\nval = "{val}"\n'
        f'[model]\npreset = "small"\nnum_classes = 10\n[train]\nepochs = 3\n[scaling]\n{scaling}'
    )
    return path


def test_the_schema_is_json_and_every_field_and_section_says_what_it_is(schema: dict) -> None:
    fields = schema_fields(schema)
    undescribed = sorted(p for p, node in fields.items() if not node.get("description", "").strip())
    assert undescribed == []
    assert all(d.get("description", "").strip() for d in schema["$defs"].values())  # the sections' docstrings
    assert {"name", "data.train", "train.epochs", "scaling.devices", "notify.urls"} <= set(fields)
    assert {"name", "data", "scaling"} <= set(schema["required"])
    assert set(schema["$defs"]["ScalingSpec"]["required"]) == {"workers", "devices"}


def test_explain_lists_every_field_of_the_schema(leaf_paths: set[str]) -> None:
    proc = run("spec", "explain")
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == len(set(rows))
    assert set(rows) == leaf_paths
    assert "[optim]" in proc.stdout and "Section 5" in proc.stdout


def test_explain_one_field_or_one_section() -> None:
    one = run("spec", "explain", "train.epochs")
    assert one.returncode == 0, one.stderr
    rows = [line for line in one.stdout.splitlines() if line.startswith("  ")]
    assert len(rows) == 1
    assert rows[0].split()[:5] == ["train.epochs", "integer", ">=", "1", "default"]
    assert rows[0].split()[5] == "90" and "Passes over the training set" in rows[0]

    section = run("spec", "explain", "scaling")
    rows = [line.split()[0] for line in section.stdout.splitlines() if line.startswith("  ")]
    assert rows == ["scaling.workers", "scaling.devices", "scaling.cpus_per_worker"]
    assert "required" in section.stdout


def test_explain_an_unknown_field_fails_in_one_line_with_close_matches() -> None:
    proc = run("spec", "explain", "train.epoch")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("alexnet-dist: error: train.epoch: ") and "did you mean train.epochs" in line


def test_validate_checks_the_spec_and_its_manifests_and_stores_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    train, val = manifest(data / "train.json", 10, 600), manifest(data / "val.json", 10, 100)
    path = spec_file(tmp_path, train, val)
    before = sorted(tmp_path.rglob("*"))
    proc = run("spec", "validate", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout
        == f"{path}: valid (600 training / 100 validation images, 10 classes; 2 workers x cpu, 3 epochs)\n"
    )
    assert sorted(tmp_path.rglob("*")) == before

    normalized = run("spec", "validate", str(path), "--set", "train.epochs=5", "--json", cwd=tmp_path)
    assert normalized.returncode == 0, normalized.stderr
    spec = json.loads(normalized.stdout)
    assert spec["train"]["epochs"] == 5 and spec["optim"]["momentum"] == 0.9  # a default, filled in
    assert spec["scaling"] == {"workers": 2, "devices": "cpu", "cpus_per_worker": 1.0}


def test_validate_refuses_a_spec_without_scaling_devices_naming_the_line_to_add(tmp_path: Path) -> None:
    train, val = manifest(tmp_path / "train.json", 10, 60), manifest(tmp_path / "val.json", 10, 10)
    path = spec_file(tmp_path, train, val, scaling="workers = 1\n")
    proc = run("spec", "validate", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"alexnet-dist: error: {path}: {DEVICES_MISSING}"


def test_validate_refuses_a_missing_manifest_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "val.json"
    path = spec_file(tmp_path, manifest(tmp_path / "train.json", 10, 60), str(missing))
    proc = run("spec", "validate", str(path))
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("alexnet-dist: error: data.val: ") and str(missing) in line


def test_validate_a_binary_file_is_one_line_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00binary")
    proc = run("spec", "validate", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"alexnet-dist: error: {path}: not a text file (not UTF-8); a spec is TOML or JSON text"
