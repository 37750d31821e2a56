"""Classify image files with a trained model: the top-5 classes of each, with probabilities.

MODEL may be any of the things a run leaves behind, tried in this order:

1. an existing local file: our model file (``model.pt``) or a Caffe ``.caffemodel``;
2. a local directory or a ``file://`` / ``s3://`` URL: a model file (``*.pt``, ``*.caffemodel``), a Ray Train
   checkpoint directory (``checkpoint_*``: the network is rebuilt from the spec it holds and the training
   manifest gives class names, mean and std), or a run directory (its ``model.pt``, else its newest
   checkpoint);
3. otherwise a job id: the job's ``model_url`` from its Redis record, or, while it still runs, the newest
   checkpoint of its run.

Images are read with the decoder the training pipeline uses (libjpeg-turbo through torchvision), so a
test image written out of a shard gives the very pixels evaluation saw, and with PIL for other formats.
The input is the central crop, or the paper's ten crops (section 4.1: four corners, centre, and their
mirror images, softmax averaged).
"""

from __future__ import annotations

import io
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alexnet_dist import storage
from alexnet_dist.errors import (
    AlexNetDistError,
    CheckpointError,
    DataError,
    JobNotFoundError,
    NotFoundError,
    QueueError,
)
from alexnet_dist.model.file import Devices
from alexnet_dist.model.network import AlexNet
from alexnet_dist.settings import Settings

__all__ = [
    "ImageResult",
    "LoadedModel",
    "Prediction",
    "class_names",
    "classify_images",
    "image_views",
    "load_checkpoint_state",
    "load_model",
    "newest_checkpoint_url",
    "read_image",
]

TOP_K = 5  # the paper reports top-1 and top-5 (section 4.1)
BATCH = 64  # images per forward pass; ten-crop runs 10x as many views
MODEL_KINDS = (
    "a model file (.pt, .caffemodel), a checkpoint or run directory, an s3:// or file:// URL of one, "
    "or a job id"
)
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class Prediction:
    index: int  # the network's output index
    name: str
    probability: float


@dataclass(frozen=True)
class ImageResult:
    image: str
    top: tuple[Prediction, ...] = ()
    error: str | None = None  # one line, when the image could not be read

    def to_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "top": [{"index": p.index, "name": p.name, "probability": p.probability} for p in self.top],
            "error": self.error,
        }


@dataclass(frozen=True)
class LoadedModel:
    model: AlexNet  # eval mode, on the CPU
    meta: dict[str, Any]  # model-file metadata: config, num_classes, preprocess, classes, source
    source: str  # where it came from, for people: "job j-1 -> file:///.../model.pt"
    names: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# MODEL -> network


def class_names(meta: dict[str, Any]) -> list[str]:
    """Readable names: the manifest's names; torchvision's ImageNet names for 1000 bare ids or numbers."""
    n = int(meta["num_classes"])
    names = [str(c) for c in meta.get("classes") or []]
    bare = all(_WNID.match(c) or c.isdigit() for c in names)
    if n == 1000 and (len(names) != n or bare):
        from alexnet_dist.model.file import imagenet_classes

        return imagenet_classes()
    return names if len(names) == n else [str(i) for i in range(n)]


def _is_url(text: str) -> bool:
    return text.startswith(("s3://", "file://"))


def load_model_path(
    path: str | Path, *, devices: Devices = ("cpu", "cpu"), **caffe: Any
) -> tuple[AlexNet, dict[str, Any]]:
    """A model file of ours, or a Caffe ``.caffemodel`` (``caffe`` options go to ``load_caffemodel``)."""
    if Path(path).suffix == ".caffemodel":
        from alexnet_dist.interop.caffe import load_caffemodel

        return load_caffemodel(path, devices=devices, **caffe)
    from alexnet_dist.model.file import load_model_file

    return load_model_file(path, devices=devices)


def _model_file(url: str, *, endpoint_url: str | None) -> tuple[AlexNet, dict[str, Any]]:
    loc = storage.parse_url(url)
    if loc.scheme == "file":
        return load_model_path(loc.key)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(loc.key).name  # keeps the suffix: .caffemodel files are read as Caffe
        local.write_bytes(storage.read_bytes(url, endpoint_url=endpoint_url))
        return load_model_path(local)


def load_checkpoint_state(url: str, *, endpoint_url: str | None) -> dict[str, Any]:
    """The state dict of a checkpoint directory (local path, ``file://`` or ``s3://``)."""
    from alexnet_dist.training.checkpoint import CHECKPOINT_FILE, read_checkpoint

    loc = storage.parse_url(url.rstrip("/"))
    if loc.scheme == "file":
        return read_checkpoint(loc.key)
    with tempfile.TemporaryDirectory() as tmp:
        data = storage.read_bytes(f"{url.rstrip('/')}/{CHECKPOINT_FILE}", endpoint_url=endpoint_url)
        (Path(tmp) / CHECKPOINT_FILE).write_bytes(data)
        return read_checkpoint(tmp)


def _from_checkpoint(url: str, *, endpoint_url: str | None) -> tuple[AlexNet, dict[str, Any]]:
    """Rebuild the network a checkpoint was training, with the model-file metadata training would write."""
    from alexnet_dist.data.manifest import load_manifest
    from alexnet_dist.model.config import model_config
    from alexnet_dist.model.file import model_file_meta
    from alexnet_dist.spec import JobSpec

    state = load_checkpoint_state(url, endpoint_url=endpoint_url)
    spec = JobSpec.from_json(state["spec"])
    cfg = model_config(spec)
    manifest = load_manifest(spec.data.train, endpoint_url=endpoint_url)
    model = AlexNet(spec.model.num_classes, config=cfg)
    try:
        model.load_state_dict(state["model"], strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise CheckpointError(f"{url}: weights do not fit preset {cfg.name!r} ({first})") from None
    source = {"job": spec.name, "checkpoint": url, "epoch": state["epoch"], "step": state["step"]}
    meta = model_file_meta(cfg, spec, manifest, source)
    return model.eval(), meta


def newest_checkpoint_url(run_url: str, *, endpoint_url: str | None) -> str | None:
    """The newest ``checkpoint_<step>_<ns>`` folder of a run (names sort by progress), or None."""
    dirs = set()
    for url in storage.list_prefix(run_url.rstrip("/") + "/", endpoint_url=endpoint_url):
        head, sep, _ = url.rpartition("/checkpoint.pt")
        if sep and head.rsplit("/", 1)[-1].startswith("checkpoint_"):
            dirs.add(head)
    return max(dirs, key=lambda d: d.rsplit("/", 1)[-1]) if dirs else None


def _from_location(where: str, *, endpoint_url: str | None) -> tuple[AlexNet, dict[str, Any], str]:
    """A URL or local directory -> (model, meta, the URL actually read)."""
    url = where.rstrip("/")
    name = url.rsplit("/", 1)[-1]
    if name.startswith("checkpoint_"):
        return (*_from_checkpoint(url, endpoint_url=endpoint_url), url)
    if name.endswith((".pt", ".caffemodel")):
        return (*_model_file(url, endpoint_url=endpoint_url), url)
    if storage.exists(f"{url}/model.pt", endpoint_url=endpoint_url):  # a run directory
        return (*_model_file(f"{url}/model.pt", endpoint_url=endpoint_url), f"{url}/model.pt")
    ckpt = newest_checkpoint_url(url, endpoint_url=endpoint_url)
    if ckpt is not None:
        return (*_from_checkpoint(ckpt, endpoint_url=endpoint_url), ckpt)
    raise NotFoundError(f"{where}: no model.pt and no checkpoint_* folder there; MODEL is {MODEL_KINDS}")


def run_url(spec_storage: str | None, run_name: str, *, settings: Settings) -> str:
    """Where training puts a run (as training.driver.resolve_storage does, without creating it)."""
    root = (spec_storage or settings.storage_root).rstrip("/")
    if root.startswith("s3://"):
        return f"{root}/{run_name}"
    return f"{Path(root.removeprefix('file://')).absolute()}/{run_name}"


def _from_job(job_id: str, *, settings: Settings) -> tuple[AlexNet, dict[str, Any], str]:
    from alexnet_dist.service.connection import connect
    from alexnet_dist.service.store import JobStore

    endpoint = settings.s3_endpoint_url
    try:
        rec = JobStore(connect(settings.redis_url), prefix=settings.redis_prefix).get(job_id)
    except JobNotFoundError:
        raise NotFoundError(f"{job_id}: no such file, directory or job; MODEL is {MODEL_KINDS}") from None
    except QueueError as err:
        raise QueueError(f"{job_id}: no such file or URL; as a job id: {err}") from None
    if rec.result and rec.result.get("model_url"):
        url = rec.result["model_url"]
        return (*_model_file(url, endpoint_url=endpoint), url)
    run = run_url(rec.spec.checkpoint.storage, job_id, settings=settings)
    ckpt = newest_checkpoint_url(run, endpoint_url=endpoint)
    if ckpt is None:
        raise QueueError(
            f"job {job_id}: {rec.state.value}, no model or checkpoint yet; wait for it "
            f"(`alexnet-dist watch {job_id}`) or give a model file"
        )
    return (*_from_checkpoint(ckpt, endpoint_url=endpoint), ckpt)


def load_model(spec: str, *, settings: Settings) -> LoadedModel:
    """MODEL (see the module docstring) -> the network in eval mode, its metadata and class names."""
    path = Path(spec).expanduser()
    if not _is_url(spec) and path.is_file():
        model, meta = load_model_path(path)
        source = str(path)
    elif _is_url(spec) or path.is_dir():
        where = spec if _is_url(spec) else str(path.absolute())
        model, meta, source = _from_location(where, endpoint_url=settings.s3_endpoint_url)
    elif "/" in spec or spec.endswith((".pt", ".caffemodel")):
        raise NotFoundError(f"{spec}: not found; MODEL is {MODEL_KINDS}")
    else:
        model, meta, url = _from_job(spec, settings=settings)
        source = f"job {spec} -> {url}"
    return LoadedModel(model.eval(), meta, source, class_names(meta))


# --------------------------------------------------------------------------------------------------
# images -> predictions


def read_image(path: str | Path) -> Any:
    """A PIL RGB image; JPEG/PNG through the training pipeline's decoder, so pixels match evaluation."""
    from PIL import Image, UnidentifiedImageError

    from alexnet_dist.data.augment import decode_image

    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise NotFoundError(f"{path}: cannot read ({err.strerror}); check the path") from None
    try:
        rgb = decode_image(data)  # uint8 [3, H, W]
        return Image.fromarray(rgb.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    except RuntimeError:
        pass  # not a format torchvision decodes (or a broken file): ask PIL, which knows more formats
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (no decoder recognises it); skipped") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's plugins raise all three on broken files
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:100]
        raise DataError(f"{path}: corrupt image ({why}); skipped") from None


def image_views(image: Any, preprocess: dict[str, Any], *, ten_crop: bool = False) -> torch.Tensor:
    """The network's input: [3, S, S] central crop, or [10, 3, S, S] ten crops (corners, centre, mirrored).

    The central crop is :func:`alexnet_dist.model.file.preprocess_image` itself; ten-crop resizes the same
    way and takes its crops from the whole resized image, as the evaluation pipeline does.
    """
    from alexnet_dist.data import augment
    from alexnet_dist.model.file import preprocess_image

    if not ten_crop:
        return preprocess_image(image, preprocess)
    return augment.ten_crop(preprocess_image(image, preprocess, crop=False), int(preprocess["crop"]))


def classify_images(
    loaded: LoadedModel, images: Sequence[str | Path], *, ten_crop: bool = False, top_k: int = TOP_K
) -> list[ImageResult]:
    """Each image's ``top_k`` classes; an unreadable image gets its error and the others go on."""
    from alexnet_dist.training.evaluation import predict

    preprocess = loaded.meta["preprocess"]
    k = min(top_k, loaded.model.num_classes)
    results: list[ImageResult | None] = [None] * len(images)
    pending: list[tuple[int, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        probs = predict(loaded.model, torch.stack([v for _, v in pending]))
        values, indices = probs.topk(k, dim=1)
        for (i, _), p, ix in zip(pending, values.tolist(), indices.tolist(), strict=True):
            top = tuple(Prediction(c, loaded.names[c], float(q)) for c, q in zip(ix, p, strict=True))
            results[i] = ImageResult(str(images[i]), top)
        pending.clear()

    for i, path in enumerate(images):
        try:
            pending.append((i, image_views(read_image(path), preprocess, ten_crop=ten_crop)))
        except AlexNetDistError as err:
            results[i] = ImageResult(str(path), error=str(err))
        if len(pending) == BATCH:
            flush()
    flush()
    return [r for r in results if r is not None]
