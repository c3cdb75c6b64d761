"""`glitr bench`: speed figures for a recipe's models, against the plain reference path.

It times what the commands run: the trainer's own optimiser step (`TrainStep`: schedule, autocast,
CUDA graphs or compile, loss scaling, AdamW) on synthetic clips of the recipe's shapes, and
evaluation's own batched pass and online predictor, all under the recipe's `Runtime`. The yardstick
is the same `TrainStep` over the plain reference path of `model/reference.py` (the original's
algorithm: float32, unfused attention, O(T^2) student loop, deep copies in the teacher step).
On the CPU, when onnx, onnxscript and onnxruntime are installed, the online step exported as
`glitr export` writes it (float32, and int8 as `--int8` writes it) is timed in ONNX Runtime beside
PyTorch (`online_ms_per_frame_b1_onnx`, `..._onnx_int8`, and `online_b1_speedup_*`: the eager PyTorch
step's median time over each). The ONNX step is the sliding one (T_c and T_l over all T slots at every
frame, the steady state of a stream); the PyTorch figure is a stream's first T frames (one cached step).

With `--data` (`Bench.data`) the same `TrainStep` is fed by the trainer's own loader
(`training_data`: the recipe's workers, pinning, prefetching, `data.decode_on` and
`data.augment_on`) on the recipe's prepared training split, and the models get the dataset's
classes: `{kind}_train_clips_per_s_data` is end-to-end training, to set against the synthetic
`{kind}_train_clips_per_s` (`{kind}_train_data_fraction`: end-to-end over synthetic). Where the time
goes is then timed stage by stage in this process, one stage after another, on one batch the
loader delivered (pinned, as the trainer gets it), in ms per clip:

- `data_decode_ms_per_clip`: reading and decoding the JPEGs of a clip: `load_frames` on one CPU core
  when the loader workers decode (the workers together deliver `workers` times as much), or one
  batched `decode_jpeg` call on the device for the batch's files (nvJPEG on CUDA; it copies the
  bytes to the device itself);
- `data_transform_ms_per_clip`: the training transform: on one CPU core as a worker runs it, or
  `DeviceAugment` on the device;
- `data_transfer_ms_per_clip`: copying what the loader hands over to the device: the float clips,
  the uint8 clips, or the JPEG bytes (already inside the decode figure);
- `{kind}_train_step_ms_per_clip`: the optimiser step, the synthetic figure inverted.

The training process runs its stages one after another (transfer, device decode and transform,
step); the workers run theirs in parallel with it, so end-to-end training keeps up with the
synthetic step while the training process's own stages are small next to the step and
`workers * 1000 / (worker stages in ms per clip)` exceeds the synthetic clips/s.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from glitr_cli.data.dataset import build_dataset
from glitr_cli.data.transforms import clip_train_transform
from glitr_cli.engine.augment import DeviceAugment, training_data
from glitr_cli.engine.distributed import ResumableSampler
from glitr_cli.engine.evaluation import online_predictor, predict_clips
from glitr_cli.engine.loading import build_model
from glitr_cli.engine.objectives import Objective, reference_objective, student_objective, teacher_objective
from glitr_cli.engine.step import TrainStep
from glitr_cli.errors import GlitrError
from glitr_cli.export import OnnxPredictor, onnx_runtime_available, quantize_int8, step_program
from glitr_cli.files import atomic_write_json
from glitr_cli.recipe import Recipe, load_recipe, resolve_recipe
from glitr_cli.runtime import PREFETCH_FACTOR, Runtime, available_cores, stop_workers

# dense bf16 tensor-core peaks (FLOP/s) of GPUs whose figures are public
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12}


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


def saved_for_backward_mib(fn: Callable[[], Any], exclude: set[int]) -> float:
    """MiB of distinct tensors autograd keeps for the backward pass during one call of `fn`: its
    activation memory on any device (what gradient checkpointing trades for recomputation).
    Storages whose address is in `exclude` (the parameters) are not counted."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values()) / 2**20


def memory_read_gb_per_s(threads: int, mib: int = 256, repeats: int = 5) -> list[float]:
    """This machine's memory read bandwidth with `threads` threads, GB/s: sums of a float32 tensor of `mib`
    MiB, far larger than the caches, `repeats` times."""
    x = torch.ones(mib * 2**18)
    with _threads(threads):
        x.sum()
        seconds = time_it(x.sum, torch.device("cpu"), 0, repeats)
    return [x.numel() * 4 / s / 1e9 for s in seconds]


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    num_classes: int = 174  # with data: the dataset's
    online_batch: int = 64
    warmup: int = 2
    repeats: int = 5
    baseline: bool = True
    data: bool = False
    data_steps: int = 10  # optimiser steps per timed end-to-end call


class Bench:
    """The recipe's teacher and student (random weights, same geometry) on synthetic clips, and with
    `settings.data` on the recipe's prepared training split."""

    def __init__(self, recipe: Recipe, settings: BenchSettings) -> None:
        self.recipe, self.settings = recipe, settings
        self.runtime = Runtime.from_recipe(recipe)
        self.runtime.apply()
        self.device = self.runtime.device
        opt = recipe.optim
        self.batch = (
            settings.batch_size if settings.batch_size is not None else max(1, opt.batch_size // opt.accum_steps)
        )
        self.teacher_batch = settings.teacher_batch_size if settings.teacher_batch_size is not None else self.batch
        minimum = {
            "--batch-size": (self.batch, 1),
            "--teacher-batch-size": (self.teacher_batch, 1),
            "--online-batch": (settings.online_batch, 1),
            "--repeats": (settings.repeats, 1),
            "--num-classes": (settings.num_classes, 1),
            "--warmup": (settings.warmup, 0),
        }
        for option, (value, least) in minimum.items():
            if value < least:
                raise GlitrError(f"bench: {option} must be at least {least}, got {value}")
        num_classes = settings.num_classes
        if settings.data:
            self.data_cfg = resolve_recipe(recipe).data
            self.train_set = build_dataset(self.data_cfg, self.data_cfg.train_split, train=True)
            num_classes = self.train_set.num_classes
            if len(self.train_set) < max(self.batch, self.teacher_batch):
                raise GlitrError(
                    f"bench --data: {self.data_cfg.root} has {len(self.train_set)} training clips, fewer than one "
                    f"batch of {max(self.batch, self.teacher_batch)}"
                )
        t, size = recipe.data.num_frames, recipe.data.img_size
        torch.manual_seed(0)
        geometry = dict(num_classes=num_classes, num_frames=t, img_size=size)
        self.teacher = build_model(recipe.model, **geometry)
        self.student = build_model(recipe.model, **geometry)
        self.student.load_state_dict(self.teacher.state_dict())
        frozen = copy.deepcopy(self.teacher)  # what the student learns from (set-up, not per step)
        self.objectives = {
            "student": student_objective(self.student, frozen, recipe.objective),
            "teacher": teacher_objective(self.teacher, recipe.objective, num_classes=num_classes),
        }
        for objective in self.objectives.values():
            objective.loss.to(self.device)
        gen = torch.Generator().manual_seed(0)
        n = max(self.batch, self.teacher_batch)
        self.frames = torch.randn(n, t, 3, size, size, generator=gen).to(self.device)
        self.labels = torch.randint(0, num_classes, (n,), generator=gen).to(self.device)
        self.results: dict[str, Figure] = {}
        self.failures: dict[str, str] = {}
        self.memory: dict[str, float] = {}
        self.activations: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self.weight_bytes: dict[str, int] = {}  # what one online step reads at batch 1, per backend
        self.online_threads: dict[str, int] = {}
        self.agreement: dict[str, float] = {}

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

    def batch_of(self, kind: str) -> int:
        return self.batch if kind == "student" else self.teacher_batch

    def train_step(
        self, kind: str, runtime: Runtime, plain: bool = False, augment: DeviceAugment | None = None
    ) -> TrainStep:
        """The trainer's `TrainStep` for `kind`, one micro-batch per step (the global batch only scales
        the recipe's learning rates)."""
        objective: Objective = self.objectives[kind]
        if plain:
            objective = reference_objective(objective)
        optim = replace(self.recipe.optim, accum_steps=1, fused=self.recipe.optim.fused and not plain)
        return TrainStep(objective, runtime, optim, steps_per_epoch=10**6, augment=augment)

    def step(self, kind: str, runtime: Runtime, plain: bool = False) -> Callable[[], None]:
        """One optimiser step of the trainer's `TrainStep` for `kind` on its synthetic batch."""
        batch = self.batch_of(kind)
        train_step = self.train_step(kind, runtime, plain)
        micro_batch = (self.frames[:batch], self.labels[:batch])

        def run() -> None:
            train_step(iter([micro_batch]))

        return run

    def training(self) -> None:
        eager = replace(self.runtime, train_graphs=False, compile=False)  # counted eagerly: the same FLOPs
        for kind in self.objectives:
            with contextlib.suppress(torch.OutOfMemoryError):
                step = self.step(kind, eager)
                self.flops[f"{kind}_train_step"] = count_flops(step)
                params = {p.untyped_storage().data_ptr() for p in self.objectives[kind].loss.parameters()}
                self.activations[f"{kind}_train_step"] = saved_for_backward_mib(step, params)
        if self.settings.baseline:
            plain = replace(eager, precision="fp32", grad_checkpointing=False)
            for model in (self.student, self.teacher):
                model.set_fused_attn(False)
            for kind in self.objectives:
                batch = self.batch_of(kind)
                self.measure(f"{kind}_train_clips_per_s_baseline", self.step(kind, plain, plain=True), batch, "clips/s")
            for model in (self.student, self.teacher):
                model.set_fused_attn(self.recipe.model.fused_attn)
        for kind in self.objectives:  # last: compiling and graphs change the modules for good
            batch = self.batch_of(kind)
            self.measure(f"{kind}_train_clips_per_s", self.step(kind, self.runtime), batch, "clips/s")

    def inference(self) -> None:
        student, t = self.student.eval(), self.recipe.data.num_frames
        size = self.recipe.data.img_size
        clips = self.frames[: self.batch]
        self.measure("eval_clips_per_s", lambda: predict_clips(student, clips, self.runtime), self.batch, "clips/s")
        runs = [
            (1, self.runtime, "online_ms_per_frame_b1", "ms/frame"),
            (
                self.settings.online_batch,
                self.runtime,
                f"online_frames_per_s_b{self.settings.online_batch}",
                "frames/s",
            ),
        ]
        if self.runtime.eval_graphs:  # what the graphs save
            runs.append((1, replace(self.runtime, eval_graphs=False), "online_ms_per_frame_b1_no_graphs", "ms/frame"))
        for batch, runtime, name, unit in runs:
            stream = torch.randn(t, batch, 3, size, size).to(self.device)
            predictor = online_predictor(student, runtime, batch)

            def online(stream: torch.Tensor = stream, predictor: Any = predictor) -> None:
                predictor.reset(stream.shape[1])
                for frame in stream:
                    predictor.step(frame)

            self.measure(name, online, t * batch, unit)
        stream = self.frames[:1].transpose(0, 1)  # (T, 1, 3, S, S): one stream
        predictor = online_predictor(student, replace(self.runtime, eval_graphs=False))
        self.flops["online_step"] = count_flops(lambda: _feed(predictor, stream)) // t
        if self.device.type == "cpu" and onnx_runtime_available():
            self.exported_online(stream.cpu())
        one, centre = self.frames[:1, 0], self.frames.new_zeros(1, 2)
        with torch.no_grad():
            self.flops["backbone_per_glimpse"] = count_flops(lambda: student.backbone(one, centre))
            self.flops["backbone_per_full_frame"] = count_flops(lambda: student.backbone(one))

    def exported_online(self, stream: torch.Tensor) -> None:
        """One stream's first T frames `stream` (T, 1, 3, S, S) through the step `glitr export` writes (float32,
        and int8 as `--int8` writes it) in ONNX Runtime with every core this process may use, as `glitr
        stream` runs it, and through the eager PyTorch step with as many threads; the bytes of weights each
        step reads, this machine's memory read bandwidth, and how often int8's top-1 agrees with the float
        step's (open loop: both look where the float step chose)."""
        student, t, cores = self.student.eval(), len(stream), available_cores()
        self.online_threads = {"pytorch": self.runtime.threads, "onnx": cores}
        proto = step_program(student)
        steps = {"onnx": proto, "onnx_int8": quantize_int8(proto)}
        self.weight_bytes = {"pytorch": sum(p.numel() * p.element_size() for p in student.parameters())}
        self.weight_bytes |= {name: _initializer_bytes(step) for name, step in steps.items()}
        predictors = {name: OnnxPredictor(step.SerializeToString(), threads=cores) for name, step in steps.items()}
        for name, predictor in predictors.items():
            self.measure(f"online_ms_per_frame_b1_{name}", lambda p=predictor: _feed(p, stream), t, "ms/frame")
        if cores != self.runtime.threads:
            eager = online_predictor(student, replace(self.runtime, threads=cores))
            with _threads(cores):
                self.measure("online_ms_per_frame_b1_all_cores", lambda: _feed(eager, stream), t, "ms/frame")
        for threads in sorted({self.runtime.threads, cores}):
            self.results[f"memory_read_gb_per_s_{threads}_threads"] = Figure(memory_read_gb_per_s(threads), "GB/s")
        reference, exact, fast = online_predictor(student, self.runtime), predictors["onnx"], predictors["onnx_int8"]
        for predictor in (reference, exact, fast):
            predictor.reset()
        location, agree, int8_diff, onnx_diff = None, [], [], []
        with torch.no_grad():
            for frame in stream:
                ref = reference.step(frame.to(self.device))
                a, b = exact.step(frame, location=location), fast.step(frame, location=location)
                agree.append(float(b.probs.argmax() == ref.probs.argmax().cpu()))
                int8_diff.append(float((b.probs - ref.probs.cpu()).abs().mean()))
                onnx_diff.append(float((a.probs - ref.probs.cpu()).abs().max()))
                location = ref.next_location.cpu()
        self.agreement = {
            "int8_top1_agreement": statistics.mean(agree),
            "int8_mean_abs_prob_diff": statistics.mean(int8_diff),
            "onnx_max_abs_prob_diff": max(onnx_diff),
        }

    def data(self) -> None:
        """End-to-end training from the prepared dataset, then its stages (module docstring)."""
        cfg, dataset, steps = self.data_cfg, self.train_set, self.settings.data_steps
        for kind in self.objectives:
            size = self.batch_of(kind)
            sampler = ResumableSampler(len(dataset), rank=0, world_size=1, seed=0)
            loader, augment = training_data(dataset, cfg, self.runtime, batch_size=size, sampler=sampler, seed=0)
            batches = _epochs(loader, sampler)
            train_step = self.train_step(kind, self.runtime, augment=augment)

            def train(train_step: TrainStep = train_step, batches: Iterator[Any] = batches) -> None:
                for _ in range(steps):
                    train_step(batches)

            self.measure(f"{kind}_train_clips_per_s_data", train, size * steps, "clips/s")
            if kind == "student":
                stages = (next(batches), augment)
            stop_workers(loader)  # not left busy or holding batches while the next one is timed
        self.data_stages(*stages)

    def data_stages(self, batch: tuple, augment: DeviceAugment | None) -> None:
        """ms per clip of decoding, transforming and copying `batch`, a loader batch (module docstring)."""
        cfg, dataset, device = self.data_cfg, self.train_set, self.device
        clips, n = batch[0], len(batch[0])
        picked = [(i, dataset.sampler.indices(dataset.records[i].num_frames, True)) for i in range(n)]

        def decode() -> list[torch.Tensor]:
            if augment is not None and augment.decode is not None:
                return augment.to_device(clips)
            return [dataset.load_frames(i, indices) for i, indices in picked]  # as a loader worker decodes

        self.measure("data_decode_ms_per_clip", decode, n, "ms/clip")
        if augment is None:  # the workers transform, the float clips cross
            transform, uint8 = clip_train_transform(cfg), decode()
            self.measure("data_transform_ms_per_clip", lambda: [transform(c) for c in uint8], n, "ms/clip")
            self.measure("data_transfer_ms_per_clip", lambda: clips.to(device, non_blocking=True), n, "ms/clip")
            return
        on_device, seeds = augment.to_device(clips), batch[-1]
        self.measure("data_transform_ms_per_clip", lambda: augment.transform_clips(on_device, seeds), n, "ms/clip")
        files = [c.data for c in clips] if augment.decode is not None else clips  # the JPEG bytes, or uint8 clips
        self.measure(
            "data_transfer_ms_per_clip", lambda: [f.to(device, non_blocking=True) for f in files], n, "ms/clip"
        )

    def summary(self, recipe_path: str) -> dict[str, Any]:
        rt = self.runtime
        out: dict[str, Any] = {
            "device": device_name(self.device),
            "recipe": recipe_path,
            "batch_size": self.batch,
            "teacher_batch_size": self.teacher_batch,
            "num_frames": self.recipe.data.num_frames,
            "precision": rt.precision,
            "compile": rt.compile,
            "cuda_graphs": rt.train_graphs,
            "grad_checkpointing": rt.grad_checkpointing,
            "results": {k: v.as_dict() for k, v in self.results.items()},
            "flops": self.flops,
            "peak_memory_mib": self.memory,
            "saved_for_backward_mib": self.activations,
            "failures": self.failures,
        }
        online = online_figures(self.results, self.flops.get("online_step"), self.weight_bytes, self.online_threads)
        out["results"] |= {name: fig.as_dict() for name, fig in online.items()}
        if self.weight_bytes:
            out["online_weight_bytes"] = self.weight_bytes
            out["online_threads"] = self.online_threads
            out["online_agreement"] = self.agreement
        if self.settings.data:
            cfg = self.data_cfg
            out["data"] = {
                "root": str(cfg.root),
                "clips": len(self.train_set),
                "workers": rt.workers,
                "decode_on": cfg.decode_on,
                "augment_on": cfg.augment_on,
                "pin_memory": rt.device.type == "cuda",
                "prefetch_batches": PREFETCH_FACTOR * rt.workers,
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
            if f"{kind}_train_clips_per_s_data" in self.results:
                out["results"][f"{kind}_train_step_ms_per_clip"] = Figure(
                    [1000 / c for c in clips], "ms/clip"
                ).as_dict()
                synthetic = statistics.median(clips)
                fed = self.results[f"{kind}_train_clips_per_s_data"].values
                out["results"][f"{kind}_train_data_fraction"] = Figure(
                    [c / synthetic for c in fed], "of synthetic"
                ).as_dict()
        return out


def online_figures(
    results: dict[str, Figure], flops_per_step: int | None, weight_bytes: dict[str, int], threads: dict[str, int]
) -> dict[str, Figure]:
    """What the online step at batch 1 achieves, per backend (eager PyTorch with the recipe's threads and with
    every core, the exported float32 and int8 steps in ONNX Runtime): GFLOP/s (`flops_per_step` over each
    ms per frame); its memory bound, every weight read once per frame at the read bandwidth measured with
    that many threads, and each time over that bound; the speed-ups over the eager step."""
    out: dict[str, Figure] = {}
    runs = {  # suffix: (whose weights, threads)
        "": ("pytorch", threads.get("pytorch")),
        "_all_cores": ("pytorch", threads.get("onnx")),
        "_onnx": ("onnx", threads.get("onnx")),
        "_onnx_int8": ("onnx_int8", threads.get("onnx")),
    }
    for suffix, (weights, n) in runs.items():
        if f"online_ms_per_frame_b1{suffix}" not in results:
            continue
        ms = results[f"online_ms_per_frame_b1{suffix}"].values
        if flops_per_step:
            out[f"online_gflop_per_s_b1{suffix}"] = Figure([flops_per_step / m / 1e6 for m in ms], "GFLOP/s")
        bandwidth = results.get(f"memory_read_gb_per_s_{n}_threads")
        if weights in weight_bytes and bandwidth is not None:
            bound = weight_bytes[weights] / max(bandwidth.values) / 1e6  # ms
            out[f"online_memory_bound_ms_b1{suffix}"] = Figure([bound], "ms/frame")
            out[f"online_over_memory_bound_b1{suffix}"] = Figure([m / bound for m in ms], "x")
    if "online_ms_per_frame_b1" in results:
        eager = statistics.median(results["online_ms_per_frame_b1"].values)
        for suffix in ("all_cores", "onnx", "onnx_int8"):
            if f"online_ms_per_frame_b1_{suffix}" in results:
                ms = results[f"online_ms_per_frame_b1_{suffix}"].values
                out[f"online_b1_speedup_{suffix}"] = Figure([eager / m for m in ms], "x")
    return out


def run_bench(recipe_path: str | Path, overrides: list[str] | None, settings: BenchSettings) -> dict[str, Any]:
    """Measure the recipe's training, evaluation and online speed; returns the JSON-ready result."""
    bench = Bench(load_recipe(recipe_path, overrides), settings)
    bench.inference()
    bench.training()
    if settings.data:
        bench.data()
    return bench.summary(str(recipe_path))


def result_table(result: dict[str, Any]) -> Table:
    """The figures as a rich table: median, min, max per measurement, then FLOPs and memory."""
    batches = f"batch {result['batch_size']}"
    if result["teacher_batch_size"] != result["batch_size"]:
        batches += f" (teacher {result['teacher_batch_size']})"
    compiled = ", compiled" if result["compile"] else ""
    compiled += ", CUDA graphs" if result["cuda_graphs"] else ""
    compiled += ", grad checkpointing" if result["grad_checkpointing"] else ""
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
    for name, mib in result["saved_for_backward_mib"].items():
        table.add_row(f"saved_for_backward_{name}", f"{mib:.1f}", "", "", "MiB")
    for name, size in result.get("online_weight_bytes", {}).items():
        table.add_row(f"online_weights_read_per_frame_{name}", f"{size / 1e6:.1f}", "", "", "MB")
    for name, value in result.get("online_agreement", {}).items():
        table.add_row(f"online_{name}", f"{value:.3g}", "", "", "open loop, these weights")
    for name, why in result["failures"].items():
        table.add_row(name, "failed", "", "", why)
    if "data" in result:
        d = result["data"]
        workers = f"in {d['workers']} loader worker{'s' * (d['workers'] != 1)}"
        decode = "in the training process" if d["decode_on"] == "device" else workers
        transform = "in the training process" if d["augment_on"] == "device" else workers
        table.caption = f"data: {d['root']} ({d['clips']} clips), decoded {decode}, transformed {transform}"
    return table


def _feed(predictor: Any, stream: torch.Tensor) -> None:
    """A new stream through `predictor`: every frame of `stream` (T, B, 3, S, S)."""
    predictor.reset()
    for frame in stream:
        predictor.step(frame)


def _initializer_bytes(proto: Any) -> int:
    """Bytes of the weights (initializers) of an ONNX model: what one step reads at batch 1."""
    import onnx

    return sum(
        math.prod(w.dims) * onnx.helper.tensor_dtype_to_np_dtype(w.data_type).itemsize for w in proto.graph.initializer
    )


def _epochs(loader: Any, sampler: ResumableSampler) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (persistent workers keep going)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _fmt(x: float) -> str:
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def write_json(result: dict[str, Any], path: str | Path) -> None:
    atomic_write_json(path, result)
