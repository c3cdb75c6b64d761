"""What the engine plugs in: the teacher and the student differ only in their `Objective`.

An `Objective` says which module computes the loss (the part wrapped in DDP), which model is
trained and saved, and how a batch of (clips, labels) becomes the loss's input (mixup/cutmix and
smoothing for the teacher, plain labels for the student). `reference_objective` swaps the loss for
the plain reference path of `model/reference.py`, keeping everything else (what `glitr bench`
compares against).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from glitr_cli.engine.mixup import MixupCutmix
from glitr_cli.model import GliTr, StudentObjective, TeacherObjective
from glitr_cli.model.reference import PlainStudentObjective, PlainTeacherObjective
from glitr_cli.recipe import ObjectiveConfig

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Objective:
    kind: str  # "teacher" | "glitr"
    loss_module: nn.Module  # (frames (B, T, 3, H, W), target) -> dict(loss, <scalars>, logits (B, T, C))
    model: GliTr  # the weights that are trained, saved and evaluated
    prepare: Callable[[torch.Tensor, torch.Tensor], Batch]  # (clips, labels) -> (frames, target)
    scalars: tuple[str, ...]  # loss components logged besides "loss"
    # modules that only some loss terms train, terms the loss module leaves out for the modules in its
    # `leave_out` (a held module's gradients are dropped anyway; see TrainStep)
    separable: tuple[str, ...] = ()


def _labels_as_is(clips: torch.Tensor, labels: torch.Tensor) -> Batch:
    return clips, labels


def teacher_objective(
    model: GliTr, cfg: ObjectiveConfig, *, num_classes: int, videomae: nn.Module | None = None
) -> Objective:
    """Full-frame teacher: L_cls on mixed/smoothed targets, VideoMAE distillation, T_l self-supervision."""
    mix = MixupCutmix(
        num_classes,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
    )
    # with mixup/cutmix the smoothing is inside the soft targets; otherwise the loss applies it
    smoothing = 0.0 if mix.active else cfg.label_smoothing
    return Objective(
        kind="teacher",
        loss_module=TeacherObjective(
            model,
            videomae,
            label_smoothing=smoothing,
            glimpse_reading=cfg.glimpse_reading,
            loc_centring=cfg.loc_centring,
        ),
        model=model,
        prepare=mix if mix.active else _labels_as_is,
        scalars=(
            "cls",
            "distill",
            "loc_mse",
            "loc_kld",
            *(["reading"] if cfg.glimpse_reading else []),
            *(["centring"] if cfg.loc_centring else []),
        ),
        separable=("locator",),
    )


def student_objective(student: GliTr, teacher: GliTr, cfg: ObjectiveConfig) -> Objective:
    """GliTr student learning from its frozen teacher: L_cls + spatial + temporal consistency."""
    return Objective(
        kind="glitr",
        loss_module=StudentObjective(student, teacher, label_smoothing=cfg.label_smoothing),
        model=student,
        prepare=_labels_as_is,
        scalars=("cls", "spatial", "temporal"),
    )


def reference_objective(objective: Objective) -> Objective:
    """The same objective computed by the plain reference path (same models, targets and scalars)."""
    loss = objective.loss_module
    if isinstance(loss, StudentObjective):
        plain: nn.Module = PlainStudentObjective(loss.student, loss.teacher, loss.label_smoothing)
    else:
        plain = PlainTeacherObjective(
            loss.model, loss.videomae, loss.label_smoothing, loss.glimpse_reading, loss.loc_centring
        )
    return replace(objective, loss_module=plain, separable=())
