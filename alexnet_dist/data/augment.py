"""The paper's data augmentation (section 4.1) and input normalisation.

Training: a random ``crop x crop`` patch of the stored ``256 x 256`` image (227 for our conv1 arithmetic)
and its horizontal reflection with probability 1/2; PCA lighting ("altering the intensities of the RGB
channels"): add ``sum_i alpha_i * lambda_i * p_i`` with ``alpha_i ~ N(0, 0.1)`` drawn once per image.
Evaluation: the central crop, or ten crops (four corners + centre, and their reflections) whose softmax
outputs are averaged.

The paper's lambda_i are eigenvalues of the RGB covariance of pixels on the [0, 1] scale (as every
reimplementation, e.g. fb.resnet.torch, reads it). The manifest stores them on the 0-255 scale, where
the same offset in 0-255 units is ``sum_i alpha_i * lambda_i / 255 * p_i``.

Each sample's randomness is a hash of (seed, epoch, key), so the augmented stream is the same whatever the
number of loader workers and whichever worker decodes the sample.

The loader writes each view straight into its batch in HWC order (``write_view``), the order the JPEG
decoder produces: no per-pixel transpose on the loader's CPUs. The batch is handed out as a [B, 3, S, S]
tensor with channels-last strides; ``normalize`` lays it out on the device.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io as tvio  # imported here, once: forked loader workers inherit it

PCA_SIGMA = 0.1  # std of the lighting alphas (section 4.1)
_TO_UNIT = 2.0**-53  # a 53-bit integer times this: a float uniform on [0, 1)
_TAU = 2.0 * math.pi
# A digest's fields, little-endian: bytes 0-7 and 8-15 place the crop, byte 16's low bit flips, bytes 24-55
# are four 64-bit words whose top 53 bits make the uniforms of the Box-Muller alphas.
_DIGEST = struct.Struct("<QQB7xQQQQ")
Alphas = tuple[float, float, float]


def train_draws(seed: int, epoch: int, key: str) -> tuple[int, int, bool, Alphas]:
    """(top draw, left draw, flip, alphas) of one training sample: a pure function of (seed, epoch, key).

    Two 64-bit integers that place the crop (``draw % (side - crop + 1)``, see :func:`train_params`), a
    fair coin and three N(0, 1) draws (Box-Muller), all read off one 64-byte BLAKE2b digest: one hash a
    sample, far cheaper than seeding a numpy Generator per sample. The crop-only JPEG decoder takes the
    draws as they are, since it learns the image's size only from the header it reads anyway.
    """
    d = hashlib.blake2b(f"{seed}:{epoch}:{key}".encode(), digest_size=64).digest()
    top, left, flip, w0, w1, w2, w3 = _DIGEST.unpack_from(d)
    u0, u1 = (w0 >> 11) * _TO_UNIT, (w1 >> 11) * _TO_UNIT  # uniform on [0, 1)
    u2, u3 = (w2 >> 11) * _TO_UNIT, (w3 >> 11) * _TO_UNIT
    r0, r1 = math.sqrt(-2.0 * math.log1p(-u0)), math.sqrt(-2.0 * math.log1p(-u2))  # 1 - u in (0, 1]
    alphas = (r0 * math.cos(_TAU * u1), r0 * math.sin(_TAU * u1), r1 * math.cos(_TAU * u3))
    return top, left, bool(flip & 1), alphas


def train_params(seed: int, epoch: int, key: str, h: int, w: int, crop: int) -> tuple[int, int, bool, Alphas]:
    """(top, left, flip, alphas) of one training sample of an ``h x w`` image: a uniform crop position
    (modulo bias < 2^-50), a fair coin and the PCA lighting alphas (:func:`train_draws`)."""
    top, left, flip, alphas = train_draws(seed, epoch, key)
    return (*crop_position(top, left, h, w, crop), flip, alphas)


def crop_position(top_draw: int, left_draw: int, h: int, w: int, crop: int) -> tuple[int, int]:
    """(top, left) of a training crop in an ``h x w`` image, from its draws (:func:`train_draws`)."""
    return top_draw % (h - crop + 1), left_draw % (w - crop + 1)


_RGB = tvio.ImageReadMode.RGB.value


def decode_image(data: bytes | bytearray) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 RGB [3, H, W] (libjpeg-turbo via torchvision: faster than PIL).

    The result is HWC in memory (a CHW view). The op is called directly: torchvision's Python wrapper (API
    logging, a deprecation warning for torchcodec, its filtering) adds its cost to every image. A
    ``bytearray`` is decoded in place; ``bytes`` are copied first (torch wants a writable buffer).
    """
    buf = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
    return torch.ops.image.decode_image(buf, _RGB, False)


def fit_min_side(img: torch.Tensor, side: int) -> torch.Tensor:
    """Upscale (bilinear) so both sides are at least ``side``; shards we build are already big enough."""
    h, w = img.shape[-2:]
    if h >= side and w >= side:
        return img
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    out = F.interpolate(img[None].float(), size=size, mode="bilinear", align_corners=False, antialias=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def lighting_matrix(eigval: Sequence[float], eigvec: Sequence[Sequence[float]], sigma: float) -> np.ndarray:
    """[3, 3] float64 ``M`` with the RGB offset (0-255 units) = ``alphas @ M`` for unit-normal alphas.

    Row i is ``sigma * lambda_i / 255 * p_i``: the offset is sum_i sigma*alpha_i * lambda_i/255 * p_i.
    """
    scale = sigma * np.asarray(eigval, dtype=np.float64) / 255.0
    return scale[:, None] * np.asarray(eigvec, dtype=np.float64)


def lighting_offsets(alphas: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """float32 [N, 3] RGB offsets of unit-normal ``alphas`` [N, 3].

    Elementwise, not a BLAS matmul, so each row's bits do not depend on N (nor on the loader workers).
    """
    a = np.asarray(alphas, dtype=np.float64).reshape(-1, 3)
    return (a[:, 0:1] * matrix[0] + a[:, 1:2] * matrix[1] + a[:, 2:3] * matrix[2]).astype(np.float32)


def lighting_offset(
    alphas: Sequence[float], eigval: Sequence[float], eigvec: Sequence[Sequence[float]], sigma: float
) -> np.ndarray:
    """float32 (3,) RGB offset (0-255 units) for one sample's unit-normal ``alphas``."""
    return lighting_offsets(np.asarray(alphas), lighting_matrix(eigval, eigvec, sigma))[0]


def mirror(img: torch.Tensor) -> torch.Tensor:
    """Left-right reflection; numpy's negative-stride copy is much faster than ``torch.flip`` on uint8."""
    return torch.from_numpy(np.ascontiguousarray(img.numpy()[..., ::-1]))


def write_view(dst: torch.Tensor, img: torch.Tensor, top: int, left: int, flip: bool) -> None:
    """Copy the patch of ``img`` [3, H, W] at (top, left), mirrored when ``flip``, into ``dst``.

    ``dst`` is [crop, crop, 3] (HWC). The decoder's output is HWC in memory (a CHW view), so the copy is
    row by row, and a mirror copy reverses pixels: both cost a fraction of gathering the same patch into CHW
    (a transpose of every pixel).
    """
    crop = dst.shape[0]
    src = img.permute(1, 2, 0)[top : top + crop, left : left + crop]
    dst.copy_(src.flip(1) if flip else src)


def center_position(h: int, w: int, crop: int) -> tuple[int, int]:
    return (h - crop) // 2, (w - crop) // 2


def write_ten_crop(dst: torch.Tensor, img: torch.Tensor) -> None:
    """``ten_crop`` written into ``dst`` [10, crop, crop, 3] (HWC): five crops, then those of the mirror.

    The mirror's crop at (t, l) is the mirrored crop of the original at (t, W - crop - l).
    """
    crop, (h, w) = dst.shape[1], img.shape[-2:]
    five = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), center_position(h, w, crop)]
    for v, (top, left) in enumerate(five):
        write_view(dst[v], img, top, left, False)
        write_view(dst[5 + v], img, top, w - crop - left, True)


def random_crop_flip(img: torch.Tensor, top: int, left: int, flip: bool, crop: int) -> torch.Tensor:
    """[3, crop, crop] contiguous: the patch ``write_view`` writes, as its own tensor."""
    out = img[:, top : top + crop, left : left + crop]
    return (out.flip(-1) if flip else out).contiguous()


def center_crop(img: torch.Tensor, crop: int) -> torch.Tensor:
    top, left = center_position(*img.shape[-2:], crop)
    return img[:, top : top + crop, left : left + crop]


def five_crop(img: torch.Tensor, crop: int) -> torch.Tensor:
    """[5, 3, crop, crop]: top-left, top-right, bottom-left, bottom-right, centre."""
    h, w = img.shape[-2:]
    views = [img[:, :crop, :crop], img[:, :crop, w - crop :], img[:, h - crop :, :crop]]
    return torch.stack([*views, img[:, h - crop :, w - crop :], center_crop(img, crop)])


def ten_crop(img: torch.Tensor, crop: int) -> torch.Tensor:
    """[10, 3, crop, crop]: the five crops of the image, then of its mirror (torchvision's order)."""
    return torch.cat([five_crop(img, crop), five_crop(mirror(img), crop)])


def normalize(
    images_u8: torch.Tensor,
    lighting: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str,
    channels_last: bool = False,
) -> torch.Tensor:
    """``(x + lighting - mean) / std`` as float32 on ``device``; images [B,3,S,S] or ten-crop [B,10,3,S,S].

    The uint8 batch crosses to the device first (4x fewer bytes than float), then the arithmetic runs there.
    The loader's batches have channels-last strides (HWC in memory); the result is contiguous (NCHW), or
    channels-last when ``channels_last``, whatever the input's strides.
    """
    x = images_u8.to(device, non_blocking=True).float()
    light = lighting.to(device, non_blocking=True).float()
    shape = (1,) * (x.dim() - 3) + (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    light = light.view(light.shape[0], *([1] * (x.dim() - 4)), 3, 1, 1)
    x = (x + light - mean_t) / std_t
    layout = torch.channels_last if channels_last and x.dim() == 4 else torch.contiguous_format
    return x.contiguous(memory_format=layout)
