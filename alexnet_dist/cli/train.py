"""CLI commands: train."""

from __future__ import annotations

from alexnet_dist.cli.app import app  # noqa: F401
