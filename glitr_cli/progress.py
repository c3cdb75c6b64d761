"""Progress of long work: a live rich bar on a terminal, plain lines in a file.

Where the output is not a terminal (a cluster job's log), a live bar would print only its last state,
cut to the console width; instead one line is written every `every` seconds and when the work is done:
`<description> <done>/<total> · <info> · elapsed 0:01:05 · eta 0:02:10`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import timedelta
from types import TracebackType
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PROGRESS_EVERY = 30.0  # seconds between plain lines: the default of log.progress_every and --progress-every
T = TypeVar("T")
_every = PROGRESS_EVERY  # where no recipe says: what `set_progress_every` set


def set_progress_every(seconds: float) -> None:
    """The seconds between plain lines for progress whose caller names none (`--progress-every`)."""
    global _every
    _every = seconds


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class ProgressLine:
    """One piece of work of `total` steps (`completed` of them done before), reported on `console`."""

    def __init__(
        self,
        console: Console | None,
        description: str,
        total: int,
        *,
        completed: int = 0,
        enabled: bool = True,
        every: float | None = None,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.description, self.total, self.done = description, total, completed
        self.every = _every if every is None else every
        self.enabled = enabled and total > 0
        self.info = ""
        self._first, self._start = completed, time.perf_counter()
        self._printed = self._start
        self._bar: Progress | None = None
        if self.enabled and self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task(description, total=total, completed=completed, info="")

    def __enter__(self) -> ProgressLine:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()

    def advance(self, steps: int = 1, info: str | None = None) -> None:
        """`steps` more done; `info` (losses, speed) replaces the text shown beside the count."""
        self.done += steps
        self.info = self.info if info is None else info
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, info=self.info)
            return
        now = time.perf_counter()
        if self.enabled and (now - self._printed >= self.every or self.done >= self.total):
            self._printed = now
            self.console.print(self.line(now), highlight=False, markup=False, soft_wrap=True)

    def line(self, now: float) -> str:
        """The plain line: count, info, elapsed and the remaining time at the speed so far."""
        elapsed = now - self._start
        rate = (self.done - self._first) / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        parts = [f"{self.description} {self.done}/{self.total}", self.info, f"elapsed {_clock(elapsed)}", f"eta {eta}"]
        return " · ".join(part for part in parts if part)


def track(
    items: Iterable[T], description: str, total: int, console: Console | None, every: float, enabled: bool = True
) -> Iterator[T]:
    """`items`, reporting progress as each is taken."""
    with ProgressLine(console, description, total, enabled=enabled, every=every) as progress:
        for item in items:
            yield item
            progress.advance()
