"""The network of Krizhevsky, Sutskever & Hinton (2012), built as two towers.

The paper trained on two GTX 580s, half of every layer's kernels on each GPU (section 3.2). We keep
that split as two modules, ``tower_a`` and ``tower_b``, which may live on different devices. The
towers talk only where the paper's GPUs did:

* conv3 sees the conv2 maps of *both* towers;
* fc6 and fc7 see every unit of the layer below, in both towers;
* fc8 (one layer, on ``devices[0]``) sees fc7 of both towers.

Everywhere else (conv1, conv2, conv4, conv5, their LRN and pooling) a tower sees only its own maps.
Parameter names never mention devices, so a state dict saved from one placement loads into another.

The model knows nothing of Ray, data or storage: it is built from an :class:`AlexNetConfig` alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_dist.errors import ConfigError
from alexnet_dist.kernels import lrn as lrn_kernel
from alexnet_dist.kernels import maxpool as maxpool_kernel
from alexnet_dist.model.config import PRESETS, AlexNetConfig

__all__ = [
    "AlexNet",
    "LocalResponseNorm",
    "MaxPool2d",
    "build_model",
    "count_parameters",
    "local_response_norm",
    "relu_lrn",
]


def build_model(
    preset: str | AlexNetConfig = "paper",
    *,
    num_classes: int = 1000,
    devices: tuple[str | torch.device, str | torch.device] = ("cpu", "cpu"),
) -> AlexNet:
    """Build AlexNet from a preset name or a config, towers placed on ``devices``."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"model.preset={preset!r}: unknown; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    return AlexNet(num_classes=num_classes, config=preset, devices=devices)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Local response normalization
#
# torch.nn.LocalResponseNorm pads and runs avg_pool3d over the squared input: on conv1's output it is a
# large share of a CPU training step (bench/model.py measures it).
# The sum over n neighbouring channels is a banded C x C matrix applied at every pixel: a 1x1
# convolution, which the convolution kernels run at close to memory speed, and which takes alpha
# and k as its weight and bias. The backward pass has a closed form through the same band:
#   y_c = x_c * s_c^-beta,  s_c = k + alpha * sum_{j in W(c)} x_j^2
#   dx_j = g_j * s_j^-beta - 2 alpha beta x_j * sum_{c: j in W(c)} g_c x_c s_c^-beta / s_c
# so forward and backward are five memory passes each, against ~16 for a chain of slice additions.
# On the CPU, relu_lrn goes one step further: a C kernel (kernels/csrc/lrn.c) fuses the ReLU before the
# LRN and makes one pass each way (bench/model.py compares the three); this formulation stays as the
# reference it is tested against and as the path for GPUs, other dtypes and machines without the kernel.


def _band(channels: int, size: int, x: torch.Tensor) -> torch.Tensor:
    """1x1 conv weight B with B[c, j] = 1 when channel j is in channel c's window (zeros past the edges)."""
    lo = (size - 1) // 2
    hi = size - 1 - lo
    i = torch.arange(channels, device=x.device)
    d = i[None, :] - i[:, None]
    return ((d >= -lo) & (d <= hi)).to(x.dtype)[:, :, None, None]


class _LRNFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)  # bf16 would lose alpha * sum
    def forward(ctx: Any, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        channels = x.shape[1]
        band = _band(channels, size, x)
        bias = torch.full((channels,), k, dtype=x.dtype, device=x.device)
        scale = F.conv2d(x * x, band * alpha, bias)
        scale_pow = scale.pow(-beta)
        ctx.save_for_backward(x, scale, scale_pow, band)
        ctx.grad_factor = -2.0 * alpha * beta
        return x * scale_pow

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, scale, scale_pow, band = ctx.saved_tensors
        inner = (grad * x * scale_pow).div_(scale)
        # dx_j sums over the channels c whose window holds j: the transposed band (the same for odd n)
        inner = F.conv2d(inner, band.transpose(0, 1) * ctx.grad_factor)
        dx = (grad * scale_pow).addcmul_(x, inner)
        return dx, None, None, None, None


def local_response_norm(
    x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> torch.Tensor:
    """The paper's LRN (section 3.3), alpha applied to the plain sum of squares (not divided by n).

    Runs in float32 under CUDA autocast: bf16 sums of squares would lose the small alpha term.
    """
    return _LRNFunction.apply(x, size, alpha, beta, k)


def relu_lrn(
    x: torch.Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0
) -> torch.Tensor:
    """LRN(ReLU(x)), as after conv1 and conv2: the fused CPU kernel where it runs, else torch ops."""
    if lrn_kernel.supports(x) and lrn_kernel.available():
        return lrn_kernel.relu_lrn(x, size, alpha, beta, k)
    return local_response_norm(F.relu(x), size, alpha, beta, k)


class LocalResponseNorm(nn.Module):
    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k)

    def relu_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This LRN applied to ReLU(x), fused on the CPU."""
        return relu_lrn(x, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class MaxPool2d(nn.MaxPool2d):
    """Overlapping max-pooling (section 3.4); on the CPU through the C kernel of ``maxpool_kernel``.

    torch's CPU kernel branches on every comparison, and half of them go either way on real activations
    (bench/model.py and bench/kernels.py measure what the kernel saves). Same outputs and gradients bit
    for bit; tiny maps (pool5 of the small preset) stay with torch, whose per-call cost is lower.
    """

    NATIVE_MIN_ELEMENTS = 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        if (
            isinstance(k, int)
            and isinstance(s, int)
            and self.padding == 0
            and self.dilation == 1
            and not self.ceil_mode
            and not self.return_indices
            and x.numel() >= self.NATIVE_MIN_ELEMENTS
            and maxpool_kernel.supports(x, k, s)
            and maxpool_kernel.available()
        ):
            return maxpool_kernel.max_pool(x, k, s)
        return super().forward(x)


# --------------------------------------------------------------------------------------------------
# The towers


class Tower(nn.Module):
    """One half of AlexNet: half the kernels of every layer but fc8."""

    def __init__(self, cfg: AlexNetConfig) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (c // 2 for c in cfg.channels)
        k, s, p = cfg.kernels, cfg.strides, cfg.paddings
        self.conv1 = nn.Conv2d(cfg.in_channels, c1, k[0], s[0], p[0])
        self.conv2 = nn.Conv2d(c1, c2, k[1], s[1], p[1])  # own tower's conv1 maps only
        self.conv3 = nn.Conv2d(2 * c2, c3, k[2], s[2], p[2])  # both towers' conv2 maps
        self.conv4 = nn.Conv2d(c3, c4, k[3], s[3], p[3])  # own tower only
        self.conv5 = nn.Conv2d(c4, c5, k[4], s[4], p[4])  # own tower only
        f = cfg.feature_size()
        self.fc6 = nn.Linear(2 * c5 * f * f, cfg.fc_units // 2)  # all of pool5, both towers
        self.fc7 = nn.Linear(cfg.fc_units, cfg.fc_units // 2)  # all of fc6, both towers
        self.lrn = LocalResponseNorm(cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k)
        self.pool = MaxPool2d(cfg.pool_kernel, cfg.pool_stride)
        self.dropout = nn.Dropout(cfg.dropout)


def _cross(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, in the compute dtype when autocast runs there: maps cross between the towers'
    devices in bf16, not in the float32 that LRN and pooling hand on (the next layer would cast anyway).
    On one device it is ``t`` itself."""
    if t.device == device:
        return t
    if torch.is_autocast_enabled(device.type) and t.dtype == torch.float32:
        t = t.to(torch.get_autocast_dtype(device.type))
    return t.to(device, non_blocking=True)


class AlexNet(nn.Module):
    """AlexNet as two towers on ``devices = (d0, d1)``; logits come back on ``d0``."""

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        config: AlexNetConfig | None = None,
        devices: tuple[str | torch.device, str | torch.device] = ("cpu", "cpu"),
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"model.num_classes={num_classes}: need at least 2 classes")
        self.config = config or PRESETS["paper"]
        self.num_classes = num_classes
        self.tower_a = Tower(self.config)
        self.tower_b = Tower(self.config)
        self.fc8 = nn.Linear(self.config.fc_units, num_classes)
        self.reset_parameters()
        self.place(devices)

    @property
    def devices(self) -> tuple[torch.device, torch.device]:
        return self._devices

    def place(self, devices: tuple[str | torch.device, str | torch.device]) -> AlexNet:
        """Move tower A (and fc8) to ``devices[0]``, tower B to ``devices[1]``."""
        d0, d1 = (torch.device(d) for d in devices)
        self.tower_a.to(d0)
        self.fc8.to(d0)
        self.tower_b.to(d1)
        self._devices = (d0, d1)
        return self

    def reset_parameters(self) -> None:
        """Section 5: weights from N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0."""
        cfg = self.config
        for name, module in self.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                layer = name.rsplit(".", 1)[-1]
                if cfg.init == "kaiming":
                    last = module is self.fc8
                    nn.init.kaiming_normal_(module.weight, nonlinearity="linear" if last else "relu")
                    nn.init.zeros_(module.bias)
                else:
                    nn.init.normal_(module.weight, 0.0, cfg.init_std)
                    nn.init.constant_(module.bias, 1.0 if layer in cfg.init_bias_one else 0.0)

    def _lrn_pool(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ReLU → LRN → overlapping max-pool, per tower (or across towers for Caffe's models)."""
        ta, tb = self.tower_a, self.tower_b
        if self.config.lrn_span == "all":  # Caffe's LRN window runs over both groups' maps
            n = a.shape[1]
            both = ta.lrn.relu_forward(torch.cat([a, b.to(a.device)], dim=1))
            a, b = both[:, :n], both[:, n:].to(b.device)
        else:
            a, b = ta.lrn.relu_forward(a), tb.lrn.relu_forward(b)
        return ta.pool(a), tb.pool(b)

    def forward(self, x: torch.Tensor, x_b: torch.Tensor | None = None) -> torch.Tensor:
        """Logits on d0. ``x_b``: tower B's copy of the input, already on d1 (the training loop normalizes
        the uint8 batch on each device rather than send floats from d0); by default ``x`` goes to both."""
        d0, d1 = self._devices
        ta, tb = self.tower_a, self.tower_b
        xa = x.to(d0, non_blocking=True)
        xb = x_b if x_b is not None else x.to(d1, non_blocking=True)
        a, b = self._lrn_pool(ta.conv1(xa), tb.conv1(xb))
        a, b = self._lrn_pool(ta.conv2(a), tb.conv2(b))
        # conv3: each tower sees both towers' maps, in the order (A, B) as in a grouped convolution.
        a, b = torch.cat([a, _cross(b, d0)], dim=1), torch.cat([_cross(a, d1), b], dim=1)
        a, b = F.relu(ta.conv3(a), inplace=True), F.relu(tb.conv3(b), inplace=True)
        a, b = F.relu(ta.conv4(a), inplace=True), F.relu(tb.conv4(b), inplace=True)
        a, b = F.relu(ta.conv5(a), inplace=True), F.relu(tb.conv5(b), inplace=True)
        a, b = ta.pool(a).flatten(1), tb.pool(b).flatten(1)
        # fc6: flatten(cat(A, B)) == cat(flatten(A), flatten(B)) since channels are the outer dim.
        a, b = torch.cat([a, _cross(b, d0)], dim=1), torch.cat([_cross(a, d1), b], dim=1)
        a, b = ta.dropout(F.relu(ta.fc6(a), inplace=True)), tb.dropout(F.relu(tb.fc6(b), inplace=True))
        a, b = torch.cat([a, _cross(b, d0)], dim=1), torch.cat([_cross(a, d1), b], dim=1)
        a, b = ta.dropout(F.relu(ta.fc7(a), inplace=True)), tb.dropout(F.relu(tb.fc7(b), inplace=True))
        return self.fc8(torch.cat([a, _cross(b, d0)], dim=1))
