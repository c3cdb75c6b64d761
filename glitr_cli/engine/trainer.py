"""The training engine: one `Trainer` for the teacher and the student, on CPU, GPU or many GPUs.

Phases: `setup` (process group, data, model and objective, optimiser, resume), `train_epoch`,
`evaluate`, `save`, `resume`; `fit` runs them. Teacher and student differ only in the
`Objective` plugged in (see objectives.py). The per-step function `step_fn` (forward +
backward of one micro-batch) is an attribute so benchmarks can swap it.

Reproducibility on CPU: model weights are initialised from `train.seed` on every rank; each
clip's augmentation is seeded by (seed, epoch, position) (`ResumableSampler`); the global
generators (mixup, drop-path) are saved per rank in every checkpoint. A run stopped at any
moment and restarted from `last.pt` replays the same steps and ends with the same weights.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from glitr_cli.engine.augment import DeviceAugment, collate_uint8_clips
from glitr_cli.engine.checkpoint import LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glitr_cli.engine.distributed import (
    DistEnv,
    ResumableSampler,
    SeededDataset,
    ShardSampler,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    init_distributed,
    seed_everything,
)
from glitr_cli.engine.graphs import GraphedStep
from glitr_cli.engine.metrics import MetricsLogger, make_progress, topk_correct
from glitr_cli.engine.models import build_dataset, clip_train_transform, warn
from glitr_cli.engine.objectives import Objective, student_objective, teacher_objective
from glitr_cli.engine.optim import MODULES, build_optimizer, build_schedule
from glitr_cli.errors import GlitrError
from glitr_cli.model.weights import load_state_dict_checked
from glitr_cli.recipe import COMMANDS, Recipe, recipe_to_dict, resolve_recipe, save_recipe

RECIPE_FILE = "recipe.yaml"

# recipe keys that may change between a run and its resumption without a warning
_RESUME_FREE_KEYS = ("log.", "train.device", "train.compile", "train.cuda_graphs", "data.workers", "eval.")


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


class Trainer:
    """Train the model of one recipe; `fit()` runs everything, the phases are public for tests."""

    def __init__(self, recipe: Recipe, *, resume: str | Path | None = None, console: Console | None = None) -> None:
        self.recipe = resolve_recipe(recipe)
        self.resume_from = Path(resume) if resume is not None else None
        self.console = console or Console(stderr=True)
        self.step_fn = self.forward_backward
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # micro-batches of the current epoch already trained
        self.step = 0  # optimiser steps taken
        self._ready = False

    # ---------------------------------------------------------------------------------------------- setup

    def say(self, message: str) -> None:
        if self.env.is_main:
            self.console.print(message, highlight=False, soft_wrap=True)

    def setup(self) -> None:
        r = self.recipe
        self.env: DistEnv = init_distributed(r.train.device)
        env, opt = self.env, r.optim
        main_console = self.console if env.is_main else None
        self.run_dir = Path(r.output_dir or ".")
        self.ckpt_dir = self.run_dir / "checkpoints"

        per_step = env.world_size * opt.accum_steps
        if opt.batch_size % per_step:
            raise GlitrError(
                f"optim.batch_size={opt.batch_size} is not divisible by {env.world_size} process(es) x "
                f"optim.accum_steps={opt.accum_steps}; pick a multiple of {per_step}"
            )
        self.micro_batch = opt.batch_size // per_step

        seed_everything(r.train.seed)  # identical initial weights on every rank
        self.train_set = build_dataset(r.data, r.data.train_split, train=True)
        self.val_set = build_dataset(r.data, r.data.val_split, train=False) if r.train.eval_every > 0 else None
        self.class_names = list(self.train_set.class_names)
        if r.kind == "teacher":
            self.objective: Objective = teacher_objective(r, num_classes=len(self.class_names), console=main_console)
        else:
            self.objective = student_objective(r, class_names=self.class_names, console=main_console)
        self.model = self.objective.model
        self.objective.loss.to(env.device)

        self.sampler = ResumableSampler(
            len(self.train_set), rank=env.rank, world_size=env.world_size, seed=r.train.seed
        )
        on_device = r.data.augment_on == "device"
        self.augment = DeviceAugment(clip_train_transform(r.data), env.device) if on_device else None
        self.loader = self._loader(
            SeededDataset(self.train_set, with_seed=on_device),
            self.sampler,
            self.micro_batch,
            drop_last=True,
            collate_fn=collate_uint8_clips if on_device else None,
        )
        if self.val_set is not None:
            shard = ShardSampler(len(self.val_set), rank=env.rank, world_size=env.world_size)
            self.val_loader = self._loader(self.val_set, shard, r.eval.batch_size, drop_last=False)
        self.steps_per_epoch = (self.sampler.num_samples // self.micro_batch) // opt.accum_steps
        if self.steps_per_epoch == 0:
            raise GlitrError(
                f"{r.data.root} split '{r.data.train_split}' has {len(self.train_set)} clips, too few for one "
                f"optimiser step of optim.batch_size={opt.batch_size}"
            )
        self.optimizer = build_optimizer(
            self.model, weight_decay=opt.weight_decay, betas=opt.betas, eps=opt.eps, fused=opt.fused
        )
        self.schedule = build_schedule(
            {m: getattr(opt, m) for m in MODULES},
            global_batch=opt.batch_size,
            lr_batch=opt.lr_batch,
            steps_per_epoch=self.steps_per_epoch,
            epochs=opt.epochs,
        )
        on_cuda = env.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.train.precision) if on_cuda else None
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp_dtype is torch.float16)

        module: nn.Module = self.objective.loss
        if env.distributed:
            module = DistributedDataParallel(module, device_ids=[env.device.index] if on_cuda else None)
        self.ddp = module if env.distributed else None
        self.train_module = module
        if r.train.compile:
            self.model.compile()
        self.graphed: GraphedStep | None = None
        if r.train.cuda_graphs and on_cuda and not env.distributed:  # DDP's gradient hooks stay eager
            self.graphed = GraphedStep(self._forward_backward, self.model)

        seed_everything(r.train.seed + 10007 * env.rank)  # per-rank randomness: mixup, drop-path
        if self.resume_from is None and (self.ckpt_dir / LAST).is_file():
            self.resume_from = self.ckpt_dir / LAST
        if self.resume_from is not None:
            self.resume(self.resume_from)

        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            command = COMMANDS[r.kind]
            save_recipe(
                r,
                self.run_dir / RECIPE_FILE,
                header=f"resolved recipe of run {r.name}; rerun it with:\n"
                f"  glitr {command} {self.run_dir / RECIPE_FILE} output_dir={self.run_dir}_again",
            )
        self.metrics = MetricsLogger(
            self.run_dir,
            enabled=env.is_main,
            tensorboard=r.log.tensorboard,
            wandb=r.log.wandb,
            wandb_project=r.log.wandb_project,
            run_name=str(r.name),
            config=recipe_to_dict(r),
        )
        self.metrics.truncate_after(self.step)
        barrier()
        self._ready = True

    def _loader(
        self, dataset: Any, sampler: Any, batch_size: int, drop_last: bool, collate_fn: Any = None
    ) -> DataLoader:
        workers = self.recipe.data.workers
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=workers,
            pin_memory=self.env.device.type == "cuda",
            drop_last=drop_last,
            persistent_workers=workers > 0,
            # its own generator: creating an iterator must not draw from the global one (resume)
            generator=torch.Generator().manual_seed(self.recipe.train.seed),
        )

    # ------------------------------------------------------------------------------------------- training

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # a CUDA graph must recompute the weight casts it reads, not take them from autocast's cache
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype, cache_enabled=self.graphed is None)

    def forward_backward(self, frames: torch.Tensor, target: torch.Tensor, sync: bool) -> dict[str, torch.Tensor]:
        """Loss of one micro-batch and its backward pass (gradients all-reduced only when `sync`).

        With `train.cuda_graphs` the pair runs as a replayed CUDA graph; its outputs are then
        overwritten by the next micro-batch."""
        if self.graphed is not None:
            return self.graphed(frames, target)
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            return self._forward_backward(frames, target)

    def _forward_backward(self, frames: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        with self.autocast():
            out = self.train_module(frames, target)
        loss = out["loss"] / self.recipe.optim.accum_steps
        self.scaler.scale(loss).backward()
        return out

    def optimizer_step(self) -> float | None:
        """Clip (optionally), step, zero the gradients; returns the gradient norm when clipping."""
        norm = None
        clip = self.recipe.optim.clip_grad
        if clip is not None:
            self.scaler.unscale_(self.optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=self.graphed is None)  # a graph keeps writing into the same .grad
        self.step += 1
        return norm

    def train_epoch(self, max_steps: int | None = None) -> bool:
        """Train the rest of epoch `self.epoch`; False when stopped early by `max_steps`."""
        r, env = self.recipe, self.env
        accum = r.optim.accum_steps
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.micro_batch)
        self.objective.loss.train()
        batches = iter(self.loader)
        first_step = self.batch_in_epoch // accum
        keys = ("loss", *self.objective.scalars)
        window = self._new_window(len(keys))
        with make_progress(self.console, env.is_main and r.log.progress) as progress:
            task = progress.add_task(
                f"epoch {self.epoch + 1}/{r.optim.epochs}",
                total=self.steps_per_epoch,
                completed=first_step,
                info="",
            )
            for _ in range(first_step, self.steps_per_epoch):
                if max_steps is not None and self.step >= max_steps:
                    return False
                lrs = self.schedule.apply(self.optimizer, self.step)
                for a in range(accum):
                    clips, labels, *seeds = next(batches)
                    if self.augment is not None:
                        clips = self.augment(clips, seeds[0])  # uint8 clips, transformed on the device
                    clips = clips.to(env.device, non_blocking=True)
                    labels = labels.to(env.device, non_blocking=True)
                    frames, target = self.objective.prepare(clips, labels)
                    out = self.step_fn(frames, target, sync=a == accum - 1)
                    self._accumulate(window, out, keys, labels)
                    self.batch_in_epoch += 1
                norm = self.optimizer_step()
                if norm is not None:
                    window["grad_norm"] = norm
                if self.step % r.train.log_every == 0:
                    info = self._log_train(window, keys, lrs)
                    progress.update(task, info=info)
                    window = self._new_window(len(keys))
                progress.advance(task)
                last_in_epoch = self.batch_in_epoch >= self.steps_per_epoch * accum
                if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0 and not last_in_epoch:
                    self.save()
        self.epoch += 1
        self.batch_in_epoch = 0
        return True

    def _new_window(self, n_keys: int) -> dict[str, Any]:
        t = self.recipe.data.num_frames
        return {
            "sums": torch.zeros(n_keys, device=self.env.device),
            "correct": torch.zeros(t, device=self.env.device),
            "clips": 0,
            "micro": 0,
            "start": time.perf_counter(),
        }

    def _accumulate(
        self, window: dict[str, Any], out: dict[str, torch.Tensor], keys: tuple[str, ...], labels: torch.Tensor
    ) -> None:
        window["sums"] += torch.stack([out[k].detach().float() for k in keys])
        window["correct"] += topk_correct(out["logits"].detach(), labels, ks=(1,))[0]
        window["clips"] += labels.shape[0]
        window["micro"] += 1

    def _log_train(self, window: dict[str, Any], keys: tuple[str, ...], lrs: dict[str, float]) -> str:
        """Reduce the window over ranks, write one metrics record; returns the progress-bar text."""
        counts = torch.tensor([window["micro"], window["clips"]], dtype=torch.float64, device=self.env.device)
        sums = all_reduce_sum(torch.cat([window["sums"].double(), window["correct"].double(), counts]))
        n_keys = len(keys)
        micro, clips = sums[-2].item(), sums[-1].item()
        elapsed = max(time.perf_counter() - window["start"], 1e-9)
        record: dict[str, Any] = {
            "split": "train",
            "epoch": self.epoch + self.batch_in_epoch / (self.steps_per_epoch * self.recipe.optim.accum_steps),
            "step": self.step,
        }
        record.update({k: sums[i].item() / micro for i, k in enumerate(keys)})
        record["lr"] = lrs
        record["top1"] = (sums[n_keys:-2] / clips).tolist()
        record["clips_per_s"] = clips / elapsed
        if "grad_norm" in window:
            record["grad_norm"] = window["grad_norm"]
        self.metrics.log(record)
        return f"loss {record['loss']:.4f} · top1@T {record['top1'][-1]:.3f} · {record['clips_per_s']:.1f} clips/s"

    # ----------------------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Top-1/top-5 at every step t on the validation split (learned glimpses or full frames)."""
        assert self.val_set is not None
        env = self.env
        self.model.eval()
        t = self.recipe.data.num_frames
        correct = torch.zeros(2, t, dtype=torch.float64, device=env.device)
        total = torch.zeros((), dtype=torch.float64, device=env.device)
        try:
            for clips, labels in self.val_loader:
                clips, labels = clips.to(env.device), labels.to(env.device)
                with self.autocast():
                    logits = self.objective.eval_logits(self.model, clips)
                correct += topk_correct(logits.float(), labels).double()
                total += labels.shape[0]
        finally:
            self.objective.loss.train()
        all_reduce_sum(correct)
        all_reduce_sum(total)
        n = max(total.item(), 1.0)
        return {"top1": (correct[0] / n).tolist(), "top5": (correct[1] / n).tolist(), "clips": int(total.item())}

    # --------------------------------------------------------------------------------------- checkpoints

    def state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "kind": self.recipe.kind,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedule": {"step": self.step, "steps_per_epoch": self.steps_per_epoch},
            "progress": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step},
            "rng": rngs,
            "world_size": self.env.world_size,
            "micro_batch": self.micro_batch,
            "class_names": self.class_names,
            "recipe": recipe_to_dict(self.recipe),
        }

    def save(self) -> Path:
        """Checkpoint everything needed to continue exactly here (collective: every rank calls it)."""
        rngs = all_gather_objects(rng_state())
        path = self.ckpt_dir / LAST
        if self.env.is_main:
            path = save_checkpoint(self.state(rngs), self.ckpt_dir, self.step, self.recipe.train.keep_last)
        barrier()
        return path

    def resume(self, path: str | Path) -> None:
        """Continue from checkpoint `path`: weights, optimiser, progress and generator states."""
        ckpt = load_checkpoint(path)
        r = self.recipe
        if ckpt["kind"] != r.kind:
            raise GlitrError(f"cannot resume a {r.kind} run from {path}: it is a {ckpt['kind']} checkpoint")
        if list(ckpt["class_names"]) != self.class_names:
            raise GlitrError(f"cannot resume from {path}: it was trained on other classes than {r.data.root} holds")
        changed = [k for k in _diff(ckpt["recipe"], recipe_to_dict(r)) if not k.startswith(_RESUME_FREE_KEYS)]
        if changed and self.env.is_main:
            warn(self.console, f"the recipe differs from the one {path} was trained with: {', '.join(changed)}")
        load_state_dict_checked(self.model, ckpt["model"], str(path))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        progress = ckpt["progress"]
        self.epoch, self.batch_in_epoch, self.step = progress["epoch"], progress["batch_in_epoch"], progress["step"]
        same_layout = ckpt.get("world_size") == self.env.world_size and ckpt.get("micro_batch") == self.micro_batch
        if same_layout:
            set_rng_state(ckpt["rng"][self.env.rank])
        elif self.env.is_main:
            warn(self.console, f"{path} was written by another process/batch layout; the data order will differ")
            self.batch_in_epoch -= self.batch_in_epoch % self.recipe.optim.accum_steps
        self.say(f"resumed from {path} (epoch {self.epoch + 1}, step {self.step})")

    # --------------------------------------------------------------------------------------------- fit

    def fit(self, max_steps: int | None = None) -> dict[str, Any] | None:
        """Set up (once), train the remaining epochs with validation and checkpoints.

        `max_steps` stops after that many optimiser steps in all without saving, which is how
        tests interrupt a run. Returns the last validation result (None when never validated).
        """
        if not self._ready:
            self.setup()
        r = self.recipe
        result = None
        if self.epoch >= r.optim.epochs:
            self.say(f"{r.name}: already trained for {r.optim.epochs} epochs ({self.ckpt_dir / LAST})")
            self.metrics.close()
            return None
        self.say(
            f"{r.name}: {r.kind} on {self.env.device} x{self.env.world_size}, {len(self.train_set)} clips, "
            f"{self.steps_per_epoch} steps/epoch of {r.optim.batch_size} clips, {r.optim.epochs} epochs "
            f"-> {self.run_dir}"
        )
        try:
            while self.epoch < r.optim.epochs:
                if not self.train_epoch(max_steps):
                    return result
                last = self.epoch == r.optim.epochs
                if self.val_set is not None and (self.epoch % r.train.eval_every == 0 or last):
                    result = self.evaluate()
                    self.metrics.log({"split": "val", "epoch": self.epoch, "step": self.step, **result})
                    self.say(
                        f"epoch {self.epoch}: val top-1 at t=1 {result['top1'][0]:.3f}, "
                        f"at t={len(result['top1'])} {result['top1'][-1]:.3f}"
                    )
                self.save()
        finally:
            self.metrics.close()
        self.say(f"{r.name}: done; weights in {self.ckpt_dir / LAST}")
        return result
