"""Metrics: per-step accuracy, `metrics.jsonl` in the run directory, optional TensorBoard / W&B.

Only the main process writes. `metrics.jsonl` holds one JSON object per line: training records
(`"split": "train"`, losses, learning rate per module, clips/s, accuracy at every step t) and
validation records (`"split": "val"`, top-1/top-5 at every step t). TensorBoard and Weights &
Biases are imported only when a recipe turns them on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Correct predictions at every step: logits (B, T, C), labels (B,) -> counts (len(ks), T)."""
    c = logits.shape[-1]
    k_max = min(max(ks), c)
    top = logits.topk(k_max, dim=-1).indices  # (B, T, k)
    hit = top == labels[:, None, None]  # (B, T, k)
    return torch.stack([hit[..., : min(k, c)].any(-1).sum(0) for k in ks]).float()  # (len(ks), T)


def make_progress(console: Console, enabled: bool) -> Progress:
    """Rich progress bar with clips/s and ETA; `enabled` False shows nothing (other ranks, tests)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


class MetricsLogger:
    """Appends records to `metrics.jsonl` and mirrors scalars to the optional loggers."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "glitr",
        run_name: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GlitrError("log.tensorboard=true needs TensorBoard: pip install 'glitr[tensorboard]'") from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise GlitrError("log.wandb=true needs Weights & Biases: pip install 'glitr[wandb]'") from None
            self._wandb = wandb_lib.init(project=wandb_project, name=run_name, config=config, dir=str(run_dir))

    def truncate_after(self, step: int) -> None:
        """Drop records beyond optimiser step `step` (a resumed run writes them again)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [record for record in read_records(self.path) if record.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = dict(_flatten(record, prefix=f"{record.get('split', 'train')}/"))
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, skipping a line cut short by a kill."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def best_over_epochs(path: Path) -> dict[str, Any] | None:
    """For every step t, the best validation top-1 over a run's per-epoch validations, and its epoch.

    This is the number the paper reports (the original validates every epoch and keeps, per t,
    the best). None when the run has no `metrics.jsonl` or never validated.
    """
    if not path.is_file():
        return None
    vals = [r for r in read_records(path) if r.get("split") == "val" and "top1" in r]
    if not vals:
        return None
    steps = len(vals[0]["top1"])
    best = [max(vals, key=lambda r: r["top1"][t]) for t in range(steps)]
    return {
        "top1": [r["top1"][t] for t, r in enumerate(best)],
        "epoch": [r["epoch"] for r in best],
        "validations": len(vals),
    }


def _flatten(record: dict[str, Any], prefix: str) -> list[tuple[str, float]]:
    out = []
    for key, value in record.items():
        if key in ("split", "step"):
            continue
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{key}/")
        elif isinstance(value, list):
            out += [(f"{prefix}{key}/t{i + 1}", float(v)) for i, v in enumerate(value)]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append((f"{prefix}{key}", float(value)))
    return out
