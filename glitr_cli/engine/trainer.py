"""The training engine: one `Trainer` for the teacher and the student, on CPU, GPU or many GPUs.

`fit` runs `setup`, `train_epoch`, `evaluate`, `save` and `resume`; teacher and student differ only in
the `Objective` (objectives.py), and one optimiser step is the `TrainStep` (step.py). Progress counts
optimiser steps of `optim.batch_size` clips: rank r reads positions r, r + W, ... of the epoch's
permutation, so step s trains on the same clips whatever the layout, and with the per-clip augmentation
seeds and the generators saved per rank a resumed run replays the same steps. SIGTERM or SIGUSR1 finish
the step, checkpoint it and raise `Preempted` (docs/training.md#preemption-and-slurm).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from glitr_cli.data.dataset import build_dataset
from glitr_cli.data.toy import FollowMeter
from glitr_cli.engine.augment import training_data
from glitr_cli.engine.bad_data import BAD_CLIPS_FILE, COUNTS, BadData
from glitr_cli.engine.build import build_objective
from glitr_cli.engine.checkpoint import LAST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from glitr_cli.engine.distributed import (
    ResumableSampler,
    ShardSampler,
    all_gather_objects,
    all_reduce_max,
    all_reduce_named,
    all_reduce_sum,
    barrier,
    init_distributed,
    seed_everything,
)
from glitr_cli.engine.evaluation import evaluate_policies
from glitr_cli.engine.metrics import MetricsLogger, topk_correct
from glitr_cli.engine.step import TrainStep
from glitr_cli.errors import GlitrError, Preempted, warn
from glitr_cli.model.weights import load_state_dict_checked
from glitr_cli.paths import RECIPE_FILE
from glitr_cli.progress import ProgressLine
from glitr_cli.recipe import COMMANDS, Recipe, recipe_to_dict, resolve_recipe, save_recipe
from glitr_cli.runtime import Runtime, stop_workers

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

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


class Window:
    """What the trainer sums between two metrics records: the loss terms `keys` (per micro-batch), the
    correct predictions at each step t, clips, micro-batches and the last gradient norm."""

    def __init__(self, keys: tuple[str, ...], num_frames: int, device: torch.device) -> None:
        self.keys = keys
        self.sums = torch.zeros(len(keys), device=device)
        self.correct = torch.zeros(num_frames, device=device)
        self.clips = self.micro = 0
        self.grad_norm: float | None = None
        self.start = time.perf_counter()

    def observe(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.sums += torch.stack([out[k].detach().float() for k in self.keys])
        self.correct += topk_correct(out["logits"].detach(), labels, ks=(1,))[0]
        self.clips += labels.shape[0]
        self.micro += 1


class Trainer:
    """Train the model of one recipe; `fit()` runs everything, the phases are public for tests."""

    def __init__(self, recipe: Recipe, *, resume: str | Path | None = None, console: Console | None = None) -> None:
        self.recipe = resolve_recipe(recipe)
        self.resume_from = Path(resume) if resume is not None else None
        self.console = console or Console(stderr=True)
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # optimiser steps of the current epoch already taken
        self._stop_signal = 0  # the preemption signal received, 0 if none
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
        self.loader, augment = training_data(
            self.train_set, r.data, runtime, batch_size=self.micro_batch, sampler=self.sampler, seed=r.train.seed
        )
        self.val_loader = None
        if self.val_set is not None:
            shard = ShardSampler(len(self.val_set), rank=runtime.rank, world_size=runtime.world_size)
            self.val_loader = runtime.loader(self.val_set, batch_size=r.eval.batch_size, sampler=shard)
        self.steps_per_epoch = len(self.train_set) // opt.batch_size  # the same on every layout
        if self.steps_per_epoch == 0:
            raise GlitrError(
                f"{r.data.root} split '{r.data.train_split}' has {len(self.train_set)} clips, too few for one "
                f"optimiser step of optim.batch_size={opt.batch_size}"
            )
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
            step=self.step,
            tensorboard=r.log.tensorboard,
            wandb=r.log.wandb,
            wandb_project=r.log.wandb_project,
            run_name=str(r.name),
            config=recipe_to_dict(r),
        )
        self.bad_data = BadData(
            self.train_set,
            self.run_dir,
            max_fraction=r.data.max_bad_fraction,
            epoch_clips=self.steps_per_epoch * opt.batch_size,
            is_main=runtime.is_main,
        )
        self.bad_data.forget_after(self.epoch)
        barrier()
        self._ready = True

    @property
    def step(self) -> int:
        """Optimiser steps taken."""
        return self.train_step.updates

    # ------------------------------------------------------------------------------------------- training

    def train_epoch(self, max_steps: int | None = None) -> bool:
        """Train the rest of epoch `self.epoch`; False when stopped early by `max_steps`."""
        r = self.recipe
        clips_per_rank = r.optim.batch_size // self.runtime.world_size  # per optimiser step
        self.sampler.set_epoch(self.epoch, skip=self.step_in_epoch * clips_per_rank)
        self.bad_data.start_epoch()
        self.objective.loss_module.train()
        batches = iter(self.loader)
        window = Window(("loss", *self.objective.scalars), r.data.num_frames, self.runtime.device)
        progress = ProgressLine(
            self.console,
            f"epoch {self.epoch + 1}/{r.optim.epochs}",
            self.steps_per_epoch,
            completed=self.step_in_epoch,
            enabled=self.runtime.is_main and r.log.progress,
            every=r.log.progress_every,
        )
        logged = False  # in this epoch: an epoch that log_every does not reach is logged at its end
        with progress:
            while self.step_in_epoch < self.steps_per_epoch:
                if max_steps is not None and self.step >= max_steps:
                    return False
                result = self.train_step(batches, window.observe)
                self.step_in_epoch += 1
                last_in_epoch = self.step_in_epoch == self.steps_per_epoch
                window.grad_norm = result["grad_norm"] if result["grad_norm"] is not None else window.grad_norm
                info = None
                if self.step % r.train.log_every == 0 or (last_in_epoch and not logged):
                    info = self._log_train(window, result["lr"])
                    window = Window(window.keys, r.data.num_frames, self.runtime.device)
                    logged = True
                progress.advance(info=info)
                if self.stop_requested():
                    self.save()
                    raise self.preempted()
                if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0 and not last_in_epoch:
                    self.save()
        self._end_epoch_data()
        self.epoch += 1
        self.step_in_epoch = 0
        return True

    def _log_train(self, window: Window, lrs: dict[str, float]) -> str:
        """Reduce the window over ranks, write one metrics record; returns the progress text."""
        device = self.runtime.device
        counts = {"micro": torch.tensor(float(window.micro), device=device)}
        counts["clips"] = torch.tensor(float(window.clips), device=device)
        losses = dict(zip(window.keys, window.sums, strict=True))
        totals = all_reduce_named({**losses, **counts, "correct": window.correct, "bad": self.bad_data.counts(device)})
        bad = self.bad_data.check(totals["bad"], self.epoch + 1, self.recipe.data.root)
        micro, clips = totals["micro"].item(), totals["clips"].item()
        record: dict[str, Any] = {
            "split": "train",
            "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
            "step": self.step,
            **{k: totals[k].item() / micro for k in window.keys},
            "lr": lrs,
            "top1": (totals["correct"] / clips).tolist(),
            "clips_per_s": clips / max(time.perf_counter() - window.start, 1e-9),
        }
        if window.grad_norm is not None:
            record["grad_norm"] = window.grad_norm
        self.metrics.log(record)
        info = f"loss {record['loss']:.4f} · top1@T {record['top1'][-1]:.3f} · {record['clips_per_s']:.1f} clips/s"
        return info + (f" · {bad} bad clips" if bad else "")

    def _end_epoch_data(self) -> None:
        """Count the epoch's bad data in metrics.jsonl and list its clips in bad_clips.jsonl (collective)."""
        totals = all_reduce_sum(self.bad_data.counts(self.runtime.device))
        bad = self.bad_data.check(totals, self.epoch + 1, self.recipe.data.root)
        record = dict(zip(COUNTS, map(int, totals.tolist()), strict=True))
        self.metrics.log({"split": "data", "epoch": self.epoch + 1, "step": self.step, **record})
        if bad:
            self.bad_data.write(self.bad_data.clips(), self.epoch + 1)
            self.say(f"epoch {self.epoch + 1}: {bad} clips had unreadable frames (listed in {BAD_CLIPS_FILE})")

    # ----------------------------------------------------------------------------------------- evaluation

    def evaluate(self) -> dict[str, Any]:
        """Top-1/top-5 at every step t on the validation split (learned glimpses, or full frames for a
        teacher) and where the glimpses went (`glimpses`: per-step location spread, the student's
        covered frame and, on toy data, how often they hold the target per direction)."""
        assert self.val_set is not None and self.val_loader is not None
        student = self.objective.kind == "glitr"
        follow = observe = None
        if self.recipe.data.dataset == "toy":
            follow = FollowMeter(
                Path(self.recipe.data.root) / "download",
                self.val_set.sampler,
                self.model.backbone.glimpse_scale[0],
                resize=self.recipe.data.resize,
                crop=self.recipe.data.img_size,
            )
            ids = iter([self.val_set.records[i].id for i in self.val_loader.sampler])

            def observe(name: str, locs: torch.Tensor) -> None:  # each batch, in the loader's order
                for clip_locs in locs.float().cpu().numpy():
                    follow.add(next(ids), clip_locs)

        try:
            result = evaluate_policies(
                self.model,
                self.val_loader,
                policies=["learned"] if student else [],
                teacher=None if student else self.model,
                runtime=self.runtime,
                seed=self.recipe.eval.seed,
                observe_locs=observe,
            )
        finally:
            self.objective.loss_module.train()
        scores = result["policies"]["learned"] if student else result["teacher"]
        glimpses: dict[str, Any] = {"locations": scores["locations"]}
        if student:
            glimpses["covered_area"] = scores["covered_area"]
        if follow is not None:
            counts = torch.from_numpy(follow.counts).to(self.runtime.device)
            all_reduce_sum(counts)
            glimpses["follow"] = follow.rates(counts.cpu().numpy())
        return {"top1": scores["top1"], "top5": scores["top5"], "clips": result["clips"], "glimpses": glimpses}

    # --------------------------------------------------------------------------------------- checkpoints

    def state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        step = self.train_step.state_dict()
        return {
            "kind": self.recipe.kind,
            "model": self.model.state_dict(),
            "optimizer": step["optimizer"],
            "scaler": step["scaler"],
            "schedule": {"step": self.step, "steps_per_epoch": self.steps_per_epoch},
            "progress": {"epoch": self.epoch, "step": self.step},
            "rng": rngs,
            "world_size": self.runtime.world_size,
            "class_names": self.class_names,
            "recipe": recipe_to_dict(self.recipe),
        }

    def save(self) -> Path:
        """Checkpoint everything needed to continue exactly here (collective: every rank calls it)."""
        rngs = all_gather_objects(rng_state(self.runtime.device))
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
        if ckpt["schedule"]["steps_per_epoch"] != self.steps_per_epoch:
            raise GlitrError(
                f"cannot resume from {path}: it was trained with {ckpt['schedule']['steps_per_epoch']} steps per "
                f"epoch, the training split and optim.batch_size now give {self.steps_per_epoch}"
            )
        self.epoch = progress["epoch"]
        self.step_in_epoch = progress["step"] - self.epoch * self.steps_per_epoch
        layout = (self.runtime.world_size, r.optim.accum_steps)
        saved_layout = (ckpt["world_size"], ckpt["recipe"]["optim"]["accum_steps"])
        if layout == saved_layout:
            set_rng_state(ckpt["rng"][self.runtime.rank], self.runtime.device)
        elif self.runtime.is_main:
            warn(
                self.console,
                f"{path} was written by {saved_layout[0]} process(es) x {saved_layout[1]} accumulation step(s), "
                f"this run has {layout[0]} x {layout[1]}: every step trains the same clips, but mixup and "
                "drop-path draw afresh",
            )
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
        start = ""  # a teacher asked for random weights says so once (a missing file or hub has warned)
        if r.kind == "teacher" and self.step == 0 and r.model.pretrained is None and r.model.init_from is None:
            start = " from random weights (model.pretrained: null)"
        self.say(
            f"{r.name}: {r.kind}{start} on {self.runtime.device} x{self.runtime.world_size}, "
            f"{len(self.train_set)} clips, {self.steps_per_epoch} steps/epoch of {r.optim.batch_size} clips, "
            f"{r.optim.epochs} epochs -> {self.run_dir}"
        )
        handlers = self._catch_preemption()  # put back in `finally`, on every way out
        try:
            while self.epoch < r.optim.epochs:
                if not self.train_epoch(max_steps):
                    return result
                last = self.epoch == r.optim.epochs
                validate = self.val_set is not None and (self.epoch % r.train.eval_every == 0 or last)
                if validate:
                    result = self.evaluate()
                    self.metrics.log({"split": "val", "epoch": self.epoch, "step": self.step, **result})
                    self.say(
                        f"epoch {self.epoch}: val top-1 at t=1 {result['top1'][0]:.3f}, "
                        f"at t={len(result['top1'])} {result['top1'][-1]:.3f}"
                    )
                self.save()
                if validate or last:
                    self.metrics.plot(title=f"{r.name} ({r.kind})")
                if self.stop_requested():
                    raise self.preempted()
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            self.metrics.close()
            for loader in (self.loader, self.val_loader):
                if loader is not None:
                    stop_workers(loader)
        self.say(f"{r.name}: done; weights in {self.ckpt_dir / LAST}")
        return result

    # --------------------------------------------------------------------------------------- preemption

    def _catch_preemption(self) -> dict[int, Any]:
        """Note SIGTERM/SIGUSR1 instead of dying; returns the handlers to put back (none off the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def note(signum: int, frame: Any) -> None:
            self._stop_signal = signum

        return {signum: signal.signal(signum, note) for signum in PREEMPT_SIGNALS}

    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank calls it after every step).

        One process reads its own flag: no tensor, so no device synchronisation in the step loop."""
        if not self.runtime.distributed:
            return self._stop_signal != 0
        flag = torch.tensor([self._stop_signal], dtype=torch.float64, device=self.runtime.device)
        self._stop_signal = int(all_reduce_max(flag).item())
        return self._stop_signal != 0

    def preempted(self) -> Preempted:
        name = signal.Signals(self._stop_signal).name
        return Preempted(
            f"stopped by {name} at step {self.step} (epoch {self.epoch + 1}); checkpoint {self.ckpt_dir / LAST}; "
            "rerun the same command to continue"
        )
