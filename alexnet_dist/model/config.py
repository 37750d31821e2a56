"""What fixes the network's shape (:class:`AlexNetConfig`), its named presets, and the config a job trains.

Plain data, no torch: a spec, a model file's metadata or a preset can be read without building a network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from alexnet_dist.errors import ConfigError
from alexnet_dist.spec import JobSpec

__all__ = ["PRESETS", "AlexNetConfig", "model_config"]


@dataclass(frozen=True)
class AlexNetConfig:
    """Everything that fixes the network's shape; the paper's values are the defaults.

    Channel and unit counts are totals over both towers; each tower holds half.
    """

    name: str = "paper"
    image_size: int = 227  # input side; 227 (not the paper's "224") gives maps of 55, 27, 13, 6
    in_channels: int = 3  # RGB
    channels: tuple[int, int, int, int, int] = (96, 256, 384, 384, 256)  # conv1..conv5 (section 3.5)
    kernels: tuple[int, int, int, int, int] = (11, 5, 3, 3, 3)
    strides: tuple[int, int, int, int, int] = (4, 1, 1, 1, 1)
    paddings: tuple[int, int, int, int, int] = (0, 2, 1, 1, 1)  # keeps conv2-conv5 maps at 27 and 13
    fc_units: int = 4096  # fc6 and fc7 (2048 per tower)
    dropout: float = 0.5  # on fc6 and fc7 (section 4.2)
    pool_kernel: int = 3  # overlapping max-pooling, z = 3 ...
    pool_stride: int = 2  # ... s = 2 (section 3.4): 0.3% lower top-5 error than z = s = 2
    # Local response normalization (section 3.3): b = a / (k + alpha * sum_{n neighbours} a^2)^beta.
    # The paper's alpha multiplies the plain sum; Caffe and torch divide it by n first.
    lrn_size: int = 5
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    lrn_k: float = 2.0
    # "tower": neighbours come from the tower's own maps (cuda-convnet, the paper's code).
    # "all": neighbours run across both towers' maps, as in Caffe's bvlc_alexnet (imported models).
    lrn_span: str = "tower"
    # "paper": weights ~ N(0, init_std), biases 1 in init_bias_one layers (section 5). "kaiming": He-normal
    # weights, zero biases: the narrow small preset does not train from N(0, 0.01), whose signal shrinks
    # about tenfold per layer at fan-ins of a few hundred (measured: stuck at chance for 3 epochs).
    init: str = "paper"
    init_std: float = 0.01
    init_bias_one: tuple[str, ...] = field(default=("conv2", "conv4", "conv5", "fc6", "fc7"))  # section 5

    def __post_init__(self) -> None:
        for name, values in (("channels", self.channels), ("kernels", self.kernels)):
            if len(values) != 5:
                raise ConfigError(f"model.{name}: needs 5 values (conv1..conv5), got {len(values)}")
        for i, c in enumerate(self.channels):
            if c <= 0 or c % 2:
                raise ConfigError(f"model.channels[{i}]={c}: must be positive and even (two towers)")
        if self.fc_units <= 0 or self.fc_units % 2:
            raise ConfigError(f"model.fc_units={self.fc_units}: must be positive and even (two towers)")
        if self.init not in ("paper", "kaiming"):
            raise ConfigError(f"model.init={self.init!r}: use 'paper' or 'kaiming'")
        if self.lrn_span not in ("tower", "all"):
            raise ConfigError(f"model.lrn_span={self.lrn_span!r}: use 'tower' or 'all'")
        if self.feature_size() < 1:
            raise ConfigError(f"model.image_size={self.image_size}: too small for this network's strides")

    def map_sizes(self) -> tuple[int, int, int, int]:
        """Spatial side after conv1, pool1, pool2 and pool5: (55, 27, 13, 6) for the paper."""

        def conv(s: int, i: int) -> int:
            return (s + 2 * self.paddings[i] - self.kernels[i]) // self.strides[i] + 1

        def pool(s: int) -> int:
            return (s - self.pool_kernel) // self.pool_stride + 1

        c1 = conv(self.image_size, 0)
        p1 = pool(c1)
        p2 = pool(conv(p1, 1))
        s = conv(conv(conv(p2, 2), 3), 4)
        return c1, p1, p2, pool(s)

    def feature_size(self) -> int:
        return self.map_sizes()[3]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlexNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config: unknown fields {unknown}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)


PRESETS: dict[str, AlexNetConfig] = {
    # The network of the paper: 60,965,224 parameters with 1000 classes.
    "paper": AlexNetConfig(),
    # Same topology at 32 px for CPU demos and tests (Fashion-MNIST upscaled to 36, cropped to 32).
    # Chosen by measurement on the 2-core machines: see README "Choosing the small preset".
    "small": AlexNetConfig(
        name="small",
        image_size=32,
        channels=(32, 64, 96, 96, 64),
        kernels=(5, 5, 3, 3, 3),
        strides=(2, 1, 1, 1, 1),
        paddings=(2, 2, 1, 1, 1),
        fc_units=512,
        init="kaiming",
    ),
}


def model_config(spec: JobSpec) -> AlexNetConfig:
    """The network a spec trains: its preset, with the spec's dropout when it sets one."""
    cfg = PRESETS[spec.model.preset]
    if spec.model.dropout is not None:
        cfg = AlexNetConfig.from_dict({**cfg.to_dict(), "dropout": spec.model.dropout})
    return cfg
