"""What the engine plugs in: the teacher and the student differ only in their `Objective`.

An `Objective` says which module computes the loss (the part wrapped in DDP), which model is
trained and saved, how a batch of (clips, labels) becomes the loss's input (mixup/cutmix and
smoothing for the teacher, plain labels for the student), and how validation reads logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from rich.console import Console

from glitr_cli.engine.mixup import MixupCutmix
from glitr_cli.engine.models import (
    build_model,
    build_videomae_teacher,
    init_teacher_weights,
    load_run_checkpoint,
    model_from_checkpoint,
)
from glitr_cli.errors import GlitrError
from glitr_cli.model import GliTr, StudentObjective, TeacherObjective
from glitr_cli.model.weights import init_student_from_teacher
from glitr_cli.recipe import Recipe

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Objective:
    kind: str  # "teacher" | "glitr"
    loss: nn.Module  # (frames (B, T, 3, H, W), target) -> dict(loss, <scalars>, logits (B, T, C))
    model: GliTr  # the weights that are trained, saved and evaluated
    prepare: Callable[[torch.Tensor, torch.Tensor], Batch]  # (clips, labels) -> (frames, target)
    eval_logits: Callable[[GliTr, torch.Tensor], torch.Tensor]  # validation: frames -> logits (B, T, C)
    scalars: tuple[str, ...]  # loss components logged besides "loss"


def _teacher_logits(model: GliTr, frames: torch.Tensor) -> torch.Tensor:
    return model.forward_teacher(frames).logits


def _student_logits(model: GliTr, frames: torch.Tensor) -> torch.Tensor:
    return model.forward_student(frames, "learned").logits


def _labels_as_is(clips: torch.Tensor, labels: torch.Tensor) -> Batch:
    return clips, labels


def teacher_objective(recipe: Recipe, *, num_classes: int, console: Console | None) -> Objective:
    """Full-frame teacher: L_cls on mixed/smoothed targets, VideoMAE distillation, T_l self-supervision."""
    model = build_model(
        recipe.model, num_classes=num_classes, num_frames=recipe.data.num_frames, img_size=recipe.data.img_size
    )
    init_teacher_weights(model, recipe.model, num_frames=recipe.data.num_frames, console=console)
    obj = recipe.objective
    videomae = build_videomae_teacher(
        obj.videomae, num_classes=num_classes, allow_random=recipe.model.allow_random_init, console=console
    )
    mix = MixupCutmix(
        num_classes,
        mixup_alpha=obj.mixup,
        cutmix_alpha=obj.cutmix,
        prob=obj.mixup_prob,
        switch_prob=obj.mixup_switch_prob,
        label_smoothing=obj.label_smoothing,
    )
    # with mixup/cutmix the smoothing is inside the soft targets; otherwise the loss applies it
    smoothing = 0.0 if mix.active else obj.label_smoothing
    return Objective(
        kind="teacher",
        loss=TeacherObjective(model, videomae, label_smoothing=smoothing),
        model=model,
        prepare=mix if mix.active else _labels_as_is,
        eval_logits=_teacher_logits,
        scalars=("cls", "distill", "loc_mse", "loc_kld"),
    )


def student_objective(recipe: Recipe, *, class_names: list[str], console: Console | None) -> Objective:
    """GliTr student: starts from its frozen teacher's weights; L_cls + spatial + temporal consistency."""
    path = recipe.objective.teacher
    assert path is not None, "resolve the recipe first"
    ckpt = load_run_checkpoint(path, produced_by="train-teacher")
    if ckpt["kind"] != "teacher":
        raise GlitrError(f"objective.teacher={path} is a {ckpt['kind']} checkpoint, not a teacher")
    if list(ckpt["class_names"]) != list(class_names):
        raise GlitrError(f"teacher {path} was trained on other classes than the dataset {recipe.data.root} holds")
    teacher = model_from_checkpoint(ckpt, path)
    student = build_model(
        recipe.model, num_classes=len(class_names), num_frames=recipe.data.num_frames, img_size=recipe.data.img_size
    )
    init_student_from_teacher(student, teacher)
    return Objective(
        kind="glitr",
        loss=StudentObjective(student, teacher, label_smoothing=recipe.objective.label_smoothing),
        model=student,
        prepare=_labels_as_is,
        eval_logits=_student_logits,
        scalars=("cls", "spatial", "temporal"),
    )
