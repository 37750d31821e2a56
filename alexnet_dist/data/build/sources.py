"""Sources: where a split's samples come from, each an :class:`Item` in the order it will be sharded.

Recognised from the layout (:func:`detect_format`), or named:

- ``fashion-mnist``: the idx files (``train-images-idx3-ubyte[.gz]`` ...); both splits unless one is named;
- ``ilsvrc``: ``train/<wnid>/*.JPEG``; ``val/`` either sorted into ``val/<wnid>/`` or flat with Kaggle's
  ``LOC_val_solution.csv`` beside ``train/``; readable names from ``LOC_synset_mapping.txt`` if present;
- ``imagefolder``: a folder per class, either at SOURCE or under SOURCE/{train,val,test}.

Keys are stable (derived from the source path or index) and contain no dots (WebDataset splits the key at
the first dot): :func:`safe_key`. Labels index the training split's sorted class folders (Fashion-MNIST:
its ten classes in their order).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alexnet_dist.data.build import fashion_mnist
from alexnet_dist.errors import ConfigError, DataError, NotFoundError

FORMATS = ("imagefolder", "ilsvrc", "fashion-mnist")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff"}
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_/-]")
_WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class Item:
    key: str
    label: int
    origin: str
    path: str | None = None  # an image file, or
    pixels: np.ndarray | None = field(default=None, compare=False)  # a raw greyscale array (Fashion-MNIST)


@dataclass(frozen=True)
class SplitSource:
    name: str  # dataset name used in file names, e.g. "fashion-mnist", "imagenet"
    split: str
    items: list[Item]
    classes: tuple[str, ...]
    names: tuple[str, ...]


def detect_format(source: Path) -> str:
    if any((source / f"train-images-idx3-ubyte{s}").exists() for s in ("", ".gz")):
        return "fashion-mnist"
    train = source / "train"
    if train.is_dir() and any(_WNID.match(p.name) for p in train.iterdir() if p.is_dir()):
        return "ilsvrc"
    if source.is_dir():
        return "imagefolder"
    raise NotFoundError(f"{source}: not a folder; pass an ImageFolder, ILSVRC2012 or Fashion-MNIST folder")


def safe_key(text: str) -> str:
    return _KEY_UNSAFE.sub("_", text)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_items(root: Path, split: str, classes: list[str]) -> list[Item]:
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for cls in classes:
        for path in _images_in(root / cls) if (root / cls).is_dir() else []:
            rel = path.relative_to(root)
            items.append(
                Item(f"{split}/{safe_key(str(rel.with_suffix('')))}", index[cls], str(rel), str(path))
            )
    return items


def list_splits(source: Path, fmt: str, split: str | None) -> list[SplitSource]:
    """The splits to build, each with its items in the order they will be sharded."""
    if fmt == "fashion-mnist":
        out = []
        for s in [split] if split else ["train", "test"]:
            images, labels = fashion_mnist.load_split(source, s)
            items = [
                Item(f"{s}_{i:06d}", int(labels[i]), f"fashion-mnist:{s}:{i}", pixels=images[i])
                for i in range(len(images))
            ]
            classes = tuple(str(i) for i in range(len(fashion_mnist.CLASSES)))
            out.append(SplitSource("fashion-mnist", s, items, classes, fashion_mnist.CLASSES))
        return out
    if fmt == "ilsvrc":
        return _ilsvrc_splits(source, split)
    if fmt != "imagefolder":
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    named = [s for s in ("train", "val", "test") if (source / s).is_dir()]
    roots = (
        [(s, source / s) for s in ([split] if split else named)] if named else [(split or "train", source)]
    )
    train_root = source / "train" if (source / "train").is_dir() else roots[0][1]
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_root}: no class folders; an ImageFolder has one folder of images per class")
    return [
        SplitSource(source.name, s, _folder_items(root, s, classes), tuple(classes), tuple(classes))
        for s, root in roots
    ]


def _ilsvrc_splits(source: Path, split: str | None) -> list[SplitSource]:
    wnids = sorted(p.name for p in (source / "train").iterdir() if p.is_dir() and _WNID.match(p.name))
    names = dict.fromkeys(wnids, "")
    mapping = source / "LOC_synset_mapping.txt"
    if mapping.exists():
        for line in mapping.read_text().splitlines():
            wnid, _, words = line.partition(" ")
            if wnid in names:
                names[wnid] = words.strip()
    readable = tuple(names[w] or w for w in wnids)
    out = []
    for s in [split] if split else [s for s in ("train", "val") if (source / s).is_dir()]:
        root = source / s
        if s == "train" or any(_WNID.match(p.name) for p in root.iterdir() if p.is_dir()):
            items = _folder_items(root, s, wnids)
        else:
            items = _ilsvrc_flat_val(source, root, s, wnids)
        out.append(SplitSource("imagenet", s, items, tuple(wnids), readable))
    return out


def _ilsvrc_flat_val(source: Path, root: Path, split: str, wnids: list[str]) -> list[Item]:
    solution = source / "LOC_val_solution.csv"
    if not solution.exists():
        raise NotFoundError(
            f"{solution}: not found; sort {root} into <wnid>/ folders (the devkit's valprep.sh) "
            "or add Kaggle's LOC_val_solution.csv"
        )
    index = {w: i for i, w in enumerate(wnids)}
    labels = {}
    for line in solution.read_text().splitlines()[1:]:
        image_id, _, pred = line.partition(",")
        if pred.split():
            labels[image_id] = index.get(pred.split()[0], -1)
    items = []
    for path in _images_in(root):
        label = labels.get(path.stem)
        if label is None or label < 0:
            raise DataError(f"{path}: no ground truth in {solution}; check the file")
        items.append(Item(f"{split}/{safe_key(path.stem)}", label, f"{split}/{path.name}", str(path)))
    return items
