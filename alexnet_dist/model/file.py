"""Model files: a trained network with what it takes to use it, as one plain dict (issue 8).

A model file is ``torch.save`` of::

    {"model": state_dict, "config": AlexNetConfig.to_dict(), "num_classes": int,
     "preprocess": {...}, "classes": [name, ...], "source": {...}}

holding only tensors, str, int, float, bool, None, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``. ``preprocess`` says how an image becomes the network's input
(see :func:`preprocess_image`): ``channel_order`` ("RGB" or "BGR"), ``scale`` (pixels in [0, 1] are
multiplied by it), ``mean`` and ``std`` (per channel, in ``channel_order``), ``resize`` and
``resize_mode`` ("warp": to resize x resize; "shorter": shorter side to resize), then a centre ``crop``.

:func:`load_model_file` also reads Caffe ``.caffemodel`` files directly (through :mod:`alexnet_dist.caffe`).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet_dist.errors import AlexNetDistError, CheckpointError, ConfigError
from alexnet_dist.interop.caffe import caffe_to_alexnet, read_caffemodel, read_mean_file
from alexnet_dist.model.network import AlexNet, AlexNetConfig

__all__ = [
    "IMAGENET_MEAN_BGR",
    "model_file_bytes",
    "model_file_meta",
    "imagenet_classes",
    "load_caffemodel",
    "load_model_file",
    "preprocess_image",
    "read_class_names",
    "save_model_file",
]

# Per-channel mean of Caffe's ilsvrc_2012_mean (data/ilsvrc12/imagenet_mean.binaryproto): B, G, R, 0-255.
IMAGENET_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)
_KEYS = ("model", "config", "num_classes", "preprocess", "classes", "source")
Devices = tuple[str | torch.device, str | torch.device]


def imagenet_classes() -> list[str]:
    """The 1000 ILSVRC-2012 class names in synset order (Caffe's and torchvision's order); offline."""
    from torchvision.models import AlexNet_Weights

    return list(AlexNet_Weights.IMAGENET1K_V1.meta["categories"])


def read_class_names(path: str | Path) -> list[str]:
    """One name per line; Caffe's ``synset_words.txt`` lines ("n01440764 tench, Tinca tinca") lose the id."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read class names ({err.strerror}); check the path") from None
    names = []
    for line in (line.strip() for line in lines if line.strip()):
        wnid, _, rest = line.partition(" ")
        names.append(rest.strip() if len(wnid) == 9 and wnid[0] == "n" and wnid[1:].isdigit() else line)
    return names


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


def model_file_meta(
    config: AlexNet | Any, spec: Any, manifest: Any, source: dict[str, Any]
) -> dict[str, Any]:
    """The metadata of a model trained by the service: how its images were prepared, and its classes.

    ``config`` is the AlexNetConfig trained, ``spec`` the JobSpec, ``manifest`` the training manifest (its
    mean/std on the 0-255 scale, stored image size and class names).
    """
    return {
        "config": config.to_dict(),
        "num_classes": spec.model.num_classes,
        "preprocess": {
            "channel_order": "RGB",
            "scale": 255.0,
            "mean": list(manifest.mean),
            "std": list(manifest.std),
            "resize": manifest.image_size,
            "resize_mode": "shorter",
            "crop": config.image_size,
        },
        "classes": list(manifest.names or manifest.classes),
        "source": source,
    }


def model_file_bytes(model_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """A model file as bytes (for local files and S3): the weights on the CPU, and ``meta``'s keys."""
    missing = [k for k in _KEYS[1:] if k not in meta]
    if missing:
        raise ConfigError(f"model file metadata: missing {missing}")
    state = {k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    buf = io.BytesIO()
    torch.save({"model": state, **{k: meta[k] for k in _KEYS[1:]}}, buf)
    return buf.getvalue()


def save_model_file(path: str | Path, model: AlexNet, meta: dict[str, Any]) -> Path:
    """Write ``model`` with ``meta`` (config, num_classes, preprocess, classes, source) to ``path``."""
    data = model_file_bytes(model.state_dict(), meta)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)  # no half-written model file under the final name
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"{path}: cannot write ({err.strerror}); check the directory") from None
    return path


def load_model_file(
    path: str | Path, *, devices: Devices = ("cpu", "cpu"), **caffe: Any
) -> tuple[AlexNet, dict[str, Any]]:
    """Our model file, or a Caffe ``.caffemodel`` (``caffe`` options go to :func:`load_caffemodel`).

    Returns the model in eval mode on ``devices`` and the metadata (every key but ``"model"``).
    """
    path = Path(path)
    if path.suffix == ".caffemodel":
        return load_caffemodel(path, devices=devices, **caffe)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; check the path")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: not a model file ({first[:120]}); use import-caffe for Caffe files"
        ) from None
    if not isinstance(data, dict) or any(k not in data for k in _KEYS[:3]):
        raise CheckpointError(f"{path}: not a model file (needs keys {list(_KEYS[:3])}); was it written by "
                              "alexnet-dist?")  # fmt: skip
    try:
        model = AlexNet(int(data["num_classes"]), config=AlexNetConfig.from_dict(data["config"]))
        model.load_state_dict(data["model"], strict=True)
    except (AlexNetDistError, RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit its config ({first[:160]})") from None
    return model.place(devices).eval(), {k: v for k, v in data.items() if k != "model"}


def preprocess_image(image: Any, preprocess: dict[str, Any], *, crop: bool = True) -> torch.Tensor:
    """A PIL image -> the network's input tensor (channels, crop, crop), as ``preprocess`` says.

    ``crop=False`` keeps the whole resized image (normalized the same way), for ten-crop views.
    """
    from PIL import Image

    img = image.convert("RGB")
    size, side = int(preprocess["resize"]), int(preprocess["crop"])
    if preprocess.get("resize_mode", "warp") == "warp":
        img = img.resize((size, size), Image.BILINEAR)
    else:  # "shorter": keep the aspect ratio
        ratio = size / min(img.size)
        img = img.resize(
            (max(side, round(img.width * ratio)), max(side, round(img.height * ratio))), Image.BILINEAR
        )
    if crop:
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # RGB in [0, 1]
    if preprocess["channel_order"] == "BGR":
        x = x.flip(0)
    mean = torch.tensor(preprocess["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(preprocess["std"], dtype=torch.float32).view(-1, 1, 1)
    return (x * float(preprocess["scale"]) - mean) / std
