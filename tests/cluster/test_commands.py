"""Every `alexnet-dist ...` and `ray ...` command the cluster configs, cluster/README.md, the recipe and
the Dockerfile run is resolved against the real CLIs, sub-commands and options included.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
import yaml
from clusterfiles import CLUSTER, COMPOSE_FILES, KUBERAY, README, RECIPE, ROOT, load_docs, shell_commands


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
