"""How this process runs: one frozen `Runtime`, decided once from the recipe and the environment.

Device, precision (autocast), CUDA graphs, `torch.compile`, gradient checkpointing, CPU threads,
loader workers and the place in a `torchrun` job live here, so every command makes the same choices
for the same recipe. Threads and workers share the cores this process may use: PyTorch gets those the
workers leave free (or `$OMP_NUM_THREADS`), since a parallel operation waits for any descheduled
thread. Training records its thread count (float results depend on it); the other commands run on
whatever machine they start on and take `Runtime.for_this_machine`.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing as mp
import os
import platform
import signal
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from glitr_cli.errors import GlitrError
from glitr_cli.recipe import Recipe

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# batches each loader worker keeps ready: with many workers 2 x workers batches wait in (pinned)
# memory, enough to ride out a slow batch; more only holds more decoded clips in shared memory
PREFETCH_FACTOR = 2
# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables `torchrun` sets; (0, 1, 0) without it."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def parse_device(
    text: str, *, key: str = "train.device", local_rank: int = 0, distributed: bool = False
) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` as a device that exists here; anything else is one clear line.

    Under torchrun (`distributed`) `cuda` means this process's GPU, cuda:LOCAL_RANK."""
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise GlitrError(f"{key}={text!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise GlitrError(f"{key}={text!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise GlitrError(f"{key}={text}: no CUDA GPU is available here; use {key}=cpu")
    if distributed or device.index is None:
        device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise GlitrError(f"{key}={text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def available_cores() -> int:
    """CPU cores this process may use: those it may run on, shared with the other processes of a
    `torchrun` job on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def auto_workers(device: torch.device) -> int:
    """Loader workers for `data.workers: auto`: the cores the training process leaves, which keeps one
    on a GPU and half of them on the CPU."""
    cores = available_cores()
    keep = 1 if device.type == "cuda" else (cores + 1) // 2
    return cores - keep


def keep_freed_memory() -> None:
    """Make glibc's malloc keep freed memory for the next allocations, process-wide and for good.

    By default glibc gives every block above its mmap threshold (32 MiB at most) back to the kernel
    when it is freed and maps fresh pages for the next one, which the kernel zero-fills one page
    fault at a time on first touch; a CPU training step's activations are such blocks. Serving all
    blocks from the heap and not trimming it (the process keeps its peak memory) removes those
    faults; what is computed is the same. Does nothing where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def auto_threads(workers: int) -> int:
    """PyTorch threads when the recipe says 0: `$OMP_NUM_THREADS` if set, else the cores left by the workers."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_cores() - workers)


@dataclass(frozen=True)
class Runtime:
    """Everything about how the process runs that is not what it computes."""

    device: torch.device
    precision: str  # what runs: bf16 | fp16 | fp32 (fp32 off CUDA whatever the recipe says)
    train_graphs: bool  # training micro-steps replayed as CUDA graphs (one CUDA process only)
    eval_graphs: bool  # online steps replayed as CUDA graphs (CUDA only)
    compile: bool
    grad_checkpointing: bool
    threads: int
    workers: int
    keep_freed_memory: bool = False  # glibc malloc keeps freed memory (`keep_freed_memory`)
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_recipe(cls, recipe: Recipe, device: str | None = None) -> Runtime:
        """The runtime `recipe` asks for in this process; `device` overrides `train.device` (`--device`)."""
        rank, world, local_rank = torchrun_env()
        key = "--device" if device is not None else "train.device"
        dev = parse_device(device or recipe.train.device, key=key, local_rank=local_rank, distributed=world > 1)
        t = recipe.train
        on_cuda = dev.type == "cuda"
        workers = auto_workers(dev) if recipe.data.workers == "auto" else recipe.data.workers
        return cls(
            device=dev,
            precision=t.precision if on_cuda else "fp32",
            train_graphs=t.cuda_graphs and on_cuda and world == 1,  # DDP's gradient hooks stay eager
            eval_graphs=recipe.eval.online_cuda_graphs and on_cuda,
            compile=t.compile,
            grad_checkpointing=t.grad_checkpointing,
            threads=t.threads or auto_threads(workers),
            workers=workers,
            keep_freed_memory=t.keep_freed_memory,
            rank=rank,
            world_size=world,
        )

    @classmethod
    def for_this_machine(
        cls, recipe: Recipe, device: str | None = None, *, threads: int = 0, workers: int | None = None
    ) -> Runtime:
        """The runtime of inference with `recipe` (often a checkpoint's, which records the training node's
        threads and workers): its device and precision, but threads and loader workers chosen for this
        machine, and malloc left as it is. `workers` (None: the recipe's, at most `auto_workers` here) and
        `threads` (0: `auto_threads` of those workers) override."""
        runtime = cls.from_recipe(recipe, device)
        if workers is None:
            workers = min(runtime.workers, auto_workers(runtime.device))
        return replace(runtime, threads=threads or auto_threads(workers), workers=workers, keep_freed_memory=False)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES.get(self.precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def apply(self) -> None:
        """Set this process's PyTorch thread count and, when asked, glibc's keeping of freed memory
        (process-wide, inherited by loader workers; do it once, before any work)."""
        torch.set_num_threads(self.threads)
        if self.keep_freed_memory:
            keep_freed_memory()

    def autocast(self, graphed: bool = False) -> contextlib.AbstractContextManager:
        """Autocast to the runtime's precision (nothing in fp32). Under a CUDA graph (`graphed`) the
        weight casts must be recomputed at every replay, not taken from autocast's cache."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not graphed)

    def loader(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        sampler: Sampler | None = None,
        drop_last: bool = False,
        collate_fn: Callable[[list], Any] | None = None,
        seed: int = 0,
    ) -> DataLoader:
        """A DataLoader with the runtime's workers (persistent, each `prefetch_factor` batches ahead),
        pinned memory on CUDA, and its own generator, so creating an iterator never draws from the
        global one (bit-exact resume).

        Workers ignore SIGTERM/SIGUSR1: a scheduler that signals every process of a job must not
        kill them while the trainer finishes its step and writes the preemption checkpoint. So that
        the process can still exit while a loader's workers are alive, they are ended at exit."""
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            persistent_workers=self.workers > 0,
            prefetch_factor=PREFETCH_FACTOR if self.workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=_ignore_preemption_signals if self.workers > 0 else None,
        )
        if self.workers > 0:
            _LIVE_LOADERS.add(loader)
        return loader


def _ignore_preemption_signals(worker_id: int) -> None:
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def stop_workers(loader: DataLoader) -> None:
    """End the persistent workers of `loader` now; iterating it again starts new ones.

    PyTorch keeps the iterator of persistent workers in the loader and ends them with a private method;
    should it lose that method, its worker processes are killed instead (they ignore SIGTERM). A test
    checks that both private members are there."""
    iterator, loader._iterator = loader._iterator, None
    if iterator is None:
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    else:
        kill_workers(getattr(iterator, "_workers", []))


def kill_workers(processes: list[mp.process.BaseProcess]) -> None:
    """End loader worker processes with SIGKILL (they ignore SIGTERM) and reap them."""
    for process in processes:
        process.kill()
    for process in processes:
        process.join()


_LIVE_LOADERS: weakref.WeakSet[DataLoader] = weakref.WeakSet()  # loaders with workers, ended at exit


@atexit.register  # after torch and multiprocessing were imported: runs before their exit handlers
def _stop_all_workers() -> None:
    """End the workers of the loaders still referenced at exit (a trainer in a reference cycle, an
    exception's traceback): multiprocessing's exit handler would end them with SIGTERM, which they
    ignore, and wait for them forever."""
    for loader in list(_LIVE_LOADERS):
        stop_workers(loader)
