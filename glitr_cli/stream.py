"""`glitr stream`: predict an action online from a video file, a URL or a camera, as the frames come.

A reader thread decodes the PyAV source and hands every `every`-th frame to the online predictor in
the main thread, which writes one JSON line per processed frame, then a summary line. In real time the
reader releases each frame at its time stamp and keeps only the newest one not yet taken (the others
count as dropped), so latency stays that of one step; `as_fast_as_possible` waits for the model
instead. The default `every` spaces the steps as training did: round(fps * D / T), D the recipe
dataset's typical clip duration (`CLIP_SECONDS`). Decisions: docs/online.md#early-decisions.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import av
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.table import Table

from glitr_cli.data.video import VideoWriter
from glitr_cli.engine.decisions import Calibration, OnlineDecider
from glitr_cli.engine.evaluation import decision_settings
from glitr_cli.engine.loading import Student, find_checkpoint, load_student
from glitr_cli.engine.online import next_trail, render_step, run_steps
from glitr_cli.engine.onnx import OnnxPredictor, cached_step, exported_student
from glitr_cli.errors import GlitrError
from glitr_cli.model.online import CONTEXTS
from glitr_cli.runtime import Runtime, available_cores

NETWORK_SCHEMES = ("http://", "https://", "rtsp://", "rtsps://", "rtmp://", "rtmps://", "udp://", "tcp://", "srt://")
DEVICE_PREFIXES = ("avfoundation:", "dshow:")  # `FORMAT:DEVICE`, the device string PyAV's format expects
CLIP_SECONDS = {"ssv2": 4.0, "jester": 3.0, "toy": 16 / 12}  # typical training clip duration per dataset
DEFAULT_CLIP_SECONDS = 3.0
OPEN_TIMEOUT_S = 10.0  # a network source that does not answer
BACKENDS = ("pytorch", "onnx", "onnx-int8")


# ------------------------------------------------------------------------------------------------ source


def source_format(source: str) -> tuple[str, str | None]:
    """(what to pass to `av.open`, its `format=`) for a SOURCE as the command line names it."""
    if source.startswith("/dev/video"):
        return source, "v4l2"
    for prefix in DEVICE_PREFIXES:
        if source.startswith(prefix):
            return source[len(prefix) :], prefix[:-1]
    return source, None


def open_source(source: str) -> Any:
    """The PyAV container of `source` with a video stream; anything else is one GlitrError naming it."""
    url, fmt = source_format(source)
    if fmt is not None and fmt not in av.formats_available:
        raise GlitrError(f"{source}: this PyAV build cannot read {fmt} devices")
    if fmt is None and not source.startswith(NETWORK_SCHEMES) and not Path(source).is_file():
        raise GlitrError(f"{source}: no such video file (or a URL: http, https, rtsp, rtmp, udp)")
    try:
        container = av.open(url, format=fmt, timeout=OPEN_TIMEOUT_S)
    except (av.FFmpegError, OSError) as e:
        reason = " ".join(str(getattr(e, "strerror", None) or e or type(e).__name__).split())
        raise GlitrError(f"{source}: cannot open as a video source ({reason})") from None
    if not container.streams.video:
        container.close()
        raise GlitrError(f"{source}: cannot open as a video source (it has no video stream)")
    return container


def frame_rate(container: Any) -> float | None:
    """The video stream's frame rate, None when the source does not say."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def default_every(fps: float, num_frames: int, dataset: str) -> int:
    """The stride that spaces the T steps as training spaced them (see the module docstring)."""
    seconds = CLIP_SECONDS.get(dataset, DEFAULT_CLIP_SECONDS)
    return max(1, round(fps * seconds / num_frames))


@dataclass
class Arrival:
    """A decoded frame, as the reader hands it over."""

    index: int  # in the source, from 0
    time: float  # its time stamp in the source, seconds from the first frame
    arrived: float  # time.perf_counter() when decoding it finished
    frame: np.ndarray  # (H, W, 3) uint8 RGB


@dataclass
class Reader:
    """Decodes `container` in a thread and hands every `every`-th frame over through a slot of one.

    `paced`: release frames at their time stamps and let a newer frame replace one not yet taken
    (counted in `dropped`); otherwise wait until the slot is free (nothing dropped)."""

    container: Any
    name: str  # the source, for messages
    every: int
    paced: bool
    fps: float | None = None  # for frames without a time stamp
    read: int = 0
    dropped: int = 0
    error: str | None = None
    current: Arrival | None = None  # the frame last taken by `frames`
    _slot: Arrival | None = None
    _done: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="glitr-stream-reader", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        stream = self.container.streams.video[0]
        first: float | None = None  # the first chosen frame's time stamp and arrival
        start = 0.0
        try:
            for frame in self.container.decode(stream):
                if self._stop.is_set():
                    break
                index = self.read
                self.read += 1
                if index % self.every:
                    continue
                t = frame.time if frame.time is not None else index / (self.fps or 25.0)  # no time stamp: count
                if first is None:
                    first, start = t, time.perf_counter()
                stamp = t - first
                if self.paced:  # the frame's moment on the wall clock (no wait when decoding is late)
                    delay = start + stamp - time.perf_counter()
                    if delay > 0 and self._stop.wait(delay):
                        break
                pixels = frame.to_ndarray(format="rgb24")
                self._put(Arrival(index, stamp, time.perf_counter(), pixels))
        except av.FFmpegError as e:
            self.error = f"decoding failed after {self.read} frames ({' '.join(str(e).split())})"
            if self.read == 0 and self.name.startswith(("http://", "https://")) and "mp4" in self.container.format.name:
                self.error += (
                    "; an MP4 whose index (moov) is at its end streams over HTTP only from a server that answers "
                    "range requests: serve it from one, or move the index to the front with "
                    "ffmpeg -i IN.mp4 -c copy -movflags +faststart OUT.mp4"
                )
        except Exception as e:  # anything else must end the stream as a failure too, not as its end
            self.error = f"reading failed after {self.read} frames ({type(e).__name__}: {' '.join(str(e).split())})"
        finally:
            self.container.close()  # here, in the thread that decodes: never under a running decode
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def _put(self, arrival: Arrival) -> None:
        with self._cond:
            if not self.paced:
                self._cond.wait_for(lambda: self._slot is None or self._stop.is_set())
                if self._stop.is_set():  # the stream ends: nobody takes this frame, and none was dropped
                    return
            if self._slot is not None:
                self.dropped += 1  # the model is still busy: the newer frame replaces it
            self._slot = arrival
            self._cond.notify_all()

    def frames(self) -> Iterator[Arrival]:
        """The frames handed over, until the source ends."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._slot is not None or self._done)
                arrival, self._slot = self._slot, None
                self._cond.notify_all()
            if arrival is None:
                return
            self.current = arrival
            yield arrival

    def stop(self) -> None:
        """Ask the thread to end and wait a little; a source stuck in a read (a silent network stream)
        is left to the daemon thread, which closes it when the read returns."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if getattr(self, "_thread", None) is None:
            self.container.close()
            return
        self._thread.join(timeout=5.0)


# --------------------------------------------------------------------------------------------- summary


def summarize(latencies: list[float], read: int, dropped: int, elapsed: float, interrupted: bool) -> dict[str, Any]:
    """The summary record: frames read, processed and dropped, latency p50/p95/max (ms), frames/s."""
    ms = np.asarray(latencies, dtype=np.float64)
    stat = (lambda f: round(float(f(ms)), 2)) if len(ms) else (lambda f: None)
    return {
        "frames_read": read,
        "frames_processed": len(latencies),
        "frames_dropped": dropped,
        "latency_ms_p50": stat(lambda a: np.percentile(a, 50)),
        "latency_ms_p95": stat(lambda a: np.percentile(a, 95)),
        "latency_ms_max": stat(np.max),
        "processed_fps": round(len(latencies) / elapsed, 2) if elapsed > 0 else None,
        "interrupted": interrupted,
    }


def describe(summary: dict[str, Any], paced: bool = True) -> str:
    """The summary as one line; unless `paced`, the latency says that it includes the queue of one frame."""
    s = summary
    latency = "no latency"
    if s["frames_processed"]:
        latency = f"latency p50 {s['latency_ms_p50']} ms, p95 {s['latency_ms_p95']} ms, max {s['latency_ms_max']} ms"
        if not paced:
            latency += " (from decoding to prediction: each frame also waited for the model to finish the one before)"
    ended = "stopped" if s["interrupted"] else "stopped at the decision" if s.get("stopped_on_decision") else "done"
    read = f"{s['frames_read']} frames read, {s['frames_processed']} processed, {s['frames_dropped']} dropped"
    parts = [f"{ended}: {read}", latency, f"{s['processed_fps']} processed frames/s"]
    if "pixels_read_per_frame" in s:
        pixels = s["pixels_read_per_frame"]
        parts.append(f"read {pixels:.0f} pixels per frame of the {s['model_input_pixels']} a whole model input has")
    if "decisions" in s:
        parts.append(f"{s['decisions']} decision{'' if s['decisions'] == 1 else 's'}")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------- main


def panel(record: dict[str, Any]) -> Table:
    """The live view of one processed frame: its top-3 classes and the latency."""
    table = Table(title=f"frame {record['frame']} · {record['time']:.2f} s · {record['latency_ms']:.0f} ms")
    table.add_column("class")
    table.add_column("p", justify="right")
    for name, p in record["top"][:3]:
        table.add_row(name, f"{p:.2f}")
    return table


@contextlib.contextmanager
def _lines(path: str | Path) -> Iterator[IO[str]]:
    if str(path) == "-":
        yield sys.stdout
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "w")  # closed by the with below, after the stream
    except OSError as e:
        raise GlitrError(f"--jsonl {path}: cannot write there ({e.strerror})") from None
    with f:
        yield f


def stream(
    source: str,
    *,
    checkpoint: str | Path | None = None,
    jsonl: str | Path = "-",
    out: str | Path | None = None,
    every: int | None = None,
    context: str = "sliding",
    as_fast_as_possible: bool = False,
    top_k: int = 3,
    size: int = 384,
    device: str = "auto",
    backend: str = "pytorch",
    runs: str | Path | None = None,
    step_delay: float = 0.0,
    glimpse_only: bool = False,
    threads: int = 0,
    calibrated: bool = False,
    calibration: str | Path | None = None,
    decide: float | None = None,
    stop_on_decision: bool = False,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run a GliTr student online over `source` as its frames arrive; returns the summary record.

    The options are `glitr stream`'s (docs/online.md#glitr-stream). `step_delay` (seconds) is slept after
    every step, to see how the stream copes with a slower model; `runs` is where the newest checkpoint is
    looked for."""
    console = console or Console(stderr=True)
    if every is not None and every < 1:
        raise GlitrError(f"--every must be 1 or more, got {every}")
    if context not in CONTEXTS:
        raise GlitrError(f"--context must be one of {', '.join(CONTEXTS)}, got {context!r}")
    if top_k < 1:
        raise GlitrError(f"--top-k must be 1 or more, got {top_k}")
    if out is not None and Path(out).suffix.lower() != ".mp4":
        raise GlitrError(f"--out {out}: the output must end in .mp4")
    if backend not in BACKENDS:
        raise GlitrError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if str(jsonl) != "-" and Path(jsonl).is_dir():
        raise GlitrError(f"--jsonl {jsonl}: cannot write there (a folder; name a file)")
    onnx = backend.startswith("onnx")
    if onnx and glimpse_only:
        raise GlitrError(f"--glimpse-only runs on the PyTorch backend; drop --backend {backend}")
    if onnx and device not in ("auto", "cpu"):
        raise GlitrError(f"--backend {backend} runs on the CPU; drop --device {device}")
    if onnx and (calibrated or calibration is not None):
        raise GlitrError(f"--calibrated needs the logits: the PyTorch backend; drop --backend {backend}")
    if threads < 0:
        raise GlitrError(f"--threads must be 0 (every core) or more, got {threads}")
    container = open_source(source)  # before the model: a wrong source answers at once
    outputs = contextlib.ExitStack()
    try:
        if checkpoint is None:
            checkpoint = find_checkpoint(runs)
            console.print(f"using the newest GliTr checkpoint: {checkpoint}", highlight=False, soft_wrap=True)
        threads = threads or available_cores()
        predictor = None
        if onnx:
            predictor = onnx_predictor(checkpoint, backend, context, threads, console)
            student = exported_student(predictor)
        elif Path(checkpoint).suffix.lower() == ".onnx":
            raise GlitrError(f"--checkpoint {checkpoint}: an exported step runs with --backend onnx (or onnx-int8)")
        else:
            student = load_student(checkpoint)
        found, threshold = decision_settings(
            checkpoint,
            student.num_frames,
            calibrated=calibrated,
            calibration=calibration,
            decide=decide,
            console=console,
        )
        if stop_on_decision and threshold is None:
            raise GlitrError("--stop-on-decision needs a threshold: --decide TAU, or the one --calibrated finds")
        decider = None if threshold is None else OnlineDecider(threshold, student.num_frames, context == "sliding")
        # no loader: every core (or --threads) to the model
        runtime = Runtime.for_this_machine(student.recipe, "cpu" if onnx else device, threads=threads, workers=0)
        runtime.apply()
        fps = frame_rate(container)
        if every is None:
            every = default_every(fps or 25.0, student.num_frames, student.recipe.data.dataset)
        # the output before the stream starts: a target that cannot be written closes the source too
        lines = outputs.enter_context(_lines(jsonl))
    except BaseException:
        container.close()
        raise
    console.print(
        f"streaming {source} ({f'{fps:g} fps' if fps else 'frame rate unknown'}): 1 frame in {every}, "
        f"{context} context of {student.num_frames}, {'as fast as possible' if as_fast_as_possible else 'real time'}, "
        f"{backend} on {runtime.device}",
        highlight=False,
        soft_wrap=True,
    )
    reader = Reader(container, source, every, paced=not as_fast_as_possible, fps=fps)
    # a live panel of the current top-3 and latency when a person watches (not when JSON goes there)
    show = console.is_terminal and not (str(jsonl) == "-" and console.file is sys.stdout)
    watched = Live(console=console, auto_refresh=False, transient=True) if show else contextlib.nullcontext()
    with outputs, watched as live:
        summary = _run(
            student,
            runtime,
            predictor,
            reader,
            lines,
            out,
            every,
            fps,
            context,
            top_k,
            size,
            step_delay,
            live,
            glimpse_only,
            found,
            decider,
            stop_on_decision,
        )
        lines.write(json.dumps({"summary": summary}) + "\n")
        lines.flush()
    console.print(describe(summary, paced=not as_fast_as_possible), highlight=False, soft_wrap=True)
    return summary


def onnx_predictor(checkpoint: str | Path, backend: str, context: str, threads: int, console: Console) -> OnnxPredictor:
    """The step of `backend` ("onnx" float32, "onnx-int8") for `checkpoint`: an exported file itself, or
    a `.pt` checkpoint's export, cached beside it (`export.cached_step`)."""
    int8 = backend == "onnx-int8"
    path = Path(checkpoint)
    step: Path | bytes = path
    if path.suffix.lower() != ".onnx":
        step = cached_step(path, int8=int8, notice=lambda text: console.print(text, highlight=False, soft_wrap=True))
    elif not path.is_file():
        raise GlitrError(f"--checkpoint {path}: no such file")
    predictor = OnnxPredictor(step, context, threads)
    precision = predictor.metadata.get("precision")
    if precision != ("int8" if int8 else "float32"):
        other = "onnx-int8" if precision == "int8" else "onnx"
        raise GlitrError(f"--checkpoint {path} holds the {precision} step: run it with --backend {other}")
    return predictor


def _run(
    student: Student,
    runtime: Runtime,
    predictor: OnnxPredictor | None,
    reader: Reader,
    lines: IO[str],
    out: str | Path | None,
    every: int,
    fps: float | None,
    context: str,
    top_k: int,
    size: int,
    step_delay: float,
    live: Live | None,
    glimpse_only: bool,
    calibration: Calibration | None,
    decider: OnlineDecider | None,
    stop_on_decision: bool,
) -> dict[str, Any]:
    writer: VideoWriter | None = None
    latencies: list[float] = []
    pixels_read: list[int] = []
    trail: list[tuple[float, float]] = []
    interrupted = stopped = False
    decisions = 0
    started = time.perf_counter()
    t = student.num_frames
    try:
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            writer = VideoWriter(out, (fps or 25.0) / every, "h264")
        reader.start()
        steps = run_steps(
            student,
            ((arrival.index, arrival.frame) for arrival in reader.frames()),
            runtime,
            context=context,
            top_k=top_k,
            predictor=predictor,
            glimpse_only=glimpse_only,
            calibration=calibration,
        )
        for frame, step in steps:
            if step_delay > 0:
                time.sleep(step_delay)
            arrival = reader.current
            assert arrival is not None
            latency = (time.perf_counter() - arrival.arrived) * 1000
            latencies.append(latency)
            record = {
                "frame": arrival.index,
                "time": round(arrival.time, 4),
                "top": [[name, round(p, 6)] for name, p in step.top],
                "box": [round(v, 2) for v in step.box],
                "step": min(step.t, t),  # position in the context: the last of T once sliding
                "window": step.window,
                "latency_ms": round(latency, 2),
            }
            if step.pixels_read is not None:
                record["pixels_read"] = step.pixels_read
                pixels_read.append(step.pixels_read)
            lines.write(json.dumps(record) + "\n")
            decision = None if decider is None else decider.update(step.t, step.window, *step.top[0])
            if decision is not None:
                decisions += 1
                line = {
                    "class": decision.name,
                    "p": round(decision.p, 6),
                    "frame": arrival.index,
                    "time": record["time"],
                    "step": record["step"],
                    "window": decision.window,
                    "threshold": decider.threshold,
                    "reached": decision.reached,
                }
                lines.write(json.dumps({"decision": line}) + "\n")
            lines.flush()
            if live is not None:
                live.update(panel(record), refresh=True)
            if writer is not None:
                if step.t == 1:
                    trail = []
                image = render_step(frame, step, trail, t, size, decided=decision is not None)
                writer.write(np.asarray(image.convert("RGB")))
                trail = next_trail(trail, step, t)
            if decision is not None and stop_on_decision:
                stopped = True
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        reader.stop()
        if writer is not None:
            writer.close()
    if reader.error is not None and not interrupted:
        raise GlitrError(f"{reader.name}: {reader.error}")
    elapsed = time.perf_counter() - started
    summary = summarize(latencies, reader.read, reader.dropped, elapsed, interrupted)
    if decider is not None:
        summary["decisions"] = decisions
        summary["stopped_on_decision"] = stopped
    if pixels_read:  # what a source delivering only the glimpse's window would send, against whole frames
        summary["pixels_read_per_frame"] = round(float(np.mean(pixels_read)), 1)
        summary["model_input_pixels"] = student.img_size**2
    return summary
