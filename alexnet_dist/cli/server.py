"""Operator commands of the front door: ``server`` (the HTTP API and dashboard) and ``admin user``
(users and their tokens). Both talk to Redis directly; users' commands go through the server."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from alexnet_dist.cli.app import app
from alexnet_dist.errors import ConfigError
from alexnet_dist.settings import load_settings

if TYPE_CHECKING:
    from alexnet_dist.service.users import UserStore

out = Console()
admin = typer.Typer(
    help="Operator commands on the store (Redis): users and their tokens.", no_args_is_help=True
)
user_cmd = typer.Typer(help="Users of the HTTP API and their tokens.", no_args_is_help=True)
admin.add_typer(user_cmd, name="user")
app.add_typer(admin, name="admin")


def _users() -> UserStore:  # imported inside: the CLI stays fast
    from alexnet_dist.service.connection import connect
    from alexnet_dist.service.keys import Keys
    from alexnet_dist.service.users import UserStore

    settings = load_settings()
    return UserStore(connect(settings.redis_url), Keys(settings.redis_prefix))


@user_cmd.command("add")
def user_add(
    name: str,
    team: str = typer.Option(..., help="the team whose jobs the user reads"),
    is_admin: bool = typer.Option(False, "--admin", help="may read and change every job"),
    replace: bool = typer.Option(False, help="give an existing user a new token (the old one stops working)"),
    token_only: bool = typer.Option(False, "--token-only", help="print the token alone (for scripts)"),
) -> None:
    """Add a user and print their token, once: the store keeps only its hash."""
    user, token = _users().add(name, team=team, admin=is_admin, replace=replace)
    if token_only:
        sys.stdout.write(token + "\n")
        return
    role = "admin" if user.admin else "user"
    out.print(f"{user.name} ({role}, team {user.team}); token, shown once, keep it secret:")
    sys.stdout.write(token + "\n")


@user_cmd.command("list")
def user_list() -> None:
    """Users, their team and role, and whether their token is live (tokens are never shown again)."""
    table = Table("user", "team", "role", "created", "token")
    for u in _users().list():
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(u.created))
        role, token = "admin" if u.admin else "user", "live" if u.live else "revoked"
        table.add_row(u.name, u.team, role, created, token)
    out.print(table)


@user_cmd.command("revoke")
def user_revoke(name: str) -> None:
    """Revoke a user's token at once, on every server."""
    u = _users().revoke(name)
    out.print(f"{u.name}: token revoked")


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, help="port to listen on"),
    workers: int = typer.Option(1, help="server processes (each stateless; Redis holds everything)"),
    ssl_certfile: str | None = typer.Option(None, help="TLS certificate (PEM); serve HTTPS"),
    ssl_keyfile: str | None = typer.Option(None, help="TLS private key (PEM)"),
    forwarded_allow_ips: str | None = typer.Option(
        None, help="proxies whose X-Forwarded-Proto/For to trust (behind a TLS-terminating proxy)"
    ),
) -> None:
    """Serve the HTTP API (/api/v1, docs at /docs) and the web dashboard (/) over the job store."""
    import uvicorn

    if bool(ssl_certfile) != bool(ssl_keyfile):
        raise ConfigError("TLS: give both --ssl-certfile and --ssl-keyfile, or neither")
    from alexnet_dist.api.server import create_app

    create_app(load_settings())  # fails here, in one line, if Redis is unreachable
    uvicorn.run(
        "alexnet_dist.api.server:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        forwarded_allow_ips=forwarded_allow_ips,
        log_level="info",
        access_log=False,
    )


@app.command()
def login(
    server_url: str | None = typer.Option(
        None, "--server", help="the API server (default: ALEXNET_DIST_SERVER)"
    ),
    token_stdin: bool = typer.Option(False, "--token-stdin", help="read the token from stdin, not a prompt"),
) -> None:
    """Check a token against the server and keep it (mode 0600) for the CLI's later commands."""
    from alexnet_dist.api.client import ApiClient

    settings = load_settings()
    url = (server_url or settings.server_url or "").rstrip("/")
    if not url:
        raise ConfigError("login: which server? pass --server URL or set ALEXNET_DIST_SERVER")
    token = sys.stdin.readline().strip() if token_stdin else typer.prompt("token", hide_input=True).strip()
    me = ApiClient(url, token).whoami()  # a wrong token fails here, and nothing is stored
    _save_token(settings.credentials_path, url, token)
    role = "admin" if me.get("admin") else "user"
    out.print(f"logged in to {url} as {me['name']} ({role}, team {me['team']}); token in "
              f"{settings.credentials_path}")  # fmt: skip
    if not settings.server_url:
        out.print(f"set ALEXNET_DIST_SERVER={url} to send your commands through it")


@app.command()
def logout(
    server_url: str | None = typer.Option(None, "--server", help="default: ALEXNET_DIST_SERVER"),
) -> None:
    """Forget the token kept for a server."""
    settings = load_settings()
    url = (server_url or settings.server_url or "").rstrip("/")
    _save_token(settings.credentials_path, url, None)
    out.print(f"logged out of {url or 'every server'}")


def _save_token(path: str, url: str, token: str | None) -> None:
    """Keep (or drop) ``url``'s token in the credentials file, readable by its owner only, replaced whole."""
    import json
    import os

    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        saved = saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        saved = {}
    if token is None:
        saved = {k: v for k, v in saved.items() if url and k != url}
    else:
        saved[url] = token
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(saved, f)
    os.replace(tmp, path)
