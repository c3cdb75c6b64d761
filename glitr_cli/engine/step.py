"""One optimiser step: what `glitr train-teacher`/`train-glitr` run at every step and `glitr bench` times.

A `TrainStep` owns everything between a micro-batch from the loader and updated weights: device-side
augmentation, mixup/cutmix, forward and backward under autocast (as a CUDA graph, or in DDP with the
gradient sync on the last micro-batch only), accumulation, loss scaling, clipping, the per-module
schedules and AdamW. A module held still (`hold_epochs`) gets no update and no AdamW state; where the
step runs eagerly in one process, the loss terms that only train it (`Objective.separable`) are not
computed at all, while a CUDA graph or DDP computes them and drops what they gave.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from glitr_cli.engine.graphs import GraphedStep
from glitr_cli.engine.objectives import Objective
from glitr_cli.engine.optim import MODULES, build_optimizer, build_schedule
from glitr_cli.recipe import OptimConfig
from glitr_cli.runtime import Runtime

Observer = Callable[[dict[str, torch.Tensor], torch.Tensor], None]


class TrainStep:
    """`step(micro_batches)` takes `optim.accum_steps` micro-batches (clips, labels[, seeds]) and makes
    one optimiser update; `updates` counts the updates made.

    `augment` (uint8 clips, seeds) -> float clips runs the training transform on the device."""

    def __init__(
        self,
        objective: Objective,
        runtime: Runtime,
        optim: OptimConfig,
        *,
        steps_per_epoch: int,
        augment: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.objective, self.runtime, self.optim = objective, runtime, optim
        self.model = objective.model
        self.augment = augment
        objective.loss_module.to(runtime.device)
        self.model.set_grad_checkpointing(runtime.grad_checkpointing)
        module: nn.Module = objective.loss_module
        self.ddp: DistributedDataParallel | None = None
        if runtime.distributed:
            on_cuda = runtime.device.type == "cuda"
            module = self.ddp = DistributedDataParallel(module, device_ids=[runtime.device.index] if on_cuda else None)
        self.module = module
        if runtime.compile:
            self.model.compile()
        self.graphed = GraphedStep(self._forward_backward, self.model) if runtime.train_graphs else None
        # a graph replays what it captured, and DDP waits for every parameter's gradient
        self.leave_out_held = self.graphed is None and self.ddp is None and bool(objective.separable)
        self.optimizer = build_optimizer(
            self.model,
            weight_decay=optim.weight_decay,
            exclude_from_decay=optim.exclude_from_decay,
            betas=optim.betas,
            eps=optim.eps,
            fused=optim.fused,
        )
        self.schedule = build_schedule(
            {m: getattr(optim, m) for m in MODULES},
            global_batch=optim.batch_size,
            lr_batch=optim.lr_batch,
            steps_per_epoch=steps_per_epoch,
            epochs=optim.epochs,
        )
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
        self.updates = 0  # optimiser updates made; the schedule is a function of it

    def __call__(self, micro_batches: Iterator[tuple], observe: Observer | None = None) -> dict[str, Any]:
        """One update from the next `accum_steps` micro-batches; `observe(out, labels)` sees each
        micro-batch's outputs (a graphed step overwrites them with the next). Returns the learning
        rates used and, when clipping, the gradient norm."""
        device = self.runtime.device
        accum = self.optim.accum_steps
        lrs = self.schedule.apply(self.optimizer, self.updates)
        held = self.schedule.held(self.updates)
        if self.leave_out_held:
            self.objective.loss_module.leave_out = held & set(self.objective.separable)
        for a in range(accum):
            clips, labels, *seeds = next(micro_batches)
            if self.augment is not None:
                clips = self.augment(clips, seeds[0])  # uint8 clips, transformed on the device
            clips = clips.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            frames, target = self.objective.prepare(clips, labels)
            out = self.forward_backward(frames, target, sync=a == accum - 1)
            if observe is not None:
                observe(out, labels)
        return {"lr": lrs, "grad_norm": self.optimizer_step(held)}

    def forward_backward(self, frames: torch.Tensor, target: torch.Tensor, sync: bool) -> dict[str, torch.Tensor]:
        """Loss of one micro-batch and its backward pass (gradients all-reduced only when `sync`)."""
        if self.graphed is not None:
            return self.graphed(frames, target)
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            return self._forward_backward(frames, target)

    def _forward_backward(self, frames: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.runtime.autocast(graphed=self.graphed is not None):
            out = self.module(frames, target)
        self.scaler.scale(out["loss"] / self.optim.accum_steps).backward()
        return out

    def optimizer_step(self, held: frozenset[str] = frozenset()) -> float | None:
        """Drop the `held` modules' gradients, clip (optionally), step, zero the gradients; returns
        the gradient norm when clipping."""
        dropped = [(p, p.grad) for g in self.optimizer.param_groups if g["module"] in held for p in g["params"]]
        for p, _ in dropped:
            p.grad = None  # AdamW skips a parameter without a gradient: no update, no state
        norm = None
        if self.optim.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.graphed is not None:
            for p, grad in dropped:
                p.grad = grad  # the graph's backward keeps adding into this storage
        self.optimizer.zero_grad(set_to_none=self.graphed is None)  # a graph keeps writing into the same .grad
        self.updates += 1
        return norm

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.updates = state["step"]
