"""The training data path: the loader and, with `data.augment_on: device` (and `data.decode_on: device`),
the transform (and the JPEG decoding) moved from the loader workers to the training process's device,
for GPUs that outrun the workers (docs/speed.md#feeding-the-gpu). Each clip's random parameters come
from a CPU generator seeded from the clip's own seed, so runs stay reproducible and resumable as with
loader-side augmentation (random erasing's noise, drawn on the device, is the exception).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from glitr_cli.data.dataset import JpegClip, VideoFolderDataset
from glitr_cli.data.transforms import clip_train_transform
from glitr_cli.engine.distributed import SeededDataset, seeded
from glitr_cli.recipe import DataConfig
from glitr_cli.runtime import Runtime

# the augmentation's seed is derived from the clip's seed, so its draws are not the frame sampler's
_AUGMENT_SEED_OFFSET = 0x9E3779B97F4A7C15


def collate_uint8_clips(batch: Sequence[tuple]) -> tuple:
    """(clip, label[, seed]) items -> (list of clips, labels (B,)[, seeds (B,)]).

    A list, since the videos of a batch may differ in size until they are cropped (the clips are
    uint8 (T, 3, H, W), or `JpegClip`s when decoding happens on the device)."""
    clips = [item[0] for item in batch]
    columns = [torch.tensor([item[i] for item in batch], dtype=torch.int64) for i in range(1, len(batch[0]))]
    return (clips, *columns)


class DeviceAugment:
    """Bring a batch's clips to `device` (decoded there by `decode` when the loader read only the
    files, else copied), then apply `transform` (uint8 clip -> float clip) to each, seeded per clip."""

    def __init__(
        self,
        transform: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        decode: Callable[[Sequence[JpegClip], torch.device], list[torch.Tensor]] | None = None,
    ) -> None:
        self.transform = transform
        self.device = device
        self.decode = decode

    def __call__(self, clips: Sequence, seeds: torch.Tensor) -> torch.Tensor:
        return self.transform_clips(self.to_device(clips), seeds)

    def to_device(self, clips: Sequence) -> list[torch.Tensor]:
        """The batch's uint8 clips (T, 3, H, W) on the device."""
        if self.decode is not None:
            return self.decode(clips, self.device)
        return [clip.to(self.device, non_blocking=True) for clip in clips]

    def transform_clips(self, clips: Sequence[torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        """The training transform of each clip, drawn from its seed: float (B, T, 3, S, S)."""
        out = []
        for clip, seed in zip(clips, seeds.tolist(), strict=True):
            with seeded((seed + _AUGMENT_SEED_OFFSET) % 2**63):
                out.append(self.transform(clip))
        return torch.stack(out)


def training_data(
    dataset: VideoFolderDataset, cfg: DataConfig, runtime: Runtime, *, batch_size: int, sampler: Sampler, seed: int
) -> tuple[DataLoader, DeviceAugment | None]:
    """The training loader over `dataset` (built by `build_dataset` from `cfg`) with `sampler` (a
    `ResumableSampler`), and the `DeviceAugment` that `TrainStep` applies when `cfg.augment_on` is
    "device" (None otherwise: the loader's clips are ready)."""
    on_device = cfg.augment_on == "device"
    loader = runtime.loader(
        SeededDataset(dataset, with_seed=on_device),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_uint8_clips if on_device else None,
        seed=seed,
    )
    if not on_device:
        return loader, None
    decode = dataset.decode if cfg.decode_on == "device" else None
    return loader, DeviceAugment(clip_train_transform(cfg), runtime.device, decode)
