"""cluster/kuberay/*.yaml against a schema of the kinds and fields these manifests use.

No API server or KubeRay CRD is reachable here, so the schema is written in this file: unknown fields
are refused, and the values the service relies on (Redis AOF on its claim, whole GPU pairs, the Ray
version, the Secret keys cluster/README.md creates) are checked by name.
"""

from __future__ import annotations

import copy
import shlex
from typing import Any

import jsonschema
import pytest
from clusterfiles import KUBERAY, README, load_docs, shell_commands

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
