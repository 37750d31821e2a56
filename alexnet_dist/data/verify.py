"""``alexnet-dist shards verify``: every shard of a manifest read, checked and every image decoded.

Each shard is checked against the manifest (size, sha256, sample count) and each of its records by the rule
the loader's streams apply (:func:`alexnet_dist.data.records.check_record`); each good record's image is
decoded whole. The report lists every problem found, a whole-shard one under the key ``"*"``.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from alexnet_dist import storage
from alexnet_dist.data.manifest import Manifest
from alexnet_dist.data.records import check_record
from alexnet_dist.data.tar import iter_tar
from alexnet_dist.errors import StorageError


@dataclass(frozen=True)
class BadSample:
    shard: str
    key: str  # "*" for a whole-shard problem (size, checksum, truncation)
    problem: str


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0  # samples read
    good: int = 0
    bad: list[BadSample] = field(default_factory=list)

    @property
    def bad_shards(self) -> set[str]:
        return {b.shard for b in self.bad}

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": self.shards,
            "samples": self.samples,
            "good": self.good,
            "bad": [{"shard": b.shard, "key": b.key, "problem": b.problem} for b in self.bad],
        }


def verify_manifest(
    manifest: Manifest, *, endpoint_url: str | None = None, progress: Callable[[], None] | None = None
) -> VerifyReport:
    """Read every shard: size and sha256 against the manifest; decode every image, check every label."""
    # imported here: augment imports torchvision, slow to load, and the CLI imports this module at start
    from alexnet_dist.data.augment import decode_image

    report = VerifyReport(shards=len(manifest.shards))
    for shard in manifest.shards:
        try:
            data = storage.read_bytes(shard.url, endpoint_url=endpoint_url)
        except StorageError as err:
            report.bad.append(BadSample(shard.url, "*", str(err)))
            continue
        if len(data) != shard.bytes:
            report.bad.append(BadSample(shard.url, "*", f"{len(data)} bytes, manifest says {shard.bytes}"))
        if hashlib.sha256(data).hexdigest() != shard.sha256:
            report.bad.append(BadSample(shard.url, "*", "sha256 differs from the manifest"))
        seen = 0
        try:
            for key, files in iter_tar(io.BytesIO(data)):
                seen += 1
                ext, _, problem = check_record(files, len(manifest.classes))
                if not problem:
                    try:
                        decode_image(files[ext])  # type: ignore[index]
                    except Exception as err:
                        problem = f"cannot decode {ext}: {type(err).__name__}"
                if problem:
                    report.bad.append(BadSample(shard.url, key, problem))
                else:
                    report.good += 1
        except (tarfile.TarError, EOFError) as err:
            report.bad.append(BadSample(shard.url, "*", f"tar unreadable after {seen} samples: {err}"))
        if seen != shard.count:
            report.bad.append(BadSample(shard.url, "*", f"{seen} samples, manifest says {shard.count}"))
        report.samples += seen
        if progress:
            progress()
    return report
