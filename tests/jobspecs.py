"""The small CPU job the training tests run, in one place: a spec dict with per-test overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alexnet_dist.spec import JobSpec, parse_spec


def cpu_spec(train: str, val: str, storage: str, **overrides: Any) -> JobSpec:
    """Two CPU workers, the small preset, no loader processes; ``section__key=value`` overrides one
    field (``train__epochs=1``), ``section=value`` a whole section or top-level field."""
    data: dict[str, Any] = {
        "name": "t",
        "seed": 7,
        "retries": 0,
        "data": {"train": train, "val": val, "loader_workers": 0, "shuffle_buffer": 0},
        "model": {"preset": "small", "num_classes": 10},
        "optim": {"lr": 0.02, "schedule": "cosine"},
        "train": {"epochs": 2, "batch_size": 32, "ten_crop_eval": False, "log_every_steps": 4},
        "scaling": {"workers": 2, "devices": "cpu"},
        "checkpoint": {"storage": storage, "every_steps": 3, "keep": 10},
    }
    for path, value in overrides.items():
        section, _, key = path.partition("__")
        data[section] = {**data[section], key: value} if key else value
    return parse_spec(data)


def spec_file(tmp_path: Path, name: str) -> Path:
    """A TOML spec of one CPU worker, small preset, on two manifests of 10 classes and no shards (what
    `submit` checks), as a user writes one: for tests of the CLI that never train it."""
    from shardkit import write_manifest

    train, val = write_manifest(tmp_path / "train.json", 10), write_manifest(tmp_path / "val.json", 10)
    path = tmp_path / "job.toml"
    path.write_text(
        f'name = "{name}"\nseed = 1\n[data]\ntrain = "{train}"\nval = "{val}"\n'
        '[model]\npreset = "small"\nnum_classes = 10\n[scaling]\nworkers = 1\ndevices = "cpu"\n'
    )
    return path
