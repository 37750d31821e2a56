"""`alexnet-dist export`: a model file -> ONNX / TorchScript that run without this package.

Models are untrained (random He-normal weights, which give input-dependent logits) and saved as model
files, exported through the real entry point, and run with onnxruntime or ``torch.jit.load``. The test
images are Fashion-MNIST test images written out as PNG and JPEG files, as ``scripts/demo.sh`` does; they
are preprocessed from the exported file's metadata alone (PIL and numpy), and the exported graph's top-5
must equal ``alexnet-dist classify``'s on every one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from alexnet_dist import __version__
from alexnet_dist.artifacts import export as export_module
from alexnet_dist.artifacts.classify import LoadedModel, classify_images, image_views, load_model, read_image
from alexnet_dist.artifacts.export import PREPROCESS_FILE, export_torchscript, plain_model
from alexnet_dist.cli import app
from alexnet_dist.data.build.fashion_mnist import CLASSES, load_split
from alexnet_dist.errors import ConfigError, NotFoundError, StorageError
from alexnet_dist.model.config import PRESETS, AlexNetConfig
from alexnet_dist.model.file import IMAGENET_MEAN_BGR, save_model_file
from alexnet_dist.model.network import AlexNet
from alexnet_dist.settings import Settings

EXE = Path(sys.executable).parent / "alexnet-dist"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = [72.9, 72.9, 72.9], [90.0, 90.0, 90.0]  # Fashion-MNIST's pixel statistics, about
RTOL = 1e-4
# torch 2.14 marks torch.jit deprecated; loading TorchScript is what this file tests
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")


def _config(preset: str) -> AlexNetConfig:
    """The preset's network with He-normal weights: the paper's N(0, 0.01) gives near-constant logits."""
    return AlexNetConfig.from_dict({**PRESETS[preset].to_dict(), "init": "kaiming"})


def _model_file(path: Path, preset: str, num_classes: int, preprocess: dict, classes: list[str]) -> Path:
    torch.manual_seed(11)
    cfg = _config(preset)
    meta = {
        "config": cfg.to_dict(),
        "num_classes": num_classes,
        "preprocess": preprocess,
        "classes": classes,
        "source": {"job": "export-test", "epoch": 0},
    }
    return save_model_file(path, AlexNet(num_classes, config=cfg), meta)


SMALL_PRE = {
    "channel_order": "RGB",
    "scale": 255.0,
    "mean": MEAN,
    "std": STD,
    "resize": 36,
    "resize_mode": "shorter",
    "crop": 32,
}
# Caffe's bvlc_alexnet preprocessing (interop.caffe): BGR, mean pixel, warped to 256, cropped to 227
PAPER_PRE = {
    "channel_order": "BGR",
    "scale": 255.0,
    "mean": list(IMAGENET_MEAN_BGR),
    "std": [1.0, 1.0, 1.0],
    "resize": 256,
    "resize_mode": "warp",
    "crop": 227,
}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small")
    return _model_file(folder / "model.pt", "small", 10, SMALL_PRE, list(CLASSES))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Twelve Fashion-MNIST test images as files, PNG and JPEG in turn (as the demo writes them)."""
    folder = tmp_path_factory.mktemp("images")
    pixels, labels = load_split(FASHION_MNIST, "test")
    paths = []
    for i in range(12):
        name = CLASSES[labels[i]].replace("/", "-").replace(" ", "-").lower()
        path = folder / f"test{i:02d}-{name}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels[i]).save(path)
        paths.append(path)
    return paths


def _export(model: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(EXE), "export", str(model), "-o", str(out), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ALEXNET_DIST_REDIS_URL": "redis://127.0.0.1:1/0"},  # never a job lookup
        timeout=180,
    )


# --------------------------------------------------------------------------------------------------
# what a program without alexnet-dist does with the file: metadata -> input


def _preprocess(path: Path, md: dict[str, Any]) -> np.ndarray:
    """One image file -> the graph's [3, S, S] float32 input, from the exported metadata with PIL alone."""
    img = Image.open(path).convert("RGB")
    side = md["crop"]
    if "resize" in md:
        size = md["resize"]
        if md["resize_mode"] == "warp":
            img = img.resize((size, size), Image.BILINEAR)
        else:
            ratio = size / min(img.size)
            img = img.resize(
                (max(side, round(img.width * ratio)), max(side, round(img.height * ratio))), Image.BILINEAR
            )
    left, top = (img.width - side) // 2, (img.height - side) // 2
    a = np.asarray(img.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0
    if md["channel_order"] == "BGR":
        a = a[:, :, ::-1]
    a = (a * md["scale"] - np.asarray(md["mean"], np.float32)) / np.asarray(md["std"], np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32)


def _onnx_metadata(path: Path) -> tuple[onnx.ModelProto, dict[str, Any]]:
    proto = onnx.load(str(path))
    return proto, {p.key: json.loads(p.value) for p in proto.metadata_props}


def _top5(logits: np.ndarray) -> list[list[int]]:
    return np.argsort(-logits, axis=1, kind="stable")[:, :5].tolist()


def _check_logits(got: np.ndarray, expected: np.ndarray) -> float:
    """Agreement to RTOL, with an absolute floor of 1e-5 of the logits' scale; returns the max difference."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-5 * scale)
    return float(np.abs(got - expected).max())


def _check_images(run, md: dict[str, Any], loaded: LoadedModel, images: list[Path]) -> None:
    """Inputs built from ``md`` equal the package's own, and ``run`` (batch -> logits) ranks as classify."""
    ours = np.stack([_preprocess(p, md) for p in images])
    package = torch.stack([image_views(read_image(p), loaded.meta["preprocess"]) for p in images]).numpy()
    np.testing.assert_allclose(ours, package, rtol=0, atol=1e-5)  # the metadata is enough to feed it
    logits = run(ours)
    assert logits.shape == (len(images), loaded.model.num_classes)
    with torch.no_grad():
        _check_logits(logits, loaded.model(torch.from_numpy(package)).numpy())
    classified = classify_images(loaded, images)
    assert _top5(logits) == [[p.index for p in r.top] for r in classified]
    names = md["class_names"]
    assert [[names[i] for i in top] for top in _top5(logits)] == [[p.name for p in r.top] for r in classified]


def _check_batches(run, loaded: LoadedModel, crop: int, batches: tuple[int, ...]) -> float:
    """Logits of random batches (sizes other than the traced one) against the model itself."""
    net = loaded.model
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    for n in batches:
        x = torch.randn(n, 3, crop, crop, generator=gen)
        with torch.no_grad():
            expected = net(x).numpy()
        worst = max(worst, _check_logits(run(x.numpy()), expected))
    return worst


def _check_common(md: dict[str, Any], model: Path, pre: dict[str, Any]) -> None:
    assert md["mean"] == pre["mean"] and md["std"] == pre["std"]
    assert md["channel_order"] == pre["channel_order"] and md["scale"] == pre["scale"]
    assert md["crop"] == md["input_size"] == pre["crop"]
    assert md["resize"] == pre["resize"] and md["resize_mode"] == pre["resize_mode"]
    assert md["source"] == str(model)
    assert md["trained"] == {"job": "export-test", "epoch": 0}
    assert md["alexnet_dist_version"] == __version__
    assert md["input"] == {
        "name": "input",
        "shape": ["batch", 3, pre["crop"], pre["crop"]],
        "dtype": "float32",
    }


def _onnx_runner(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["logits"], {"input": x})[0]


# --------------------------------------------------------------------------------------------------
# ONNX


def test_onnx_export_runs_in_onnxruntime_like_the_model(small_model, images, tmp_path) -> None:
    out = tmp_path / "exported" / "fashion.onnx"  # the folder is created
    proc = _export(small_model, out)
    assert proc.returncode == 0, proc.stderr
    size = out.stat().st_size
    assert proc.stdout.strip() == (
        f"wrote {out} (onnx, {size / 1e6:.1f} MB): {small_model}, "
        "input [N, 3, 32, 32] float32 -> logits [N, 10]"
    )
    assert [p.name for p in out.parent.iterdir()] == ["fashion.onnx"]  # no temporary file left
    proto, md = _onnx_metadata(out)
    onnx.checker.check_model(proto)
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "input" and dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert md["class_names"] == list(CLASSES) and md["num_classes"] == 10 and md["preset"] == "small"
    _check_common(md, small_model, SMALL_PRE)
    assert "centre crop 32" in proto.doc_string
    run = _onnx_runner(out)
    loaded = load_model(str(small_model), settings=Settings())
    _check_batches(run, loaded, 32, (1, 7))  # traced with a batch of 2
    _check_images(run, md, loaded, images)


def test_paper_preset_exports_to_onnx_with_imagenet_names(images, tmp_path) -> None:
    wnids = [f"n{i:08d}" for i in range(1000)]  # bare ids: exported with torchvision's readable names
    model = _model_file(tmp_path / "paper.pt", "paper", 1000, PAPER_PRE, wnids)
    out = tmp_path / "paper.onnx"
    proc = _export(model, out, "--format", "onnx", "--opset", "18")
    assert proc.returncode == 0, proc.stderr
    assert "logits [N, 1000]" in proc.stdout
    proto, md = _onnx_metadata(out)
    assert proto.opset_import[0].version == 18
    assert len(md["class_names"]) == 1000 and md["class_names"][0] == "tench" and md["preset"] == "paper"
    _check_common(md, model, PAPER_PRE)
    run = _onnx_runner(out)
    loaded = load_model(str(model), settings=Settings())
    _check_batches(run, loaded, 227, (3,))
    _check_images(run, md, loaded, images[:4])


# --------------------------------------------------------------------------------------------------
# TorchScript


def test_torchscript_export_loads_with_torch_jit_and_its_preprocess_json(
    small_model, images, tmp_path
) -> None:
    out = tmp_path / "fashion.pt"  # .pt is TorchScript for export
    proc = _export(small_model, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out} (torchscript, ")
    extra = {PREPROCESS_FILE: ""}
    scripted = torch.jit.load(str(out), map_location="cpu", _extra_files=extra)
    md = json.loads(extra[PREPROCESS_FILE])
    assert md["class_names"] == list(CLASSES) and md["num_classes"] == 10
    _check_common(md, small_model, SMALL_PRE)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.from_numpy(x)).numpy()

    loaded = load_model(str(small_model), settings=Settings())
    _check_batches(run, loaded, 32, (1, 7))
    _check_images(run, md, loaded, images)


# --------------------------------------------------------------------------------------------------
# the plain-operator network, bad input, atomic writes


@pytest.mark.parametrize(("span", "size"), [("tower", 5), ("all", 5), ("tower", 4)])
def test_plain_model_computes_what_the_model_does_and_leaves_it_alone(span, size) -> None:
    torch.manual_seed(4)
    cfg = AlexNetConfig.from_dict({**_config("small").to_dict(), "lrn_span": span, "lrn_size": size})
    model = AlexNet(10, config=cfg).eval()
    plain = plain_model(model)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        _check_logits(plain(x).numpy(), model(x).numpy())
    assert type(model.tower_a.lrn).__name__ == "LocalResponseNorm"  # the original keeps its kernels
    assert type(plain.tower_a.pool) is torch.nn.MaxPool2d
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters(), strict=True))


def _invoke(args: list[str]):
    return CliRunner().invoke(app, ["export", *args], env={"ALEXNET_DIST_REDIS_URL": "redis://127.0.0.1:1/0"})


def test_bad_format_missing_model_or_overwriting_the_model_are_one_line_errors(small_model, tmp_path) -> None:
    cases = [
        ([str(small_model), "-o", str(tmp_path / "m.bin")], ConfigError, "cannot tell the format"),
        ([str(small_model), "-o", str(tmp_path / "m.onnx"), "--format", "tflite"], ConfigError, "--format"),
        ([str(small_model), "-o", str(tmp_path / "m.pt"), "--opset", "17"], ConfigError, "only for ONNX"),
        ([str(small_model), "-o", str(small_model)], ConfigError, "is the model file MODEL names"),
        ([str(small_model.parent), "-o", str(small_model)], ConfigError, "is the model file MODEL names"),
        ([str(small_model), "-o", str(tmp_path / "m.onnx"), "--opset", "17"], ConfigError, "use 18 to"),
        ([str(tmp_path / "nope.pt"), "-o", str(tmp_path / "m.onnx")], NotFoundError, "not found"),
    ]
    before = small_model.read_bytes()
    for args, kind, words in cases:
        result = _invoke(args)
        assert isinstance(result.exception, kind), (args, result.output)
        assert words in str(result.exception) and "\n" not in str(result.exception)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written
    assert small_model.read_bytes() == before
    # through the real entry point: one line on stderr and the error's exit code
    proc = _export(small_model, tmp_path / "m.onnx", "--format", "tflite")
    assert proc.returncode == ConfigError.exit_code
    assert proc.stderr.strip().splitlines() == [
        "alexnet-dist: error: --format tflite: unknown; use one of onnx, torchscript"
    ]


def test_explicit_format_and_a_failed_write_leaves_the_earlier_file(
    small_model, tmp_path, monkeypatch
) -> None:
    out = tmp_path / "model.bin"
    result = _invoke([str(small_model), "-o", str(out), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    first = out.read_bytes()
    torch.jit.load(str(out))  # a whole TorchScript file

    def no_space(src: str | os.PathLike, dst: str | os.PathLike) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.os, "replace", no_space)
    loaded = load_model(str(small_model), settings=Settings())
    with pytest.raises(StorageError, match="No space left on device"):
        export_torchscript(loaded, out)
    assert out.read_bytes() == first  # the earlier export is intact
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]  # and the temporary file is gone
