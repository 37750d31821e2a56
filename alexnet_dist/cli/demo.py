"""CLI commands for the demo: none of its own yet.

The demo is ``scripts/demo.sh`` (what ``make demo`` runs): it starts Redis and Ray and drives the other
commands (``shards build``, ``submit``, ``dispatcher``, ``watch``, ``result``, ``classify``, ``plot``).
"""

from __future__ import annotations

from alexnet_dist.cli.app import app  # noqa: F401
