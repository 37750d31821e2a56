"""CLI commands that make the job spec discoverable: ``alexnet-dist spec schema | explain | docs | validate``.

The reference (``explain``, ``docs`` and ``docs/spec.md``) is rendered from ``JobSpec.model_json_schema()``,
the one source of every field's type, bounds, default and description, so the three cannot drift from the
models in :mod:`alexnet_dist.spec`. ``validate`` checks a spec and its manifests as ``submit`` does, and
queues nothing.

Imports stay light (typer, the stdlib, the spec): every command of the CLI imports this module, and only
``validate`` needs the manifest reader and S3, which it imports when it runs.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from alexnet_dist.cli.app import app
from alexnet_dist.errors import ConfigError
from alexnet_dist.spec import JobSpec, load_spec

__all__ = ["FieldDoc", "SectionDoc", "spec_markdown", "spec_reference"]

spec_app = typer.Typer(
    help="The job spec: its JSON Schema, a reference of every field, and a check of a spec file.",
    no_args_is_help=True,
)
app.add_typer(spec_app, name="spec")

DOCS_COMMAND = "alexnet-dist spec docs > docs/spec.md"

# The smallest spec that trains: the fields without a default. The rest is the paper's recipe.
MINIMAL_SPEC = """\
name = "imagenet"

[data]
train = "s3://my-bucket/ilsvrc2012/imagenet-train.json"
val = "s3://my-bucket/ilsvrc2012/imagenet-val.json"

[scaling]
workers = 1
devices = "gpu-pair"
"""


@dataclass(frozen=True)
class FieldDoc:
    path: str  # dotted, as --set takes it: "train.epochs"; top-level fields have no section: "seed"
    type: str  # JSON type with its bounds: "integer >= 1"
    default: str  # as written in TOML, "required" when there is none, "unset" for null
    description: str


@dataclass(frozen=True)
class SectionDoc:
    name: str  # "train"; "" for the top-level fields
    description: str
    fields: tuple[FieldDoc, ...]

    @property
    def title(self) -> str:
        return f"[{self.name}]" if self.name else "top level"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with its ``$ref`` replaced by the definition it names (the node's own keys win)."""
    while "$ref" in node:
        target = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def _number(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _type(node: dict[str, Any]) -> str:
    """A JSON Schema type with its constraints, as a reader would say it."""
    if "anyOf" in node:
        kinds = [k for k in node["anyOf"] if k.get("type") != "null"]
        text = " or ".join(_type(k) for k in kinds)
        return f"{text}, or unset" if len(kinds) < len(node["anyOf"]) else text
    if "enum" in node:
        return " | ".join(json.dumps(v) for v in node["enum"])
    if "const" in node:
        return json.dumps(node["const"])
    kind = node.get("type", "any")
    if kind in ("integer", "number"):
        low = (">=", node["minimum"]) if "minimum" in node else (">", node.get("exclusiveMinimum"))
        high = ("<=", node["maximum"]) if "maximum" in node else ("<", node.get("exclusiveMaximum"))
        if low[1] is not None and high[1] is not None:
            left, right = "[" if low[0] == ">=" else "(", "]" if high[0] == "<=" else ")"
            return f"{kind} in {left}{_number(low[1])}, {_number(high[1])}{right}"
        for op, bound in (low, high):
            if bound is not None:
                return f"{kind} {op} {_number(bound)}"
        return kind
    if kind == "string":
        parts = []
        if "pattern" in node:
            parts.append(f"matching {node['pattern']}")
        if "minLength" in node or "maxLength" in node:
            parts.append(f"{node.get('minLength', 0)}..{node.get('maxLength', '')} characters")
        return "string" + (f" ({', '.join(parts)})" if parts else "")
    if kind == "array":
        text = f"list of {_type(node.get('items', {}))}s"
        return text + (f" (at most {node['maxItems']})" if "maxItems" in node else "")
    return kind


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _number(value)
    return json.dumps(value)


def _field(path: str, node: dict[str, Any], required: bool, default: Any) -> FieldDoc:
    shown = "required" if required else _default(node.get("default", default))
    return FieldDoc(path, _type(node), shown, _one_line(node.get("description", "")))


def _model_default(model: Any, name: str) -> Any:
    """A field's default where the schema shows none (a ``default_factory``, e.g. ``notify.urls``)."""
    info = model.model_fields[name]
    return None if info.is_required() else info.get_default(call_default_factory=True)


def spec_reference() -> list[SectionDoc]:
    """Every field of the spec, grouped by section (top-level fields first), from the JSON Schema."""
    schema = JobSpec.model_json_schema()
    top: list[FieldDoc] = []
    sections: list[SectionDoc] = []
    for name, prop in schema["properties"].items():
        node = _resolve(schema, prop)
        if "properties" not in node:
            top.append(_field(name, node, name in schema.get("required", ()), _model_default(JobSpec, name)))
            continue
        model = JobSpec.model_fields[name].annotation
        definition = _resolve(schema, {"$ref": prop["$ref"]})
        fields = tuple(
            _field(f"{name}.{key}", _resolve(schema, sub), key in node.get("required", ()),
                   _model_default(model, key))
            for key, sub in node["properties"].items()
        )  # fmt: skip
        sections.append(SectionDoc(name, _one_line(definition.get("description", "")), fields))
    return [SectionDoc("", _one_line(schema.get("description", "")), tuple(top)), *sections]


def _select(sections: list[SectionDoc], name: str | None) -> list[SectionDoc]:
    """The sections (or the one field) ``name`` names; a ConfigError with close matches for a wrong one."""
    if not name:
        return sections
    for s in sections:
        if s.name == name:
            return [s]
        for f in s.fields:
            if f.path == name:
                return [SectionDoc(s.name, s.description, (f,))]
    known = [s.name for s in sections if s.name] + [f.path for s in sections for f in s.fields]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = "`alexnet-dist spec explain` lists them all"
    if close:
        hint = f"did you mean {close[0] if len(close) == 1 else ', '.join(close[:-1]) + ' or ' + close[-1]}?"
    raise ConfigError(f"{name}: no such spec field or section; {hint}")


def spec_text(name: str | None = None) -> str:
    """The plain-text reference: a header per section, then one line per field, columns aligned."""
    lines: list[str] = []
    for s in _select(spec_reference(), name):
        lines.append(f"{s.title}  {s.description}".rstrip())
        width_path = max(len(f.path) for f in s.fields)
        width_type = max(len(f.type) for f in s.fields)
        defaults = [f.default if f.default == "required" else f"default {f.default}" for f in s.fields]
        width_default = max(len(d) for d in defaults)
        for f, default in zip(s.fields, defaults, strict=True):
            columns = f"{f.path:<{width_path}}  {f.type:<{width_type}}  {default:<{width_default}}"
            lines.append(f"  {columns}  {f.description}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def spec_markdown() -> str:
    """``docs/spec.md``: the reference as Markdown, one table per section."""
    sections = spec_reference()
    out = [
        "# Job spec reference",
        "",
        f"Generated from the models in `alexnet_dist/spec/models.py` by `{DOCS_COMMAND}`; edit the models' "
        "descriptions, not this file (a test compares the two).",
        "",
        "`alexnet-dist spec explain [FIELD]` prints the same reference in a terminal, `alexnet-dist spec "
        "schema` the JSON Schema, and `alexnet-dist spec validate FILE` checks a spec and its manifests "
        "without queueing it. `--set section.field=value` overrides any field by the path shown here.",
        "",
        sections[0].description,
        "",
        "The smallest spec states what cannot be guessed: the job's name, its manifests and the hardware "
        "it is meant for. Every other field takes the paper's value:",
        "",
        "```toml",
        MINIMAL_SPEC.rstrip("\n"),
        "```",
    ]
    for s in sections:
        title = "Top-level fields" if not s.name else f"`{s.title}`"
        out += ["", f"## {title}", ""]
        if s.name:
            out += [s.description, ""]
        out += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
        for f in s.fields:
            default = f.default if f.default == "required" else f"`{_cell(f.default)}`"
            out.append(f"| `{f.path}` | `{_cell(f.type)}` | {default} | {_cell(f.description)} |")
    return "\n".join(out) + "\n"


@spec_app.command("schema")
def schema() -> None:
    """Print the spec's JSON Schema (for editors and other tools)."""
    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


@spec_app.command("explain")
def explain(
    field: Annotated[
        str | None, typer.Argument(metavar="[FIELD]", help="a field (train.epochs) or a section (train)")
    ] = None,
) -> None:
    """Print every field: path, type, default and what it is; or only FIELD."""
    typer.echo(spec_text(field), nl=False)


@spec_app.command("docs")
def docs() -> None:
    """Print the reference as Markdown: alexnet-dist spec docs > docs/spec.md."""
    typer.echo(spec_markdown(), nl=False)


@spec_app.command("validate")
def validate(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="job spec: TOML, or JSON if it ends in .json")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override a field: --set train.epochs=3")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the normalized spec as JSON")] = False,
) -> None:
    """Check FILE as submit does (fields, then its manifests and their classes); nothing is queued."""
    from alexnet_dist.data.manifest import load_manifest
    from alexnet_dist.service.operations import check_data
    from alexnet_dist.settings import load_settings

    spec = load_spec(path, set_ or [])
    endpoint = load_settings().s3_endpoint_url
    check_data(spec, endpoint_url=endpoint)
    if as_json:
        typer.echo(json.dumps(spec.model_dump(mode="json"), indent=2))
        return
    train = load_manifest(spec.data.train, endpoint_url=endpoint)
    val = load_manifest(spec.data.val, endpoint_url=endpoint)
    workers = f"{spec.scaling.workers} worker{'s' if spec.scaling.workers != 1 else ''}"
    typer.echo(
        f"{path}: valid ({train.num_samples:,} training / {val.num_samples:,} validation images, "
        f"{spec.model.num_classes} classes; {workers} x {spec.scaling.devices}, {spec.train.epochs} epochs)"
    )
