"""AdamW with one learning rate per module and a per-iteration warm-up + cosine schedule.

GliTr trains T_f (`backbone`), T_c (`classifier`) and T_l (`locator`) with their own base and
floor learning rates (DESIGN §4). Each module gets two parameter groups, with and without
weight decay; both follow that module's schedule. Norms, biases and embeddings get no decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from glitr_cli.recipe import GroupLR

MODULES = ("backbone", "classifier", "locator")

# learned tokens and embeddings: decaying them towards zero only hurts
NO_DECAY_NAMES = ("cls_token", "pos_embed", "temporal_embed", "init_loc", "reg_token", "dist_token")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and norm weights (1-D) and named embeddings are excluded from weight decay."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups per module of `MODULES` (decay / no decay), each tagged with `module`."""
    groups = []
    covered = 0
    for module_name in MODULES:
        decay, no_decay = [], []
        for name, p in getattr(model, module_name).named_parameters():
            if p.requires_grad:
                (no_decay if no_weight_decay(name, p) else decay).append(p)
        covered += len(decay) + len(no_decay)
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                groups.append({"params": params, "weight_decay": wd, "module": module_name})
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert covered == trainable, "every trainable parameter must belong to backbone, classifier or locator"
    return groups


@dataclass(frozen=True)
class GroupSchedule:
    """Learning rate of one module at optimiser step `it` (0-based) of `total`.

    Zero for the first `hold` steps, then linear warm-up from `warmup_start` to `base` over
    `warmup` steps, then half-cosine from `base` down to `floor` over the remaining steps.
    """

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
        span = max(1, self.total - self.hold - self.warmup)
        progress = min(1.0, (it - self.warmup) / span)
        return self.floor + 0.5 * (self.base - self.floor) * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Per-module schedules applied to an optimiser's groups by their `module` tag.

    Stateless: the learning rate is a function of the step alone, so resuming needs only the
    step count, which the checkpoint keeps.
    """

    def __init__(self, schedules: dict[str, GroupSchedule]) -> None:
        self.schedules = schedules

    def lrs(self, it: int) -> dict[str, float]:
        return {name: s(it) for name, s in self.schedules.items()}

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
    model: nn.Module, *, weight_decay: float, betas: tuple[float, float], eps: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; learning rates are set by `LRSchedule.apply` each step.

    `fused` takes the single-kernel implementation when the parameters are on a CUDA device.
    """
    fused = fused and next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=0.0, betas=betas, eps=eps, fused=fused or None)
