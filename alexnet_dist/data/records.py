"""What makes a shard's record a sample: an image under one of ``IMAGE_EXTS`` and a ``.cls`` label in range.

The loader's streams and ``alexnet-dist shards verify`` apply this one rule, so verification reports
exactly the records training would skip as bad.
"""

from __future__ import annotations

from collections.abc import Mapping

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def check_record(files: Mapping[str, bytes | bytearray], num_classes: int) -> tuple[str | None, int, str]:
    """(image extension, label, problem): a problem is "" for a good record."""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    if ext is None:
        return None, 0, "no image"
    if "cls" not in files:
        return ext, 0, "no .cls label"
    try:
        label = int(files["cls"].decode().strip())
    except ValueError:
        return ext, 0, f"label {files['cls'][:20]!r} is not an integer"
    if not 0 <= label < num_classes:
        return ext, label, f"label {label} outside 0..{num_classes - 1}"
    return ext, label, ""
