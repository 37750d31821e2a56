"""A full disk: checkpoint storage on a small tmpfs. The checkpoint that does not fit fails in one line
naming the folder and the space needed, nothing half-written is left, and the previous checkpoint
stays loadable (and a run resumes from it once there is room)."""

from __future__ import annotations

from pathlib import Path

import pytest
from shardkit import build_fashion

from alexnet_dist.errors import CheckpointError
from alexnet_dist.settings import Settings
from alexnet_dist.spec import load_spec
from alexnet_dist.training.checkpoint import read_checkpoint
from alexnet_dist.training.local import run_local

ROOT = Path(__file__).resolve().parents[2]


def test_a_checkpoint_that_does_not_fit_fails_in_one_line_and_keeps_the_last_good_one(
    small_disk: Path, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    train = build_fashion(fashion_mnist_dir, tmp_path / "train", limit=128, shard_size=64)
    val = build_fashion(fashion_mnist_dir, tmp_path / "val", limit=64, shard_size=64, split="test")
    overrides = [
        f"data.train={train.url}",
        f"data.val={val.url}",
        "train.epochs=1",
        "train.ten_crop_eval=false",
        "scaling.workers=1",
        "train.batch_size=16",
        "checkpoint.every_steps=2",
        "checkpoint.keep=5",
        f"checkpoint.storage={small_disk}",
    ]
    spec = load_spec(ROOT / "jobs/smoke.toml", overrides)
    with pytest.raises(CheckpointError) as caught:
        run_local(spec, run_name="full", settings=Settings())
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{small_disk / 'full'}/checkpoint_")
    assert "no room for the checkpoint (" in message and "MiB needed" in message and "MiB free" in message
    run_dir = small_disk / "full"
    kept = sorted(p for p in run_dir.iterdir() if p.name.startswith("checkpoint_"))
    assert len(kept) == 1 and not [p for p in run_dir.iterdir() if p.name.endswith(".partial")]
    state = read_checkpoint(kept[0])  # the last good one loads, whole
    assert state["step"] == 2 and not state["finished"]
    print(f"\nfull disk: {message}")
