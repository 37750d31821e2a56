"""The ``alexnet-dist`` command line. Only this package maps errors to exit codes (the table in
:mod:`alexnet_dist.errors`) and sets up logging."""

from __future__ import annotations

import logging
import sys

from alexnet_dist.cli.app import app
from alexnet_dist.errors import AlexNetDistError

# Command modules register themselves on ``app`` when imported.
from alexnet_dist.cli import caffe, classify, demo, export, jobs, server, shards, spec, train  # noqa: F401  isort: skip

__all__ = ["app", "main"]


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        app()
    except AlexNetDistError as err:
        print(f"alexnet-dist: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("alexnet-dist: interrupted", file=sys.stderr)
        sys.exit(130)
