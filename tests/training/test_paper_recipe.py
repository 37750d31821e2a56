"""jobs/imagenet-paper.toml through the real loop: the paper's network at 227 px, its optimizer and ten-crop
evaluation, on a small ILSVRC-layout tree of 256 px JPEGs built here, with only its scale cut for 2 CPUs.

The local runner (no Ray) trains it: one run is killed (a real process exit, in a child process) one step
after a mid-epoch checkpoint; the same run name then resumes from that checkpoint, finishes, and ends
with the ten-crop evaluation and the same weights as a run that was never interrupted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_dist.data.build.writer import BuildOptions, build
from alexnet_dist.model.config import model_config
from alexnet_dist.settings import Settings
from alexnet_dist.spec import JobSpec, load_spec
from alexnet_dist.training.checkpoint import read_checkpoint
from alexnet_dist.training.local import run_local

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 24, 2
BATCH, STEPS, EVERY = 16, 4, 2  # 4 steps an epoch, a checkpoint every 2: one in the middle of each epoch
KILL_AT = STEPS + EVERY + 1  # global step 7: one step after epoch 2's mid-epoch checkpoint (global step 6)

CHILD = """
import json, sys
from alexnet_dist.settings import Settings
from alexnet_dist.spec import JobSpec
from alexnet_dist.training.local import run_local

args = json.loads(open(sys.argv[1]).read())
run_local(JobSpec.from_json(args["spec"]), run_name=args["run"], settings=Settings(storage_root=args["root"]),
          fault=args["fault"])
"""


def write_ilsvrc(root: Path) -> None:
    """``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``: photo-like 256 x 256..320 images (smooth colour in
    a class tint, texture, noise), cheap to make: one noise field, shifted per image."""
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 8, (256, 400, 3)).astype(np.float32)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            wnid = f"n{c + 1:08d}"
            (root / split / wnid).mkdir(parents=True)
            tint = np.array([(c * 67) % 256, (c * 131) % 256, (c * 197) % 256], np.float32)
            for i in range(per_class):
                w = 256 + int(rng.integers(0, 65))
                coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, 256))
                x0 = int(rng.integers(0, 400 - w + 1))
                img = 0.6 * np.asarray(coarse, np.float32) + 0.4 * tint + noise[:, x0 : x0 + w]
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    root / split / wnid / f"{wnid}_{i}.JPEG", quality=90
                )
    (root / "LOC_synset_mapping.txt").write_text("".join(f"n{c + 1:08d} class {c}\n" for c in range(CLASSES)))


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("ilsvrc")
    write_ilsvrc(tmp / "src")
    opts = BuildOptions(resize_to=256, quality=90, shard_size=TRAIN_PER_CLASS, processes=2)
    built = {m.split: m for m in build(tmp / "src", str(tmp / "shards"), opts)}
    assert built["train"].num_samples == CLASSES * TRAIN_PER_CLASS and built["train"].image_size == 256
    assert built["val"].num_samples == CLASSES * VAL_PER_CLASS
    return {split: m.url for split, m in built.items()}


def paper_spec(manifests: dict[str, str], storage: Path) -> JobSpec:
    overrides = {
        "data.train": manifests["train"],
        "data.val": manifests["val"],
        "data.loader_workers": 1,  # the spec's 16 decode processes are for a GPU node
        "model.num_classes": CLASSES,
        "train.epochs": 2,
        "train.batch_size": BATCH,
        "train.max_steps_per_epoch": STEPS,
        "train.log_every_steps": 1,
        "scaling.workers": 1,
        "scaling.devices": "cpu",
        "scaling.cpus_per_worker": 2,
        "checkpoint.storage": str(storage),
        "checkpoint.every_steps": EVERY,
        "checkpoint.keep": 10,
    }
    return load_spec(
        ROOT / "jobs" / "imagenet-paper.toml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    )


def events(text: str) -> list[dict]:
    prefix = "[alexnet-dist] "
    return [json.loads(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)]


def newest_checkpoint(run_dir: Path) -> Path:
    found = [p for p in run_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    return max(found, key=lambda p: tuple(int(x) for x in p.name.split("_")[1:]))


def test_the_spec_keeps_the_paper_recipe(manifests, tmp_path) -> None:
    spec = paper_spec(manifests, tmp_path)
    cfg = model_config(spec)
    assert (spec.model.preset, cfg.image_size, cfg.channels, cfg.fc_units, cfg.dropout) == (
        "paper", 227, (96, 256, 384, 384, 256), 4096, 0.5
    )  # fmt: skip
    o = spec.optim
    assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.lr_decay, o.warmup_epochs) == (
        0.01, 0.9, 0.0005, "plateau", 0.1, 0.0
    )  # fmt: skip
    assert spec.train.ten_crop_eval and spec.data.pca_lighting == 0.1 and spec.train.val_every_epochs == 1


def test_paper_recipe_trains_is_killed_resumes_and_ends_with_ten_crops(manifests, tmp_path, capsys) -> None:
    storage = tmp_path / "runs"
    spec = paper_spec(manifests, storage)
    settings = Settings(storage_root=f"file://{storage}")

    # 1. a run killed at global step 7: a real process exit, one step after the checkpoint at step 6
    marker = tmp_path / "killed"
    args = tmp_path / "child.json"
    fault = {"rank": 0, "global_step": KILL_AT, "marker": str(marker)}
    args.write_text(
        json.dumps({"spec": spec.to_json(), "run": "paper", "root": f"file://{storage}", "fault": fault})
    )
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(args)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 1 and marker.read_text() == str(KILL_AT), (
        child.stdout[-3000:] + child.stderr[-3000:]
    )
    killed = events(child.stdout)
    assert [(e["epoch"], e["step"]) for e in killed if e["type"] == "step"][-1] == (2, EVERY)  # then killed
    last = newest_checkpoint(storage / "paper")
    meta = json.loads((last / "meta.json").read_text())
    assert (meta["epoch"], meta["step"], meta["global_step"]) == (1, EVERY, STEPS + EVERY)  # epoch 2, mid-way
    saved = read_checkpoint(last)
    assert len(saved["history"]) == 1 and saved["history"][0]["val_samples"] == CLASSES * VAL_PER_CLASS

    # 2. the same run name resumes from that checkpoint and finishes
    capsys.readouterr()
    result = run_local(spec, run_name="paper", settings=settings)
    out = events(capsys.readouterr().out)
    (resumed,) = [e for e in out if e["type"] == "resumed"]
    assert (resumed["epoch"], resumed["step"], resumed["global_step"]) == (1, EVERY, STEPS + EVERY)
    steps = [e for e in out if e["type"] == "step"]
    assert [(e["epoch"], e["step"]) for e in steps] == [(2, s) for s in range(EVERY + 1, STEPS + 1)]
    assert result.steps == 2 * STEPS and result.epochs == 2
    assert [h["epoch"] for h in result.history] == [1, 2]  # grew from the checkpoint's one epoch
    assert result.history[0]["val_top1_error"] == saved["history"][0]["val_top1_error"]

    # 3. the final evaluation: ten 227 px crops per validation image, each image counted once
    assert result.ten_crop and result.val_samples == CLASSES * VAL_PER_CLASS
    assert 0.0 <= result.top5_error <= result.top1_error <= 1.0
    assert all(0.0 <= h["val_top5_error"] <= h["val_top1_error"] <= 1.0 for h in result.history)
    (final,) = [e for e in out if e["type"] == "final"]
    assert final["ten_crop"] and final["steps"] == 2 * STEPS
    sidecar = json.loads((storage / "paper" / "model.json").read_text())
    assert sidecar["preset"] == "paper" and sidecar["result"]["ten_crop"] is True
    assert (storage / "paper" / "model.pt").stat().st_size > 4 * 50_000_000  # 56.9 M float32 parameters

    # 4. the same weights as a run never interrupted: the resume continued exactly where it stopped
    reference = run_local(spec, run_name="uninterrupted", settings=settings)
    assert reference.steps == result.steps and reference.top1_error == result.top1_error
    a = read_checkpoint(newest_checkpoint(storage / "uninterrupted"))["model"]
    b = read_checkpoint(newest_checkpoint(storage / "paper"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
