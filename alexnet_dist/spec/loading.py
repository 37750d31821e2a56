"""Reading a job spec: a TOML or JSON file or text, ``--set key=value`` overrides by dotted path
(``--set train.epochs=3``, values parsed as TOML), and relative local paths made absolute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib

from alexnet_dist.errors import ConfigError
from alexnet_dist.spec.models import JobSpec, parse_spec

__all__ = ["absolute_paths", "apply_overrides", "load_spec", "parse_spec_text"]


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: take it as a string


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``key.path=value`` overrides applied (values parsed as TOML)."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=3")
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw.strip())
    return out


def _absolute(url: str, base: Path) -> str:
    """A relative local path becomes absolute (against ``base``): Ray Jobs and workers run elsewhere."""
    if "://" in url or Path(url).is_absolute():
        return url
    return str((base / url).resolve())


def absolute_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    for section, key in (("data", "train"), ("data", "val"), ("checkpoint", "storage")):
        value = out.get(section, {}).get(key)
        if isinstance(value, str) and value:
            out[section][key] = _absolute(value, base)
    return out


def parse_spec_text(
    text: str,
    *,
    json_format: bool = False,
    source: str = "<spec>",
    overrides: list[str] | None = None,
    base: Path | None = None,
) -> JobSpec:
    """A spec from its text, TOML (or JSON); every error names ``source`` and the field. Relative local
    paths are taken from ``base``, and kept as they are without one."""
    if json_format:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"{source}: not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a spec is a JSON object, not {type(data).__name__}")
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{source}: not valid TOML ({err})") from None
    data = apply_overrides(data, overrides or [])
    if base is not None:
        data = absolute_paths(data, base)
    return parse_spec(data, source=source)


def load_spec(path: str | Path, overrides: list[str] | None = None, *, base: Path | None = None) -> JobSpec:
    """Read a job spec (TOML; JSON when the file ends in ``.json``); every error names the file and the field.

    Relative local paths in it (manifests, checkpoint storage) are taken from ``base``, the current
    directory by default, and stored absolute, since the job runs in other processes and directories.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such spec file; see jobs/ for examples") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (not UTF-8); a spec is TOML or JSON text") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read it ({err.strerror})") from None
    return parse_spec_text(
        text, json_format=p.suffix == ".json", source=str(p), overrides=overrides, base=base or Path.cwd()
    )
