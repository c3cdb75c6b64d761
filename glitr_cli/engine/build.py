"""Building what a recipe names: the models with their starting weights, and the objective. A missing
pretrained input stops the run with one line naming the file and the command that makes it;
`model.allow_random_init=true` turns a teacher's missing weights into one warning and random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from rich.console import Console

from glitr_cli.engine.loading import (
    build_model,
    checkpoint_recipe,
    geometry_mismatch,
    load_run_checkpoint,
    model_from_checkpoint,
    producing_command,
)
from glitr_cli.engine.objectives import Objective, student_objective, teacher_objective
from glitr_cli.errors import GlitrError, warn
from glitr_cli.model import GliTr
from glitr_cli.model.videomae import load_videomae
from glitr_cli.model.weights import (
    WeightsUnavailable,
    init_student_from_teacher,
    load_backbone,
    load_jester_teacher_init,
)
from glitr_cli.recipe import ModelConfig, Recipe


def _is_file_source(source: str) -> bool:
    return Path(source).suffix in (".pth", ".pt", ".bin") or "/" in source or Path(source).exists()


def _present(path: str, what: str, key: str, allow_random: bool, console: Console | None, hint: str = "") -> bool:
    """True when `path` exists; else a GlitrError, or a warning when random weights are allowed."""
    if Path(path).is_file():
        return True
    if not allow_random:
        raise GlitrError(
            f"{what} {path} not found ({key}); {hint or 'put the file there'}, "
            "or set model.allow_random_init=true to start from random weights"
        )
    warn(console, f"{what} {path} not found; {key} is IGNORED and the weights are RANDOM (model.allow_random_init)")
    return False


def init_teacher_weights(model: GliTr, cfg: ModelConfig, *, console: Console | None) -> None:
    """A teacher's starting weights: another teacher (`init_from`), else T_f from `pretrained`."""
    if cfg.init_from is not None:
        if not _present(
            cfg.init_from,
            "teacher checkpoint",
            "model.init_from",
            cfg.allow_random_init,
            console,
            f"produce it first: {producing_command(cfg.init_from, 'train-teacher')}",
        ):
            return
        ckpt = load_run_checkpoint(cfg.init_from, produced_by="train-teacher")
        load_jester_teacher_init(model, ckpt["model"], str(cfg.init_from))
        return
    if cfg.pretrained is None:  # the recipe asks for random T_f weights (the toy recipes; the trainer says so)
        return
    if _is_file_source(cfg.pretrained) and not _present(
        cfg.pretrained, "pretrained backbone", "model.pretrained", cfg.allow_random_init, console
    ):
        return
    try:
        load_backbone(model, cfg.pretrained)
    except WeightsUnavailable:
        if not cfg.allow_random_init:
            raise
        warn(
            console,
            f"timm weights {cfg.pretrained} are not cached and the hub cannot be reached; model.pretrained is "
            "IGNORED and the weights are RANDOM (model.allow_random_init)",
        )


def build_videomae_teacher(
    path: str | None, *, num_classes: int, allow_random: bool, console: Console | None
) -> nn.Module | None:
    """The frozen VideoMAE the SSv2 teacher distils from; None when `objective.videomae` is null, or
    when the file is missing under `model.allow_random_init` (a random VideoMAE's logits would be
    noise, so the distillation term is dropped instead)."""
    if path is None:
        return None
    if not Path(path).is_file() and allow_random:
        warn(
            console, f"VideoMAE checkpoint {path} not found; the distillation term is DROPPED (model.allow_random_init)"
        )
        return None
    _present(path, "VideoMAE checkpoint", "objective.videomae", allow_random, console)
    return load_videomae(Path(path), num_classes=num_classes).freeze()


def build_objective(recipe: Recipe, class_names: list[str], console: Console | None) -> Objective:
    """The recipe's objective with its models at their starting weights (resolve the recipe first).

    A teacher starts from `model.init_from` or `model.pretrained` (random where neither is set); a
    student starts from all of its trained teacher's weights, and learns from that teacher, frozen.
    """
    r = recipe
    geometry = dict(num_classes=len(class_names), num_frames=r.data.num_frames, img_size=r.data.img_size)
    if r.kind == "teacher":
        model = build_model(r.model, **geometry)
        init_teacher_weights(model, r.model, console=console)
        videomae = build_videomae_teacher(
            r.objective.videomae, num_classes=len(class_names), allow_random=r.model.allow_random_init, console=console
        )
        return teacher_objective(model, r.objective, num_classes=len(class_names), videomae=videomae)
    path = r.objective.teacher
    assert path is not None, "resolve the recipe first"
    ckpt = load_run_checkpoint(path, produced_by="train-teacher")
    if ckpt["kind"] != "teacher":
        raise GlitrError(f"objective.teacher={path} is a {ckpt['kind']} checkpoint, not a teacher")
    if list(ckpt["class_names"]) != list(class_names):
        raise GlitrError(f"teacher {path} was trained on other classes than the dataset {r.data.root} holds")
    mismatch = geometry_mismatch(checkpoint_recipe(ckpt, path), r, weights=True)
    if mismatch is not None:
        what, fix = mismatch
        raise GlitrError(f"teacher {path} was {what}; the student starts from its weights, so set {fix}")
    teacher = model_from_checkpoint(ckpt, path)
    student = build_model(r.model, **geometry)
    init_student_from_teacher(student, teacher)
    return student_objective(student, teacher, r.objective)
