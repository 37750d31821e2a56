"""Settings from the environment. This module is the only reader of ``os.environ``.

Values flow down from here as arguments; nothing below the CLI looks at the environment itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://localhost:6379/0"  # ALEXNET_DIST_REDIS_URL; rediss:// for TLS
    redis_prefix: str = "alexnet:"  # ALEXNET_DIST_REDIS_PREFIX: every key lives under it
    ray_address: str | None = None  # RAY_ADDRESS: None starts or joins a local Ray
    ray_dashboard_url: str = "http://127.0.0.1:8265"  # ALEXNET_DIST_RAY_DASHBOARD: Ray Jobs API
    s3_endpoint_url: str | None = None  # AWS_ENDPOINT_URL(_S3): MinIO, moto or another S3 store
    aws_region: str | None = None  # AWS_REGION / AWS_DEFAULT_REGION
    storage_root: str = "file://./.stack/storage"  # ALEXNET_DIST_STORAGE: checkpoints when a spec names none
    extra: dict[str, str] = field(default_factory=dict)


def _absolute(url: str) -> str:
    """Relative local storage becomes absolute: Ray Jobs and workers do not share our directory."""
    if url.startswith("file://"):
        return "file://" + os.path.abspath(url.removeprefix("file://"))
    if "://" not in url:
        return os.path.abspath(url)
    return url


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if environ is None else environ)
    return Settings(
        redis_url=env.get("ALEXNET_DIST_REDIS_URL", Settings.redis_url),
        redis_prefix=env.get("ALEXNET_DIST_REDIS_PREFIX", Settings.redis_prefix),
        ray_address=env.get("RAY_ADDRESS") or None,
        ray_dashboard_url=env.get("ALEXNET_DIST_RAY_DASHBOARD", Settings.ray_dashboard_url),
        s3_endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
        aws_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        storage_root=_absolute(env.get("ALEXNET_DIST_STORAGE", Settings.storage_root)),
    )
