"""Metrics: per-step accuracy, `metrics.jsonl` in the run directory, optional TensorBoard / W&B.

Only the main process writes. `metrics.jsonl` is strict JSON, one record per line (train, val, and
bad-data counts as `"split": "data"`); a value that is not finite is written as null. `curves.png`
plots it. A resumed run drops the records after its checkpoint, hides them from TensorBoard
(`purge_step`) and continues the same W&B run (`wandb_id.txt`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write, atomic_write_text

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
WANDB_ID_FILE = "wandb_id.txt"


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Correct predictions at every step: logits (B, T, C), labels (B,) -> counts (len(ks), T)."""
    c = logits.shape[-1]
    k_max = min(max(ks), c)
    top = logits.topk(k_max, dim=-1).indices  # (B, T, k)
    hit = top == labels[:, None, None]  # (B, T, k)
    return torch.stack([hit[..., : min(k, c)].any(-1).sum(0) for k in ks]).float()  # (len(ks), T)


class MetricsLogger:
    """Appends records to `metrics.jsonl` and mirrors scalars to the optional loggers."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        step: int = 0,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "glitr",
        run_name: str = "",
        config: dict[str, Any] | None = None,
    ) -> None:
        """`step`: the optimiser step the run starts from (the records beyond it are logged again)."""
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [record for record in read_records(self.path) if record.get("step", 0) <= step]
            atomic_write_text(self.path, "".join(_json_line(record) for record in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise GlitrError("log.tensorboard=true needs TensorBoard: pip install 'glitr[tensorboard]'") from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step + 1)
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise GlitrError("log.wandb=true needs Weights & Biases: pip install 'glitr[wandb]'") from None
            id_file = run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if id_file.is_file() else None
            self._wandb = wandb_lib.init(
                project=wandb_project, name=run_name, config=config, dir=str(run_dir), id=run_id, resume="allow"
            )
            if run_id is None:
                atomic_write_text(id_file, self._wandb.id + "\n")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(_json_line(record))
        step = record.get("step", 0)
        scalars = dict(_flatten(record, prefix=f"{record.get('split', 'train')}/"))
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def plot(self, title: str = "") -> None:
        """Redraw `curves.png` from everything in `metrics.jsonl` so far."""
        if self.enabled and self.path.exists():
            plot_curves(read_records(self.path), self.path.with_name(CURVES_FILE), title)

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
    """For every step t, the best validation top-1 over a run's per-epoch validations and its epoch (the
    paper's number); None when the run never validated."""
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


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training losses, learning rate per module, top-1 at the last step t (training window and
    validation) and clips/s, each against the epoch, and where validations logged them, the spread
    of the glimpse locations and how often they held the toy target per direction; written
    atomically as a PNG."""
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val" and "top1" in r]
    epochs = [r["epoch"] for r in train]

    def series(get: Callable[[dict[str, Any]], Any]) -> list[float]:  # None (a loss left out) becomes a gap in the line
        values = [get(r) for r in train]
        return [math.nan if v is None else float(v) for v in values]

    first = train[0] if train else {}
    loss_keys = [k for k, v in first.items() if k not in _NOT_LOSSES and not isinstance(v, list | dict)]
    losses = {k: series(lambda r, k=k: r.get(k)) for k in loss_keys}
    lrs = {m: series(lambda r, m=m: r["lr"].get(m)) for m in first.get("lr", {})}

    seen = [r for r in val if "glimpses" in r]  # validations that logged where the glimpses went
    fig = Figure(figsize=(10, 10 if seen else 7), dpi=100)  # no pyplot: no GUI backend, no global figure state
    axes = fig.subplots(3 if seen else 2, 2, sharex=True)
    (loss_ax, lr_ax), (acc_ax, speed_ax) = axes[:2]
    dot = "o" if len(train) == 1 else None  # a line through one record draws nothing
    for ax, curves in ((loss_ax, losses), (lr_ax, lrs)):
        for name, values in curves.items():
            ax.plot(epochs, values, label=name, lw=2 if name == "loss" else 1, marker=dot)
        finite = [v for values in curves.values() for v in values if math.isfinite(v)]
        if finite and min(finite) > 0:
            ax.set_yscale("log")
    if train:
        steps = len(train[0]["top1"])
        acc_ax.plot(epochs, series(lambda r: 100 * r["top1"][-1]), label=f"training, t={steps}", marker=dot)
        speed_ax.plot(epochs, series(lambda r: r["clips_per_s"]), marker=dot)
    if val:
        steps = len(val[0]["top1"])
        val_epochs = [r["epoch"] for r in val]
        acc_ax.plot(val_epochs, [100 * r["top1"][-1] for r in val], "o-", label=f"validation, t={steps}")
        acc_ax.plot(val_epochs, [100 * r["top1"][0] for r in val], "s:", label="validation, t=1")
    names = {loss_ax: "training loss", lr_ax: "learning rate", acc_ax: "top-1 (%)", speed_ax: "clips/s"}
    if seen:
        spread_ax, follow_ax = axes[2]
        seen_epochs = [r["epoch"] for r in seen]
        for axis in ("x", "y"):
            spread = [sum(r["glimpses"]["locations"][f"{axis}_std"]) / len(r["top1"]) for r in seen]
            spread_ax.plot(seen_epochs, spread, "o-", label=f"{axis}, mean over t")
        for direction in seen[-1]["glimpses"].get("follow", {}):  # toy data only
            held = [100 * r["glimpses"].get("follow", {}).get(direction, math.nan) for r in seen]
            follow_ax.plot(seen_epochs, held, "o-", label=direction, lw=2 if direction == "all" else 1)
        follow_ax.set_visible(bool(follow_ax.lines))
        names |= {spread_ax: "glimpse location spread (std)", follow_ax: "toy target held (%)"}
    for ax, name in names.items():
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines and ax is not speed_ax:
            ax.legend(fontsize="small")
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


_NOT_LOSSES = ("split", "epoch", "step", "clips_per_s", "grad_norm")


def _finite_or_none(value: Any) -> Any:
    """`value` with every float that is not finite replaced by None, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def _json_line(record: dict[str, Any]) -> str:
    """One strict-JSON line (no NaN or Infinity tokens, which strict parsers refuse)."""
    return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


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
