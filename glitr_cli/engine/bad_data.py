"""Training clips with unreadable frames: counted per epoch (the difference of the dataset's shared-memory
counts, `VideoFolderDataset.damage`, from the epoch's start), listed in `bad_clips.jsonl`, and a stop
when there are too many.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from glitr_cli.data.dataset import VideoFolderDataset
from glitr_cli.engine.distributed import all_gather_objects
from glitr_cli.engine.metrics import read_records
from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_text

BAD_CLIPS_FILE = "bad_clips.jsonl"  # per epoch, every training clip with unreadable frames
COUNTS = ("bad_clips", "replaced_frames", "unreadable_clips")


class BadData:
    """The bad data of this rank's training clips in the current epoch; `data.max_bad_fraction` of the
    epoch's `epoch_clips` may have unreadable frames before `check` stops the run."""

    def __init__(
        self, dataset: VideoFolderDataset, run_dir: Path, *, max_fraction: float, epoch_clips: int, is_main: bool
    ) -> None:
        self.dataset, self.path = dataset, run_dir / BAD_CLIPS_FILE
        self.max_fraction, self.epoch_clips, self.is_main = max_fraction, epoch_clips, is_main
        self.start_epoch()

    def start_epoch(self) -> None:
        self._start = self.dataset.damage.clone()

    def forget_after(self, epoch: int) -> None:
        """A resumed run lists the bad clips of the epochs it trains again afresh."""
        if self.is_main and self.path.is_file():
            kept = [c for c in read_records(self.path) if c["epoch"] <= epoch]
            atomic_write_text(self.path, "".join(json.dumps(c) + "\n" for c in kept))

    def counts(self, device: torch.device) -> torch.Tensor:
        """`COUNTS` of this epoch on this rank: clips with unreadable frames, frames replaced, unreadable clips."""
        d = self.dataset.damage - self._start  # (clips, [frames replaced, times unreadable])
        counts = [(d.sum(1) > 0).sum(), d[:, 0].sum(), (d[:, 1] > 0).sum()]
        return torch.tensor([int(c) for c in counts], dtype=torch.float64, device=device)

    def clips(self) -> list[dict[str, Any]]:
        """Every rank's damaged clips of this epoch, worst first (collective)."""
        d = self.dataset.damage - self._start
        mine = [
            {"id": self.dataset.records[i].id, "replaced_frames": int(d[i, 0]), "unreadable": bool(d[i, 1])}
            for i in d.sum(1).nonzero().flatten().tolist()
        ]
        clips = [c for rank in all_gather_objects(mine) for c in rank]
        return sorted(clips, key=lambda c: (not c["unreadable"], -c["replaced_frames"], c["id"]))

    def check(self, totals: torch.Tensor, epoch: int, root: str | None) -> int:
        """Stop the run (listing the clips) when more clips had unreadable frames than allowed; `totals` are
        the `counts` summed over ranks (every rank calls it). Returns the number of such clips."""
        bad = int(totals[0].item())
        if bad > self.max_fraction * self.epoch_clips:
            worst = self.clips()
            self.write(worst, epoch)
            shown = ", ".join(
                f"{c['id']} ({'unreadable' if c['unreadable'] else str(c['replaced_frames']) + ' frames replaced'})"
                for c in worst[:5]
            )
            raise GlitrError(
                f"{bad} training clips of epoch {epoch} had unreadable frames, more than "
                f"data.max_bad_fraction={self.max_fraction} of {self.epoch_clips} allows; worst: {shown} "
                f"(all in {self.path}; check the frames under {root})"
            )
        return bad

    def write(self, clips: list[dict[str, Any]], epoch: int) -> None:
        if self.is_main:
            with open(self.path, "a") as f:
                f.writelines(json.dumps({"epoch": epoch, **c}) + "\n" for c in clips)
