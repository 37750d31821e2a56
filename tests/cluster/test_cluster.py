"""The cluster configs (issue 7): each file validates, every command it runs exists, the image installs.

What cannot run here (a Docker engine, GPUs, a cloud, Kubernetes) is checked another way, as
cluster/README.md says: the Ray launcher YAML through Ray's own prepare_config + validate_config; the
KubeRay objects against a schema of the fields we rely on; the compose files through `docker compose
config` when the compose plugin is present, else a schema; the Dockerfile's install steps by running
cluster/install.sh here, phase by phase, exactly as the Dockerfile's RUN lines name them.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
COMPOSE_FILES = [CLUSTER / "compose.yaml", CLUSTER / "compose.gpu.yaml"]
README = CLUSTER / "README.md"
RECIPE = ROOT / "jobs" / "imagenet-paper.toml"
PAPER_PARAMS = 60_965_224


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ------------------------------------------------------------------------------------------------
# Ray cluster launcher


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


# ------------------------------------------------------------------------------------------------
# KubeRay manifests: a schema of the kinds and fields these manifests use

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"const": "alexnet-dist"}, "labels": _STR_MAP},
    "additionalProperties": False,
}
_QUANTITY = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti)?$"}
_RESOURCES = {
    "type": "object",
    "properties": {
        k: {
            "type": "object",
            "additionalProperties": _QUANTITY,
            "propertyNames": {"enum": ["cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"]},
        }
        for k in ("requests", "limits")
    },
    "additionalProperties": False,
}
_ENV = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z_][A-Z0-9_]*$"},
            "value": {"type": "string"},
            "valueFrom": {
                "type": "object",
                "properties": {
                    "secretKeyRef": {
                        "type": "object",
                        "required": ["name", "key"],
                        "properties": {"name": {"type": "string"}, "key": {"type": "string"}},
                        "additionalProperties": False,
                    }
                },
                "additionalProperties": False,
            },
        },
        "oneOf": [{"required": ["value"]}, {"required": ["valueFrom"]}],
        "additionalProperties": False,
    },
}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string", "pattern": r"^[^:\s]+:[^:\s]+$"},  # always a tag, never :latest
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": _ENV,
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "properties": {"name": {"type": "string"}, "containerPort": {"type": "integer"}},
                "additionalProperties": False,
            },
        },
        "resources": _RESOURCES,
        "readinessProbe": {"type": "object"},
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mountPath"],
                "properties": {"name": {"type": "string"}, "mountPath": {"type": "string"}},
                "additionalProperties": False,
            },
        },
    },
    "additionalProperties": False,
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object", "properties": {"labels": _STR_MAP}, "additionalProperties": False},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "volumes": {"type": "array"},
                "tolerations": {"type": "array"},
                "securityContext": {"type": "object"},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
}
_GROUP = {  # a KubeRay head or worker group: rayStartParams is map[string]string in the CRD
    "required": ["rayStartParams", "template"],
    "properties": {"rayStartParams": _STR_MAP, "template": _POD_TEMPLATE},
}
_SELECTOR = {"type": "object", "required": ["matchLabels"], "properties": {"matchLabels": _STR_MAP}}
KUBE_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("v1", "Namespace"): {"properties": {"metadata": {"type": "object"}}},
    ("v1", "Service"): {
        "properties": {"spec": {"type": "object", "required": ["selector", "ports"]}},
    },
    ("apps/v1", "StatefulSet"): {
        "properties": {
            "spec": {
                "type": "object",
                "required": ["serviceName", "selector", "template", "volumeClaimTemplates"],
                "properties": {
                    "serviceName": {"type": "string"},
                    "replicas": {"const": 1},
                    "selector": _SELECTOR,
                    "template": _POD_TEMPLATE,
                    "volumeClaimTemplates": {"type": "array", "minItems": 1},
                },
                "additionalProperties": False,
            }
        }
    },
    ("apps/v1", "Deployment"): {
        "properties": {
            "spec": {
                "type": "object",
                "required": ["selector", "template"],
                "properties": {
                    "replicas": {"type": "integer", "minimum": 1},
                    "selector": _SELECTOR,
                    "template": _POD_TEMPLATE,
                },
                "additionalProperties": False,
            }
        }
    },
    ("ray.io/v1", "RayCluster"): {
        "properties": {
            "spec": {
                "type": "object",
                "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                "properties": {
                    "rayVersion": {"type": "string"},
                    "enableInTreeAutoscaling": {"type": "boolean"},
                    "headGroupSpec": {"type": "object", **_GROUP, "additionalProperties": False},
                    "workerGroupSpecs": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            **_GROUP,
                            "required": [
                                "groupName",
                                "replicas",
                                "minReplicas",
                                "maxReplicas",
                                *_GROUP["required"],
                            ],
                            "properties": {
                                **_GROUP["properties"],
                                "groupName": {"type": "string"},
                                "replicas": {"type": "integer", "minimum": 0},
                                "minReplicas": {"type": "integer", "minimum": 0},
                                "maxReplicas": {"type": "integer", "minimum": 1},
                            },
                            "additionalProperties": False,
                        },
                    },
                },
                "additionalProperties": False,
            }
        }
    },
}


def kube_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in load_docs(path)]


def validate_kube(obj: dict[str, Any]) -> None:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key not in KUBE_SCHEMAS:
        raise jsonschema.ValidationError(f"{key}: a kind these tests do not know")
    schema = {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata"],
        "properties": {"apiVersion": {}, "kind": {}, "metadata": _META, "spec": {}},
        "additionalProperties": False,
    }
    jsonschema.validate(obj, schema)
    jsonschema.validate(obj, KUBE_SCHEMAS[key])


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    templates = [spec.get("template")]
    if obj["kind"] == "RayCluster":
        templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    return [c for t in templates if t for c in t["spec"]["containers"]]


def test_kuberay_objects_match_the_fields_they_use() -> None:
    objects = kube_objects()
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Deployment", "Namespace", "RayCluster", "Service", "StatefulSet"]
    for obj in objects:
        validate_kube(obj)

    import ray

    by_kind = {o["kind"]: o for o in objects}
    cluster = by_kind["RayCluster"]["spec"]
    assert cluster["rayVersion"] == ray.__version__  # the image's Ray (cluster/constraints.txt)
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in cluster["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            gpus = int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert gpus >= 2 and gpus % 2 == 0, f"{group['groupName']}: {gpus} GPUs is not whole pairs"

    # Redis persists: AOF on, and its --dir is the mounted PersistentVolumeClaim.
    redis = by_kind["StatefulSet"]["spec"]
    (rc,) = redis["template"]["spec"]["containers"]
    args = rc["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    claim = redis["volumeClaimTemplates"][0]["metadata"]["name"]
    assert {"name": claim, "mountPath": args[args.index("--dir") + 1]} in rc["volumeMounts"]

    # One image for Ray and the dispatcher, so the driver and the workers run the same code.
    ours = {c["image"] for o in objects if o["kind"] in ("RayCluster", "Deployment") for c in containers(o)}
    assert len(ours) == 1


def test_kuberay_schema_rejects_wrong_fields() -> None:
    cluster = next(o for o in kube_objects() if o["kind"] == "RayCluster")
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # the CRD wants strings
    with pytest.raises(jsonschema.ValidationError):
        validate_kube(bad)
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_kube(bad)


def test_every_secret_key_is_created_by_the_readme_command() -> None:
    used = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for o in kube_objects()
        for c in containers(o)
        for e in c.get("env", [])
        if "valueFrom" in e
    }
    assert len(used) == 4
    created = set()
    for cmd in shell_commands(README.read_text()):
        argv = shlex.split(cmd)
        if argv[:4] == ["kubectl", "create", "secret", "generic"]:
            for a in argv[5:]:
                if a.startswith("--from-literal="):
                    created.add((argv[4], a.removeprefix("--from-literal=").split("=", 1)[0]))
    assert used <= created, f"secret keys used but never created in cluster/README.md: {used - created}"


# ------------------------------------------------------------------------------------------------
# Compose

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


# ------------------------------------------------------------------------------------------------
# Commands the configs run exist in the real CLIs


def shell_commands(text: str) -> list[str]:
    """Command lines in a README or comments: lines (after any `#` or `$ `) that start with a known CLI."""
    out = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip().lstrip("#").strip().removeprefix("$ ")
        if re.match(r"^(alexnet-dist|ray|kubectl|docker)\s", line):
            out.append(line)
    return out


def strings_in(node: Any) -> list[str | list[str]]:
    """Every string in a YAML tree, and every list of strings (an argv) as one item."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        found: list[str | list[str]] = []
        if node and all(isinstance(x, str) for x in node):
            found.append(node)
        return found + [s for x in node for s in strings_in(x)]
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings_in(v)]
    return []


def invocations(program: str) -> list[tuple[str, list[str]]]:
    """(where, argv after the program name) for every call of ``program`` in cluster/ and the recipe."""
    found: list[tuple[str, list[str]]] = []
    sources: list[tuple[str, list[str | list[str]]]] = []
    for path in [CLUSTER / "ray-aws.yaml", *COMPOSE_FILES, *sorted(KUBERAY.glob("*.yaml"))]:
        items = [s for d in load_docs(path) for s in strings_in(d)]
        sources.append((path.name, items + shell_commands(path.read_text())))
    for path in (README, RECIPE, ROOT / "Dockerfile"):
        sources.append((path.name, list(shell_commands(path.read_text()))))
    sources.append(("Dockerfile CMD", [_dockerfile_cmd()]))
    for where, items in sources:
        for item in items:
            if isinstance(item, list):
                argv = item[1:] if item[:1] == ["CMD"] else item  # a compose healthcheck test
                if argv[:1] == [program]:
                    found.append((where, argv[1:]))
                continue
            if item.strip() == program:
                continue  # a name (cluster_name, a namespace), not a command
            lexer = shlex.shlex(item, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            try:
                tokens = list(lexer)
            except ValueError:
                continue
            for i, tok in enumerate(tokens):
                if tok == program and at_command_position(tokens, i):
                    rest = []
                    for t in tokens[i + 1 :]:
                        if set(t) <= set("();&|<>"):
                            break
                        rest.append(t)
                    found.append((where, rest))
    unique = {(w, tuple(a)) for w, a in found}
    return sorted((w, list(a)) for w, a in unique)


def at_command_position(tokens: list[str], i: int) -> bool:
    """Whether ``tokens[i]`` is a program name: first, or after an operator, `--`, nohup or VAR=value."""
    if i == 0:
        return True
    prev = tokens[i - 1]
    return (
        set(prev) <= set("();&|")
        or prev in ("--", "nohup", "exec", "then", "do")
        or re.match(r"^[A-Z_][A-Z0-9_]*=", prev) is not None
    )


def _dockerfile_cmd() -> list[str]:
    (line,) = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("CMD ")]
    return yaml.safe_load(line.removeprefix("CMD "))


def is_group(cmd: Any) -> bool:
    # Duck-typed: Typer 0.29 vendors its own click, whose Group is not click.Group.
    return isinstance(getattr(cmd, "commands", None), dict)


def resolve(cli: Any, argv: list[str]) -> tuple[Any, list[str], str]:
    """Walk groups by the words of ``argv``; return the command reached, its option words, and its path."""
    cmd, path = cli, []
    words = [a for a in argv if not a.startswith("-")]
    for w in words:
        if not is_group(cmd):
            if not path:
                raise LookupError(f"`{cli.name} {w}`: the CLI has no sub-commands")
            break
        sub = cmd.commands.get(w)
        if sub is None:
            raise LookupError(f"`{' '.join([cli.name or '', *path, w])}`: no such command")
        cmd, path = sub, [*path, w]
    options = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
    return cmd, options, " ".join(path)


def check_invocation(cli: Any, argv: list[str]) -> str:
    cmd, options, path = resolve(cli, argv)
    assert not is_group(cmd), f"`{path}` is a group, not a command: {argv}"
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    unknown = [o for o in options if o not in known]
    assert not unknown, f"`{path}` has no option {unknown}"
    return path


def test_alexnet_dist_commands_in_the_configs_exist() -> None:
    import typer.main

    from alexnet_dist.cli import app

    cli = typer.main.get_command(app)
    calls = invocations("alexnet-dist")
    paths = {check_invocation(cli, argv) for _, argv in calls if argv != ["--help"]}
    # The dispatcher runs from the AWS head, the KubeRay Deployment and compose; the recipe names
    # shards build/verify, submit and watch.
    where = {w for w, a in calls if a[:1] == ["dispatcher"]}
    assert where >= {"ray-aws.yaml", "dispatcher.yaml", "compose.yaml"}
    assert {"dispatcher", "shards build", "shards verify", "submit", "watch"} <= paths


def test_ray_commands_in_the_configs_exist() -> None:
    from ray.scripts.scripts import cli

    calls = invocations("ray")
    paths = {check_invocation(cli, argv) for _, argv in calls}
    assert {"start", "stop", "health-check", "up"} <= paths
    heads = [a for _, a in calls if a[:1] == ["start"] and "--head" in a]
    assert len(heads) >= 2  # AWS head and compose head


def test_command_check_catches_a_wrong_option() -> None:
    from ray.scripts.scripts import cli

    with pytest.raises(AssertionError):
        check_invocation(cli, ["start", "--head", "--dashbord-host=0.0.0.0"])
    with pytest.raises(LookupError):
        check_invocation(cli, ["strat", "--head"])


# ------------------------------------------------------------------------------------------------
# The recipe and the sizing page


def test_imagenet_recipe_is_the_papers() -> None:
    from alexnet_dist.spec import load_spec

    spec = load_spec(RECIPE)
    assert (spec.train.epochs, spec.train.batch_size, spec.train.ten_crop_eval) == (90, 128, True)
    o = spec.optim
    assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.lr_decay, o.max_decays) == (
        0.01,
        0.9,
        0.0005,
        "plateau",
        0.1,
        3,
    )
    assert (spec.model.preset, spec.model.num_classes, spec.scaling.devices) == ("paper", 1000, "gpu-pair")
    assert spec.scaling.gpus_per_worker == 2 and spec.per_worker_batch == 64
    assert spec.data.train.startswith("s3://") and spec.checkpoint.storage.startswith("s3://")


def test_sizing_page_figures_match_the_model() -> None:
    from alexnet_dist.model.network import build_model, count_parameters

    model = build_model("paper", num_classes=1000)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert count_parameters(model) == PAPER_PARAMS and grad_bytes == 243_860_896
    text = README.read_text()
    assert "60,965,224" in text and "243,860,896" in text
    # The ring all-reduce table: each worker sends 2(N-1)/N of the gradient per step.
    for n in (2, 4, 8, 16):
        mb = 2 * (n - 1) / n * grad_bytes / 1e6
        assert re.search(rf"\|\s*{n}\s*\|\s*{mb:.1f} MB", text), f"row N={n} ({mb:.1f} MB) missing"
    assert 'train.grad_compression = "bf16"' in text


# ------------------------------------------------------------------------------------------------
# The Dockerfile's install steps, run here


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    allowed = True
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat.removeprefix("!").rstrip("/")
        alts = [p, p.removeprefix("**/")] if p.startswith("**/") else [p]
        if any(fnmatch.fnmatchcase(pre, a) for pre in prefixes for a in alts):
            allowed = neg
    return allowed


def dockerfile_steps() -> tuple[list[str], list[list[str]]]:
    """COPY sources (each copied to the same relative path) and the install.sh phases of each RUN."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    sources, runs = [], []
    for line in text.splitlines():
        argv = shlex.split(line, comments=True) if line.strip() else []
        if argv[:1] == ["COPY"]:
            *srcs, dest = [a for a in argv[1:] if not a.startswith("--")]
            for s in srcs:
                expected = "./" if "/" not in s else "./" + s.rsplit("/", 1)[0] + "/"
                assert dest in (expected, "./" + s), f"COPY {s} {dest}: the image must keep the repo layout"
                sources.append(s)
        elif argv[:1] == ["RUN"] and "cluster/install.sh" in argv:
            i = argv.index("cluster/install.sh")
            phases = []
            for a in argv[i + 1 :]:
                if a in ("&&", ";", "||"):
                    break
                phases.append(a)
            runs.append(phases)
    return sources, runs


@pytest.mark.slow
def test_dockerfile_install_steps_install_a_working_package(tmp_path: Path) -> None:
    sources, runs = dockerfile_steps()
    assert runs == [["deps"], ["package", "check"]]
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert not dockerignore_allows(".venv/bin/python", patterns)
    assert not dockerignore_allows(".git/config", patterns)
    # Stage the build context exactly as docker would send it for these COPY lines.
    ctx = tmp_path / "ctx"
    staged = 0
    for src in sources:
        assert dockerignore_allows(src, patterns), f"{src}: COPY'd but excluded by .dockerignore"
        origin = ROOT / src
        assert origin.exists(), f"{src}: COPY'd by the Dockerfile but missing from the checkout"
        files = [origin] if origin.is_file() else sorted(p for p in origin.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            if dockerignore_allows(rel, patterns):
                (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, ctx / rel)
                staged += 1
    assert staged >= 10 and not list(ctx.rglob("__pycache__"))

    # A fresh venv that sees the project's .venv (its dependencies) through a .pth file: the heavy
    # downloads are `make setup`'s job; here `deps` must find every pin satisfied with no index.
    venv = tmp_path / "venv"
    # --without-pip: pip, setuptools and the rest come from the .venv, at the pinned versions.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        **os.environ,
        "PYTHON": str(py),
        "PIP_NO_INDEX": "1",
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
    }
    outputs = []
    for phases in runs:
        r = subprocess.run(
            ["bash", "cluster/install.sh", *phases],
            cwd=ctx,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, (
            f"install.sh {' '.join(phases)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        )
        outputs.append(r.stdout)
    report = outputs[-1]
    m = re.search(
        r"check: (\d+) requirements satisfied \((\d+) direct\), (\d+) pins matched, "
        r"alexnet_dist from (\S+)",
        report,
    )
    assert m, report
    assert int(m.group(2)) == 14 and int(m.group(3)) == 15 and int(m.group(1)) > 14
    assert Path(m.group(4)).is_relative_to(site)  # the installed copy, not the checkout
    assert (venv / "bin" / "alexnet-dist").exists()
    # pip left the project's own editable install alone.
    assert list(Path(sysconfig.get_paths()["purelib"]).glob("alexnet_dist-*.dist-info"))


def test_constraints_pin_every_dependency_to_the_installed_version() -> None:
    import importlib.metadata as md

    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {}
    for raw in (CLUSTER / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: pins must be exact"
            pins[req.name] = spec.version
    for d in deps:
        name = Requirement(d).name
        assert name in pins, f"{name}: in pyproject.toml but not pinned in cluster/constraints.txt"
        assert md.version(name) == pins[name], f"{name}: {md.version(name)} installed, pinned {pins[name]}"
