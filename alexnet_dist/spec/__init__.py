"""Job specs: what a user writes in ``jobs/*.toml``.

- ``models``: the sections as pydantic models, their descriptions, and validation's one-line errors;
- ``loading``: files and text (TOML or JSON), ``--set`` overrides, relative paths.
"""

from __future__ import annotations

from alexnet_dist.spec.loading import absolute_paths, apply_overrides, load_spec, parse_spec_text
from alexnet_dist.spec.models import (
    CheckpointSpec,
    DataSpec,
    JobSpec,
    ModelSpec,
    NotifySpec,
    OptimSpec,
    ScalingSpec,
    SchedulingSpec,
    TrainSpec,
    parse_spec,
)

__all__ = [
    "CheckpointSpec",
    "DataSpec",
    "JobSpec",
    "ModelSpec",
    "NotifySpec",
    "OptimSpec",
    "ScalingSpec",
    "SchedulingSpec",
    "TrainSpec",
    "absolute_paths",
    "apply_overrides",
    "load_spec",
    "parse_spec",
    "parse_spec_text",
]
