"""The training engine: one `Trainer` for the teacher and the student, on CPU, GPU or many GPUs.

Phases: `setup` (runtime, process group, data, objective, the training step, resume), `train_epoch`,
`evaluate`, `save`, `resume`; `fit` runs them. Teacher and student differ only in the `Objective`
plugged in (objectives.py); what happens inside one optimiser step is the `TrainStep` (step.py).

Reproducibility on CPU: model weights are initialised from `train.seed` on every rank; each
clip's augmentation is seeded by (seed, epoch, position) (`ResumableSampler`); the global
generators (mixup, drop-path) are saved per rank in every checkpoint; the CPU thread count is
recorded in the run and reused on resume. A run stopped at any moment and restarted from `last.pt`
replays the same steps and ends with the same weights.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from glitr_cli.data.dataset import build_dataset
from glitr_cli.data.transforms import clip_train_transform
from glitr_cli.engine.augment import DeviceAugment, collate_uint8_clips
from glitr_cli.engine.build import build_objective
from glitr_cli.engine.checkpoint import LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glitr_cli.engine.distributed import (
    ResumableSampler,
    SeededDataset,
    ShardSampler,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    init_distributed,
    seed_everything,
)
from glitr_cli.engine.evaluation import evaluate_policies
from glitr_cli.engine.metrics import MetricsLogger, make_progress, topk_correct
from glitr_cli.engine.step import TrainStep
from glitr_cli.errors import GlitrError, warn
from glitr_cli.model.weights import load_state_dict_checked
from glitr_cli.recipe import COMMANDS, Recipe, recipe_to_dict, resolve_recipe, save_recipe
from glitr_cli.runtime import Runtime

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
        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # micro-batches of the current epoch already trained
        self._ready = False

    # ---------------------------------------------------------------------------------------------- setup

    def say(self, message: str) -> None:
        if self.runtime.is_main:
            self.console.print(message, highlight=False, soft_wrap=True)

    def setup(self) -> None:
        r = self.recipe
        self.run_dir = Path(r.output_dir or ".")
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.resume_from is None and (self.ckpt_dir / LAST).is_file():
            self.resume_from = self.ckpt_dir / LAST
        ckpt = load_checkpoint(self.resume_from) if self.resume_from is not None else None
        if ckpt is not None and r.train.threads == 0:  # the thread count the run was trained with
            r.train.threads = ckpt["recipe"].get("train", {}).get("threads", 0)
        self.runtime = runtime = Runtime.from_recipe(r)
        runtime.apply()
        r.train.threads = runtime.threads  # recorded in recipe.yaml and every checkpoint
        init_distributed(runtime)
        opt = r.optim
        main_console = self.console if runtime.is_main else None

        per_step = runtime.world_size * opt.accum_steps
        if opt.batch_size % per_step:
            raise GlitrError(
                f"optim.batch_size={opt.batch_size} is not divisible by {runtime.world_size} process(es) x "
                f"optim.accum_steps={opt.accum_steps}; pick a multiple of {per_step}"
            )
        self.micro_batch = opt.batch_size // per_step

        seed_everything(r.train.seed)  # identical initial weights on every rank
        self.train_set = build_dataset(r.data, r.data.train_split, train=True)
        if self.train_set.dropped_clips:
            self.say(
                f"{r.data.root} split '{r.data.train_split}': left out {self.train_set.dropped_clips} clips with "
                f"fewer than {r.data.min_train_frames} frames (data.min_train_frames)"
            )
        self.val_set = build_dataset(r.data, r.data.val_split, train=False) if r.train.eval_every > 0 else None
        self.class_names = list(self.train_set.class_names)
        self.objective = build_objective(r, self.class_names, main_console)
        self.model = self.objective.model

        self.sampler = ResumableSampler(
            len(self.train_set), rank=runtime.rank, world_size=runtime.world_size, seed=r.train.seed
        )
        on_device = r.data.augment_on == "device"
        self.loader = runtime.loader(
            SeededDataset(self.train_set, with_seed=on_device),
            batch_size=self.micro_batch,
            sampler=self.sampler,
            drop_last=True,
            collate_fn=collate_uint8_clips if on_device else None,
            seed=r.train.seed,
        )
        if self.val_set is not None:
            shard = ShardSampler(len(self.val_set), rank=runtime.rank, world_size=runtime.world_size)
            self.val_loader = runtime.loader(self.val_set, batch_size=r.eval.batch_size, sampler=shard)
        self.steps_per_epoch = (self.sampler.num_samples // self.micro_batch) // opt.accum_steps
        if self.steps_per_epoch == 0:
            raise GlitrError(
                f"{r.data.root} split '{r.data.train_split}' has {len(self.train_set)} clips, too few for one "
                f"optimiser step of optim.batch_size={opt.batch_size}"
            )
        augment = DeviceAugment(clip_train_transform(r.data), runtime.device) if on_device else None
        self.train_step = TrainStep(self.objective, runtime, opt, steps_per_epoch=self.steps_per_epoch, augment=augment)

        seed_everything(r.train.seed + 10007 * runtime.rank)  # per-rank randomness: mixup, drop-path
        if ckpt is not None:
            self.resume(ckpt, self.resume_from)

        if runtime.is_main:
            command = COMMANDS[r.kind]
            save_recipe(
                r,
                self.run_dir / RECIPE_FILE,
                header=f"resolved recipe of run {r.name}; rerun it with:\n"
                f"  glitr {command} {self.run_dir / RECIPE_FILE} output_dir={self.run_dir}_again",
            )
        self.metrics = MetricsLogger(
            self.run_dir,
            enabled=runtime.is_main,
            tensorboard=r.log.tensorboard,
            wandb=r.log.wandb,
            wandb_project=r.log.wandb_project,
            run_name=str(r.name),
            config=recipe_to_dict(r),
        )
        self.metrics.truncate_after(self.step)
        barrier()
        self._ready = True

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.train_step.step

    # ------------------------------------------------------------------------------------------- training

    def train_epoch(self, max_steps: int | None = None) -> bool:
        """Train the rest of epoch `self.epoch`; False when stopped early by `max_steps`."""
        r = self.recipe
        accum = r.optim.accum_steps
        self.sampler.set_epoch(self.epoch, skip=self.batch_in_epoch * self.micro_batch)
        self.objective.loss.train()
        batches = iter(self.loader)
        first_step = self.batch_in_epoch // accum
        keys = ("loss", *self.objective.scalars)
        window = self._new_window(len(keys))

        def observe(out: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
            window["sums"] += torch.stack([out[k].detach().float() for k in keys])
            window["correct"] += topk_correct(out["logits"].detach(), labels, ks=(1,))[0]
            window["clips"] += labels.shape[0]
            window["micro"] += 1
            self.batch_in_epoch += 1

        with make_progress(self.console, self.runtime.is_main and r.log.progress) as progress:
            task = progress.add_task(
                f"epoch {self.epoch + 1}/{r.optim.epochs}", total=self.steps_per_epoch, completed=first_step, info=""
            )
            for _ in range(first_step, self.steps_per_epoch):
                if max_steps is not None and self.step >= max_steps:
                    return False
                result = self.train_step(batches, observe)
                if result["grad_norm"] is not None:
                    window["grad_norm"] = result["grad_norm"]
                if self.step % r.train.log_every == 0:
                    progress.update(task, info=self._log_train(window, keys, result["lr"]))
                    window = self._new_window(len(keys))
                progress.advance(task)
                last_in_epoch = self.batch_in_epoch >= self.steps_per_epoch * accum
                if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0 and not last_in_epoch:
                    self.save()
        self.epoch += 1
        self.batch_in_epoch = 0
        return True

    def _new_window(self, n_keys: int) -> dict[str, Any]:
        device = self.runtime.device
        return {
            "sums": torch.zeros(n_keys, device=device),
            "correct": torch.zeros(self.recipe.data.num_frames, device=device),
            "clips": 0,
            "micro": 0,
            "start": time.perf_counter(),
        }

    def _log_train(self, window: dict[str, Any], keys: tuple[str, ...], lrs: dict[str, float]) -> str:
        """Reduce the window over ranks, write one metrics record; returns the progress-bar text."""
        counts = torch.tensor([window["micro"], window["clips"]], dtype=torch.float64, device=self.runtime.device)
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

    def evaluate(self) -> dict[str, Any]:
        """Top-1/top-5 at every step t on the validation split (learned glimpses, or full frames for a teacher)."""
        assert self.val_set is not None
        student = self.objective.kind == "glitr"
        try:
            result = evaluate_policies(
                self.model,
                self.val_loader,
                policies=["learned"] if student else [],
                teacher=None if student else self.model,
                runtime=self.runtime,
                seed=self.recipe.eval.seed,
            )
        finally:
            self.objective.loss.train()
        scores = result["policies"]["learned"] if student else result["teacher"]
        return {"top1": scores["top1"], "top5": scores["top5"], "clips": result["clips"]}

    # --------------------------------------------------------------------------------------- checkpoints

    def state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        step = self.train_step.state_dict()
        return {
            "kind": self.recipe.kind,
            "model": self.model.state_dict(),
            "optimizer": step["optimizer"],
            "scaler": step["scaler"],
            "schedule": {"step": self.step, "steps_per_epoch": self.steps_per_epoch},
            "progress": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step},
            "rng": rngs,
            "world_size": self.runtime.world_size,
            "micro_batch": self.micro_batch,
            "class_names": self.class_names,
            "recipe": recipe_to_dict(self.recipe),
        }

    def save(self) -> Path:
        """Checkpoint everything needed to continue exactly here (collective: every rank calls it)."""
        rngs = all_gather_objects(rng_state())
        path = self.ckpt_dir / LAST
        if self.runtime.is_main:
            path = save_checkpoint(self.state(rngs), self.ckpt_dir, self.step, self.recipe.train.keep_last)
        barrier()
        return path

    def resume(self, ckpt: dict[str, Any], path: str | Path) -> None:
        """Continue from checkpoint `ckpt` (read from `path`): weights, optimiser, progress, generators."""
        r = self.recipe
        if ckpt["kind"] != r.kind:
            raise GlitrError(f"cannot resume a {r.kind} run from {path}: it is a {ckpt['kind']} checkpoint")
        if list(ckpt["class_names"]) != self.class_names:
            raise GlitrError(f"cannot resume from {path}: it was trained on other classes than {r.data.root} holds")
        changed = [k for k in _diff(ckpt["recipe"], recipe_to_dict(r)) if not k.startswith(_RESUME_FREE_KEYS)]
        if changed and self.runtime.is_main:
            warn(self.console, f"the recipe differs from the one {path} was trained with: {', '.join(changed)}")
        load_state_dict_checked(self.model, ckpt["model"], str(path))
        progress = ckpt["progress"]
        self.train_step.load_state_dict(
            {"optimizer": ckpt["optimizer"], "scaler": ckpt.get("scaler"), "step": progress["step"]}
        )
        self.epoch, self.batch_in_epoch = progress["epoch"], progress["batch_in_epoch"]
        same_layout = ckpt.get("world_size") == self.runtime.world_size and ckpt.get("micro_batch") == self.micro_batch
        if same_layout:
            set_rng_state(ckpt["rng"][self.runtime.rank])
        elif self.runtime.is_main:
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
            f"{r.name}: {r.kind} on {self.runtime.device} x{self.runtime.world_size}, {len(self.train_set)} clips, "
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
