"""A single-module AlexNet built from grouped convolutions: the yardstick for the two-tower model.

This is how Caffe's bvlc_alexnet writes the paper's network (``group: 2`` on conv2, conv4 and conv5), on
one device. Tests check that :class:`alexnet_dist.model.AlexNet` computes the same function, and the
benchmark measures what splitting into towers costs against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alexnet_dist.model.config import AlexNetConfig
from alexnet_dist.model.network import AlexNet, MaxPool2d, local_response_norm, relu_lrn

# (tower layer, grouped?) for the five convolutions; fc layers are split by output rows.
_CONVS = (("conv1", True), ("conv2", True), ("conv3", False), ("conv4", True), ("conv5", True))


class GroupedAlexNet(nn.Module):
    def __init__(self, num_classes: int, config: AlexNetConfig, *, cpu_kernels: bool = False) -> None:
        """``cpu_kernels``: ReLU+LRN and max-pooling through the model's own functions, its C kernels on the
        CPU (for benchmarks: only the split into towers differs), rather than the plain torch formulation
        and ``F.max_pool2d`` (for tests: an independent yardstick)."""
        super().__init__()
        self.cpu_kernels = cpu_kernels
        self.pool = MaxPool2d(config.pool_kernel, config.pool_stride) if cpu_kernels else None
        cfg = self.config = config
        ins = (cfg.in_channels, *cfg.channels[:4])
        self.convs = nn.ModuleList()
        for i, (_, grouped) in enumerate(_CONVS):
            # conv1 is "grouped" in the sense that each tower has its own kernels over the full RGB input:
            # that is a plain convolution with all 96 kernels, so groups=1 there.
            groups = 2 if grouped and i > 0 else 1
            self.convs.append(
                nn.Conv2d(
                    ins[i], cfg.channels[i], cfg.kernels[i], cfg.strides[i], cfg.paddings[i], groups=groups
                )
            )
        f = cfg.feature_size()
        self.fc6 = nn.Linear(cfg.channels[4] * f * f, cfg.fc_units)
        self.fc7 = nn.Linear(cfg.fc_units, cfg.fc_units)
        self.fc8 = nn.Linear(cfg.fc_units, num_classes)

    def _relu_lrn(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        args = (cfg.lrn_size, cfg.lrn_alpha, cfg.lrn_beta, cfg.lrn_k)
        lrn = relu_lrn if self.cpu_kernels else lambda t, *a: local_response_norm(F.relu(t), *a)
        if cfg.lrn_span == "all":
            return lrn(x, *args)
        a, b = x.chunk(2, dim=1)  # the window stays inside each group's maps
        return torch.cat([lrn(a.contiguous(), *args), lrn(b.contiguous(), *args)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        pool = self.pool or (lambda t: F.max_pool2d(t, cfg.pool_kernel, cfg.pool_stride))
        c1, c2, c3, c4, c5 = self.convs
        x = pool(self._relu_lrn(c1(x)))
        x = pool(self._relu_lrn(c2(x)))
        x = F.relu(c5(F.relu(c4(F.relu(c3(x))))))
        x = pool(x).flatten(1)
        x = F.dropout(F.relu(self.fc6(x)), cfg.dropout, self.training)
        x = F.dropout(F.relu(self.fc7(x)), cfg.dropout, self.training)
        return self.fc8(x)

    @torch.no_grad()
    def copy_from(self, towers: AlexNet) -> GroupedAlexNet:
        """Take the two-tower model's weights: tower A's kernels first, then tower B's."""
        ta, tb = towers.tower_a, towers.tower_b
        for conv, (name, _) in zip(self.convs, _CONVS, strict=True):
            a, b = getattr(ta, name), getattr(tb, name)
            conv.weight.copy_(torch.cat([a.weight.cpu(), b.weight.cpu()]))
            conv.bias.copy_(torch.cat([a.bias.cpu(), b.bias.cpu()]))
        for name in ("fc6", "fc7"):
            a, b = getattr(ta, name), getattr(tb, name)
            getattr(self, name).weight.copy_(torch.cat([a.weight.cpu(), b.weight.cpu()]))
            getattr(self, name).bias.copy_(torch.cat([a.bias.cpu(), b.bias.cpu()]))
        self.fc8.weight.copy_(towers.fc8.weight.cpu())
        self.fc8.bias.copy_(towers.fc8.bias.cpu())
        return self

    def tower_grads(self) -> dict[str, torch.Tensor]:
        """Gradients rearranged under the two-tower model's parameter names, for comparison."""
        out: dict[str, torch.Tensor] = {}
        layers = [(n, c) for (n, _), c in zip(_CONVS, self.convs, strict=True)]
        layers += [("fc6", self.fc6), ("fc7", self.fc7)]
        for name, mod in layers:
            for pname in ("weight", "bias"):
                a, b = getattr(mod, pname).grad.chunk(2, dim=0)
                out[f"tower_a.{name}.{pname}"], out[f"tower_b.{name}.{pname}"] = a, b
        out["fc8.weight"], out["fc8.bias"] = self.fc8.weight.grad, self.fc8.bias.grad
        return out
