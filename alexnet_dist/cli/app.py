"""The Typer application object; command modules in this package attach their commands to it.

Options before the command apply to every command: ``--version``, ``-v``/``-q`` (log level), and the
shell completion Typer installs (``--install-completion``). Colour follows the terminal, and ``NO_COLOR``
(https://no-color.org) turns it off, as rich reads it.
"""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    name="alexnet-dist",
    help="Train the original AlexNet as a distributed service: Redis queue, Ray Train, S3 shards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("alexnet-dist")
    except PackageNotFoundError:
        return "0+unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"alexnet-dist {version()}")
        raise typer.Exit()


@app.callback()
def options(
    show_version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="print the version and exit"
    ),
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="-v: this package's debug lines; -vv: every library's too"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="only warnings and errors in the log"),
) -> None:
    """Train the original AlexNet as a distributed service: Redis queue, Ray Train, S3 shards."""
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)
    elif verbose:
        logging.getLogger("alexnet_dist").setLevel(logging.DEBUG)
        if verbose >= 2:
            logging.getLogger().setLevel(logging.DEBUG)
