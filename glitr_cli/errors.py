"""The one error type for user mistakes, the stop on request, and the one way to warn.

The CLI prints a `GlitrError` as one `error:` line and exits with code 2, and a `Preempted` as one
line and exit code `PREEMPTED_EXIT_CODE`."""

from __future__ import annotations

from rich.console import Console


class GlitrError(Exception):
    """A user mistake (bad file, key, recipe or argument), reported without a traceback."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, rerun the same command to continue


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint at the step it reached."""


def warn(console: Console | None, message: str) -> None:
    """One yellow `warning:` line on `console` (nothing when it is None, e.g. on other ranks)."""
    if console is not None:
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
