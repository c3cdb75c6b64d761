"""AdamW with one learning rate per module (T_f `backbone`, T_c `classifier`, T_l `locator`), each with a
per-iteration warm-up + cosine schedule, as the original trains them. With `exclude_from_decay` each
module gets a second group without weight decay for norms, biases and its `no_weight_decay()` names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from glitr_cli.recipe import GroupLR

MODULES = ("backbone", "classifier", "locator")


def param_groups(model: nn.Module, weight_decay: float, exclude_from_decay: bool) -> list[dict]:
    """AdamW groups for each module of `MODULES`, tagged with `module`: one with `weight_decay`
    for every parameter, or with `exclude_from_decay` two (decay / no decay)."""
    groups = []
    covered = 0
    for module_name in MODULES:
        module = getattr(model, module_name)
        skip = module.no_weight_decay() if exclude_from_decay else set()
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                excluded = exclude_from_decay and (p.ndim <= 1 or name in skip)
                (no_decay if excluded else decay).append(p)
        covered += len(decay) + len(no_decay)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "module": module_name})
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert covered == trainable, "every trainable parameter must belong to backbone, classifier or locator"
    return groups


@dataclass(frozen=True)
class GroupSchedule:
    """Learning rate of one module at optimiser step `it` (0-based) of `total`: zero for `hold` steps, then
    a half-cosine from `base` to `floor` over the rest whose first `warmup` steps a linear warm-up from
    `warmup_start` replaces, without restarting the cosine (timm's `CosineLRScheduler`, the original's)."""

    base: float
    floor: float
    warmup: int
    warmup_start: float
    total: int
    hold: int = 0

    def __call__(self, it: int) -> float:
        if it < self.hold:
            return 0.0
        it -= self.hold
        if it < self.warmup:
            return self.warmup_start + (self.base - self.warmup_start) * it / self.warmup
        progress = min(1.0, it / max(1, self.total - self.hold))
        return self.floor + 0.5 * (self.base - self.floor) * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Per-module schedules applied to an optimiser's groups by their `module` tag; stateless, so resuming
    needs only the step count."""

    def __init__(self, schedules: dict[str, GroupSchedule]) -> None:
        self.schedules = schedules

    def lrs(self, it: int) -> dict[str, float]:
        return {name: s(it) for name, s in self.schedules.items()}

    def held(self, it: int) -> frozenset[str]:
        """The modules still held at step `it` (within their `hold` steps)."""
        return frozenset(name for name, s in self.schedules.items() if it < s.hold)

    def apply(self, optimizer: torch.optim.Optimizer, it: int) -> dict[str, float]:
        lrs = self.lrs(it)
        for group in optimizer.param_groups:
            group["lr"] = lrs[group["module"]]
        return lrs


def build_schedule(
    groups: dict[str, GroupLR],
    *,
    global_batch: int,
    lr_batch: int,
    steps_per_epoch: int,
    epochs: int,
) -> LRSchedule:
    """`groups` maps module -> its recipe `GroupLR`; base lr is scaled by `global_batch / lr_batch`,
    floors and warm-up starts are not."""
    total = steps_per_epoch * epochs
    scale = global_batch / lr_batch
    return LRSchedule(
        {
            name: GroupSchedule(
                base=g.base * scale,
                floor=g.floor,
                warmup=round(g.warmup_epochs * steps_per_epoch),
                warmup_start=g.warmup_start,
                total=total,
                hold=round(g.hold_epochs * steps_per_epoch),
            )
            for name, g in groups.items()
        }
    )


def build_optimizer(
    model: nn.Module,
    *,
    weight_decay: float,
    exclude_from_decay: bool,
    betas: tuple[float, float],
    eps: float,
    fused: bool = False,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`, the single-kernel one with `fused` on CUDA; `LRSchedule.apply`
    sets the learning rates each step."""
    fused = fused and next(model.parameters()).is_cuda
    groups = param_groups(model, weight_decay, exclude_from_decay)
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, eps=eps, fused=fused or None)
