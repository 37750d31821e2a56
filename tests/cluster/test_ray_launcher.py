"""cluster/ray-aws.yaml through Ray's own prepare_config + validate_config, what `ray up` runs first."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml
from clusterfiles import CLUSTER


def ray_launcher_config() -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTER / "ray-aws.yaml").read_text()))
    validate_config(config)  # what `ray up` runs before it touches the cloud
    return config


def test_ray_launcher_config_passes_rays_validation() -> None:
    config = ray_launcher_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert len(gpu_types) == 2
    for t in gpu_types.values():
        # Whole GPU pairs only: a node's GPUs split into gpu-pair workers with none left over.
        assert t["resources"]["GPU"] >= 2 and t["resources"]["GPU"] % 2 == 0
        assert t["max_workers"] >= 1
    # The launcher's defaults pip install a Ray nightly; ours must replace them (all is in the image).
    assert config["setup_commands"] == [] and config["head_setup_commands"] == []
    assert config["docker"]["image"].endswith(":0.1.0")


def test_ray_validation_rejects_a_broken_config() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "ray-aws.yaml").read_text())
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu-4x-a10g"]["max_worker"] = 8  # typo: not in ray-schema.json
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
