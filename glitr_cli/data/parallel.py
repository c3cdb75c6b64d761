"""Running one function over many files in parallel worker processes, with a progress bar.

Used by `prepare-data` (decoding videos) and the toy generator (encoding them). Imports no torch,
so spawned workers start quickly.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import Any

from rich.console import Console

from glitr_cli.progress import ProgressLine


def default_workers() -> int:
    """Worker processes used when none are given: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def map_tasks(
    fn: Callable[[Any], Any],
    tasks: list[Any],
    workers: int,
    progress: bool,
    description: str,
    threads: bool = False,
) -> Iterator[Any]:
    """Run `fn` over `tasks` (in-process for workers <= 1), yielding results as they finish, with
    progress. At most 4 tasks per worker are in flight."""
    with ProgressLine(Console(), description, len(tasks), enabled=progress) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                yield fn(t)
                bar.advance()
            return
        pool: Executor
        if threads:
            pool = ThreadPoolExecutor(workers)
        else:
            # spawn: workers never inherit a parent's threads (torch, rich) half-locked
            pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
        with pool:
            it = iter(tasks)
            pending: set[Future] = set()
            for t in it:
                pending.add(pool.submit(fn, t))
                if len(pending) >= 4 * workers:
                    break
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    yield f.result()
                    bar.advance()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.add(pool.submit(fn, nxt))
