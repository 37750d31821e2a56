"""The paper's augmentation (section 4.1): statistics of crops, flips and PCA lighting; crops; normalize."""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF

from alexnet_dist.data import augment

EIGVAL = (5000.0, 300.0, 80.0)  # (0-255)^2, of the order of ImageNet's
EIGVEC = ((0.58, 0.58, 0.57), (-0.70, 0.01, 0.71), (0.41, -0.81, 0.41))


def test_train_params_are_a_function_of_seed_epoch_key():
    a = augment.train_params(1, 2, "k", 256, 256, 227)
    assert a == augment.train_params(1, 2, "k", 256, 256, 227)
    assert a != augment.train_params(1, 3, "k", 256, 256, 227)
    assert a != augment.train_params(2, 2, "k", 256, 256, 227)
    assert a != augment.train_params(1, 2, "k2", 256, 256, 227)


def test_crop_positions_flip_rate_and_lighting_statistics():
    n, h, crop, sigma = 20000, 256, 227, 0.1
    params = [augment.train_params(0, 0, f"img{i}", h, h, crop) for i in range(n)]
    tops = np.array([p[0] for p in params])
    lefts = np.array([p[1] for p in params])
    flips = np.array([p[2] for p in params])
    # uniform over 0..29: mean 14.5, variance (30^2 - 1) / 12 = 74.9; every position reached
    assert set(tops) == set(range(h - crop + 1)) and set(lefts) == set(range(h - crop + 1))
    assert abs(tops.mean() - 14.5) < 0.25 and abs(lefts.mean() - 14.5) < 0.25
    assert abs(tops.var() - 74.92) < 3
    assert abs(flips.mean() - 0.5) < 0.015  # 4.2 standard errors
    assert abs(np.corrcoef(tops, lefts)[0, 1]) < 0.03
    alphas = np.array([p[3] for p in params])
    # the alphas are independent N(0, 1): moments, and the normal's tail (2.3% beyond 2 sigma)
    assert np.abs(alphas.mean(0)).max() < 0.03 and np.abs(alphas.std(0) - 1).max() < 0.02
    assert np.abs(np.corrcoef(alphas.T) - np.eye(3)).max() < 0.03
    assert abs((alphas > 2).mean() - 0.02275) < 0.004
    offsets = np.stack([augment.lighting_offset(a, EIGVAL, EIGVEC, sigma) for a in alphas])
    # the loader's batched form gives the very same bits, whatever the batch
    matrix = augment.lighting_matrix(EIGVAL, EIGVEC, sigma)
    assert np.array_equal(augment.lighting_offsets(alphas, matrix), offsets)
    assert np.array_equal(augment.lighting_offsets(alphas[5:8], matrix), offsets[5:8])
    # offset = P^T diag(sigma * lambda / 255) alpha  =>  cov = P^T diag((sigma * lambda / 255)^2) P
    p = np.array(EIGVEC)
    expected = p.T @ np.diag((sigma * np.array(EIGVAL) / 255) ** 2) @ p
    assert np.abs(offsets.mean(0)).max() < 0.05
    assert np.allclose(np.cov(offsets.T), expected, rtol=0.05, atol=0.01)
    assert abs(offsets.std(0)[0] - np.sqrt(expected[0, 0])) / np.sqrt(expected[0, 0]) < 0.03  # ~1.1 units


def test_random_crop_flip_takes_the_named_patch():
    img = torch.arange(3 * 8 * 8, dtype=torch.int32).reshape(3, 8, 8).to(torch.uint8)
    out = augment.random_crop_flip(img, 2, 1, False, 5)
    assert torch.equal(out, img[:, 2:7, 1:6])
    assert torch.equal(augment.random_crop_flip(img, 2, 1, True, 5), img[:, 2:7, 1:6].flip(-1))


def test_write_view_writes_the_patch_in_hwc_from_any_layout():
    chw = torch.randint(0, 256, (3, 12, 10), dtype=torch.uint8)
    hwc_backed = chw.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # what the JPEG decoder returns
    for img in (chw, hwc_backed):
        for flip in (False, True):
            dst = torch.zeros(6, 6, 3, dtype=torch.uint8)
            augment.write_view(dst, img, 4, 3, flip)
            assert torch.equal(dst.permute(2, 0, 1), augment.random_crop_flip(chw, 4, 3, flip, 6))


def test_write_ten_crop_matches_ten_crop():
    img = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8)
    dst = torch.empty(10, 32, 32, 3, dtype=torch.uint8)
    augment.write_ten_crop(dst, img)
    assert torch.equal(dst.permute(0, 3, 1, 2), augment.ten_crop(img, 32))


def test_center_and_ten_crop_match_torchvision():
    img = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8)
    assert torch.equal(augment.center_crop(img, 32), TF.center_crop(img, [32, 32]))
    ours = augment.ten_crop(img, 32)
    theirs = torch.stack(TF.ten_crop(img, [32, 32]))  # 4 corners + centre, then the mirrored five
    assert ours.shape == (10, 3, 32, 32) and torch.equal(ours, theirs)


def test_fit_min_side_upscales_small_images_only():
    small = torch.randint(0, 256, (3, 28, 40), dtype=torch.uint8)
    assert augment.fit_min_side(small, 32).shape == (3, 32, 46)
    big = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert augment.fit_min_side(big, 32) is big


def test_normalize_formula_and_ten_crop_dims():
    mean, std = (120.0, 110.0, 100.0), (60.0, 55.0, 50.0)
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    light = torch.tensor([[1.0, -2.0, 3.0]] * 4)
    out = augment.normalize(x, light, mean, std, device="cpu", channels_last=True)
    expected = (x.float() + light[:, :, None, None] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[
        :, None, None
    ]
    assert out.dtype == torch.float32 and torch.allclose(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    # the loader's batches are HWC in memory; the result is laid out as asked, the values the same
    hwc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    plain = augment.normalize(hwc, light, mean, std, device="cpu")
    assert plain.is_contiguous() and torch.equal(plain, out)
    ten = torch.randint(0, 256, (2, 10, 3, 5, 5), dtype=torch.uint8)
    out10 = augment.normalize(ten, torch.zeros(2, 3), mean, std, device="cpu")
    assert out10.shape == (2, 10, 3, 5, 5)
    assert torch.allclose(out10[1, 7, 2], (ten[1, 7, 2].float() - 100.0) / 50.0)


def test_decode_image_gives_rgb_chw():
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20, 10), 200).save(buf, format="JPEG")
    img = augment.decode_image(buf.getvalue())
    assert img.shape == (3, 10, 20) and img.dtype == torch.uint8
    assert abs(int(img.float().mean()) - 200) <= 1
    assert torch.equal(augment.decode_image(bytearray(buf.getvalue())), img)
