"""Which frames of a clip the model sees: T segments, one frame from each (TSN sampling), as the release
does (`original`) or covering the whole clip (`whole_clip`): docs/training.md#deliberate-deviations.
Indices are 0-based.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Sampling = Literal["original", "whole_clip"]


@dataclass(frozen=True)
class FrameSampler:
    """T = `num_segments` frame indices of an N-frame clip, the `mode` way."""

    num_segments: int
    mode: Sampling = "original"

    def __post_init__(self) -> None:
        if self.num_segments < 1:
            raise ValueError(f"need at least one segment, got {self.num_segments}")
        if self.mode not in ("original", "whole_clip"):
            raise ValueError(f"unknown frame sampling {self.mode!r}: original or whole_clip")

    def support(self, num_frames: int) -> list[tuple[int, int]]:
        """The 0-based range [lo, hi] (both inclusive) each training segment draws its frame from."""
        n, t = num_frames, self.num_segments
        if n < 1:
            raise ValueError(f"a clip needs at least one frame, got {n}")
        if n < t:
            return [(min(k, n - 1), min(k, n - 1)) for k in range(t)]
        if self.mode == "original":
            width = n // t
            return [(k * width, (k + 1) * width - 1) for k in range(t)]
        starts = [k * n // t for k in range(t + 1)]
        return [(s, e - 1) for s, e in zip(starts[:-1], starts[1:], strict=True)]

    def indices(self, num_frames: int, train: bool, generator: torch.Generator | None = None) -> list[int]:
        """T frame indices: one uniform draw in each training segment (from `generator`, else torch's
        global one), or evaluation's fixed frames."""
        support = self.support(num_frames)
        if train:
            return [lo + int(torch.randint(hi - lo + 1, (), generator=generator)) for lo, hi in support]
        if self.mode == "original":
            tick = num_frames / self.num_segments
            return [int(tick / 2.0 + tick * k) for k in range(self.num_segments)]
        return [lo + (hi + 1 - lo) // 2 for lo, hi in support]
