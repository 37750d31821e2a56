"""The decoders by name: each writes every sample's view as the augmentation defines it, whichever it is."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_dist.data import augment
from alexnet_dist.data.decoders import DECODERS, Views, get_decoder
from alexnet_dist.data.loader import LoaderConfig
from alexnet_dist.errors import ConfigError

CROP = 32


def encoded(h: int, w: int, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 255 / h, xx * 255 / w, (yy + xx) * 127 / (h + w)], axis=-1) + rng.normal(
        0, 20, (h, w, 3)
    )
    buf = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buf, format=fmt, quality=90)
    return buf.getvalue()


# (url, key, label, bytes): JPEGs big enough for the view, a PNG, a JPEG smaller than the view, a corrupt JPEG
RECORDS = [
    ("s0.tar", "big_a", 1, encoded(40, 48, "JPEG", 0)),
    ("s0.tar", "png", 2, encoded(36, 36, "PNG", 1)),
    ("s0.tar", "big_b", 3, encoded(48, 40, "JPEG", 2)),
    ("s0.tar", "small", 4, encoded(20, 24, "JPEG", 3)),
    ("s0.tar", "corrupt", 5, b"\xff\xd8\xff" + b"\x00" * 50),
    ("s0.tar", "big_c", 6, encoded(33, 60, "JPEG", 4)),
]


def expected_view(data: bytes, key: str, views: Views) -> tuple[torch.Tensor, augment.Alphas | None]:
    """The view as the augmentation defines it: the whole image decoded (upscaled if small), then cut."""
    img = augment.fit_min_side(augment.decode_image(data), CROP)
    if views.mode == "ten_crop":
        return augment.ten_crop(img, CROP).permute(0, 2, 3, 1), None
    top, left, flip, alphas = views.position(key, *img.shape[-2:])
    view = img[:, top : top + CROP, left : left + CROP]
    return (view.flip(-1) if flip else view).permute(1, 2, 0)[None], alphas


@pytest.mark.parametrize("mode", ["train", "val", "ten_crop"])
@pytest.mark.parametrize("name", sorted(DECODERS))
def test_each_decoder_writes_every_view_as_augment_defines_it(name: str, mode: str) -> None:
    views = Views(mode, CROP, seed=9, epoch=2)
    slots = torch.full(
        (len(RECORDS) + 1, 10 if mode == "ten_crop" else 1, CROP, CROP, 3), 7, dtype=torch.uint8
    )
    bad: list[tuple[str, str, str]] = []
    written = get_decoder(name).write(slots[1:], RECORDS, views, lambda *b: bad.append(b))
    assert [(url, key) for url, key, _ in bad] == [("s0.tar", "corrupt")] and "cannot decode" in bad[0][2]
    assert sorted(k for k, _, _ in written) == sorted(r[1] for r in RECORDS if r[1] != "corrupt")
    records = {r[1]: r for r in RECORDS}
    for slot, (key, label, alphas) in enumerate(written, start=1):
        want, want_alphas = expected_view(records[key][3], key, views)
        assert label == records[key][2] and alphas == want_alphas
        assert torch.equal(slots[slot], want), (name, key)
    assert torch.all(slots[0] == 7) and torch.all(slots[len(written) + 1 :] == 7)  # no slot but its own


def test_an_unknown_decoder_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"loader decoder 'pil': unknown; use one of 'crop', 'whole', 'device'"
    ):
        LoaderConfig(batch_size=4, crop=CROP, mode="train", seed=0, decoder="pil")
    assert LoaderConfig(batch_size=4, crop=CROP, mode="train", seed=0).decoder == "crop"
