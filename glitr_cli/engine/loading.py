"""Loading trained models: the public way to get a GliTr (or its teacher) out of a run.

A training checkpoint holds the resolved recipe it was trained with, so the model is rebuilt in
its own geometry; `load_student` adds what online use needs (class names, preprocessing sizes).
Every file is read with `weights_only=True`; a missing checkpoint names the command that writes it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from glitr_cli.data.sampling import FrameSampler
from glitr_cli.engine.checkpoint import load_checkpoint
from glitr_cli.errors import GlitrError
from glitr_cli.model import GliTr, build_glitr
from glitr_cli.model.weights import load_state_dict_checked
from glitr_cli.paths import RUNS_DIR
from glitr_cli.recipe import ModelConfig, Recipe, recipe_from_dict


def build_model(
    cfg: ModelConfig, *, num_classes: int, num_frames: int, img_size: int, drop_path: float | None = None
) -> GliTr:
    """GliTr with random weights in the geometry of `cfg`."""
    return build_glitr(
        num_classes=num_classes,
        num_frames=num_frames,
        img_size=img_size,
        glimpse_size=cfg.glimpse_size,
        backbone=cfg.backbone,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        temporal_dim=cfg.temporal_dim,
        temporal_depth=cfg.temporal_depth,
        temporal_heads=cfg.temporal_heads,
        drop_path=cfg.drop_path if drop_path is None else drop_path,
        fused_attn=cfg.fused_attn,
        stem=cfg.stem,
    )


def producing_command(path: str | Path, command: str) -> str:
    """`glitr <command> recipes/<name>.yaml` when `path` lies in runs/<name>/, else a generic hint."""
    parts = Path(path).parts
    if RUNS_DIR in parts and parts.index(RUNS_DIR) + 1 < len(parts):
        return f"glitr {command} recipes/{parts[parts.index(RUNS_DIR) + 1]}.yaml"
    return f"glitr {command} RECIPE"


def load_run_checkpoint(path: str | Path, *, produced_by: str) -> dict[str, Any]:
    """A checkpoint of one of our runs; a missing one names the command that writes it."""
    if not Path(path).is_file():
        raise GlitrError(f"checkpoint {path} not found; produce it first: {producing_command(path, produced_by)}")
    with warnings.catch_warnings():  # a plain pickle makes torch warn before it refuses the file: one line only
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return load_checkpoint(path)


def checkpoint_recipe(ckpt: dict[str, Any], source: str) -> Recipe:
    """The resolved recipe a training checkpoint was written with."""
    return recipe_from_dict(ckpt["recipe"], f"the recipe stored in {source}")


def model_from_checkpoint(ckpt: dict[str, Any], source: str) -> GliTr:
    """The GliTr a training checkpoint holds, rebuilt from the recipe saved inside it (no drop-path)."""
    recipe = checkpoint_recipe(ckpt, source)
    model = build_model(
        recipe.model,
        num_classes=len(ckpt["class_names"]),
        num_frames=recipe.data.num_frames,
        img_size=recipe.data.img_size,
        drop_path=0.0,
    )
    load_state_dict_checked(model, ckpt["model"], source)
    return model


@dataclass
class Student:
    """A trained GliTr student (on the CPU, in eval mode) with what online use needs."""

    model: GliTr | None  # None: an exported step (`export.exported_student`), run by its own predictor
    path: Path
    class_names: list[str]
    recipe: Recipe  # the resolved recipe it was trained with (sizes, precision, CUDA graphs)

    @property
    def num_frames(self) -> int:
        return self.recipe.data.num_frames

    @property
    def img_size(self) -> int:
        return self.recipe.data.img_size

    @property
    def resize(self) -> int:
        return self.recipe.data.resize

    @property
    def sampler(self) -> FrameSampler:
        """Evaluation's frames of a clip, picked the way the recipe trained with."""
        return FrameSampler(self.num_frames, self.recipe.data.sampling)


def load_student(path: str | Path) -> Student:
    """Load a GliTr student checkpoint written by `glitr train-glitr`; anything else is a GlitrError."""
    path = Path(path)
    if path.is_dir():
        raise GlitrError(f"--checkpoint {path} is a folder; pass a checkpoint file such as {path}/checkpoints/last.pt")
    ckpt = load_run_checkpoint(path, produced_by="train-glitr")
    if ckpt["kind"] != "glitr":
        raise GlitrError(
            f"{path} is a {ckpt['kind']} checkpoint, not a GliTr (student) checkpoint "
            "from `glitr train-glitr` or `glitr demo`"
        )
    model = model_from_checkpoint(ckpt, str(path)).eval()
    return Student(model, path, [str(c) for c in ckpt["class_names"]], checkpoint_recipe(ckpt, str(path)))


def _run_kind(ckpt: Path) -> str | None:
    """The `kind:` in the run's recipe.yaml beside checkpoints/ (None when unknown)."""
    recipe = ckpt.parent.parent / "recipe.yaml"
    try:
        data = yaml.safe_load(recipe.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


def find_checkpoint(runs: str | Path | None = None) -> Path:
    """The newest GliTr (student) `checkpoints/last.pt` under `runs` (default runs/)."""
    runs = Path(runs if runs is not None else RUNS_DIR)
    found = [p for p in runs.glob("**/checkpoints/last.pt") if p.is_file()] if runs.is_dir() else []
    students = [p for p in found if _run_kind(p) in ("glitr", None)]
    if not students:
        raise GlitrError(
            f"no GliTr checkpoint under {runs}/: train one with `glitr demo` (or `glitr train-glitr RECIPE`), "
            "or pass --checkpoint PATH"
        )
    return max(students, key=lambda p: p.stat().st_mtime)
