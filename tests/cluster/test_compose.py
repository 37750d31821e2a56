"""cluster/compose.yaml + compose.gpu.yaml: `docker compose config` when the plugin is present, else a
schema of the fields used after compose's own ${VAR} interpolation.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any

import jsonschema
import pytest
import yaml
from clusterfiles import COMPOSE_FILES

COMPOSE_ENV = {"RAY_AUTH_TOKEN": "t" * 64, "MINIO_ROOT_USER": "alexnet", "MINIO_ROOT_PASSWORD": "p" * 32}
_SERVICE = {
    "type": "object",
    "properties": {
        "image": {"type": "string", "pattern": r"^[^\s]+:[^\s]+$"},
        "build": {
            "type": "object",
            "required": ["context"],
            "properties": {"context": {"type": "string"}, "dockerfile": {"type": "string"}},
            "additionalProperties": False,
        },
        "command": {"type": "array", "items": {"type": "string"}},
        "entrypoint": {"type": "array", "items": {"type": "string"}},
        "environment": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
        "volumes": {"type": "array", "items": {"type": "string"}},
        "ports": {"type": "array", "items": {"type": "string", "pattern": r"^127\.0\.0\.1:\d+:\d+$"}},
        "healthcheck": {
            "type": "object",
            "required": ["test"],
            "properties": {
                "test": {"type": "array", "prefixItems": [{"const": "CMD"}]},
                "interval": {"type": "string"},
                "timeout": {"type": "string"},
                "retries": {"type": "integer"},
            },
            "additionalProperties": False,
        },
        "depends_on": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["condition"],
                "properties": {
                    "condition": {
                        "enum": ["service_started", "service_healthy", "service_completed_successfully"]
                    }
                },
                "additionalProperties": False,
            },
        },
        "shm_size": {"type": "string"},
        "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
        "deploy": {
            "type": "object",
            "properties": {
                "replicas": {"type": "integer", "minimum": 1},
                "resources": {
                    "type": "object",
                    "properties": {
                        "reservations": {
                            "type": "object",
                            "properties": {
                                "devices": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["driver", "count", "capabilities"],
                                        "properties": {
                                            "driver": {"const": "nvidia"},
                                            "count": {"type": "integer"},
                                            "capabilities": {"type": "array"},
                                        },
                                        "additionalProperties": False,
                                    },
                                }
                            },
                            "additionalProperties": False,
                        }
                    },
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
COMPOSE_SCHEMA = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "name": {"type": "string"},
        "services": {"type": "object", "additionalProperties": _SERVICE},
        "volumes": {"type": "object"},
    },
    "patternProperties": {"^x-": {}},
    "additionalProperties": False,
}


def compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} ($$ escapes a dollar)."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if name in env:
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    text = re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:[-?])([^}]*))?\}", sub, text)
    return text.replace("$$", "$")


def merged_compose(env: dict[str, str]) -> dict[str, Any]:
    """The model `docker compose -f compose.yaml -f compose.gpu.yaml config` prints."""
    if compose_plugin():
        files = [a for f in COMPOSE_FILES for a in ("-f", str(f))]
        out = subprocess.run(
            ["docker", "compose", *files, "config", "--format", "json"],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        ).stdout
        return yaml.safe_load(out)
    merged: dict[str, Any] = {}
    for f in COMPOSE_FILES:
        doc = yaml.safe_load(interpolate(f.read_text(), env))
        jsonschema.validate(doc, COMPOSE_SCHEMA)
        merged = _deep_merge(merged, doc)
    return merged


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_compose_files_validate_and_wire_the_cluster() -> None:
    for f in COMPOSE_FILES:  # each file alone also passes the schema
        jsonschema.validate(yaml.safe_load(interpolate(f.read_text(), COMPOSE_ENV)), COMPOSE_SCHEMA)
    model = merged_compose(COMPOSE_ENV)
    services = model["services"]
    assert sorted(services) == ["buckets", "dispatcher", "minio", "ray-head", "ray-worker", "redis"]
    assert services["redis"]["command"][1:3] == ["--appendonly", "yes"]
    assert "redis-data:/data" in services["redis"]["volumes"]
    (gpus,) = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["count"] == 2  # one gpu-pair worker per container
    env = services["dispatcher"]["environment"]
    assert env["ALEXNET_DIST_REDIS_URL"] == "redis://redis:6379/0"
    assert env["ALEXNET_DIST_RAY_DASHBOARD"] == "http://ray-head:8265"
    assert env["RAY_AUTH_TOKEN"] == COMPOSE_ENV["RAY_AUTH_TOKEN"]
    assert services["ray-worker"]["environment"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    # The services we build all run the one image the head builds.
    built = services["ray-head"]["image"]
    assert {services[s]["image"] for s in ("ray-head", "ray-worker", "dispatcher")} == {built}


def test_compose_refuses_to_start_without_credentials() -> None:
    for missing in COMPOSE_ENV:
        env = {k: v for k, v in COMPOSE_ENV.items() if k != missing}
        with pytest.raises((KeyError, subprocess.CalledProcessError)):
            merged_compose(env)
