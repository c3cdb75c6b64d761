"""The one error type for user mistakes, and the one way to warn; the CLI prints an error as one
line and exits with code 2."""

from __future__ import annotations

from rich.console import Console


class GlitrError(Exception):
    """A user mistake (bad file, key, recipe or argument), reported without a traceback."""


def warn(console: Console | None, message: str) -> None:
    """One yellow `warning:` line on `console` (nothing when it is None, e.g. on other ranks)."""
    if console is not None:
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
