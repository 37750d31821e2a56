"""Decoding only a view's crop of a JPEG (csrc/jpeg_crop.c): the same pixels as a whole decode, cropped."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_dist.data import augment
from alexnet_dist.data.decoders import DECODERS
from alexnet_dist.data.loader import LoaderConfig, make_loader
from alexnet_dist.kernels import jpeg as jpeg_kernel

pytestmark = pytest.mark.skipif(not jpeg_kernel.available(), reason="no C compiler or libjpeg headers")


def jpeg(h: int, w: int, *, seed: int, quality: int = 90, subsampling: int = 2, gray: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: every DCT frequency and the chroma upsampling get exercised
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 255 / h, xx * 255 / w, (yy + xx) * 127 / (h + w)], axis=-1) + rng.normal(
        0, 25, (h, w, 3)
    )
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    (img.convert("L") if gray else img).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


@pytest.mark.parametrize(("h", "w", "subsampling", "gray"), [
    (256, 256, 2, False),  # 4:2:0, the shards' PIL default
    (256, 300, 1, False),  # 4:2:2, wider than tall
    (241, 256, 0, False),  # 4:4:4, a height that is not a multiple of the iMCU
    (256, 256, 2, True),  # grayscale comes out as RGB
])  # fmt: skip
def test_crop_equals_whole_decode_cropped(h: int, w: int, subsampling: int, gray: bool) -> None:
    data = jpeg(h, w, seed=h + w, subsampling=subsampling, gray=gray)
    assert jpeg_kernel.jpeg_size(data) == (h, w)
    whole = augment.decode_image(data).permute(1, 2, 0)  # torchvision's decoder, HWC
    rng = np.random.default_rng(0)
    corners = [(0, 0), (h - 227, w - 227), (0, w - 227), (h - 227, 0)]
    for top, left in corners + [
        (int(rng.integers(0, h - 226)), int(rng.integers(0, w - 226))) for _ in range(6)
    ]:
        for flip in (False, True):
            out = torch.empty(227, 227, 3, dtype=torch.uint8)
            jpeg_kernel.decode_crop_into(out, bytearray(data) if flip else data, top, left, flip)
            want = whole[top : top + 227, left : left + 227]
            assert torch.equal(out, want.flip(1) if flip else want), (top, left, flip)


def test_corrupt_truncated_and_out_of_range_are_errors() -> None:
    data = jpeg(256, 256, seed=1)
    out = torch.empty(227, 227, 3, dtype=torch.uint8)
    for bad in (data[: len(data) // 2], data[:400], b"\xff\xd8\xff" + b"not a jpeg" * 30):
        with pytest.raises(ValueError, match=r"\w"):
            jpeg_kernel.decode_crop_into(out, bad, 0, 0, False)
    with pytest.raises(ValueError, match="outside"):
        jpeg_kernel.decode_crop_into(out, data, 30, 0, False)
    with pytest.raises(ValueError):
        jpeg_kernel.jpeg_size(b"\xff\xd8\xff\xe0 nothing else")
    with pytest.raises(ValueError, match="contiguous uint8"):
        jpeg_kernel.decode_crop_into(torch.empty(3, 227, 227, dtype=torch.uint8), data, 0, 0, False)


def test_view_is_placed_by_the_samples_draws_with_one_call() -> None:
    data = jpeg(256, 300, seed=7)
    whole = augment.decode_image(data).permute(1, 2, 0)
    out = torch.empty(227, 227, 3, dtype=torch.uint8)
    for key in ("a", "b", "c", "d"):
        top_draw, left_draw, flip, _ = augment.train_draws(5, 2, key)
        top, left, flip2, _ = augment.train_params(5, 2, key, 256, 300, 227)
        assert flip2 == flip and 0 <= top <= 29 and 0 <= left <= 73
        assert jpeg_kernel.decode_view_into(out, data, (top_draw, left_draw), flip)
        want = whole[top : top + 227, left : left + 227]
        assert torch.equal(out, want.flip(1) if flip else want), key
    assert jpeg_kernel.decode_view_into(out, data, None)  # the centre, unflipped
    assert torch.equal(out, whole[14:241, 36:263])
    small = torch.full((300, 300, 3), 7, dtype=torch.uint8)
    assert not jpeg_kernel.decode_view_into(small, data, None)  # smaller than the view: nothing written
    assert torch.all(small == 7)
    with pytest.raises(ValueError, match=r"\w"):
        jpeg_kernel.decode_view_into(out, data[:300], (1, 2), False)


def test_a_batch_of_views_in_one_call_skips_the_bad_and_the_small() -> None:
    """decode_views_into: the good views fill consecutive slots, each as one decode_view_into call puts
    it; a corrupt JPEG gets status 1 and its message, one smaller than the view status 2, neither a slot."""
    datas = [jpeg(256, 256 + 8 * i, seed=20 + i) for i in range(5)]
    datas[1] = datas[1][:500]  # truncated
    datas[3] = jpeg(200, 200, seed=3)  # smaller than 227
    draws = [(2**63 + 12345 * i, 987654321 * i) for i in range(5)]
    flips = [i % 2 == 0 for i in range(5)]
    out = torch.full((6, 227, 227, 3), 7, dtype=torch.uint8)
    codes, messages = jpeg_kernel.decode_views_into(out, [bytearray(d) for d in datas], draws, flips)
    assert codes == [0, 1, 0, 2, 0]
    assert messages[1] and not any(messages[i] for i in (0, 2, 3, 4))
    one = torch.empty(227, 227, 3, dtype=torch.uint8)
    for slot, i in enumerate((0, 2, 4)):
        assert jpeg_kernel.decode_view_into(one, datas[i], draws[i], flips[i])
        assert torch.equal(out[slot], one), i
    assert torch.all(out[3:] == 7)  # nothing written past the three good views
    codes, _ = jpeg_kernel.decode_views_into(out, [datas[0], datas[2]], None)  # centre views
    assert codes == [0, 0] and jpeg_kernel.decode_view_into(one, datas[2], None)
    assert torch.equal(out[1], one)
    with pytest.raises(ValueError, match="contiguous"):
        jpeg_kernel.decode_views_into(out[:1], datas[:2], None)  # fewer slots than images


@pytest.mark.parametrize("decoder", sorted(set(DECODERS) - {"whole"}))
@pytest.mark.parametrize(("mode", "crop"), [("train", 32), ("val", 32), ("train", 40)])
def test_loader_batches_are_the_same_either_way(
    fashion_mnist_dir, tmp_path, mode: str, crop: int, decoder: str
) -> None:
    """Every decoder's batches equal those of ``whole`` (torchvision's decode of the whole image)."""
    from shardkit import build_fashion

    manifest = build_fashion(fashion_mnist_dir, tmp_path, limit=120, shard_size=40)
    assert manifest.image_size < 40  # crop 40: every image is upscaled first (the whole-decode path)
    batches = {}
    for name in (decoder, "whole"):
        cfg = LoaderConfig(batch_size=16, crop=crop, mode=mode, seed=3, num_workers=0, decoder=name)
        batches[name] = list(make_loader(manifest, cfg, rank=0, world_size=1))
    assert len(batches[decoder]) == len(batches["whole"]) > 0
    for a, b in zip(batches[decoder], batches["whole"], strict=True):
        assert a.keys == b.keys
        assert torch.equal(a.images, b.images) and torch.equal(a.lighting, b.lighting)
        assert torch.equal(a.labels, b.labels)
