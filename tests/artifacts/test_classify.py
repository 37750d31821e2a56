"""`alexnet-dist classify`: image files -> top-5 classes, for every kind of MODEL.

The fast tests use a small untrained network saved as a model file. The slow ones train a real job on a
local Ray (one fit, ~40 s) with its events going to a real redis-server, write the test split's images
out of the shards as files, and check that classifying them through the CLI gives exactly the accuracy
the job reported on them.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from jobspecs import cpu_spec
from PIL import Image
from typer.testing import CliRunner

from alexnet_dist.artifacts.classify import class_names, image_views, load_model, read_image
from alexnet_dist.cli import app
from alexnet_dist.data import augment
from alexnet_dist.errors import NotFoundError
from alexnet_dist.model.config import PRESETS
from alexnet_dist.model.file import save_model_file
from alexnet_dist.model.network import build_model
from alexnet_dist.settings import Settings

MEAN, STD = [72.9, 72.9, 72.9], [90.0, 90.0, 90.0]  # Fashion-MNIST's pixel statistics, about


def _meta(num_classes: int = 10, classes: list[str] | None = None) -> dict:
    return {
        "config": PRESETS["small"].to_dict(),
        "num_classes": num_classes,
        "preprocess": {
            "channel_order": "RGB",
            "scale": 255.0,
            "mean": MEAN,
            "std": STD,
            "resize": 36,
            "resize_mode": "shorter",
            "crop": 32,
        },
        "classes": classes or [f"class {i}" for i in range(num_classes)],
        "source": {"test": True},
    }


@pytest.fixture
def model_file(tmp_path) -> Path:
    torch.manual_seed(3)
    return save_model_file(tmp_path / "model.pt", build_model("small", num_classes=10), _meta())


def _images(folder: Path, n: int, size: tuple[int, int] = (36, 36)) -> list[Path]:
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _classify(args: list[str], env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, ["classify", *args], env=env)
    doc = json.loads(result.stdout) if "--json" in args and result.stdout.strip() else None
    return result, doc


def _accuracy(doc: dict, labels: dict[str, int]) -> tuple[int, int, int]:
    """(images classified, top-1 correct, top-5 correct) for files named by their sample key."""
    done = [r for r in doc["results"] if r["error"] is None]
    truth = [labels[Path(r["image"]).stem] for r in done]
    top1 = sum(r["top"][0]["index"] == y for r, y in zip(done, truth, strict=True))
    top5 = sum(y in [p["index"] for p in r["top"]] for r, y in zip(done, truth, strict=True))
    return len(done), top1, top5


# --------------------------------------------------------------------------------------------------
# fast: an untrained small network


def test_ten_crop_views_are_the_evaluation_pipelines_and_its_centre_is_the_central_crop(tmp_path) -> None:
    (jpg,) = _images(tmp_path, 1, size=(36, 36))
    pre = _meta()["preprocess"]
    ten = image_views(read_image(jpg), pre, ten_crop=True)
    central = image_views(read_image(jpg), pre)
    assert ten.shape == (10, 3, 32, 32) and central.shape == (3, 32, 32)
    assert torch.equal(ten[4], central)  # torchvision's order: 4 corners, then the centre
    # what evaluation computes from the same file: decode, ten crops, (x - mean) / std
    u8 = augment.ten_crop(augment.decode_image(jpg.read_bytes()), 32)
    expected = augment.normalize(u8[None], torch.zeros(1, 3), MEAN, STD, device="cpu")[0]
    assert torch.equal(ten, expected)
    # a non-square image: shorter side to 36, crops from the whole resized image
    (tmp_path / "wide").mkdir()
    (wide,) = _images(tmp_path / "wide", 1, size=(72, 36))
    views = image_views(read_image(wide), pre, ten_crop=True)
    assert torch.equal(views[4], image_views(read_image(wide), pre))
    assert not torch.equal(views[0], views[4])


def test_corrupt_and_non_image_files_get_their_error_and_the_rest_are_classified(
    model_file, tmp_path
) -> None:
    good = _images(tmp_path, 5)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good[0].read_bytes()[:200])  # a JPEG cut short
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    files = [good[0], corrupt, *good[1:3], text, tmp_path / "missing.png", *good[3:]]
    result, doc = _classify([str(model_file), *map(str, files), "--json"])
    assert result.exit_code == 1  # some failed; all are reported
    assert [r["image"] for r in doc["results"]] == [str(f) for f in files]  # the order given
    errors = {Path(r["image"]).name: r["error"] for r in doc["results"] if r["error"]}
    assert sorted(errors) == ["corrupt.jpg", "missing.png", "notes.jpg"]
    assert errors["corrupt.jpg"].startswith(f"{corrupt}: corrupt image")
    assert errors["notes.jpg"] == f"{text}: not an image (no decoder recognises it); skipped"
    assert errors["missing.png"].startswith(f"{tmp_path / 'missing.png'}: cannot read")
    assert all("\n" not in e for e in errors.values())
    assert all(f"alexnet-dist: error: {e}" in result.stderr.splitlines() for e in errors.values())
    # the five good images: the network's own softmax, top-5 in order
    model = load_model(str(model_file), settings=Settings()).model
    x = torch.stack([image_views(read_image(p), _meta()["preprocess"]) for p in good])
    with torch.no_grad():
        probs = model(x).softmax(dim=1)
    done = [r for r in doc["results"] if not r["error"]]
    assert len(done) == 5
    for r, p in zip(done, probs, strict=True):
        values, indices = p.topk(5)
        assert [t["index"] for t in r["top"]] == indices.tolist()
        assert [t["name"] for t in r["top"]] == [f"class {i}" for i in indices.tolist()]
        assert np.allclose([t["probability"] for t in r["top"]], values.tolist(), atol=1e-6)


def test_table_output_and_top_option(model_file, tmp_path) -> None:
    images = _images(tmp_path, 2)
    result, _ = _classify([str(model_file), *map(str, images), "--top", "3", "--ten-crop"])
    assert result.exit_code == 0, result.output
    assert "ten crops" in result.stdout and result.stdout.count("│ class ") == 6


def test_imagenet_names_for_1000_classes_and_manifest_names_otherwise() -> None:
    wnids = [f"n{i:08d}" for i in range(1000)]
    names = class_names(_meta(1000, wnids))
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    assert class_names(_meta(3, ["shirt", "bag", "boot"])) == ["shirt", "bag", "boot"]
    assert class_names({"num_classes": 2, "classes": []}) == ["0", "1"]


def test_model_file_from_s3_or_file_url_or_run_folder(model_file, tmp_path, s3) -> None:
    images = [str(p) for p in _images(tmp_path, 3)]
    bucket = s3.make_bucket("models")
    s3.client().put_object(Bucket=bucket, Key="runs/r1/model.pt", Body=model_file.read_bytes())
    _, local = _classify([str(model_file), *images, "--json"])
    for where in (
        f"s3://{bucket}/runs/r1/model.pt",
        f"s3://{bucket}/runs/r1",
        f"file://{model_file}",
        str(tmp_path),
    ):
        result, doc = _classify([where, *images, "--json"])
        assert result.exit_code == 0, (where, result.output)
        assert doc["results"] == local["results"], where


def test_unknown_model_says_what_model_may_be(tmp_path, redis_url) -> None:
    env = {"ALEXNET_DIST_REDIS_URL": redis_url}
    (image,) = _images(tmp_path, 1)
    result, _ = _classify(["no-such-job", str(image)], env)
    assert isinstance(result.exception, NotFoundError)
    assert str(result.exception) == (
        "no-such-job: no such file, directory or job; MODEL is a model file (.pt, .caffemodel), a "
        "checkpoint or run directory, an s3:// or file:// URL of one, or a job id"
    )
    # through the real entry point: one line on stderr and the error's exit code
    exe = Path(os.sys.executable).parent / "alexnet-dist"
    proc = subprocess.run(
        [str(exe), "classify", str(tmp_path / "nope.pt"), str(image)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert proc.returncode == NotFoundError.exit_code == 5
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith(f"alexnet-dist: error: {tmp_path / 'nope.pt'}: not found")
    )


# --------------------------------------------------------------------------------------------------
# slow: a job trained on Ray, classified through Redis


@pytest.fixture(scope="module")
def trained(tmp_path_factory, redis_server, s3_server):
    """One real job: shards, a 1-epoch run on 2 Ray Train workers, events and result in Redis."""
    import ray

    from alexnet_dist.data.build.writer import BuildOptions, build
    from alexnet_dist.service.connection import connect
    from alexnet_dist.service.events import job_events
    from alexnet_dist.service.store import JobState, JobStore
    from alexnet_dist.training.driver import run_training

    root = tmp_path_factory.mktemp("classify")
    manifests = {}
    for split, limit, size in (("train", 2000, 500), ("test", 400, 100)):
        (m,) = build(
            "/usr/share/datasets/fashion-mnist",
            str(root / "shards"),
            BuildOptions(resize_to=36, shard_size=size, limit=limit, processes=1),
            fmt="fashion-mnist",
            split=split,
        )
        manifests[split] = m
    spec = cpu_spec(
        manifests["train"].url,
        manifests["test"].url,
        str(root / "runs"),
        name="classify-test",
        seed=11,
        train__epochs=1,
        train__log_every_steps=20,
        checkpoint__every_steps=0,
        checkpoint__keep=2,
    )
    prefix = "classify-test:"
    settings = Settings(redis_url=redis_server.url, redis_prefix=prefix)
    queue = JobStore(connect(redis_server.url), prefix=prefix)
    job, _ = queue.submit(spec)
    os.environ["RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS"] = "0"
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    try:
        events = job_events(redis_server.url, queue.keys, job.id)
        result = run_training(spec, run_name=job.id, settings=settings, events=events)
    finally:
        ray.shutdown()
    queue.transition(queue.get(job.id), JobState.SUCCEEDED, message="trained by the test")
    queue.store_result(job.id, result.to_dict())

    # the test split as ordinary files, exactly the bytes evaluation decoded
    images, labels = root / "images", {}
    images.mkdir()
    for shard in manifests["test"].shards:
        with tarfile.open(shard.url.removeprefix("file://")) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if ext == "jpg":
                    (images / f"{key}.jpg").write_bytes(data)
                elif ext == "cls":
                    labels[key] = int(data)
    env = {"ALEXNET_DIST_REDIS_URL": redis_server.url, "ALEXNET_DIST_REDIS_PREFIX": prefix}
    return {
        "job": job.id,
        "result": result,
        "images": images,
        "labels": labels,
        "env": env,
        "root": root,
        "manifest": manifests["test"],
        "train_manifest": manifests["train"],
        "settings": settings,
    }


@pytest.mark.slow
def test_classify_job_agrees_with_the_accuracy_it_reported(trained, tmp_path) -> None:
    result = trained["result"]
    assert result.val_samples == 400 and not result.ten_crop
    # it learnt something (chance: 0.9 and 0.5; measured 0.585 and 0.07), so agreement means something
    assert result.top1_error < 0.75 and result.top5_error < 0.3
    files = sorted(trained["images"].glob("*.jpg"))
    assert len(files) == 400
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(files[0].read_bytes()[:150])
    args = [trained["job"], *map(str, files[:200]), str(corrupt), *map(str, files[200:]), "--json"]
    out, doc = _classify(args, trained["env"])
    assert out.exit_code == 1
    assert doc["model"] == f"job {trained['job']} -> {result.model_url}"
    assert [r["image"] for r in doc["results"] if r["error"]] == [str(corrupt)]
    done, top1, top5 = _accuracy(doc, trained["labels"])
    print(
        f"job top-1 error {result.top1_error:.4f}, top-5 {result.top5_error:.4f} on 400; classify: "
        f"{top1}/400 top-1, {top5}/400 top-5 correct"
    )
    assert done == 400
    assert top1 == round((1 - result.top1_error) * 400)  # the very images, the very answers
    assert top5 == round((1 - result.top5_error) * 400)
    names = {t["name"] for r in doc["results"] for t in r["top"]}
    assert "Ankle boot" in names or "ankle boot" in {n.lower() for n in names}


@pytest.mark.slow
def test_ten_crop_agrees_with_ten_crop_evaluation(trained) -> None:
    from alexnet_dist.data.loader import LoaderConfig, make_loader
    from alexnet_dist.training.evaluation import evaluate

    model_url = trained["result"].model_url
    loaded = load_model(model_url, settings=Settings())
    train_manifest = trained["train_manifest"]  # normalisation uses the training pixels' statistics
    cfg = LoaderConfig(
        batch_size=64, crop=32, mode="ten_crop", seed=0, num_workers=0, shuffle_buffer=0, pca_lighting=0.0
    )
    loader = make_loader(trained["manifest"], cfg, rank=0, world_size=1)
    expected = evaluate(loaded.model, loader, train_manifest.mean, train_manifest.std, devices=("cpu", "cpu"))
    files = sorted(map(str, trained["images"].glob("*.jpg")))
    out, doc = _classify([model_url, *files, "--ten-crop", "--json"])
    assert out.exit_code == 0, out.output
    done, top1, top5 = _accuracy(doc, trained["labels"])
    print(f"ten-crop: evaluation {expected.top1_correct}/{expected.samples}, classify {top1}/{done}")
    assert (done, top1, top5) == (expected.samples, expected.top1_correct, expected.top5_correct)


@pytest.mark.slow
def test_checkpoint_and_run_folder_give_the_model_files_answers(trained) -> None:
    result = trained["result"]
    files = sorted(map(str, trained["images"].glob("*.jpg")))[:40]
    _, by_file = _classify([result.model_url, *files, "--json"])
    run = Path(result.checkpoint_url.removeprefix("file://")).parent
    shutil.copytree(run, trained["root"] / "ckpt-only", ignore=shutil.ignore_patterns("model.*"))
    # a job still running has no model_url yet: its run's newest checkpoint answers (runs are named by job)
    from alexnet_dist.errors import QueueError
    from alexnet_dist.service.connection import connect
    from alexnet_dist.service.store import JobStore

    settings = trained["settings"]
    queue = JobStore(connect(settings.redis_url), prefix=settings.redis_prefix)
    running, _ = queue.submit(queue.get(trained["job"]).spec)
    with pytest.raises(QueueError, match=f"job {running.id}: QUEUED, no model or checkpoint yet"):
        load_model(running.id, settings=settings)
    shutil.copytree(run, run.parent / running.id, ignore=shutil.ignore_patterns("model.*"))
    for where in (result.checkpoint_url, str(trained["root"] / "ckpt-only"), running.id):
        out, doc = _classify([where, *files, "--json"], trained["env"])
        assert "checkpoint_" in doc["model"]
        assert out.exit_code == 0, out.output
        for a, b in zip(doc["results"], by_file["results"], strict=True):
            assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
            assert np.allclose(
                [t["probability"] for t in a["top"]], [t["probability"] for t in b["top"]], atol=1e-6
            )


@pytest.mark.slow
def test_plot_of_the_finished_job(trained, tmp_path) -> None:
    out = tmp_path / "curves.png"
    res = CliRunner().invoke(app, ["plot", trained["job"], "-o", str(out), "--json"], env=trained["env"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    history = trained["result"].history
    assert doc["epochs"] == [1] == [h["epoch"] for h in history]
    assert doc["source"] == f"job {trained['job']} (SUCCEEDED)"
    assert doc["train_loss"] == [pytest.approx(history[0]["train_loss"], rel=1e-3)]
    assert doc["val_top1_error"] == [pytest.approx(trained["result"].val_top1_error, abs=1e-3)]
    assert Image.open(io.BytesIO(out.read_bytes())).size == (1200, 380)
