"""Settings from the environment. This module is the only reader of ``os.environ``.

Values flow down from here as arguments; nothing below the CLI looks at the environment itself.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass, field

from alexnet_dist.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://localhost:6379/0"  # ALEXNET_DIST_REDIS_URL; rediss:// for TLS
    redis_prefix: str = "alexnet:"  # ALEXNET_DIST_REDIS_PREFIX: every key lives under it
    ray_address: str | None = None  # RAY_ADDRESS: None starts or joins a local Ray
    ray_dashboard_url: str = "http://127.0.0.1:8265"  # ALEXNET_DIST_RAY_DASHBOARD: Ray Jobs API
    s3_endpoint_url: str | None = None  # AWS_ENDPOINT_URL(_S3): MinIO, moto or another S3 store
    aws_region: str | None = None  # AWS_REGION / AWS_DEFAULT_REGION
    storage_root: str = "file://./.stack/storage"  # ALEXNET_DIST_STORAGE: checkpoints when a spec names none
    # Who submits (until there is authentication): ALEXNET_DIST_USER (default: the login name) and
    # ALEXNET_DIST_TEAM. A job's owner and team come from here, never from its spec.
    user: str = ""
    team: str = "default"
    # Per-team quotas, ALEXNET_DIST_QUOTAS="vision=gpus:8,workers:4;nlp=gpus:4": a team within its quota is
    # admitted ahead of one over it; a team over it may borrow idle room, the first to be preempted.
    quotas: dict[str, dict[str, float]] = field(default_factory=dict)
    usage_half_life_s: float = 6 * 3600.0  # ALEXNET_DIST_USAGE_HALF_LIFE_H: fair-share memory, in hours
    min_run_s: float = 600.0  # ALEXNET_DIST_MIN_RUN_S: no preemption of a job that started this recently
    # Webhooks (ALEXNET_DIST_WEBHOOKS: comma-separated URLs): a signed JSON POST on every state change and
    # result, HMAC-SHA256 with ALEXNET_DIST_WEBHOOK_SECRET; ALEXNET_DIST_WEBHOOK_SLACK=1 for Slack's format.
    webhooks: tuple[str, ...] = ()
    webhook_secret: str = ""
    webhook_slack: bool = False
    # The HTTP API (ALEXNET_DIST_SERVER, e.g. https://alexnet.example.org): when set, the CLI's user
    # commands go through it with ALEXNET_DIST_TOKEN, or the token `alexnet-dist login` stored in
    # credentials_path (mode 0600); operator commands (dispatcher, server, admin) still use Redis.
    server_url: str | None = None
    token: str | None = None
    credentials_path: str = ""  # $XDG_CONFIG_HOME/alexnet-dist/credentials.json (~/.config by default)
    mlflow_tracking_uri: str | None = None  # MLFLOW_TRACKING_URI: log runs to MLflow (the mlflow extra)
    mlflow_experiment: str | None = None  # MLFLOW_EXPERIMENT_NAME (default "alexnet-dist")
    extra: dict[str, str] = field(default_factory=dict)


def _absolute(url: str) -> str:
    """Relative local storage becomes absolute: Ray Jobs and workers do not share our directory."""
    if url.startswith("file://"):
        return "file://" + os.path.abspath(url.removeprefix("file://"))
    if "://" not in url:
        return os.path.abspath(url)
    return url


def parse_quotas(text: str) -> dict[str, dict[str, float]]:
    """``"vision=gpus:8,workers:4;nlp=gpus:4"`` -> ``{"vision": {"gpus": 8.0, "workers": 4.0}, ...}``."""
    quotas: dict[str, dict[str, float]] = {}
    for part in (p.strip() for p in text.split(";") if p.strip()):
        team, _, limits = part.partition("=")
        entry: dict[str, float] = {}
        for item in (i.strip() for i in limits.split(",") if i.strip()):
            name, _, value = item.partition(":")
            if name not in ("workers", "cpus", "gpus"):
                raise ConfigError(f"ALEXNET_DIST_QUOTAS: {item!r}: use workers:N, cpus:N or gpus:N")
            try:
                entry[name] = float(value)
            except ValueError:
                raise ConfigError(f"ALEXNET_DIST_QUOTAS: {item!r}: {value!r} is not a number") from None
        if not team.strip() or not entry:
            raise ConfigError(f"ALEXNET_DIST_QUOTAS: {part!r}: write team=gpus:8,workers:4")
        quotas[team.strip()] = entry
    return quotas


def _number(env: dict[str, str], name: str, default: float) -> float:
    try:
        return float(env.get(name, default))
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r}: not a number") from None


def credentials_file(env: dict[str, str]) -> str:
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "alexnet-dist", "credentials.json")


def stored_token(path: str, server: str | None) -> str | None:
    """The token `alexnet-dist login` stored for ``server``, if any."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or server is None:
        return None
    token = saved.get(server.rstrip("/"))
    return token if isinstance(token, str) and token else None


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if environ is None else environ)
    server = (env.get("ALEXNET_DIST_SERVER") or "").rstrip("/") or None
    credentials = credentials_file(env)
    return Settings(
        redis_url=env.get("ALEXNET_DIST_REDIS_URL", Settings.redis_url),
        redis_prefix=env.get("ALEXNET_DIST_REDIS_PREFIX", Settings.redis_prefix),
        ray_address=env.get("RAY_ADDRESS") or None,
        ray_dashboard_url=env.get("ALEXNET_DIST_RAY_DASHBOARD", Settings.ray_dashboard_url),
        s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        aws_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        storage_root=_absolute(env.get("ALEXNET_DIST_STORAGE", Settings.storage_root)),
        user=env.get("ALEXNET_DIST_USER") or _login(),
        team=env.get("ALEXNET_DIST_TEAM", Settings.team),
        quotas=parse_quotas(env.get("ALEXNET_DIST_QUOTAS", "")),
        usage_half_life_s=_number(env, "ALEXNET_DIST_USAGE_HALF_LIFE_H", Settings.usage_half_life_s / 3600)
        * 3600,
        min_run_s=_number(env, "ALEXNET_DIST_MIN_RUN_S", Settings.min_run_s),
        webhooks=tuple(u.strip() for u in env.get("ALEXNET_DIST_WEBHOOKS", "").split(",") if u.strip()),
        webhook_secret=env.get("ALEXNET_DIST_WEBHOOK_SECRET", ""),
        webhook_slack=env.get("ALEXNET_DIST_WEBHOOK_SLACK", "") in ("1", "true", "yes"),
        server_url=server,
        token=env.get("ALEXNET_DIST_TOKEN") or stored_token(credentials, server),
        credentials_path=credentials,
        mlflow_tracking_uri=env.get("MLFLOW_TRACKING_URI") or None,
        mlflow_experiment=env.get("MLFLOW_EXPERIMENT_NAME") or None,
    )


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (containers)
        return "unknown"
