"""The Typer application object; command modules in this package attach their commands to it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="alexnet-dist",
    help="Train the original AlexNet as a distributed service: Redis queue, Ray Train, S3 shards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
