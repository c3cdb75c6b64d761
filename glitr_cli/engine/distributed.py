"""One process or many: the process group of a `torchrun` job (nccl on CUDA, gloo on the CPU), samplers,
seeding, reductions. The training sampler shards one seeded permutation per epoch, can start part-way
through an epoch (resume), and hands every clip a seed from (seed, epoch, position), so its augmentation
depends on neither the loader workers, restarts nor timing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler

from glitr_cli.runtime import Runtime


def init_distributed(runtime: Runtime) -> None:
    """Join the process group `torchrun` describes (nothing in a single process): nccl on CUDA, gloo on CPU."""
    if not runtime.distributed or dist.is_initialized():
        return
    dev = runtime.device
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(
        backend="nccl" if dev.type == "cuda" else "gloo",
        rank=runtime.rank,
        world_size=runtime.world_size,
        timeout=timedelta(minutes=30),
        device_id=dev if dev.type == "cuda" else None,
    )


def cleanup_distributed() -> None:
    """Leave the process group after a command succeeded on every rank.

    Not for the error path: a rank that failed must not wait in a barrier for ranks that are
    waiting in another collective; it exits, and its peers' next collective fails at once.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op in one process); returns the same tensor."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_named(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of `parts` over ranks in one collective (as float64); returns them by name."""
    flat = all_reduce_sum(torch.cat([t.to(torch.float64).flatten() for t in parts.values()]))
    return dict(zip(parts, flat.split([t.numel() for t in parts.values()]), strict=True))


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks (a no-op in one process); returns the same tensor."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the clip at `position` of epoch `epoch`'s global order."""
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0]) >> 1  # shifted as a Python int: NumPy 1.x cannot shift a uint64 by an int


class ResumableSampler(DistributedSampler):
    """DistributedSampler that yields (index, seed) pairs and can skip the first clips of an epoch.

    Rank r gets positions r, r + W, r + 2W, ... of the epoch's permutation (W ranks); the tail
    that would not divide evenly is dropped. `set_epoch(epoch, skip)` starts after `skip`
    clips of this rank, which is how a run resumed mid-epoch sees exactly the clips it had not.
    """

    def __init__(self, dataset_len: int, *, rank: int, world_size: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(
            range(dataset_len), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        for i in range(self.skip, len(indices)):
            position = i * self.num_replicas + self.rank
            yield indices[i], sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(Sampler[int]):
    """Evaluation: rank r reads clips r, r + W, ...; no padding, so every clip counts exactly once."""

    def __init__(self, dataset_len: int, *, rank: int, world_size: int) -> None:
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with the CPU generators (Python, NumPy, torch) seeded by `seed`, then put their states back.

    GPU generators are left alone: this runs in loader workers, which must not touch CUDA."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


class SeededDataset(Dataset):
    """Wraps a dataset for `ResumableSampler`: item (index, seed) is `dataset[index]` drawn under `seed`
    (with `with_seed`, the seed is appended to the item, for augmentation done later on the device)."""

    def __init__(self, dataset: Dataset, with_seed: bool = False) -> None:
        self.dataset = dataset
        self.with_seed = with_seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with seeded(seed):
            item = self.dataset[index]
        return (*item, seed) if self.with_seed else item
