"""Model files: a trained network with what it takes to use it, as one plain dict.

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
from alexnet_dist.model.config import AlexNetConfig
from alexnet_dist.model.network import AlexNet

__all__ = [
    "IMAGENET_MEAN_BGR",
    "model_file_bytes",
    "model_file_meta",
    "imagenet_classes",
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


def load_model_file(path: str | Path, *, devices: Devices = ("cpu", "cpu")) -> tuple[AlexNet, dict[str, Any]]:
    """A model file: the model in eval mode on ``devices`` and the metadata (every key but ``"model"``)."""
    path = Path(path)
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
