"""Caffe's bvlc_alexnet (a binary ``.caffemodel``) read into the two-tower AlexNet.

A ``.caffemodel`` is one protobuf ``NetParameter`` (Caffe's ``src/caffe/proto/caffe.proto``): the layers
with their parameters *and* their weight blobs. The protobuf wire format is decoded by hand
(:mod:`alexnet_dist.interop.protowire`), one message level at a time, keeping weight arrays as zero-copy
numpy views of the file's bytes; the protobuf library would copy the 61M weights into its own arrays and
again into numpy, and is slower at it (``bench/caffe_import.py`` times both). It reads both layer
encodings: ``layer`` (field 100, string types) and the older ``layers`` (field 2, ``V1LayerParameter``
with enum types, which is how bvlc_alexnet was saved).

Everything the network's shape depends on (kernels, strides, pads, groups, pooling, LRN size, alpha,
beta and k, dropout, the crop size) is read from the file; the layout must be AlexNet's, and anything
this network cannot compute the same way is refused with a message naming the layer.

Caffe's ``group: 2`` halves (conv2, conv4, conv5) are our towers: output kernels ``[:n/2]`` go to tower A,
``[n/2:]`` to tower B, for every layer but fc8. Caffe's LRN runs across the whole 96/256-channel blob,
so imported models use ``lrn_span="all"``, and Caffe's alpha is divided by ``local_size`` before use
while ours multiplies the plain sum (paper section 3.3): ours = caffe_alpha / local_size.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet_dist.errors import CheckpointError, ConfigError
from alexnet_dist.interop.protowire import Msg, Truncated
from alexnet_dist.model.config import AlexNetConfig
from alexnet_dist.model.file import IMAGENET_MEAN_BGR, Devices, imagenet_classes
from alexnet_dist.model.network import AlexNet

__all__ = [
    "CaffeLayer",
    "CaffeNet",
    "caffe_to_alexnet",
    "load_caffemodel",
    "read_caffemodel",
    "read_mean_file",
]

# --------------------------------------------------------------------------------------------------
# NetParameter -> layers

# V1LayerParameter.LayerType values we may meet, as the V2 type strings.
_V1_TYPES = {
    1: "Accuracy", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout", 8: "Flatten", 9: "HDF5Data",
    12: "ImageData", 14: "InnerProduct", 15: "LRN", 17: "Pooling", 18: "ReLU", 19: "Sigmoid",
    20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 23: "TanH", 24: "WindowData", 25: "Eltwise",
    29: "MemoryData", 32: "DummyData", 36: "Silence",
}  # fmt: skip
# Field numbers of each parameter message: (in LayerParameter, in V1LayerParameter).
_PARAM_FIELDS = {
    "convolution": (106, 10), "inner_product": (117, 17), "lrn": (118, 18), "pooling": (121, 19),
    "dropout": (108, 12), "relu": (123, 30), "transform": (100, 36), "data": (107, 11),
    "image_data": (115, 15), "input": (143, None),
}  # fmt: skip


@dataclass(frozen=True)
class CaffeLayer:
    name: str
    type: str  # V2 type string ("Convolution"); V1 enums are mapped to these
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    blobs: tuple[np.ndarray, ...]  # each shaped as the file says (legacy 4-D shapes kept)
    params: dict[str, Msg]


@dataclass(frozen=True)
class CaffeNet:
    name: str
    encoding: str  # "layer (V2)" or "layers (V1)"
    layers: tuple[CaffeLayer, ...]
    input_dims: tuple[int, ...]  # NetParameter.input_dim / input_shape, if the file has them
    sha256: str


def _blob(msg: Msg, what: str) -> np.ndarray:
    shape_msg = msg.message(7)
    if shape_msg is not None:
        shape = tuple(shape_msg.ints(1))
    else:  # legacy num/channels/height/width, each 0 when absent
        shape = tuple(msg.int(n, 0) for n in (1, 2, 3, 4))
    data = msg.floats(5)
    if not len(data) and msg.has(8):
        data = msg.floats(8, "<f8").astype(np.float32)
    if len(data) != math.prod(shape):
        raise CheckpointError(f"{what}: holds {len(data)} values but its shape {shape} needs "
                              f"{math.prod(shape)}; the file is damaged")  # fmt: skip
    return data.reshape(shape)


def _layer(msg: Msg, v1: bool, index: int) -> CaffeLayer:
    if v1:
        if msg.has(1):
            raise CheckpointError(f"layer {index}: uses Caffe's V0 layer format; upgrade the file with "
                                  "Caffe's upgrade_net_proto_binary first")  # fmt: skip
        name, kind = msg.string(4, f"#{index}"), _V1_TYPES.get(msg.int(5), f"V1 type {msg.int(5)}")
        bottoms, tops, blob_field = msg.strings(2), msg.strings(3), 6
    else:
        name, kind = msg.string(1, f"#{index}"), msg.string(2)
        bottoms, tops, blob_field = msg.strings(3), msg.strings(4), 7
    params = {}
    for key, fields in _PARAM_FIELDS.items():
        field = fields[1] if v1 else fields[0]
        sub = msg.message(field) if field is not None else None
        if sub is not None:
            params[key] = sub
    blobs = tuple(_blob(b, f"{name}: blob {i}") for i, b in enumerate(msg.messages(blob_field)))
    return CaffeLayer(name, kind, tuple(bottoms), tuple(tops), blobs, params)


def read_caffemodel(path: str | Path) -> CaffeNet:
    """Decode a binary ``.caffemodel`` (NetParameter). Raises CheckpointError if it is not one."""
    path = Path(path)
    try:
        buf = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror}); check the path") from None
    if buf[:4] == b"\x89HDF":
        raise CheckpointError(f"{path}: an HDF5 Caffe snapshot; save the net as a binary .caffemodel")
    try:
        net = Msg(buf, 0, len(buf))
        v2, v1 = net.messages(100), net.messages(2)
        layers = [_layer(m, False, i) for i, m in enumerate(v2)] or [
            _layer(m, True, i) for i, m in enumerate(v1)
        ]
        dims = net.ints(4) or [d for s in net.messages(8)[:1] for d in s.ints(1)]
        name = net.string(1)
    except Truncated as err:
        raise CheckpointError(f"{path}: truncated (a field runs past byte {len(buf)} at byte {err.args[0]}); "
                              "the file is incomplete, download or copy it again") from None  # fmt: skip
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a Caffe NetParameter ({err}); is it a .caffemodel?") from None
    if not layers:
        raise CheckpointError(f"{path}: no layers found; is it a .caffemodel (not a prototxt or mean file)?")
    encoding = "layer (V2)" if v2 else "layers (V1)"
    return CaffeNet(name, encoding, tuple(layers), tuple(dims), hashlib.sha256(buf).hexdigest())


def read_mean_file(path: str | Path) -> tuple[float, float, float]:
    """Per-channel mean (B, G, R) of a Caffe mean file (``imagenet_mean.binaryproto``, a BlobProto).

    Caffe's own ``classification.cpp`` reduces the mean image to its channel means the same way.
    """
    path = Path(path)
    try:
        buf = path.read_bytes()
        blob = _blob(Msg(buf, 0, len(buf)), str(path))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror}); check the --mean-file path") from None
    except (Truncated, ValueError) as err:
        raise ConfigError(f"{path}: not a Caffe mean BlobProto ({err}); pass --mean B,G,R instead") from None
    dims = _squeeze(blob.shape)
    if dims[0] != 3:
        raise ConfigError(f"{path}: mean blob of shape {blob.shape} is not 3 colour channels; "
                          "pass --mean B,G,R instead")  # fmt: skip
    means = blob.reshape(3, -1).astype(np.float64).mean(axis=1)
    return (float(means[0]), float(means[1]), float(means[2]))


# --------------------------------------------------------------------------------------------------
# Caffe's AlexNet -> our config and weights

_CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5")
_FCS = ("fc6", "fc7", "fc8")
# conv2, conv4 and conv5 stay inside a tower (section 3.5): Caffe's group 2. conv1 has each tower's
# kernels over all of RGB and conv3 sees both towers: group 1.
_GROUPS = {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
# What lies between each weighted layer and the next, in file order (bvlc_alexnet's train_val.prototxt):
# LRN *before* pooling as in the paper (CaffeNet swaps them and is refused). Dropout may be absent.
_BETWEEN = {
    "conv1": ("ReLU", "LRN", "Pooling"), "conv2": ("ReLU", "LRN", "Pooling"), "conv3": ("ReLU",),
    "conv4": ("ReLU",), "conv5": ("ReLU", "Pooling"), "fc6": ("ReLU", "Dropout"),
    "fc7": ("ReLU", "Dropout"), "fc8": (),
}  # fmt: skip
# Layers that feed data, compute the loss or only copy blobs: no part of the function we import.
_IGNORED = {"Data", "ImageData", "Input", "MemoryData", "DummyData", "HDF5Data", "WindowData", "Softmax",
            "SoftmaxWithLoss", "Accuracy", "Split", "Silence"}  # fmt: skip
_EMPTY = Msg(b"", 0, 0)


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop leading 1s: Caffe's legacy blobs pad every shape to 4-D (a bias is 1x1x1xN)."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def _layout(net: CaffeNet, source: str) -> tuple[dict[str, CaffeLayer], dict[str, list[CaffeLayer]]]:
    """Find conv1-conv5 and fc6-fc8 and the layers after each; refuse anything but AlexNet's chain."""
    chain = [layer for layer in net.layers if layer.type not in _IGNORED]
    found: dict[str, CaffeLayer] = {}
    for names, kind in ((_CONVS, "Convolution"), (_FCS, "InnerProduct")):
        of_kind = [layer for layer in chain if layer.type == kind]
        by_name = {layer.name: layer for layer in of_kind}
        missing = [n for n in names if n not in by_name]
        if len(of_kind) != len(names):
            listed = ", ".join(layer.name for layer in of_kind) or "none"
            what = f"layer {', '.join(missing)} missing" if missing else f"{len(of_kind)} {kind} layers"
            raise CheckpointError(f"{source}: {what} ({kind} layers in the file: {listed}); AlexNet has "
                                  f"{', '.join(names)}")  # fmt: skip
        # By name when bvlc_alexnet's names are there, else by position (a fine-tuned "fc8_flickr").
        found.update(
            {n: by_name[n] for n in names} if not missing else dict(zip(names, of_kind, strict=True))
        )
    index = {id(layer): i for i, layer in enumerate(chain)}
    starts = [index[id(found[n])] for n in (*_CONVS, *_FCS)]
    if starts != sorted(starts) or starts[0] != 0:
        first = chain[0].name if starts[0] else "the layers"
        raise CheckpointError(f"{source}: {first} out of AlexNet's order (conv1..conv5, fc6..fc8)")
    segments: dict[str, list[CaffeLayer]] = {}
    for n, start, stop in zip((*_CONVS, *_FCS), starts, [*starts[1:], len(chain)], strict=True):
        segments[n] = between = chain[start + 1 : stop]
        kinds = tuple(layer.type for layer in between)
        want = _BETWEEN[n] if "Dropout" in kinds else tuple(t for t in _BETWEEN[n] if t != "Dropout")
        if kinds != want:
            got = ", ".join(f"{layer.name} ({layer.type})" for layer in between) or "nothing"
            raise CheckpointError(f"{source}: after {found[n].name} comes {got}; AlexNet needs "
                                  f"{', '.join(want) or 'nothing'} there")  # fmt: skip
    # Each layer must read the blob the one before it wrote (ReLU and Dropout work in place).
    for prev, layer in zip(chain, chain[1:], strict=False):
        if prev.tops and layer.bottoms and layer.bottoms[0] != prev.tops[0]:
            raise CheckpointError(f"{source}: {layer.name} reads blob {layer.bottoms[0]!r}, not "
                                  f"{prev.tops[0]!r} from {prev.name}; not AlexNet's chain")  # fmt: skip
    return found, segments


def _square(p: Msg, listed: int, h: int, w: int, default: int | None, what: str) -> int:
    values = p.ints(listed) or [v for v in (p.int(h, -1), p.int(w, -1)) if v >= 0]
    if not values:
        if default is None:
            raise CheckpointError(f"{what}: not set in the file; the layer is incomplete")
        return default
    if len(set(values)) != 1:
        raise CheckpointError(f"{what}: {values} is not square; this network needs square kernels")
    return values[0]


def _conv(layer: CaffeLayer, slot: str) -> dict[str, int]:
    p, name = layer.params.get("convolution", _EMPTY), layer.name
    if any(d != 1 for d in p.ints(18)) or p.int(16, 1) != 1:
        raise CheckpointError(f"{name}: dilated or non-channel-axis convolution; not AlexNet's")
    conv = {
        "out": p.int(1, 0),
        "kernel": _square(p, 4, 11, 12, None, f"{name}: kernel size"),
        "stride": _square(p, 6, 13, 14, 1, f"{name}: stride"),
        "pad": _square(p, 3, 9, 10, 0, f"{name}: pad"),
        "group": p.int(5, 1),
    }
    if conv["group"] != _GROUPS[slot]:
        raise CheckpointError(f"{name}: group {conv['group']}, but {slot} of the two-tower AlexNet needs "
                              f"group {_GROUPS[slot]} (paper section 3.5)")  # fmt: skip
    return conv


def _pool(layer: CaffeLayer) -> tuple[int, int]:
    p, name = layer.params.get("pooling", _EMPTY), layer.name
    pad = _square(p, 4, 9, 10, 0, f"{name}: pad")
    # Field 13 is round_mode in later BVLC Caffe (CEIL 0, FLOOR 1) and dilation in some forks.
    if p.int(1, 0) != 0 or p.int(12, 0) or pad or p.int(13, 0) > 1:
        raise CheckpointError(f"{name}: only unpadded max-pooling can be imported (section 3.4)")
    return _square(p, 2, 5, 6, None, f"{name}: kernel size"), _square(p, 3, 7, 8, 1, f"{name}: stride")


def _one(values: list[Any], names: list[str], what: str) -> Any:
    if len(set(values)) != 1:
        raise CheckpointError(f"{', '.join(names)}: differ in {what} {values}; this network uses one setting")
    return values[0]


def _image_size(net: CaffeNet) -> int:
    """The crop the model was trained on: transform_param (or legacy data_param) crop_size, else inputs."""
    for layer in net.layers:
        for key, field in (("transform", 3), ("data", 5), ("image_data", 5)):
            if key in layer.params and layer.params[key].int(field, 0):
                return layer.params[key].int(field, 0)
        shapes = layer.params["input"].messages(1) if "input" in layer.params else []
        if shapes and len(shapes[0].ints(1)) == 4:
            return shapes[0].ints(1)[2]
    return net.input_dims[2] if len(net.input_dims) == 4 else 227


def caffe_to_alexnet(net: CaffeNet, *, source: str) -> tuple[AlexNet, dict[str, Any]]:
    """Check ``net`` is AlexNet's layout, build the matching config, copy the weights in.

    Returns the model (eval mode) and what the file says about its input and origin: ``input_mean``
    (the data layer's mean_value, B, G, R) or ``input_mean_file`` (the mean file it names), and
    ``input_scale`` (transform_param.scale), with the net's name, encoding, layer names and LRN.
    """
    found, segments = _layout(net, source)
    convs = {n: _conv(found[n], n) for n in _CONVS}
    norms = [layer for n in ("conv1", "conv2") for layer in segments[n] if layer.type == "LRN"]
    pools = [layer for n in ("conv1", "conv2", "conv5") for layer in segments[n] if layer.type == "Pooling"]
    drops = [layer for n in ("fc6", "fc7") for layer in segments[n] if layer.type == "Dropout"]
    for layer in (layer for seg in segments.values() for layer in seg if layer.type == "ReLU"):
        if layer.params.get("relu", _EMPTY).float(1, 0.0) != 0.0:
            raise CheckpointError(f"{layer.name}: leaky ReLU; AlexNet's ReLU has slope 0 below zero")
    lrns = []
    for layer in norms:
        p = layer.params.get("lrn", _EMPTY)
        lrns.append((p.int(1, 5), p.float(2, 1.0), p.float(3, 0.75), p.float(5, 1.0)))  # Caffe's defaults
        if p.int(4, 0) != 0 or lrns[-1][0] % 2 == 0:
            raise CheckpointError(f"{layer.name}: only ACROSS_CHANNELS LRN of odd size can be imported")
    size, alpha, beta, k = _one(lrns, [layer.name for layer in norms], "LRN parameters")
    pool_kernel, pool_stride = _one([_pool(layer) for layer in pools], [p.name for p in pools], "pooling")
    ratios = [d.params.get("dropout", _EMPTY).float(1, 0.5) for d in drops]
    dropout = _one(ratios, [d.name for d in drops], "dropout_ratio") if drops else 0.5
    fcs = {n: found[n].params.get("inner_product", _EMPTY) for n in _FCS}
    outs = {**{n: convs[n]["out"] for n in _CONVS}, **{n: fcs[n].int(1, 0) for n in _FCS}}
    for n in (*_CONVS, "fc6", "fc7"):
        if outs[n] <= 0 or outs[n] % 2:
            raise CheckpointError(
                f"{found[n].name}: num_output {outs[n]}; must be even to split in two towers"
            )
    if outs["fc6"] != outs["fc7"]:
        raise CheckpointError(f"{found['fc6'].name}, {found['fc7'].name}: {outs['fc6']} and {outs['fc7']} "
                              "outputs; this network needs fc6 and fc7 of one size")  # fmt: skip
    try:
        cfg = AlexNetConfig(
            name="caffe", image_size=_image_size(net), in_channels=3,
            channels=tuple(outs[n] for n in _CONVS),  # type: ignore[arg-type]
            kernels=tuple(convs[n]["kernel"] for n in _CONVS),  # type: ignore[arg-type]
            strides=tuple(convs[n]["stride"] for n in _CONVS),  # type: ignore[arg-type]
            paddings=tuple(convs[n]["pad"] for n in _CONVS),  # type: ignore[arg-type]
            fc_units=outs["fc6"], dropout=dropout, pool_kernel=pool_kernel, pool_stride=pool_stride,
            lrn_size=size, lrn_alpha=alpha / size, lrn_beta=beta, lrn_k=k, lrn_span="all",
        )  # fmt: skip
    except ConfigError as err:
        raise CheckpointError(f"{source}: its layers give an unusable network ({err})") from None
    _check_pooling(cfg, pools)
    _copy_weights(model := AlexNet(outs["fc8"], config=cfg), found, fcs, convs, outs)
    transform = next(
        (layer.params["transform"] for layer in net.layers if "transform" in layer.params), _EMPTY
    )
    data = next((layer.params["data"] for layer in net.layers if "data" in layer.params), _EMPTY)
    facts = {
        "net_name": net.name, "encoding": net.encoding, "sha256": net.sha256,
        "layers": {n: found[n].name for n in (*_CONVS, *_FCS)},
        "caffe_lrn": {"local_size": size, "alpha": alpha, "beta": beta, "k": k},
        "input_mean": [float(v) for v in transform.floats(5)] or None,
        "input_mean_file": transform.string(4) or data.string(3) or None,
        "input_scale": transform.float(1, 1.0),
    }  # fmt: skip
    return model.eval(), facts


def _check_pooling(cfg: AlexNetConfig, pools: list[CaffeLayer]) -> None:
    """Caffe rounds pooled sizes up, torch (our model) down: refuse sizes where the two differ."""
    side, k, s, p = cfg.image_size, cfg.kernels, cfg.strides, cfg.paddings
    for pool, convs in zip(pools, ((0,), (1,), (2, 3, 4)), strict=True):
        for i in convs:
            side = (side + 2 * p[i] - k[i]) // s[i] + 1
        up = math.ceil((side - cfg.pool_kernel) / cfg.pool_stride) + 1
        side = (side - cfg.pool_kernel) // cfg.pool_stride + 1
        if up != side:
            raise CheckpointError(f"{pool.name}: Caffe's ceil-mode pooling gives {up}x{up} maps at "
                                  f"{cfg.image_size}px, ours {side}x{side}; not importable")  # fmt: skip


def _copy_weights(
    model: AlexNet,
    found: dict[str, CaffeLayer],
    fcs: dict[str, Msg],
    convs: dict[str, dict[str, int]],
    outs: dict[str, int],
) -> None:
    """Check each blob's shape, then copy: group g's kernels (rows) go to tower g, fc8 whole."""
    cfg = model.config
    ins = dict(zip(_CONVS, (3, *cfg.channels[:4]), strict=True))
    shapes: dict[str, tuple[int, ...]] = {
        n: (outs[n], ins[n] // convs[n]["group"], convs[n]["kernel"], convs[n]["kernel"]) for n in _CONVS
    }
    pool5 = cfg.channels[4] * cfg.feature_size() ** 2  # fc6 sees pool5 flattened (channel, row, column)
    shapes.update(fc6=(outs["fc6"], pool5), fc7=(outs["fc7"], outs["fc6"]), fc8=(outs["fc8"], outs["fc7"]))
    params = dict(model.named_parameters())
    for n, shape in shapes.items():
        layer = found[n]
        transpose = n in _FCS and bool(fcs[n].int(6, 0))  # InnerProduct transpose: stored (in, out)
        want = [shape[::-1] if transpose else shape, (shape[0],)]
        if len(layer.blobs) != 2:
            raise CheckpointError(f"{layer.name}: {len(layer.blobs)} blobs, expected weights and biases; "
                                  "is this a .caffemodel with trained weights?")  # fmt: skip
        for blob, shp, what in zip(layer.blobs, want, ("weights", "biases"), strict=True):
            if _squeeze(blob.shape) != _squeeze(shp):
                raise CheckpointError(f"{layer.name}: {what} of shape {tuple(blob.shape)}, expected {shp} "
                                      f"(from its layer parameters at {cfg.image_size}px)")  # fmt: skip
        weight = torch.from_numpy(np.array(layer.blobs[0], np.float32)).reshape(want[0])  # a writable copy
        weight, bias = (
            (weight.t() if transpose else weight),
            torch.from_numpy(np.array(layer.blobs[1], np.float32)),
        )
        with torch.no_grad():
            if n == "fc8":
                params["fc8.weight"].copy_(weight)
                params["fc8.bias"].copy_(bias.reshape(-1))
                continue
            half = shape[0] // 2
            for tower, rows in (("tower_a", slice(0, half)), ("tower_b", slice(half, None))):
                params[f"{tower}.{n}.weight"].copy_(weight[rows])
                params[f"{tower}.{n}.bias"].copy_(bias.reshape(-1)[rows])


def load_caffemodel(
    path: str | Path,
    *,
    mean: tuple[float, float, float] | None = None,
    mean_file: str | Path | None = None,
    classes: list[str] | None = None,
    resize: int | None = None,
    devices: Devices = ("cpu", "cpu"),
) -> tuple[AlexNet, dict[str, Any]]:
    """A Caffe AlexNet as our model (eval mode) and its model-file metadata.

    The mean pixel (B, G, R on 0-255) is ``mean``, else the channel means of ``mean_file`` (Caffe's
    ``imagenet_mean.binaryproto``), else the ``mean_value`` in the file's data layer, else the standard
    ImageNet mean pixel :data:`IMAGENET_MEAN_BGR`. ``classes`` default to the ImageNet names for 1000
    outputs, else to numbers. Images are warped to ``resize`` square before the centre crop: by default
    256 for a 227 crop (bvlc_alexnet's training data); 227 is what Caffe's ``classification.cpp`` does.
    """
    if mean is not None and mean_file is not None:
        raise ConfigError("--mean and --mean-file: give one of them, not both")
    mean_from = "given (--mean)" if mean is not None else None
    if mean_file is not None:
        mean, mean_from = read_mean_file(mean_file), f"mean file {Path(mean_file).name}"
    model, facts = caffe_to_alexnet(read_caffemodel(path), source=Path(path).name)
    if mean is None:
        values = facts["input_mean"] or []
        if len(values) in (1, 3):
            mean, mean_from = tuple((values * 3)[:3]), "the model's mean_value"  # type: ignore[assignment]
        else:
            mean, mean_from = IMAGENET_MEAN_BGR, "standard ImageNet mean pixel: Caffe's ilsvrc_2012_mean"
    n = model.num_classes
    if classes is not None and len(classes) != n:
        raise ConfigError(f"classes: {len(classes)} names for a model with {n} outputs; give one per output")
    class_names = "given" if classes is not None else "ImageNet (torchvision)" if n == 1000 else "numbers"
    if classes is None:
        classes = imagenet_classes() if n == 1000 else [str(i) for i in range(n)]
    cfg = model.config
    resize = round(cfg.image_size * 256 / 227) if resize is None else resize
    if resize < cfg.image_size:
        raise ConfigError(f"--resize {resize}: smaller than the model's {cfg.image_size}px crop")
    meta = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()},
        "num_classes": n,
        "preprocess": {
            "channel_order": "BGR",  # conv1 was trained on OpenCV's BGR images ...
            "scale": 255.0,  # ... of 0-255 pixels ...
            "mean": [float(m) for m in mean],  # ... minus the mean pixel (B, G, R) ...
            "std": [1.0 / facts["input_scale"]] * 3,  # ... times transform_param.scale (1 in bvlc_alexnet)
            "resize": resize,  # bvlc_alexnet's training images were warped to 256x256 ...
            "resize_mode": "warp",
            "crop": cfg.image_size,  # ... and cropped to 227
        },
        "classes": list(classes),
        "source": {
            "format": "caffemodel",
            "file": Path(path).name,
            **facts,
            "mean_from": mean_from,
            "class_names": class_names,
        },  # fmt: skip
    }
    return model.place(devices).eval(), meta
