"""The `glitr` command line: one thin function per subcommand, no logic of its own.

Each command parses its options, calls one library function and lets `main` turn a
`GlitrError` (a user mistake) into one red line and exit code 2.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from glitr_cli import __version__
from glitr_cli.errors import GlitrError

app = typer.Typer(
    name="glitr",
    help="GliTr: online action prediction from glimpses (WACV 2023), faithful and fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"glitr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """GliTr: online action prediction from glimpses."""


def main() -> None:
    """Entry point of the `glitr` console script."""
    try:
        app()
    except GlitrError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
