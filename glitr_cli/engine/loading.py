"""Loading trained models: the public way to get a GliTr (or its teacher) out of a run.

A training checkpoint holds the resolved recipe it was trained with, so the model is rebuilt in
its own geometry; `load_student` adds what online use needs (class names, preprocessing sizes).
Every file is read with `weights_only=True`; a missing checkpoint names the command that writes it.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from glitr_cli.data.sampling import FrameSampler
from glitr_cli.engine.checkpoint import LAST, load_checkpoint
from glitr_cli.errors import GlitrError
from glitr_cli.model import GliTr, build_glitr
from glitr_cli.model.weights import load_state_dict_checked
from glitr_cli.paths import RECIPE_FILE, RUNS_DIR, closest_existing, recipe_names, run_of
from glitr_cli.recipe import ModelConfig, Recipe, recipe_from_dict, recipe_value

# what a model reads (frames per clip, frame size), and the other recipe keys that shape its weights
DATA_GEOMETRY = ("data.num_frames", "data.img_size")
MODEL_GEOMETRY = (
    "model.backbone",
    "model.embed_dim",
    "model.depth",
    "model.patch_size",
    "model.stem",
    "model.temporal_dim",
    "model.temporal_depth",
)


def build_model(
    cfg: ModelConfig, *, num_classes: int, num_frames: int, img_size: int, drop_path: float | None = None
) -> GliTr:
    """GliTr with random weights in the geometry of `cfg` (the keys `build_glitr` takes by the same name)."""
    geometry = {k: v for k, v in asdict(cfg).items() if k in inspect.signature(build_glitr).parameters}
    if drop_path is not None:
        geometry["drop_path"] = drop_path
    return build_glitr(num_classes=num_classes, num_frames=num_frames, img_size=img_size, **geometry)


def producing_command(path: str | Path, command: str) -> str:
    """The command that writes checkpoint `path` of run runs/<name>/: the run's saved recipe when the
    run has begun, else recipes/<name>.yaml when that file or a shipped recipe of that name exists,
    else any recipe named for the run."""
    parts = Path(path).parts
    if RUNS_DIR not in parts or parts.index(RUNS_DIR) + 1 >= len(parts):
        return f"glitr {command} RECIPE"
    name = parts[parts.index(RUNS_DIR) + 1]
    saved = Path(*parts[: parts.index(RUNS_DIR) + 2]) / RECIPE_FILE
    if saved.is_file():
        return f"glitr {command} {saved}"
    if Path("recipes", name + ".yaml").is_file() or name in recipe_names():
        return f"glitr {command} recipes/{name}.yaml"
    return f"glitr {command} RECIPE name={name}"


def load_run_checkpoint(path: str | Path, *, produced_by: str) -> dict[str, Any]:
    """A checkpoint of one of our runs; a missing one names the file it was likely meant to be, else the
    command that writes it."""
    if not Path(path).is_file():
        meant = closest_existing(path)
        if meant is not None and meant.is_file():
            raise GlitrError(f"checkpoint {path} not found; did you mean {meant}?")
        raise GlitrError(f"checkpoint {path} not found; produce it first: {producing_command(path, produced_by)}")
    with warnings.catch_warnings():  # a plain pickle makes torch warn before it refuses the file: one line only
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return load_checkpoint(path)


def geometry_mismatch(trained: Recipe, recipe: Recipe, *, weights: bool) -> tuple[str, str] | None:
    """How `recipe` differs from `trained` (a checkpoint's recipe) in what the model reads and, with
    `weights`, in the other keys that shape its weights: (what differs, the overrides that make
    `recipe` agree), or None when they agree."""
    keys = DATA_GEOMETRY + (MODEL_GEOMETRY if weights else ())
    values = {k: (recipe_value(trained, k), recipe_value(recipe, k)) for k in (*keys, "data.resize")}
    differ = [k for k in keys if values[k][0] != values[k][1]]
    if not differ:
        return None
    if "data.img_size" in differ and values["data.resize"][0] != values["data.resize"][1]:
        differ.append("data.resize")  # evaluation's short side goes with the crop
    t, r = trained.data, recipe.data
    if (t.num_frames, t.img_size) != (r.num_frames, r.img_size):
        what = f"trained on {t.num_frames} frames of {t.img_size} px, the recipe reads {r.num_frames} of {r.img_size}"
    else:
        what = "built with " + ", ".join(f"{k} {values[k][0]}, the recipe has {values[k][1]}" for k in differ)
    fix = " ".join(f"{k}={'null' if values[k][0] is None else values[k][0]}" for k in differ)
    return what, fix


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
        inside = [p for p in (path / "checkpoints" / LAST, path / LAST) if p.is_file()]
        example = inside[0] if inside else Path("RUN", "checkpoints", LAST)
        raise GlitrError(f"{path} is a folder, not a checkpoint file; pass one such as {example}")
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
    recipe = run_of(ckpt) / RECIPE_FILE
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
