"""Training augmentation on the training device (`data.augment_on: device`).

The training transform (RandAugment on the full frame, then the random-resized crop) costs far
more CPU time than decoding the JPEGs (README, "Speed"), so a GPU that trains at hundreds of clips/s
can outrun the loader workers of a normal host. With this option the workers only decode (uint8
clips, pinned) and the transform runs on the device in the training process, clip by clip. Each
clip's random parameters are drawn from a CPU generator seeded from the clip's own seed, so runs
stay reproducible and resumable as with loader-side augmentation (the noise of random erasing,
drawn on the device, is the one exception).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from glitr_cli.engine.distributed import seeded

# the augmentation's seed is derived from the clip's seed, so its draws are not the frame sampler's
_AUGMENT_SEED_OFFSET = 0x9E3779B97F4A7C15


def collate_uint8_clips(batch: Sequence[tuple]) -> tuple:
    """(clip, label[, seed]) items -> (list of uint8 clips (T, 3, H, W), labels (B,)[, seeds (B,)]).

    A list, since the videos of a batch may differ in size until they are cropped."""
    clips = [item[0] for item in batch]
    columns = [torch.tensor([item[i] for item in batch], dtype=torch.int64) for i in range(1, len(batch[0]))]
    return (clips, *columns)


class DeviceAugment:
    """Apply `transform` (uint8 clip -> float clip) to each clip on `device`, seeded per clip."""

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self.transform = transform
        self.device = device

    def __call__(self, clips: Sequence[torch.Tensor], seeds: torch.Tensor) -> torch.Tensor:
        out = []
        for clip, seed in zip(clips, seeds.tolist(), strict=True):
            with seeded((seed + _AUGMENT_SEED_OFFSET) % 2**63):
                out.append(self.transform(clip.to(self.device, non_blocking=True)))
        return torch.stack(out)  # (B, T, 3, S, S)
