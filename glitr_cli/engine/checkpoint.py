"""Training checkpoints: atomic writes, `last.pt` always the newest complete one, safe loading.

A run directory holds `checkpoints/step_00001234.pt` (numbered by optimiser step, the newest
`keep_last` kept) and `checkpoints/last.pt`, a hard link to the newest. Each file is written
to a temporary name and renamed into place, so a process killed at any moment (even SIGKILL)
leaves either the previous checkpoint or the new one, never half a file. Loading uses
`torch.load(weights_only=True)`; a corrupt, truncated or foreign file is a `GlitrError`.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write, fsync_dir
from glitr_cli.model.weights import read_checkpoint

FORMAT = "glitr-checkpoint"
VERSION = 1
LAST = "last.pt"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _point_last(ckpt: Path) -> None:
    """Make `last.pt` the same file as `ckpt` atomically (a hard link; a copy where links fail)."""
    tmp = ckpt.with_name(f".{LAST}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt, tmp)
    except OSError:
        shutil.copyfile(ckpt, tmp)
    os.replace(tmp, ckpt.with_name(LAST))
    fsync_dir(ckpt.parent)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` numbered checkpoints (0 keeps all) and stale temp files."""
    for stale in ckpt_dir.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)
    if keep_last <= 0:
        return
    numbered = sorted(ckpt_dir.glob("step_*.pt"))
    for old in numbered[:-keep_last]:
        old.unlink(missing_ok=True)


def save_checkpoint(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int) -> Path:
    """Write `state` as the checkpoint of optimiser step `step`, point `last.pt` at it, prune."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / checkpoint_name(step)
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))
    _point_last(path)
    prune(ckpt_dir, keep_last)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a glitr training checkpoint on the CPU; anything else is one clear `GlitrError`."""
    obj = read_checkpoint(path)  # weights_only load; missing/corrupt/truncated -> GlitrError
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise GlitrError(f"{path}: not a glitr training checkpoint (no '{FORMAT}' format tag)")
    if obj.get("version", 0) > VERSION:
        raise GlitrError(f"{path}: checkpoint format version {obj['version']} is newer than this glitr ({VERSION})")
    for key in ("kind", "model", "recipe", "class_names", "progress"):
        if key not in obj:
            raise GlitrError(f"{path}: incomplete checkpoint, key '{key}' is missing")
    return obj


# ------------------------------------------------------------------------------------------- RNG states


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch and, on a CUDA `device`, that device's generator states, in
    `weights_only`-loadable types. Only the process's own device: a run resumed on a node with fewer
    GPUs restores every state it saved."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def cuda_rng_state(saved: torch.Tensor | list[torch.Tensor], index: int) -> torch.Tensor | None:
    """The CUDA generator state for device `index` from a checkpoint's `saved` one: the saving
    process's own device's (a tensor), or, from checkpoints that held every visible device's (a
    list), entry `index` where the saving node had that many devices; None: nothing to restore."""
    if isinstance(saved, torch.Tensor):
        return saved
    return saved[index] if index < len(saved) else None


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` captured (the CUDA state into `device`, when it is a CUDA device)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        own = cuda_rng_state(state["cuda"], index)
        if own is not None:
            torch.cuda.set_rng_state(own, index)
