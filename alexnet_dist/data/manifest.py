"""The dataset manifest: one JSON file per split, written by ``shards build`` beside the shards.

It lists every shard (URL, sample count, bytes, sha256) so ranks can balance work by counts before reading
a byte, the class list, and the training pixels' statistics: per-channel mean and std for normalisation,
and the eigen-decomposition of the RGB covariance for the paper's PCA lighting (section 4.1).
All pixel figures are on the 0-255 scale, channels in RGB order. ``eigvec[i]`` (a row) is the unit
eigenvector of ``eigval[i]``; eigenvalues are sorted from largest to smallest.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from alexnet_dist import storage
from alexnet_dist.errors import DataError

FORMAT = "alexnet-dist/manifest@1"


@dataclass(frozen=True)
class ShardInfo:
    url: str
    count: int  # samples in the shard
    bytes: int  # size of the tar file
    sha256: str  # hex digest of the tar file


@dataclass(frozen=True)
class Manifest:
    url: str  # where this manifest was read from or written to
    split: str  # "train", "val", "test", ...
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...]  # class ids: WordNet ids for ImageNet, "0".."9" for Fashion-MNIST
    names: tuple[str, ...]  # readable class names, same order
    image_size: int  # side of the stored square images (256 in the paper, section 2)
    mean: tuple[float, float, float]  # RGB, 0-255
    std: tuple[float, float, float]  # RGB, 0-255
    eigval: tuple[float, float, float]  # RGB covariance eigenvalues, (0-255)^2, descending
    eigvec: tuple[tuple[float, float, float], ...]  # rows: unit eigenvectors of eigval
    num_samples: int
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # provenance: source, quality, ...

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "split": self.split,
            "num_samples": self.num_samples,
            "image_size": self.image_size,
            "classes": list(self.classes),
            "names": list(self.names),
            "mean": list(self.mean),
            "std": list(self.std),
            "eigval": list(self.eigval),
            "eigvec": [list(v) for v in self.eigvec],
            "shards": [
                {"url": s.url, "count": s.count, "bytes": s.bytes, "sha256": s.sha256} for s in self.shards
            ],
            **({"extra": self.extra} if self.extra else {}),
        }
        return json.dumps(doc, indent=1) + "\n"


def _field(doc: dict, name: str, kind: type | tuple[type, ...], url: str) -> Any:
    if name not in doc:
        raise DataError(f"{url}: manifest has no field {name!r}; rebuild it with `alexnet-dist shards build`")
    value = doc[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{url}: manifest field {name!r} is {type(value).__name__}; rebuild the manifest")
    return value


def _floats(doc: dict, name: str, n: int, url: str) -> tuple[float, ...]:
    values = _field(doc, name, list, url)
    if len(values) != n or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise DataError(f"{url}: manifest field {name!r} must be {n} finite numbers")
    return tuple(float(v) for v in values)


def _resolve(shard_url: str, manifest_url: str) -> str:
    """Shard URLs may be relative to the manifest's folder (then the folder can move)."""
    if "://" in shard_url or shard_url.startswith("/"):
        return shard_url
    loc = storage.parse_url(manifest_url)
    if loc.scheme == "s3":
        parent = str(PurePosixPath(loc.key).parent)
        return f"s3://{loc.bucket}/{'' if parent == '.' else parent + '/'}{shard_url}"
    return str(PurePosixPath(loc.key).parent / shard_url)


def parse_manifest(text: str, url: str) -> Manifest:
    """A Manifest from its JSON text; every error names ``url`` and the field."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{url}: not JSON ({err.msg} at line {err.lineno}); rebuild the manifest") from err
    if not isinstance(doc, dict):
        raise DataError(f"{url}: manifest must be a JSON object")
    shards = []
    for i, s in enumerate(_field(doc, "shards", list, url)):
        if not isinstance(s, dict):
            raise DataError(f"{url}: shards[{i}] must be an object")
        where = f"{url} shards[{i}]"
        count, nbytes = _field(s, "count", int, where), _field(s, "bytes", int, where)
        if count < 0 or nbytes < 0:
            raise DataError(f"{where}: negative count or bytes; rebuild the manifest")
        shards.append(
            ShardInfo(
                _resolve(_field(s, "url", str, where), url), count, nbytes, _field(s, "sha256", str, where)
            )
        )
    classes = tuple(str(c) for c in _field(doc, "classes", list, url))
    names = tuple(str(c) for c in doc.get("names") or classes)
    if len(names) != len(classes):
        raise DataError(f"{url}: manifest has {len(classes)} classes but {len(names)} names")
    eigvec = _field(doc, "eigvec", list, url)
    if len(eigvec) != 3 or not all(isinstance(v, list) and len(v) == 3 for v in eigvec):
        raise DataError(f"{url}: manifest field 'eigvec' must be 3 rows of 3 numbers")
    num_samples = _field(doc, "num_samples", int, url)
    if num_samples != sum(s.count for s in shards):
        raise DataError(
            f"{url}: num_samples {num_samples} != sum of shard counts {sum(s.count for s in shards)}"
        )
    image_size = _field(doc, "image_size", int, url)
    if image_size <= 0:
        raise DataError(f"{url}: manifest field 'image_size' must be positive")
    return Manifest(
        url=url,
        split=_field(doc, "split", str, url),
        shards=tuple(shards),
        classes=classes,
        names=names,
        image_size=image_size,
        mean=_floats(doc, "mean", 3, url),  # type: ignore[arg-type]
        std=_floats(doc, "std", 3, url),  # type: ignore[arg-type]
        eigval=_floats(doc, "eigval", 3, url),  # type: ignore[arg-type]
        eigvec=tuple(_floats({"v": v}, "v", 3, f"{url} eigvec") for v in eigvec),  # type: ignore[misc]
        num_samples=num_samples,
        extra=dict(doc.get("extra") or {}),
    )


def load_manifest(url: str, *, endpoint_url: str | None = None) -> Manifest:
    return parse_manifest(storage.read_bytes(url, endpoint_url=endpoint_url).decode("utf-8"), url)


def save_manifest(manifest: Manifest, url: str, *, endpoint_url: str | None = None) -> None:
    storage.write_bytes(url, manifest.to_json().encode(), endpoint_url=endpoint_url)
