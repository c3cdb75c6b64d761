"""Loader throughput: how many clips and frames per second the DataLoader delivers.

`glitr bench-loader` runs this on a prepared dataset so one can check that decoding and
augmentation keep up with the GPU before a long run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from glitr_cli.data.dataset import SPLITS, VideoFolderDataset
from glitr_cli.data.formats import DATASETS
from glitr_cli.data.transforms import eval_transform, train_transform
from glitr_cli.errors import GlitrError
from glitr_cli.paths import data_root
from glitr_cli.runtime import PREFETCH_FACTOR


def measure_loader(
    dataset: Dataset, batch_size: int, workers: int, num_batches: int, warmup: int = 2
) -> dict[str, Any]:
    """Time `num_batches` batches from a shuffled DataLoader over `dataset` (items
    `(clip (T, 3, H, W), label)`), after `warmup` batches that absorb worker start-up.

    Memory is pinned when an accelerator exists; workers persist across epochs when
    `workers > 0` and prefetch as the training loader's do. Returns clips_per_s, frames_per_s,
    seconds, startup_s (time to the first batch), batch_size, workers, num_batches,
    frames_per_clip, pin_memory."""
    if batch_size < 1 or num_batches < 1 or workers < 0:
        raise GlitrError(
            f"need batch_size >= 1, num_batches >= 1, workers >= 0; got {batch_size}, {num_batches}, {workers}"
        )
    if len(dataset) < batch_size:  # type: ignore[arg-type]
        raise GlitrError(f"the dataset has {len(dataset)} videos, fewer than one batch of {batch_size}")  # type: ignore[arg-type]
    pin = torch.cuda.is_available()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        drop_last=True,
        prefetch_factor=PREFETCH_FACTOR if workers > 0 else None,
    )

    def batches():
        while True:  # epochs as needed; persistent workers make re-iteration cheap
            yield from loader

    it = batches()
    t0 = time.perf_counter()
    clips, _ = next(it)
    startup = time.perf_counter() - t0
    frames_per_clip = int(clips[0].shape[0])
    for _ in range(max(0, warmup - 1)):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(num_batches):
        clips, _ = next(it)
        n += len(clips)
    seconds = time.perf_counter() - t0
    return {
        "clips_per_s": n / seconds,
        "frames_per_s": n * frames_per_clip / seconds,
        "seconds": seconds,
        "startup_s": startup,
        "batch_size": batch_size,
        "workers": workers,
        "num_batches": num_batches,
        "frames_per_clip": frames_per_clip,
        "pin_memory": pin,
    }


def resolve_dataset(dataset: str | Path, root: Path | None = None) -> Path:
    """A dataset folder from a path, or from a name (ssv2, jester, toy) under the data root
    (`root`, else `$GLITR_DATA` or ./data) when no such folder exists here."""
    path = Path(dataset)
    if str(dataset) in DATASETS and not (path / "category.txt").is_file():
        return (root if root is not None else data_root()) / str(dataset)
    return path


def benchmark_dataset(
    root: Path,
    split: str = "train",
    num_frames: int = 16,
    size: int = 224,
    resize: int | None = None,
    batch_size: int = 8,
    workers: int = 2,
    num_batches: int = 20,
    train: bool = True,
) -> dict[str, Any]:
    """`measure_loader` on a prepared dataset with the training (RandAugment + crop) or the
    evaluation transform; `resize` defaults to size * 256 / 224. Values are checked first, each
    error naming the `glitr bench-loader` option."""
    least = {"--frames": (num_frames, 1), "--size": (size, 1), "--batch-size": (batch_size, 1)}
    least |= {"--batches": (num_batches, 1), "--workers": (workers, 0), "--resize": (resize or size, size)}
    for flag, (value, low) in least.items():
        if value < low:
            raise GlitrError(f"bench-loader {flag} must be at least {low}, got {value}")
    if split not in SPLITS:
        raise GlitrError(f"bench-loader --split must be one of {', '.join(SPLITS)}, got {split!r}")
    if train:
        transform = train_transform(size)
    else:
        transform = eval_transform(size, resize or round(size * 256 / 224))
    ds = VideoFolderDataset(root, split, num_frames, transform, train=train)
    result = measure_loader(ds, batch_size, workers, num_batches)
    result.update(dataset=str(root), split=split, size=size, train=train, replaced_frames=ds.replaced_frames)
    return result


def describe(result: dict[str, Any]) -> str:
    """One line for the terminal."""
    mode = "train transform" if result.get("train", True) else "eval transform"
    return (
        f"{result['clips_per_s']:.1f} clips/s, {result['frames_per_s']:.0f} frames/s "
        f"({result['workers']} workers, batch {result['batch_size']}, {result['frames_per_clip']} frames/clip, "
        f"{mode}, {result['num_batches']} batches in {result['seconds']:.2f} s; first batch after "
        f"{result['startup_s']:.2f} s)"
    )
