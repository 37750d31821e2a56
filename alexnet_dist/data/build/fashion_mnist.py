"""Read the Fashion-MNIST idx files (Debian's dataset-fashion-mnist) into numpy arrays."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from alexnet_dist.errors import DataError, NotFoundError

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
SPLITS = {"train": "train", "test": "t10k"}


def _open(path: Path):
    if path.exists():
        return open(path, "rb")
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rb")
    raise NotFoundError(f"{path}[.gz]: not found; install Debian's dataset-fashion-mnist (`make setup`)")


def read_idx(path: Path) -> np.ndarray:
    """Parse one idx file (``.gz`` or plain): magic 0x0000 08 <ndim>, big-endian dims, then uint8 data."""
    with _open(path) as f:
        header = f.read(4)
        if len(header) != 4 or header[:3] != b"\x00\x00\x08":
            raise DataError(f"{path}: not an idx file of unsigned bytes")
        ndim = header[3]
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated ({data.size} bytes of {int(np.prod(dims))})")
    return data.reshape(dims)


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the ``train`` or ``test`` split."""
    if split not in SPLITS:
        raise DataError(f"fashion-mnist split {split!r}: use 'train' or 'test'")
    root = Path(root)
    images = read_idx(root / f"{SPLITS[split]}-images-idx3-ubyte")
    labels = read_idx(root / f"{SPLITS[split]}-labels-idx1-ubyte")
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels
