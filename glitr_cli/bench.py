"""`glitr bench`: speed figures for a recipe's models, against a plain reimplementation of the original.

The plain path does what the original GliTr code does: float32, explicit softmax attention,
both temporal heads re-run over the whole prefix at every student step (O(T^2)), and deep
copies of the backbone and class head at every teacher step for the location losses. It lives
here only, as the yardstick; training always takes the fast path, which computes the same
function (tests/test_bench.py checks that).
"""

from __future__ import annotations

import contextlib
import copy
import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from glitr_cli.engine.graphs import GraphedStep
from glitr_cli.engine.models import build_model
from glitr_cli.engine.optim import build_optimizer
from glitr_cli.errors import GlitrError
from glitr_cli.model import (
    GliTr,
    OnlinePredictor,
    StudentObjective,
    StudentOutput,
    TeacherObjective,
    kl_divergence,
    step_cross_entropy,
)
from glitr_cli.recipe import Recipe, load_recipe, resolve_recipe

Loss = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]

# dense bf16 tensor-core peaks (FLOP/s) of GPUs whose figures are public
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12}


# ------------------------------------------------------------------------------------ the plain path


def plain_student_forward(student: GliTr, frames: torch.Tensor) -> StudentOutput:
    """The original's student loop: at step t both heads re-read all t features (O(T^2))."""
    b, t = frames.shape[:2]
    loc = student.initial_location(b)
    feats, logits, locs = [], [], []
    for i in range(t):
        locs.append(loc)
        feats.append(student.backbone(frames[:, i], loc))
        prefix = torch.stack(feats, dim=1)  # (B, i + 1, D)
        loc = student.locator(prefix.detach())[:, -1]
        logits.append(student.classifier(prefix)[:, -1])
    return StudentOutput(torch.stack(feats, 1), torch.stack(logits, 1), torch.stack(locs, 1))


def plain_student_loss(
    student: GliTr, teacher: GliTr, frames: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        teacher_feat = teacher.encode_frames(frames)
        teacher_logits = teacher.classifier(teacher_feat)
    out = plain_student_forward(student, frames)
    cls = step_cross_entropy(out.logits, labels, label_smoothing)
    spatial = F.mse_loss(out.feat, teacher_feat)
    temporal = kl_divergence(out.logits, teacher_logits)
    return {"loss": cls + spatial + temporal, "cls": cls, "spatial": spatial, "temporal": temporal}


def plain_teacher_loss(model: GliTr, frames: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """The original's teacher step: frozen snapshots for the location losses are deep copies."""
    out = model.forward_teacher(frames)
    b, t = frames.shape[:2]
    cls = step_cross_entropy(out.logits, target)
    backbone = copy.deepcopy(model.backbone).requires_grad_(False)
    classifier = copy.deepcopy(model.classifier).requires_grad_(False)
    glimpse_feat = backbone(frames.flatten(0, 1), out.locs.flatten(0, 1)).view(b, t, -1)
    loc_mse = F.mse_loss(glimpse_feat, out.feat.detach())
    loc_kld = kl_divergence(classifier(glimpse_feat), out.logits)
    return {"loss": cls + loc_mse + loc_kld, "cls": cls, "loc_mse": loc_mse, "loc_kld": loc_kld}


# ------------------------------------------------------------------------------------ measuring


@dataclass
class Figure:
    values: list[float]
    unit: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": statistics.median(self.values),
            "min": min(self.values),
            "max": max(self.values),
            "unit": self.unit,
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn`, warm-up calls excluded."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls, convolutions and attention, as torch's flop counter sees them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def gpu_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


@contextlib.contextmanager
def _peak_memory(device: torch.device, into: dict[str, float], name: str) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        into[name] = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the process's peak resident set so far (KiB on Linux)
        into[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------ the benchmark


@dataclass
class BenchSettings:
    batch_size: int | None = None  # None: the recipe's per-process batch
    teacher_batch_size: int | None = None  # None: batch_size (a full-frame step needs far more memory)
    num_classes: int = 174
    online_batch: int = 64
    warmup: int = 2
    repeats: int = 5
    baseline: bool = True
    data: bool = False
    loader_batches: int = 10


class Bench:
    """The recipe's teacher and student (random weights, same geometry) on synthetic clips."""

    def __init__(self, recipe: Recipe, settings: BenchSettings) -> None:
        self.recipe, self.settings = recipe, settings
        self.device = _device(recipe.train.device)
        self.amp = self.device.type == "cuda" and recipe.train.precision != "fp32"
        self.amp_dtype = torch.float16 if recipe.train.precision == "fp16" else torch.bfloat16
        opt = recipe.optim
        self.batch = settings.batch_size or max(1, opt.batch_size // opt.accum_steps)
        self.teacher_batch = settings.teacher_batch_size or self.batch
        if min(self.batch, self.teacher_batch, settings.online_batch, settings.repeats) < 1 or settings.warmup < 0:
            raise GlitrError("bench: batch sizes and --repeats must be at least 1, --warmup at least 0")
        t, size = recipe.data.num_frames, recipe.data.img_size
        torch.manual_seed(0)
        geometry = dict(num_classes=settings.num_classes, num_frames=t, img_size=size)
        self.teacher = build_model(recipe.model, **geometry).to(self.device)
        self.student = build_model(recipe.model, **geometry).to(self.device)
        self.student.load_state_dict(self.teacher.state_dict())
        self.frozen_teacher = copy.deepcopy(self.teacher)  # what the student learns from (set-up, not per step)
        gen = torch.Generator().manual_seed(0)
        n = max(self.batch, self.teacher_batch)
        self.frames = torch.randn(n, t, 3, size, size, generator=gen).to(self.device)
        self.labels = torch.randint(0, settings.num_classes, (n,), generator=gen).to(self.device)
        self.results: dict[str, Figure] = {}
        self.failures: dict[str, str] = {}
        self.memory: dict[str, float] = {}
        self.flops: dict[str, int] = {}

    def autocast(self, enabled: bool = True, cache: bool = True) -> contextlib.AbstractContextManager:
        if enabled and self.amp:
            return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=cache)
        return contextlib.nullcontext()

    def measure(self, name: str, fn: Callable[[], Any], work: float, unit: str) -> bool:
        """Record `work / seconds` per call of `fn` (or milliseconds per unit of work for ms units).

        A measurement that runs out of GPU memory is recorded as a failure and the bench goes on.
        """
        try:
            with _peak_memory(self.device, self.memory, name):
                times = time_it(fn, self.device, self.settings.warmup, self.settings.repeats)
        except torch.OutOfMemoryError:
            self.failures[name] = "out of GPU memory"
            torch.cuda.empty_cache()
            return False
        values = [1000 * s / work for s in times] if unit.startswith("ms") else [work / s for s in times]
        self.results[name] = Figure(values, unit)
        return True

    def train_step(
        self, model: GliTr, objective: Loss, x: torch.Tensor, y: torch.Tensor, *, fast: bool, graphs: bool
    ) -> Callable[[], None]:
        """One optimiser step of `objective` on (x, y); the fast path in bf16 on a GPU, optionally graphed."""
        o = self.recipe.optim
        opt = build_optimizer(model, weight_decay=o.weight_decay, betas=o.betas, eps=o.eps, fused=fast and o.fused)
        for group in opt.param_groups:
            group["lr"] = 1e-6  # a real update, small enough to keep the weights sane

        def forward_backward(frames: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
            with self.autocast(fast, cache=not graphs):
                out = objective(frames, target)
            out["loss"].backward()
            return out

        run = GraphedStep(forward_backward, model) if graphs else forward_backward

        def step() -> None:
            run(x, y)
            opt.step()
            opt.zero_grad(set_to_none=not graphs)

        return step

    def training(self) -> None:
        student, teacher, frozen = self.student, self.teacher, self.frozen_teacher
        x, y = self.frames[: self.batch], self.labels[: self.batch]
        xt, yt = self.frames[: self.teacher_batch], self.labels[: self.teacher_batch]
        fast = {
            "student": (
                student,
                StudentObjective(student, frozen, self.recipe.objective.label_smoothing).train(),
                x,
                y,
            ),
            "teacher": (teacher, TeacherObjective(teacher).train(), xt, yt),
        }
        for kind, (model, objective, a, b) in fast.items():  # counted eagerly: compiled or graphed, the same FLOPs
            with contextlib.suppress(torch.OutOfMemoryError):
                self.flops[f"{kind}_train_step"] = count_flops(
                    self.train_step(model, objective, a, b, fast=True, graphs=False)
                )
        if self.settings.baseline:
            plain = {
                "student": (student, lambda f, t: plain_student_loss(student, frozen, f, t), x, y),
                "teacher": (teacher, lambda f, t: plain_teacher_loss(teacher, f, t), xt, yt),
            }
            for model in (student, teacher):
                model.set_fused_attn(False)
            for kind, (model, objective, a, b) in plain.items():
                step = self.train_step(model, objective, a, b, fast=False, graphs=False)
                self.measure(f"{kind}_train_clips_per_s_baseline", step, a.shape[0], "clips/s")
            for model in (student, teacher):
                model.set_fused_attn(self.recipe.model.fused_attn)
        if self.recipe.train.compile:  # last: the plain path and inference run the eager modules
            student.compile()
            teacher.compile()
        graphs = self.recipe.train.cuda_graphs and self.device.type == "cuda"
        for kind, (model, objective, a, b) in fast.items():
            step = self.train_step(model, objective, a, b, fast=True, graphs=graphs)
            self.measure(f"{kind}_train_clips_per_s", step, a.shape[0], "clips/s")

    def inference(self) -> None:
        student, t = self.student.eval(), self.recipe.data.num_frames
        size = self.recipe.data.img_size

        @torch.inference_mode()
        def evaluate() -> None:
            with self.autocast():
                student.forward_student(self.frames[: self.batch])

        self.measure("eval_clips_per_s", evaluate, self.batch, "clips/s")
        graphs = self.recipe.eval.cuda_graphs
        runs = [
            (1, graphs, "online_ms_per_frame_b1", "ms/frame"),
            (self.settings.online_batch, graphs, f"online_frames_per_s_b{self.settings.online_batch}", "frames/s"),
        ]
        if graphs and self.device.type == "cuda":  # what the graphs save
            runs.append((1, False, "online_ms_per_frame_b1_no_graphs", "ms/frame"))
        for batch, use_graphs, name, unit in runs:
            stream = torch.randn(t, batch, 3, size, size).to(self.device)
            amp = self.amp_dtype if self.amp else None
            predictor = OnlinePredictor(student, batch_size=batch, amp_dtype=amp, cuda_graphs=use_graphs)

            def online(stream: torch.Tensor = stream, predictor: OnlinePredictor = predictor) -> None:
                predictor.reset(stream.shape[1])
                for frame in stream:
                    predictor.step(frame)

            self.measure(name, online, t * batch, unit)
        one, centre = self.frames[:1, 0], self.frames.new_zeros(1, 2)
        self.flops["backbone_per_glimpse"] = count_flops(lambda: student.backbone(one, centre))
        self.flops["backbone_per_full_frame"] = count_flops(lambda: student.backbone(one))

    def loader(self) -> None:
        from glitr_cli.data.bench import measure_loader
        from glitr_cli.engine.augment import DeviceAugment, collate_uint8_clips
        from glitr_cli.engine.models import build_dataset, clip_train_transform

        data = resolve_recipe(self.recipe).data
        dataset = build_dataset(data, data.train_split, train=True)
        on_device = data.augment_on == "device"  # then the loader only decodes
        collate = collate_uint8_clips if on_device else None
        result = measure_loader(dataset, self.batch, data.workers, self.settings.loader_batches, collate_fn=collate)
        self.results["loader_clips_per_s"] = Figure([result["clips_per_s"]], "clips/s")
        if on_device:
            clips = collate_uint8_clips([dataset[i] for i in range(self.batch)])[0]
            augment = DeviceAugment(clip_train_transform(data), self.device)
            seeds = torch.arange(len(clips))
            self.measure("device_augment_clips_per_s", lambda: augment(clips, seeds), len(clips), "clips/s")

    def summary(self, recipe_path: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device": device_name(self.device),
            "recipe": recipe_path,
            "batch_size": self.batch,
            "teacher_batch_size": self.teacher_batch,
            "num_frames": self.recipe.data.num_frames,
            "precision": self.recipe.train.precision if self.amp else "fp32",
            "compile": self.recipe.train.compile,
            "cuda_graphs": self.recipe.train.cuda_graphs and self.device.type == "cuda",
            "results": {k: v.as_dict() for k, v in self.results.items()},
            "flops": self.flops,
            "peak_memory_mib": self.memory,
            "failures": self.failures,
        }
        peak = gpu_peak(self.device)
        for kind, batch in (("student", self.batch), ("teacher", self.teacher_batch)):
            if f"{kind}_train_clips_per_s" not in self.results or f"{kind}_train_step" not in self.flops:
                continue
            clips = self.results[f"{kind}_train_clips_per_s"].values
            achieved = Figure([self.flops[f"{kind}_train_step"] * c / batch for c in clips], "FLOP/s")
            out["results"][f"{kind}_train_flop_per_s"] = achieved.as_dict()
            if peak:
                fraction = Figure([a / peak for a in achieved.values], "of peak")
                out["results"][f"{kind}_train_fraction_of_peak"] = fraction.as_dict()
            if f"{kind}_train_clips_per_s_baseline" in self.results:
                base = statistics.median(self.results[f"{kind}_train_clips_per_s_baseline"].values)
                out["results"][f"{kind}_train_speedup"] = Figure([c / base for c in clips], "x").as_dict()
        return out


def run_bench(recipe_path: str | Path, overrides: list[str] | None, settings: BenchSettings) -> dict[str, Any]:
    """Measure the recipe's training, evaluation and online speed; returns the JSON-ready result."""
    bench = Bench(load_recipe(recipe_path, overrides), settings)
    bench.inference()
    bench.training()
    if settings.data:
        bench.loader()
    return bench.summary(str(recipe_path))


def result_table(result: dict[str, Any]) -> Table:
    """The figures as a rich table: median, min, max per measurement, then FLOPs and memory."""
    batches = f"batch {result['batch_size']}"
    if result["teacher_batch_size"] != result["batch_size"]:
        batches += f" (teacher {result['teacher_batch_size']})"
    compiled = ", compiled" if result["compile"] else ""
    compiled += ", CUDA graphs" if result["cuda_graphs"] else ""
    table = Table(
        title=f"glitr bench: {result['device']}, {batches}, T={result['num_frames']}, {result['precision']}{compiled}"
    )
    for col in ("measurement", "median", "min", "max", "unit"):
        table.add_column(col, justify="left" if col in ("measurement", "unit") else "right", no_wrap=True)
    for name, fig in result["results"].items():
        table.add_row(name, *(_fmt(fig[k]) for k in ("median", "min", "max")), fig["unit"])
    for name, flops in result["flops"].items():
        table.add_row(f"flops_{name}", _fmt(flops), "", "", "FLOP")
    for name, mib in result["peak_memory_mib"].items():
        table.add_row(f"peak_memory_{name}", f"{mib:.0f}", "", "", "MiB")
    for name, why in result["failures"].items():
        table.add_row(name, "failed", "", "", why)
    return table


def _fmt(x: float) -> str:
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
