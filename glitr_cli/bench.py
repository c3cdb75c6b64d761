"""`glitr bench`: speed figures for a recipe's models (random weights, the recipe's geometry and
`Runtime`), against the plain reference path of `model/reference.py`. One function per suite
(`training`, `inference` with `exported_online`, `data`), `derived` for the ratios computed from the
timings. What each figure means: docs/speed.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from glitr_cli.data.dataset import VideoFolderDataset, build_dataset
from glitr_cli.data.transforms import clip_train_transform
from glitr_cli.engine.augment import DeviceAugment, training_data
from glitr_cli.engine.distributed import ResumableSampler
from glitr_cli.engine.evaluation import online_predictor, predict_clips
from glitr_cli.engine.loading import build_model
from glitr_cli.engine.objectives import Objective, reference_objective, student_objective, teacher_objective
from glitr_cli.engine.onnx import OnnxPredictor, onnx_runtime_available, quantize_int8, step_program
from glitr_cli.engine.step import TrainStep
from glitr_cli.errors import GlitrError
from glitr_cli.model import GliTr, OnlinePredictor
from glitr_cli.recipe import Recipe, load_recipe, resolve_recipe
from glitr_cli.runtime import PREFETCH_FACTOR, Runtime, available_cores, stop_workers

# dense bf16 tensor-core peaks (FLOP/s) of GPUs whose figures are public
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "RTX 4090": 165e12}
DATA_STEPS = 10  # optimiser steps per timed end-to-end call of `--data`
KINDS = ("student", "teacher")


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


# ------------------------------------------------------------------------------------------ harness


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn` after `warmup` untimed calls, the device's queued work included.

    Not `torch.utils.benchmark.Timer`: it sets its own thread count and warms up before every timed
    call (a training step is too long to run three times per figure)."""

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(now() - start)
    return times


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """{"mib": peak} of the block: memory allocated on CUDA, or the resident set on Linux (its
    high-water mark reset first, so no earlier peak counts); left empty elsewhere."""
    peak: dict[str, float] = {}
    status = Path("/proc/self/status")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets the resident set's high-water mark
        except OSError:
            status = Path("/nonexistent")
    yield peak
    if device.type == "cuda":
        peak["mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    elif status.is_file():
        kib = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        peak["mib"] = int(kib) / 1024


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls, convolutions and attention, as torch's flop counter sees them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def memory_read_gb_per_s(threads: int, mib: int = 256, repeats: int = 5) -> list[float]:
    """This machine's memory read bandwidth with `threads` threads, GB/s: sums of a float32 tensor of `mib`
    MiB, far larger than the caches, `repeats` times."""
    x = torch.ones(mib * 2**18)
    with _threads(threads):
        x.sum()
        seconds = time_calls(x.sum, torch.device("cpu"), 0, repeats)
    return [x.numel() * 4 / s / 1e9 for s in seconds]


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """PyTorch's CPU threads set to `threads` for the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _with_threads(threads: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run with PyTorch's CPU threads set to `threads`."""

    def run() -> Any:
        with _threads(threads):
            return fn()

    return run


def saved_for_backward_mib(fn: Callable[[], Any], exclude: set[int]) -> float:
    """MiB of distinct tensors autograd keeps for the backward pass during one call of `fn` (the
    activation memory that gradient checkpointing trades for recomputation), on any device; storages
    at the addresses in `exclude` (the parameters) are not counted."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes.values()) / 2**20


@dataclass
class Measurements:
    """What the suites measured: per name the values of each repeat and their unit."""

    warmup: int
    repeats: int
    device: torch.device
    values: dict[str, tuple[list[float], str]] = field(default_factory=dict)
    peak_mib: dict[str, float] = field(default_factory=dict)
    saved_mib: dict[str, float] = field(default_factory=dict)
    flops: dict[str, int] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    weight_bytes: dict[str, int] = field(default_factory=dict)  # what one online step reads, per backend
    online_threads: dict[str, int] = field(default_factory=dict)  # per backend
    agreement: dict[str, float] = field(default_factory=dict)  # int8's decisions against the float step's

    def time(self, name: str, fn: Callable[[], Any], work: float, unit: str) -> None:
        """`work` per second of each call of `fn`, or for a unit "ms/...", milliseconds per unit of work.
        A call that runs out of GPU memory is recorded as a failure and the bench goes on."""
        try:
            with peak_memory(self.device) as peak:
                seconds = time_calls(fn, self.device, self.warmup, self.repeats)
        except torch.OutOfMemoryError:
            self.failures[name] = "out of GPU memory"
            torch.cuda.empty_cache()
            return
        self.peak_mib.update({name: peak["mib"]} if peak else {})
        self._record(name, seconds, work, unit)

    def time_together(self, calls: dict[str, Callable[[], Any]], work: float, unit: str) -> None:
        """`time` for several calls whose figures are compared (CPU only), their repeats interleaved: each
        repeat times one call of each in turn, so that a machine whose speed drifts during the run (other
        jobs on shared cores) slows all of them alike rather than whichever ran in a slow minute."""
        for fn in calls.values():
            time_calls(fn, self.device, self.warmup, 0)
        seconds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(self.repeats):
            for name, fn in calls.items():
                with peak_memory(self.device) as peak:
                    seconds[name] += time_calls(fn, self.device, 0, 1)
                if peak:  # as `time`: nothing where the peak cannot be read
                    self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), peak["mib"])
        for name, values in seconds.items():
            self._record(name, values, work, unit)

    def _record(self, name: str, seconds: list[float], work: float, unit: str) -> None:
        rate = unit.startswith("ms")
        self.values[name] = ([1000 * s / work if rate else work / s for s in seconds], unit)


# ------------------------------------------------------------------------------------------- suites


@dataclass
class Setup:
    """The recipe's models, objectives and a synthetic batch, under the recipe's runtime."""

    recipe: Recipe
    runtime: Runtime
    batch: dict[str, int]  # per kind
    objectives: dict[str, Objective]
    clips: torch.Tensor  # (B, T, 3, S, S) on the device
    labels: torch.Tensor  # (B,)
    train_set: VideoFolderDataset | None  # with --data

    def train_step(self, kind: str, runtime: Runtime, plain: bool = False, augment: Any = None) -> TrainStep:
        """The trainer's `TrainStep` for `kind`, one micro-batch per step (the global batch only scales the
        recipe's learning rates); `plain` computes it along the reference path."""
        objective = reference_objective(self.objectives[kind]) if plain else self.objectives[kind]
        optim = replace(self.recipe.optim, accum_steps=1, fused=self.recipe.optim.fused and not plain)
        return TrainStep(objective, runtime, optim, steps_per_epoch=10**6, augment=augment)

    def step(self, kind: str, runtime: Runtime, plain: bool = False) -> Callable[[], None]:
        """One optimiser step of `kind` on the synthetic batch."""
        train_step, n = self.train_step(kind, runtime, plain), self.batch[kind]
        micro_batch = (self.clips[:n], self.labels[:n])
        return lambda: train_step(iter([micro_batch]))


def setup(recipe: Recipe, settings: BenchSettings) -> Setup:
    """Check the settings and build the recipe's teacher and student (the student starting as a copy of the
    teacher, which it learns from), with the dataset's classes under `settings.data`."""
    # this machine's threads; the training steps keep malloc as training sets it
    runtime = replace(Runtime.for_this_machine(recipe), keep_freed_memory=recipe.train.keep_freed_memory)
    runtime.apply()
    opt = recipe.optim
    batch = settings.batch_size if settings.batch_size is not None else max(1, opt.batch_size // opt.accum_steps)
    teacher_batch = settings.teacher_batch_size if settings.teacher_batch_size is not None else batch
    least = {"--batch-size": (batch, 1), "--teacher-batch-size": (teacher_batch, 1)}
    least |= {"--online-batch": (settings.online_batch, 1), "--repeats": (settings.repeats, 1)}
    least |= {"--num-classes": (settings.num_classes, 1), "--warmup": (settings.warmup, 0)}
    for option, (value, low) in least.items():
        if value < low:
            raise GlitrError(f"bench: {option} must be at least {low}, got {value}")
    num_classes, train_set = settings.num_classes, None
    if settings.data:
        data = resolve_recipe(recipe).data
        train_set = build_dataset(data, data.train_split, train=True)
        num_classes = train_set.num_classes
        if len(train_set) < max(batch, teacher_batch):
            raise GlitrError(
                f"bench --data: {data.root} has {len(train_set)} training clips, fewer than one batch of "
                f"{max(batch, teacher_batch)}"
            )
    t, size = recipe.data.num_frames, recipe.data.img_size
    torch.manual_seed(0)
    geometry = dict(num_classes=num_classes, num_frames=t, img_size=size)
    teacher, student = build_model(recipe.model, **geometry), build_model(recipe.model, **geometry)
    student.load_state_dict(teacher.state_dict())
    frozen = copy.deepcopy(teacher)  # what the student learns from (set-up, not per step)
    objectives = {
        "student": student_objective(student, frozen, recipe.objective),
        "teacher": teacher_objective(teacher, recipe.objective, num_classes=num_classes),
    }
    for objective in objectives.values():
        objective.loss_module.to(runtime.device)
    gen = torch.Generator().manual_seed(0)
    n = max(batch, teacher_batch)
    clips = torch.randn(n, t, 3, size, size, generator=gen).to(runtime.device)
    labels = torch.randint(0, num_classes, (n,), generator=gen).to(runtime.device)
    batches = {"student": batch, "teacher": teacher_batch}
    return Setup(recipe, runtime, batches, objectives, clips, labels, train_set)


def set_fused_attention(objective: Objective, enabled: bool) -> None:
    """Switch the attention of every GliTr in `objective` (the trained model and a frozen teacher)."""
    for module in objective.loss_module.modules():
        if isinstance(module, GliTr):
            module.set_fused_attn(enabled)


def training(s: Setup, m: Measurements, baseline: bool) -> None:
    """FLOPs and saved activations of each kind's step (eager), its plain path, then the recipe's step."""
    eager = replace(s.runtime, train_graphs=False, compile=False)  # counted eagerly: the same FLOPs
    for kind in KINDS:
        with contextlib.suppress(torch.OutOfMemoryError):
            step = s.step(kind, eager)
            m.flops[f"{kind}_train_step"] = count_flops(step)
            params = {p.untyped_storage().data_ptr() for p in s.objectives[kind].loss_module.parameters()}
            m.saved_mib[f"{kind}_train_step"] = saved_for_backward_mib(step, params)
    if baseline:
        plain = replace(eager, precision="fp32", grad_checkpointing=False)
        for kind in KINDS:
            set_fused_attention(s.objectives[kind], False)
            m.time(f"{kind}_train_clips_per_s_baseline", s.step(kind, plain, plain=True), s.batch[kind], "clips/s")
            set_fused_attention(s.objectives[kind], s.recipe.model.fused_attn)
    for kind in KINDS:  # last: compiling and graphs change the modules for good
        m.time(f"{kind}_train_clips_per_s", s.step(kind, s.runtime), s.batch[kind], "clips/s")


def inference(s: Setup, m: Measurements, online_batch: int) -> None:
    """Evaluation's batched pass, the online predictor (batch 1 and `online_batch`, with and without CUDA
    graphs) over a stream's first T frames, the FLOPs of its step, and on a CPU `exported_online`."""
    student, runtime = s.objectives["student"].model.eval(), s.runtime
    t, size, n = s.recipe.data.num_frames, s.recipe.data.img_size, s.batch["student"]
    m.time("eval_clips_per_s", lambda: predict_clips(student, s.clips[:n], runtime), n, "clips/s")
    exported = runtime.device.type == "cpu" and onnx_runtime_available()  # then batch 1 is timed beside it
    runs = [] if exported else [(1, runtime, "online_ms_per_frame_b1", "ms/frame")]
    runs.append((online_batch, runtime, f"online_frames_per_s_b{online_batch}", "frames/s"))
    if runtime.eval_graphs:  # what the graphs save
        runs.append((1, replace(runtime, eval_graphs=False), "online_ms_per_frame_b1_no_graphs", "ms/frame"))
    for batch, rt, name, unit in runs:
        stream = torch.randn(t, batch, 3, size, size).to(rt.device)
        m.time(name, _stream(online_predictor(student, rt, batch), stream), t * batch, unit)
    stream = s.clips[:1].transpose(0, 1)  # (T, 1, 3, S, S): one stream
    eager = online_predictor(student, replace(runtime, eval_graphs=False))
    m.flops["online_step"] = count_flops(_stream(eager, stream)) // t
    if exported:
        exported_online(s, m, stream)
    one, centre = s.clips[:1, 0], s.clips.new_zeros(1, 2)
    with torch.no_grad():
        m.flops["backbone_per_glimpse"] = count_flops(lambda: student.backbone(one, centre))
        m.flops["backbone_per_full_frame"] = count_flops(lambda: student.backbone(one))


def exported_online(s: Setup, m: Measurements, stream: torch.Tensor) -> None:
    """One stream's first T frames `stream` (T, 1, 3, S, S) through the eager step and the exported float32
    and int8 steps in ONNX Runtime, timed together (`Measurements.time_together`) with the recipe's threads
    and then with every core; the weight bytes each step reads, the memory read bandwidth, and int8's
    open-loop top-1 agreement with the float step on these random weights (`scripts/int8_accuracy.py`
    measures a trained model's)."""
    student, runtime, t, cores = s.objectives["student"].model.eval(), s.runtime, len(stream), available_cores()
    m.online_threads |= {"recipe": runtime.threads, "all_cores": cores}
    protos = {"onnx": step_program(student)}
    protos["onnx_int8"] = quantize_int8(protos["onnx"])
    m.weight_bytes["pytorch"] = sum(p.numel() * p.element_size() for p in student.parameters())
    m.weight_bytes |= {name: _initializer_bytes(proto) for name, proto in protos.items()}
    steps = {name: proto.SerializeToString() for name, proto in protos.items()}
    runs = {runtime.threads: ""} | ({cores: "_all_cores"} if cores != runtime.threads else {})
    for threads, suffix in runs.items():
        eager = _stream(online_predictor(student, replace(runtime, threads=threads)), stream)
        calls = {f"online_ms_per_frame_b1{suffix}": _with_threads(threads, eager)}
        for name, step in steps.items():
            calls[f"online_ms_per_frame_b1_{name}{suffix}"] = _stream(OnnxPredictor(step, threads=threads), stream)
        m.time_together(calls, t, "ms/frame")
        m.values[f"memory_read_gb_per_s_{threads}_threads"] = (memory_read_gb_per_s(threads), "GB/s")
    predictors = {name: OnnxPredictor(step, threads=runtime.threads) for name, step in steps.items()}
    reference, exact, fast = online_predictor(student, runtime), predictors["onnx"], predictors["onnx_int8"]
    for predictor in (reference, exact, fast):
        predictor.reset()
    location, agree, int8_diff, onnx_diff = None, [], [], []
    for frame in stream:
        ref = reference.step(frame)
        a, b = exact.step(frame, location=location), fast.step(frame, location=location)
        agree.append(float(b.probs.argmax() == ref.probs.argmax()))
        int8_diff.append(float((b.probs - ref.probs).abs().mean()))
        onnx_diff.append(float((a.probs - ref.probs).abs().max()))
        location = ref.next_location
    m.agreement = {
        "int8_top1_agreement": statistics.mean(agree),
        "int8_mean_abs_prob_diff": statistics.mean(int8_diff),
        "onnx_max_abs_prob_diff": max(onnx_diff),
    }


def _initializer_bytes(proto: Any) -> int:
    """Bytes of the weights (initializers) of an ONNX model: what one step reads at batch 1."""
    import onnx

    return sum(
        math.prod(w.dims) * onnx.helper.tensor_dtype_to_np_dtype(w.data_type).itemsize for w in proto.graph.initializer
    )


def _stream(predictor: Any, frames: torch.Tensor) -> Callable[[], None]:
    """One stream of `frames` (T, B, 3, S, S) through an online predictor, from its start."""

    def run() -> None:
        if isinstance(predictor, OnlinePredictor):
            predictor.reset(frames.shape[1])
        else:
            predictor.reset()
        for frame in frames:
            predictor.step(frame)

    return run


def data(s: Setup, m: Measurements) -> None:
    """End-to-end training from the prepared dataset through the trainer's loader, then the loader's
    stages on one batch it delivered, in ms per clip: reading and decoding (`load_frames` on one CPU core,
    as a worker decodes, or the batched decode on the device), the training transform (one CPU core, or
    `DeviceAugment` on the device) and the copy of what the loader hands over to the device."""
    cfg, dataset, runtime = resolve_recipe(s.recipe).data, s.train_set, s.runtime
    assert dataset is not None
    for kind in KINDS:
        sampler = ResumableSampler(len(dataset), rank=0, world_size=1, seed=0)
        loader, augment = training_data(dataset, cfg, runtime, batch_size=s.batch[kind], sampler=sampler, seed=0)
        batches = _epochs(loader, sampler)
        train_step = s.train_step(kind, runtime, augment=augment)

        def train(train_step: TrainStep = train_step, batches: Iterator[Any] = batches) -> None:
            for _ in range(DATA_STEPS):
                train_step(batches)

        m.time(f"{kind}_train_clips_per_s_data", train, s.batch[kind] * DATA_STEPS, "clips/s")
        if kind == "student":
            batch, student_augment = next(batches), augment
        stop_workers(loader)  # not left busy or holding batches while the next one is timed
    clips, n, device = batch[0], len(batch[0]), runtime.device
    picked = [(i, dataset.sampler.indices(dataset.records[i].num_frames, True)) for i in range(n)]

    def decode() -> list[torch.Tensor]:
        if student_augment is not None and student_augment.decode is not None:
            return student_augment.to_device(clips)
        return [dataset.load_frames(i, indices) for i, indices in picked]  # as a loader worker decodes

    m.time("data_decode_ms_per_clip", decode, n, "ms/clip")
    if student_augment is None:  # the workers transform, the float clips cross
        transform, uint8 = clip_train_transform(cfg), decode()
        m.time("data_transform_ms_per_clip", lambda: [transform(c) for c in uint8], n, "ms/clip")
        m.time("data_transfer_ms_per_clip", lambda: clips.to(device, non_blocking=True), n, "ms/clip")
        return
    augment: DeviceAugment = student_augment
    on_device, seeds = augment.to_device(clips), batch[-1]
    m.time("data_transform_ms_per_clip", lambda: augment.transform_clips(on_device, seeds), n, "ms/clip")
    files = [c.data for c in clips] if augment.decode is not None else clips  # the JPEG bytes, or uint8 clips
    m.time("data_transfer_ms_per_clip", lambda: [f.to(device, non_blocking=True) for f in files], n, "ms/clip")


def _epochs(loader: Any, sampler: ResumableSampler) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (persistent workers keep going)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# ------------------------------------------------------------------------------------------ figures


def figure(values: list[float], unit: str) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "unit": unit}


def derived(
    values: dict[str, tuple[list[float], str]],
    flops: dict[str, int],
    batch: dict[str, int],
    peak: float | None,
    weight_bytes: dict[str, int] | None = None,
    online_threads: dict[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """The figures computed from the measured `values` (name -> (per-repeat values, unit)), each repeat
    against the median of what it is compared with; what each means: docs/speed.md."""
    out: dict[str, dict[str, Any]] = {}

    def median(name: str) -> float:
        return statistics.median(values[name][0])

    for kind, n in batch.items():
        if f"{kind}_train_clips_per_s" not in values:
            continue
        clips = values[f"{kind}_train_clips_per_s"][0]
        if f"{kind}_train_step" in flops:
            achieved = [flops[f"{kind}_train_step"] * c / n for c in clips]
            out[f"{kind}_train_flop_per_s"] = figure(achieved, "FLOP/s")
            if peak:
                out[f"{kind}_train_fraction_of_peak"] = figure([a / peak for a in achieved], "of peak")
        if f"{kind}_train_clips_per_s_baseline" in values:
            base = median(f"{kind}_train_clips_per_s_baseline")
            out[f"{kind}_train_speedup"] = figure([c / base for c in clips], "x")
        if f"{kind}_train_clips_per_s_data" in values:
            out[f"{kind}_train_step_ms_per_clip"] = figure([1000 / c for c in clips], "ms/clip")
            synthetic, fed = statistics.median(clips), values[f"{kind}_train_clips_per_s_data"][0]
            out[f"{kind}_train_data_fraction"] = figure([c / synthetic for c in fed], "of synthetic")
    weight_bytes, threads = weight_bytes or {}, online_threads or {}
    runs = {  # suffix: (whose weights, threads)
        f"{backend}{cores}": (weights, threads.get("all_cores" if cores else "recipe"))
        for backend, weights in (("", "pytorch"), ("_onnx", "onnx"), ("_onnx_int8", "onnx_int8"))
        for cores in ("", "_all_cores")
    }
    for suffix, (weights, n) in runs.items():
        if f"online_ms_per_frame_b1{suffix}" not in values:
            continue
        ms = values[f"online_ms_per_frame_b1{suffix}"][0]
        if "online_step" in flops:
            out[f"online_gflop_per_s_b1{suffix}"] = figure([flops["online_step"] / v / 1e6 for v in ms], "GFLOP/s")
        if weights in weight_bytes and f"memory_read_gb_per_s_{n}_threads" in values:
            bound = weight_bytes[weights] / max(values[f"memory_read_gb_per_s_{n}_threads"][0]) / 1e6  # ms
            out[f"online_memory_bound_ms_b1{suffix}"] = figure([bound], "ms/frame")
            out[f"online_over_memory_bound_b1{suffix}"] = figure([v / bound for v in ms], "x")
        if suffix and "online_ms_per_frame_b1" in values:
            eager = median("online_ms_per_frame_b1")
            out[f"online_b1_speedup{suffix}"] = figure([eager / v for v in ms], "x")
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_bench(recipe_path: str | Path, overrides: list[str] | None, settings: BenchSettings) -> dict[str, Any]:
    """Measure the recipe's training, evaluation and online speed; returns the JSON-ready result."""
    recipe = load_recipe(recipe_path, overrides)
    s = setup(recipe, settings)
    rt = s.runtime
    m = Measurements(settings.warmup, settings.repeats, rt.device)
    inference(s, m, settings.online_batch)
    training(s, m, settings.baseline)
    if settings.data:
        data(s, m)
    name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else ""
    peak = next((flops for key, flops in PEAK_BF16.items() if key in name), None)
    online = derived(m.values, m.flops, s.batch, peak, m.weight_bytes, m.online_threads)
    results = {k: figure(*v) for k, v in m.values.items()} | online
    out: dict[str, Any] = {
        "device": device_name(rt.device),
        "recipe": str(recipe_path),
        "batch_size": s.batch["student"],
        "teacher_batch_size": s.batch["teacher"],
        "num_frames": recipe.data.num_frames,
        "precision": rt.precision,
        "compile": rt.compile,
        "cuda_graphs": rt.train_graphs,
        "grad_checkpointing": rt.grad_checkpointing,
        "results": results,
        "flops": m.flops,
        "peak_memory_mib": m.peak_mib,
        "saved_for_backward_mib": m.saved_mib,
        "failures": m.failures,
    }
    if m.weight_bytes:
        out |= {"online_weight_bytes": m.weight_bytes, "online_threads": m.online_threads}
        out["online_agreement"] = m.agreement
    if settings.data:
        cfg = resolve_recipe(recipe).data
        out["data"] = {
            "root": str(cfg.root),
            "clips": len(s.train_set or []),
            "workers": rt.workers,
            "decode_on": cfg.decode_on,
            "augment_on": cfg.augment_on,
            "pin_memory": rt.device.type == "cuda",
            "prefetch_batches": PREFETCH_FACTOR * rt.workers,
        }
    return out


def result_table(result: dict[str, Any]) -> Table:
    """The figures as a rich table: median, min, max per measurement, then FLOPs and memory."""
    batches = f"batch {result['batch_size']}"
    if result["teacher_batch_size"] != result["batch_size"]:
        batches += f" (teacher {result['teacher_batch_size']})"
    switches = [name for key, name in (("compile", "compiled"), ("cuda_graphs", "CUDA graphs")) if result[key]]
    switches += ["grad checkpointing"] if result["grad_checkpointing"] else []
    title = f"glitr bench: {result['device']}, {batches}, T={result['num_frames']}, {result['precision']}"
    table = Table(title=", ".join([title, *switches]))
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
        table.add_row(f"online_{name}", f"{value:.3g}", "", "", "open loop, these random weights")
    for name, why in result["failures"].items():
        table.add_row(name, "failed", "", "", why)
    if "data" in result:
        d = result["data"]
        workers = f"in {d['workers']} loader worker{'s' * (d['workers'] != 1)}"
        decode = "in the training process" if d["decode_on"] == "device" else workers
        transform = "in the training process" if d["augment_on"] == "device" else workers
        table.caption = f"data: {d['root']} ({d['clips']} clips), decoded {decode}, transformed {transform}"
    return table


def _fmt(x: float) -> str:
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"
