"""Importing Caffe's bvlc_alexnet.

The tests write .caffemodel files themselves, byte by byte in protobuf wire format (a tiny encoder
below, independent of the reader under test), with bvlc_alexnet's layer names, parameters and shapes
and random weights, in both encodings: ``layer`` (V2: string types, ``shape`` blobs, packed floats)
and ``layers`` (V1: enum types, legacy num/channels/height/width blobs, unpacked floats). The imported
network must compute what Caffe computes, checked against a plain re-statement of Caffe's layers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alexnet_dist.artifacts.classify import load_model_path
from alexnet_dist.errors import CheckpointError, ConfigError
from alexnet_dist.interop.caffe import load_caffemodel, read_caffemodel, read_mean_file
from alexnet_dist.model.file import (
    IMAGENET_MEAN_BGR,
    imagenet_classes,
    load_model_file,
    preprocess_image,
    read_class_names,
)
from alexnet_dist.model.network import count_parameters

# --------------------------------------------------------------------------------------------------
# A protobuf encoder: just what caffe.proto's messages need.


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def f_int(num: int, value: int) -> bytes:
    return varint(num << 3) + varint(value)


def f_float(num: int, value: float) -> bytes:
    return varint(num << 3 | 5) + struct.pack("<f", value)


def f_bytes(num: int, data: bytes) -> bytes:
    return varint(num << 3 | 2) + varint(len(data)) + data


def f_str(num: int, text: str) -> bytes:
    return f_bytes(num, text.encode())


def blob(array: np.ndarray, legacy: bool) -> bytes:
    """A BlobProto: V2 style (``shape``, packed data) or legacy (4-D num/channels/..., unpacked data)."""
    array = np.ascontiguousarray(array, dtype="<f4")
    if not legacy:
        return f_bytes(7, f_bytes(1, b"".join(varint(d) for d in array.shape))) + f_bytes(5, array.tobytes())
    dims = (1,) * (4 - array.ndim) + array.shape
    records = np.empty(array.size, dtype=np.dtype([("tag", "u1"), ("value", "<f4")]))  # 5 bytes each
    records["tag"], records["value"] = 5 << 3 | 5, array.ravel()  # field 5 (data), wire type fixed32
    return b"".join(f_int(n, d) for n, d in zip((1, 2, 3, 4), dims, strict=True)) + records.tobytes()


# Field numbers in LayerParameter (V2) and V1LayerParameter; the parameter messages are shared.
V2 = {"name": 1, "type": 2, "bottom": 3, "top": 4, "blobs": 7, "convolution": 106, "inner_product": 117,
      "lrn": 118, "pooling": 121, "dropout": 108, "transform": 100, "relu": 123}  # fmt: skip
V1 = {"name": 4, "type": 5, "bottom": 2, "top": 3, "blobs": 6, "convolution": 10, "inner_product": 17,
      "lrn": 18, "pooling": 19, "dropout": 12, "transform": 36, "relu": 30}  # fmt: skip
V1_TYPES = {"Data": 5, "Convolution": 4, "ReLU": 18, "LRN": 15, "Pooling": 17, "InnerProduct": 14,
            "Dropout": 6, "SoftmaxWithLoss": 21, "Accuracy": 1}  # fmt: skip


@dataclass(frozen=True)
class Dims:
    channels: tuple[int, ...] = (96, 256, 384, 384, 256)  # bvlc_alexnet
    fc: int = 4096
    classes: int = 1000
    crop: int = 227
    lrn: tuple[int, float, float, float | None] = (5, 1e-4, 0.75, None)  # k unset: Caffe's default 1


BVLC = Dims()
TINY = Dims(channels=(8, 16, 24, 24, 16), fc=32, classes=10, crop=99)  # maps 23, 11, 5, 2
GROUPS = {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
GEOMETRY = {
    "conv1": (11, 4, 0),
    "conv2": (5, 1, 2),
    "conv3": (3, 1, 1),
    "conv4": (3, 1, 1),
    "conv5": (3, 1, 1),
}


def feature_side(crop: int) -> int:
    side = (crop - 11) // 4 + 1
    for _ in range(3):
        side = (side - 3) // 2 + 1
    return side


def random_weights(d: Dims, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Caffe-shaped weights, scaled by fan-in so activations stay near 1 through the network."""
    rng = np.random.default_rng(seed)
    ins = (3, *d.channels[:4])
    shapes: dict[str, tuple[int, ...]] = {}
    for i, name in enumerate(GROUPS):
        kernel = GEOMETRY[name][0]
        shapes[name] = (d.channels[i], ins[i] // GROUPS[name], kernel, kernel)
    shapes.update(
        fc6=(d.fc, d.channels[4] * feature_side(d.crop) ** 2), fc7=(d.fc, d.fc), fc8=(d.classes, d.fc)
    )
    out = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(1.5 / np.sqrt(fan_in))
        out[name] = (w, rng.standard_normal(shape[0], dtype=np.float32) * np.float32(0.1))
    return out


def alexnet_layers(d: Dims, weights: dict[str, Any], *, lrn_after_pool: bool = False) -> list[dict[str, Any]]:
    """bvlc_alexnet's train_val net, layer by layer (CaffeNet's order with ``lrn_after_pool``)."""
    size, alpha, beta, k = d.lrn
    lrn = f_int(1, size) + f_float(2, alpha) + f_float(3, beta) + (f_float(5, k) if k is not None else b"")
    pool = f_int(2, 3) + f_int(3, 2)  # MAX (the default, not written), kernel 3, stride 2
    transform = f_int(2, 1) + f_int(3, d.crop) + f_str(4, "data/ilsvrc12/imagenet_mean.binaryproto")
    layers: list[dict[str, Any]] = [{"name": "data", "type": "Data", "top": ["data", "label"],
                                     "transform": transform}]  # fmt: skip
    below = "data"
    for i in range(1, 6):
        name = f"conv{i}"
        kernel, stride, pad = GEOMETRY[name]
        conv = f_int(1, d.channels[i - 1]) + (f_int(3, pad) if pad else b"") + f_int(4, kernel)
        conv += (f_int(6, stride) if stride != 1 else b"") + (f_int(5, 2) if GROUPS[name] == 2 else b"")
        layers.append({"name": name, "type": "Convolution", "bottom": [below], "top": [name],
                       "convolution": conv, "blobs": weights[name]})  # fmt: skip
        layers.append({"name": f"relu{i}", "type": "ReLU", "bottom": [name], "top": [name]})
        below = name
        steps = [("norm", "LRN", lrn), ("pool", "Pooling", pool)] if i in (1, 2) else []
        steps = steps[::-1] if lrn_after_pool else steps
        steps += [("pool", "Pooling", pool)] if i == 5 else []
        for prefix, kind, param in steps:
            key = "lrn" if kind == "LRN" else "pooling"
            layers.append({"name": f"{prefix}{i}", "type": kind, "bottom": [below], "top": [f"{prefix}{i}"],
                           key: param})  # fmt: skip
            below = f"{prefix}{i}"
    for i in (6, 7, 8):
        name = f"fc{i}"
        ip = f_int(1, weights[name][0].shape[0])
        layers.append({"name": name, "type": "InnerProduct", "bottom": [below], "top": [name],
                       "inner_product": ip, "blobs": weights[name]})  # fmt: skip
        below = name
        if i < 8:
            layers.append({"name": f"relu{i}", "type": "ReLU", "bottom": [name], "top": [name]})
            layers.append({"name": f"drop{i}", "type": "Dropout", "bottom": [name], "top": [name],
                           "dropout": f_float(1, 0.5)})  # fmt: skip
    layers.append({"name": "loss", "type": "SoftmaxWithLoss", "bottom": ["fc8", "label"], "top": ["loss"]})
    return layers


def write_caffemodel(path: Path, layers: list[dict[str, Any]], *, v1: bool = False) -> Path:
    fields = V1 if v1 else V2
    with path.open("wb") as out:
        out.write(f_str(1, "AlexNet"))
        for layer in layers:
            body = f_str(fields["name"], layer["name"])
            body += (
                f_int(fields["type"], V1_TYPES[layer["type"]]) if v1 else f_str(fields["type"], layer["type"])
            )
            body += b"".join(f_str(fields["bottom"], b) for b in layer.get("bottom", []))
            body += b"".join(f_str(fields["top"], t) for t in layer.get("top", []))
            for key in ("convolution", "inner_product", "lrn", "pooling", "dropout", "transform", "relu"):
                if key in layer:
                    body += f_bytes(fields[key], layer[key])
            for array in layer.get("blobs", ()):
                body += f_bytes(fields["blobs"], blob(array, legacy=v1))
            out.write(f_bytes(2 if v1 else 100, body))
    return path


# --------------------------------------------------------------------------------------------------
# Caffe's forward pass, restated plainly: one device, grouped convolutions, Caffe's layer formulas.


def caffe_lrn(x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    """Caffe's LRNLayer, ACROSS_CHANNELS: x / (k + alpha/n * sum of squares over n channels)^beta."""
    half = (size - 1) // 2
    squares = F.pad(x * x, (0, 0, 0, 0, half, size - 1 - half))
    window = sum(squares[:, i : i + x.shape[1]] for i in range(size))
    return x / (k + alpha / size * window) ** beta


def caffe_forward(x: torch.Tensor, weights: dict[str, Any], d: Dims) -> torch.Tensor:
    size, alpha, beta, k = d.lrn
    lrn_args = (size, alpha, beta, 1.0 if k is None else k)
    w = {name: (torch.from_numpy(a), torch.from_numpy(b)) for name, (a, b) in weights.items()}
    for i in range(1, 6):
        name = f"conv{i}"
        kernel, stride, pad = GEOMETRY[name]
        x = F.relu(F.conv2d(x, *w[name], stride=stride, padding=pad, groups=GROUPS[name]))
        if i in (1, 2):
            x = caffe_lrn(x, *lrn_args)
        if i in (1, 2, 5):
            x = F.max_pool2d(x, 3, 2, ceil_mode=True)  # Caffe rounds pooled sizes up
    x = x.flatten(1)  # Caffe's InnerProduct reads the blob in (channel, row, column) order
    x = F.relu(F.linear(x, *w["fc6"]))  # dropout: identity at test time
    x = F.relu(F.linear(x, *w["fc7"]))
    return F.linear(x, *w["fc8"])


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def bvlc_weights() -> dict[str, Any]:
    return random_weights(BVLC, seed=8)


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, Any]:
    return random_weights(TINY, seed=3)


def tiny_file(tmp_path: Path, weights: dict[str, Any], d: Dims = TINY, **kw: Any) -> Path:
    return write_caffemodel(tmp_path / "tiny.caffemodel", alexnet_layers(d, weights), **kw)


# --------------------------------------------------------------------------------------------------
# Importing computes Caffe's function


@pytest.mark.slow  # 233 MiB files, 61M weights
@pytest.mark.parametrize("v1", [False, True], ids=["layer-V2-packed", "layers-V1-unpacked-legacy"])
def test_bvlc_alexnet_imports_and_matches_caffe(
    tmp_path: Path, bvlc_weights: dict[str, Any], v1: bool
) -> None:
    d = BVLC if not v1 else replace(BVLC, lrn=(5, 3e-4, 0.8, 2.0))  # V1 file: k and alpha set explicitly
    path = write_caffemodel(tmp_path / "bvlc_alexnet.caffemodel", alexnet_layers(d, bvlc_weights), v1=v1)
    net = read_caffemodel(path)
    assert net.encoding == ("layers (V1)" if v1 else "layer (V2)")
    assert len(net.layers) == 24  # data, 8 weighted, 7 ReLU, 2 LRN, 3 pool, 2 dropout, loss

    model, meta = load_caffemodel(path)
    cfg = model.config
    assert count_parameters(model) == 60_965_224  # the paper's network, as bvlc_alexnet
    assert (cfg.channels, cfg.fc_units, cfg.image_size, cfg.lrn_span) == (BVLC.channels, 4096, 227, "all")
    size, alpha, beta, k = d.lrn
    assert cfg.lrn_size == size and cfg.lrn_k == (1.0 if k is None else k)
    assert cfg.lrn_alpha == pytest.approx(alpha / size, rel=1e-6)  # Caffe divides alpha by n; we do not
    assert cfg.lrn_beta == pytest.approx(beta, rel=1e-6)
    assert meta["source"]["input_mean_file"].endswith("imagenet_mean.binaryproto")
    # The weights arrive where the towers expect them: conv2's second group is tower B.
    assert torch.equal(model.tower_b.conv2.weight, torch.from_numpy(bvlc_weights["conv2"][0][128:]))
    assert torch.equal(model.fc8.weight, torch.from_numpy(bvlc_weights["fc8"][0]))

    x = torch.randn(2, 3, 227, 227, generator=torch.Generator().manual_seed(0)) * 60  # like mean-free pixels
    with torch.no_grad():
        ours, ref = model(x), caffe_forward(x, bvlc_weights, d)
    assert ref.abs().max() > 1.0 and ref.std() > 0.1  # the reference is not trivially small
    assert relative_error(ours, ref) < 1e-5
    assert torch.equal(ours.argsort(dim=1)[:, -5:], ref.argsort(dim=1)[:, -5:])  # same top-5 per image


@pytest.mark.parametrize("v1", [False, True], ids=["layer-V2", "layers-V1"])
def test_small_variant_matches_caffe_with_2x2_pool5(
    tmp_path: Path, tiny_weights: dict[str, Any], v1: bool
) -> None:
    """Sizes come from the file (99 px crop, other widths); pool5 is 2x2, so fc6's input order matters."""
    model, meta = load_caffemodel(tiny_file(tmp_path, tiny_weights, v1=v1))
    assert model.config.map_sizes() == (23, 11, 5, 2)
    assert (model.config.channels, model.config.fc_units, model.num_classes) == (TINY.channels, 32, 10)
    assert meta["preprocess"]["crop"] == 99 and meta["classes"] == [str(i) for i in range(10)]
    x = torch.randn(2, 3, 99, 99, generator=torch.Generator().manual_seed(1)) * 60
    with torch.no_grad():
        assert relative_error(model(x), caffe_forward(x, tiny_weights, TINY)) < 1e-5


def test_renamed_layers_map_by_position(tmp_path: Path, tiny_weights: dict[str, Any]) -> None:
    """A fine-tuned net (Caffe's flickr_style example renames fc8 to fc8_flickr) still imports."""
    layers = alexnet_layers(TINY, tiny_weights)
    for layer in layers:
        if layer["name"] == "fc8":
            layer["name"] = layer["top"][0] = "fc8_flickr"
    layers[-1]["bottom"] = ["fc8_flickr", "label"]
    _, meta = load_caffemodel(write_caffemodel(tmp_path / "ft.caffemodel", layers))
    assert meta["source"]["layers"]["fc8"] == "fc8_flickr"


def bench_module() -> Any:
    """bench/caffe_import.py (a script, so loaded by path): the protobuf library's reader it times."""
    spec = importlib.util.spec_from_file_location(
        "bench_caffe_import", Path(__file__).parents[2] / "bench" / "caffe_import.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("v1", [False, True], ids=["layer-V2", "layers-V1"])
def test_protobuf_library_reads_what_the_hand_decoder_reads(
    tmp_path: Path, tiny_weights: dict[str, Any], v1: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The benchmark compares like with like: the library's parse gives the same net and model bit for bit."""
    pytest.importorskip("google.protobuf")
    from alexnet_dist.interop import caffe

    library_read = bench_module().protobuf_reader()
    path = tiny_file(tmp_path, tiny_weights, v1=v1)
    hand, library = read_caffemodel(path), library_read(path)
    assert (library.name, library.encoding, library.input_dims, library.sha256) == (
        hand.name, hand.encoding, hand.input_dims, hand.sha256,
    )  # fmt: skip
    assert len(library.layers) == len(hand.layers) == 24
    for ours, theirs in zip(hand.layers, library.layers, strict=True):
        assert (theirs.name, theirs.type, theirs.bottoms, theirs.tops) == (
            ours.name, ours.type, ours.bottoms, ours.tops,
        )  # fmt: skip
        assert sorted(theirs.params) == sorted(ours.params)
        assert len(theirs.blobs) == len(ours.blobs)
        for a, b in zip(ours.blobs, theirs.blobs, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    model, meta = load_caffemodel(path)
    monkeypatch.setattr(caffe, "read_caffemodel", library_read)
    library_model, library_meta = load_caffemodel(path)
    assert library_meta == meta
    state, library_state = model.state_dict(), library_model.state_dict()
    assert list(library_state) == list(state)
    assert all(torch.equal(library_state[k], state[k]) for k in state)


# --------------------------------------------------------------------------------------------------
# Refusals name the layer


def without(layers: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    return [layer for layer in layers if layer["name"] not in names]


@pytest.mark.parametrize(
    ("removed", "named"),
    [(("fc7", "relu7", "drop7"), "fc7"), (("conv3", "relu3"), "conv3"), (("conv1", "relu1"), "conv1")],
)
def test_missing_layer_is_refused_by_name(
    tmp_path: Path, tiny_weights: dict[str, Any], removed: tuple[str, ...], named: str
) -> None:
    path = write_caffemodel(tmp_path / "m.caffemodel", without(alexnet_layers(TINY, tiny_weights), *removed))
    with pytest.raises(CheckpointError, match=rf"layer {named} missing"):
        load_caffemodel(path)


def test_wrong_shape_is_refused_by_name(tmp_path: Path, tiny_weights: dict[str, Any]) -> None:
    bad = dict(tiny_weights, conv2=(np.zeros((16, 8, 5, 5), np.float32), tiny_weights["conv2"][1]))
    path = write_caffemodel(tmp_path / "m.caffemodel", alexnet_layers(TINY, bad), v1=True)
    with pytest.raises(
        CheckpointError, match=r"conv2: weights of shape \(16, 8, 5, 5\), expected \(16, 4, 5, 5\)"
    ):
        load_caffemodel(path)
    short = dict(tiny_weights, fc8=(tiny_weights["fc8"][0], np.zeros(9, np.float32)))
    path = write_caffemodel(tmp_path / "m.caffemodel", alexnet_layers(TINY, short))
    with pytest.raises(CheckpointError, match=r"fc8: biases of shape \(9,\), expected \(10,\)"):
        load_caffemodel(path)


def test_truncated_file_is_refused(tmp_path: Path, tiny_weights: dict[str, Any]) -> None:
    data = tiny_file(tmp_path, tiny_weights).read_bytes()
    refused = 0
    for fraction in (0.02, 0.3, 0.5, 0.9, 0.999):
        cut = tmp_path / f"cut{fraction}.caffemodel"
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(CheckpointError, match="truncated"):
            load_caffemodel(cut)
        refused += 1
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no layers"):
        load_caffemodel(tmp_path / "empty.caffemodel")
    assert refused == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("caffenet", r"after conv1 comes relu1 \(ReLU\), pool1 \(Pooling\), norm1 \(LRN\); AlexNet needs "
                     r"ReLU, LRN, Pooling"),
        ("ceil", r"pool1: Caffe's ceil-mode pooling gives 12x12 maps at 103px, ours 11x11"),
        ("group", r"conv4: group 1, but conv4 of the two-tower AlexNet needs group 2"),
        ("lrn", r"norm1, norm2: differ in LRN parameters"),
    ],
)  # fmt: skip
def test_networks_we_cannot_compute_the_same_are_refused(
    tmp_path: Path, tiny_weights: dict[str, Any], change: str, message: str
) -> None:
    d = replace(TINY, crop=103) if change == "ceil" else TINY
    weights = random_weights(d, 0) if change == "ceil" else tiny_weights
    if change == "group":
        weights = dict(weights, conv4=(np.zeros((24, 24, 3, 3), np.float32), weights["conv4"][1]))
    layers = alexnet_layers(d, weights, lrn_after_pool=change == "caffenet")
    for layer in layers:
        if change == "group" and layer["name"] == "conv4":
            layer["convolution"] = f_int(1, 24) + f_int(3, 1) + f_int(4, 3)  # no group: 2
        if change == "lrn" and layer["name"] == "norm2":
            layer["lrn"] += f_float(5, 2.0)
    with pytest.raises(CheckpointError, match=message):
        load_caffemodel(write_caffemodel(tmp_path / "m.caffemodel", layers))


def test_not_a_caffemodel_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.caffemodel").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match="HDF5"):
        load_caffemodel(tmp_path / "a.caffemodel")
    (tmp_path / "b.caffemodel").write_bytes(b'name: "AlexNet"\nlayer {\n  name: "data"\n}\n')  # a prototxt
    with pytest.raises(CheckpointError, match="b.caffemodel"):
        load_caffemodel(tmp_path / "b.caffemodel")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_caffemodel(tmp_path / "missing.caffemodel")


# --------------------------------------------------------------------------------------------------
# Preprocessing metadata, model files


def test_mean_pixel_sources(tmp_path: Path, tiny_weights: dict[str, Any]) -> None:
    path = tiny_file(tmp_path, tiny_weights)
    _, meta = load_caffemodel(path)
    assert meta["preprocess"]["mean"] == list(IMAGENET_MEAN_BGR)
    assert meta["preprocess"] | {"mean": None} == {"channel_order": "BGR", "scale": 255.0, "mean": None,
        "std": [1.0, 1.0, 1.0], "resize": 112, "resize_mode": "warp", "crop": 99}  # fmt: skip
    # A mean image like imagenet_mean.binaryproto (legacy 1x3xHxW, BGR): its channel means are used.
    image = np.stack([np.full((4, 4), v, np.float32) for v in (100.0, 110.0, 120.0)])
    image[0, 0, 0] = 116.0  # channel B: 15 x 100 + 116 over 16 = 101
    (tmp_path / "mean.binaryproto").write_bytes(blob(image, legacy=True))
    assert read_mean_file(tmp_path / "mean.binaryproto") == pytest.approx((101.0, 110.0, 120.0))
    _, meta = load_caffemodel(path, mean_file=tmp_path / "mean.binaryproto")
    assert meta["preprocess"]["mean"] == pytest.approx([101.0, 110.0, 120.0])
    _, meta = load_caffemodel(path, mean=(1.0, 2.0, 3.0))
    assert meta["preprocess"]["mean"] == [1.0, 2.0, 3.0] and meta["source"]["mean_from"] == "given (--mean)"
    # A data layer with mean_value (and scale) in its transform_param: taken from the model.
    layers = alexnet_layers(TINY, tiny_weights)
    layers[0]["transform"] += f_float(5, 104.0) + f_float(5, 117.0) + f_float(5, 123.0) + f_float(1, 0.5)
    _, meta = load_caffemodel(write_caffemodel(tmp_path / "mv.caffemodel", layers))
    assert meta["preprocess"]["mean"] == [104.0, 117.0, 123.0] and meta["preprocess"]["std"] == [2.0] * 3
    with pytest.raises(ConfigError, match="give one of them"):
        load_caffemodel(path, mean=(1.0, 2.0, 3.0), mean_file=tmp_path / "mean.binaryproto")


def test_class_names(tmp_path: Path, tiny_weights: dict[str, Any]) -> None:
    names = imagenet_classes()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
    weights = dict(tiny_weights, fc8=(np.zeros((1000, 32), np.float32), np.zeros(1000, np.float32)))
    path = write_caffemodel(tmp_path / "m.caffemodel", alexnet_layers(replace(TINY, classes=1000), weights))
    _, meta = load_caffemodel(path)
    assert meta["classes"] == names and meta["source"]["class_names"] == "ImageNet (torchvision)"
    (tmp_path / "synset_words.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius\n"
    )
    assert read_class_names(tmp_path / "synset_words.txt") == ["tench, Tinca tinca", "goldfish, Carassius"]
    with pytest.raises(ConfigError, match="2 names for a model with 1000 outputs"):
        load_caffemodel(path, classes=read_class_names(tmp_path / "synset_words.txt"))


def test_preprocess_image_is_bgr_0_255_minus_mean() -> None:
    image = Image.new("RGB", (300, 200), (200, 100, 50))
    pre = {"channel_order": "BGR", "scale": 255.0, "mean": [104.0, 117.0, 123.0], "std": [1.0] * 3,
           "resize": 256, "resize_mode": "warp", "crop": 227}  # fmt: skip
    x = preprocess_image(image, pre)
    assert x.shape == (3, 227, 227)
    assert x[:, 100, 100].tolist() == pytest.approx([50 - 104.0, 100 - 117.0, 200 - 123.0], abs=1e-3)
    rgb = preprocess_image(
        image, pre | {"channel_order": "RGB", "scale": 1.0, "mean": [0.5] * 3, "std": [0.25] * 3}
    )
    assert rgb[:, 0, 0].tolist() == pytest.approx([(200 / 255 - 0.5) / 0.25, (100 / 255 - 0.5) / 0.25,
                                                   (50 / 255 - 0.5) / 0.25], abs=1e-5)  # fmt: skip


def test_model_file_round_trip(tmp_path: Path, tiny_weights: dict[str, Any]) -> None:
    from alexnet_dist.model.file import save_model_file

    path = tiny_file(tmp_path, tiny_weights)
    model, meta = load_caffemodel(path)
    saved = save_model_file(tmp_path / "alexnet.pt", model, meta)
    raw = torch.load(saved, weights_only=True)  # plain data only
    assert sorted(raw) == ["classes", "config", "model", "num_classes", "preprocess", "source"]
    again, meta2 = load_model_file(saved)
    direct, _ = load_model_path(path)  # a .caffemodel directly
    assert meta2 == json.loads(json.dumps(meta))  # and all of the metadata is JSON
    x = torch.randn(2, 3, 99, 99) * 60
    with torch.no_grad():
        assert torch.equal(again(x), model(x)) and torch.equal(direct(x), model(x))
    assert not again.training and again.config == model.config
    raw["model"]["fc8.bias"] = torch.zeros(7)
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: weights do not fit its config"):
        load_model_file(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pt: not a model file"):
        load_model_file(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="nope.pt: not found"):
        load_model_file(tmp_path / "nope.pt")


# --------------------------------------------------------------------------------------------------
# The command


def test_import_caffe_command(tmp_path: Path, tiny_weights: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from alexnet_dist.cli import app

    path = tiny_file(tmp_path, tiny_weights, v1=True)
    out = tmp_path / "alexnet.pt"
    args = ["import-caffe", str(path), "-o", str(out), "--mean", "1,2,3", "--resize", "99", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["bytes"] == out.stat().st_size and summary["num_classes"] == 10
    assert summary["preprocess"]["mean"] == [1.0, 2.0, 3.0] and summary["encoding"] == "layers (V1)"
    assert summary["preprocess"]["resize"] == 99  # warp straight to the crop, as classification.cpp does
    model, meta = load_model_file(out)
    assert summary["parameters"] == count_parameters(model) and meta["preprocess"]["crop"] == 99
    result = CliRunner().invoke(app, ["import-caffe", str(path), "-o", str(out)])
    assert result.exit_code == 0 and "conv2" in result.stdout and "k 1" in result.stdout
    assert load_model_file(out)[1]["preprocess"]["resize"] == 112  # 99 * 256 / 227, bvlc_alexnet's ratio
    result = CliRunner().invoke(app, ["import-caffe", str(path), "-o", str(out), "--resize", "50"])
    assert isinstance(result.exception, ConfigError) and "smaller than the model's 99px crop" in str(
        result.exception
    )


@pytest.mark.slow  # starts the real command line (its imports)
def test_import_caffe_errors_are_one_line(tmp_path: Path, tiny_weights: dict[str, Any]) -> None:
    path = write_caffemodel(tmp_path / "m.caffemodel", without(alexnet_layers(TINY, tiny_weights), "fc7"))
    exe = Path(sys.executable).parent / "alexnet-dist"
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.run([exe, "import-caffe", path, "-o", tmp_path / "x.pt"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("alexnet-dist: error: m.caffemodel: layer fc7 missing")
    )
    assert not (tmp_path / "x.pt").exists()
    proc = subprocess.run([exe, "import-caffe", path, "-o", tmp_path / "x.pt", "--mean", "1,2"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--mean 1,2: needs three numbers" in proc.stderr
