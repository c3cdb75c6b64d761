"""Running a trained GliTr online over a video, one glimpse per frame, and drawing what it does.

`run_steps` is the online driver (`glitr visualize`, `glitr stream`): frames preprocessed as evaluation
does, fed to the online predictor one at a time; `render_step` draws a step on the *source* frame and
`visualize` writes the steps as a GIF or an MP4. Boxes are in source-frame pixels whose integers are
pixel centres (the location convention: `model/glimpse.py`); what is drawn: docs/online.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console

from glitr_cli.data.sampling import FrameSampler
from glitr_cli.data.transforms import CentreCrop, denormalize, eval_resize, eval_transform
from glitr_cli.data.video import FrameSource, VideoWriter
from glitr_cli.engine.decisions import Calibration, OnlineDecider
from glitr_cli.engine.evaluation import decision_settings, online_predictor
from glitr_cli.engine.loading import Student, find_checkpoint, load_student
from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_json
from glitr_cli.model import extract_glimpse
from glitr_cli.model.online import CONTEXTS
from glitr_cli.runtime import Runtime

OUTPUT_SUFFIXES = (".gif", ".mp4")
DIM = 0.4  # brightness kept outside the glimpse
OUTLINE = (255, 226, 0)  # glimpse outline
TRAIL = (0, 220, 255)  # earlier glimpse centres
RESTART = (255, 80, 80)
PANEL_BG = (24, 24, 28)
TEXT = (235, 235, 235)
BAR = (70, 110, 200)
DECIDED = (60, 220, 90)  # the frame of the step that decided
INKS = (OUTLINE, TRAIL, RESTART, TEXT, BAR, DECIDED)  # drawn in exact colours, also in GIFs


# ------------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class CropGeometry:
    """How evaluation preprocessing maps a W x H source frame onto the S x S model input.

    torchvision's `Resize(resize)` makes the short side `resize` and the long side
    int(resize * long / short); `CenterCrop(S)` then cuts at offset round((size - S) / 2).
    """

    width: int  # source frame
    height: int
    resized_width: int
    resized_height: int
    left: int  # crop offset in the resized frame
    top: int
    size: int  # S

    @classmethod
    def of(cls, width: int, height: int, resize: int, size: int) -> CropGeometry:
        if width <= height:
            rw, rh = resize, int(resize * height / width)
        else:
            rw, rh = int(resize * width / height), resize
        return cls(width, height, rw, rh, int(round((rw - size) / 2.0)), int(round((rh - size) / 2.0)), size)

    def to_source(self, u: float, v: float) -> tuple[float, float]:
        """Model-input pixel coordinates (u across, v down; pixel centres) -> source pixel coordinates."""
        # a resize by factor f maps pixel centres as src = (dst + 0.5) / f - 0.5
        x = (u + self.left + 0.5) * self.width / self.resized_width - 0.5
        y = (v + self.top + 0.5) * self.height / self.resized_height - 0.5
        return x, y


def glimpse_box(
    loc: tuple[float, float], geometry: CropGeometry, scale: tuple[float, float]
) -> tuple[float, float, float, float]:
    """The glimpse at `loc` as (x0, y0, x1, y1) in source-frame pixel coordinates."""
    last = geometry.size - 1
    cu, cv = (loc[0] + 1) / 2 * last, (loc[1] + 1) / 2 * last  # centre in model-input pixels
    hu, hv = scale[0] * last / 2, scale[1] * last / 2  # half-width, half-height
    x0, y0 = geometry.to_source(cu - hu, cv - hv)
    x1, y1 = geometry.to_source(cu + hu, cv + hv)
    return x0, y0, x1, y1


def display_size(width: int, height: int, size: int) -> tuple[int, int]:
    """Size of a frame drawn with its longer side `size` pixels (0: the source size)."""
    if size <= 0:
        return width, height
    f = size / max(width, height)
    return max(1, round(width * f)), max(1, round(height * f))


def to_display(x: float, y: float, src: tuple[int, int], dst: tuple[int, int]) -> tuple[float, float]:
    """Source pixel coordinates -> coordinates in the frame resized from `src` to `dst` (W, H)."""
    return (x + 0.5) * dst[0] / src[0] - 0.5, (y + 0.5) * dst[1] / src[1] - 0.5


# ------------------------------------------------------------------------------------------- frames


def step_frames(source: FrameSource, sampler: FrameSampler, every: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """Evaluation's T frames as `sampler` picks them (`every` None), or every `every`-th frame of the
    whole video."""
    if every is None:
        return iter(source.sample(lambda n: sampler.indices(n, train=False)))
    return ((i, f) for i, f in source.frames() if i % every == 0)


# ------------------------------------------------------------------------------------------ drawing


@dataclass
class OnlineStep:
    """One model step, everything the drawing and the JSON need."""

    index: int  # source frame index
    t: int  # 1-based step within the current window (sliding: the frames so far)
    window: int  # 1-based window (a new one starts after every T steps)
    location: tuple[float, float]
    box: tuple[float, float, float, float]  # source pixels
    top: list[tuple[str, float]]
    glimpse: np.ndarray | None  # (g, g, 3) uint8, what the model saw (side by side)
    pixels_read: int | None = None  # glimpse-only: the source pixels this step read


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def render_step(
    frame: np.ndarray,
    step: OnlineStep,
    trail: list[tuple[float, float]],
    num_frames: int,
    size: int,
    palette: bool = False,
    decided: bool = False,
) -> Image.Image:
    """One step drawn on its frame (longer side `size` px, 0 = native), the glimpse crop beside it when
    present, and a panel with the step and the top classes; `decided` marks the step that decided. With
    `palette` a 256-colour image (for GIF) whose drawing colours are exact: the pictures take the first
    256 - len(INKS) entries, the inks the rest."""
    h, w = frame.shape[:2]
    dw, dh = display_size(w, h, size)
    img = Image.fromarray(frame)
    if (dw, dh) != (w, h):
        img = img.resize((dw, dh), Image.Resampling.BILINEAR)
    x0, y0 = to_display(step.box[0], step.box[1], (w, h), (dw, dh))
    x1, y1 = to_display(step.box[2], step.box[3], (w, h), (dw, dh))

    # dim every pixel whose centre lies outside the glimpse
    arr = np.asarray(img).astype(np.float32)
    xs, ys = np.arange(dw), np.arange(dh)
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    img = Image.fromarray(np.where(inside[..., None], arr, arr * DIM).round().astype(np.uint8))

    font = _font(12)
    line = 16
    glimpse_w = dh if step.glimpse is not None else 0
    gap = 4 if glimpse_w else 0
    width = max(dw + gap + glimpse_w, 220)
    canvas = Image.new("RGB", (width, dh + 6 + line * (1 + len(step.top))), PANEL_BG)
    canvas.paste(img, (0, 0))
    if step.glimpse is not None:
        crop = Image.fromarray(step.glimpse).resize((glimpse_w, dh), Image.Resampling.NEAREST)
        canvas.paste(crop, (dw + gap, 0))
    if palette:
        n = 256 - len(INKS)
        canvas = canvas.quantize(n)
        colours = (canvas.getpalette() or [])[: 3 * n]
        canvas.putpalette(colours + [0] * (3 * n - len(colours)) + [c for ink in INKS for c in ink])
        ink = {colour: n + i for i, colour in enumerate(INKS)}
    else:
        ink = {colour: colour for colour in INKS}

    # on the frame alone, so nothing spills out of it: the trail of earlier centres, then the
    # current centre and the outline on top
    view = canvas.crop((0, 0, dw, dh))
    draw = ImageDraw.Draw(view)
    pts = [to_display(x, y, (w, h), (dw, dh)) for x, y in trail]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if pts:
        draw.line([*pts, (cx, cy)], fill=ink[TRAIL], width=1)
        for px, py in pts:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=ink[TRAIL])
    draw.line([(cx - 3, cy), (cx + 3, cy)], fill=ink[OUTLINE], width=1)
    draw.line([(cx, cy - 3), (cx, cy + 3)], fill=ink[OUTLINE], width=1)
    draw.rectangle([round(x0), round(y0), round(x1), round(y1)], outline=ink[OUTLINE], width=2)
    if decided:
        draw.rectangle([0, 0, dw - 1, dh - 1], outline=ink[DECIDED], width=3)
    canvas.paste(view, (0, 0))

    draw = ImageDraw.Draw(canvas)
    y = dh + 3
    count = f"{step.t}/{num_frames}" if step.t <= num_frames else f"{step.t} · last {num_frames}"
    head = f"step {count} · frame {step.index}"
    draw.text((4, y), head, fill=ink[TEXT], font=font)
    if step.window > 1 and step.t == 1:
        restart = f"restart (window {step.window})"
        draw.text((8 + draw.textlength(head, font=font), y), restart, fill=ink[RESTART], font=font)
    elif decided:
        draw.text((8 + draw.textlength(head, font=font), y), "decided", fill=ink[DECIDED], font=font)
    for name, p in step.top:
        y += line
        draw.rectangle([4, y + 1, 4 + round(p * (width - 8)), y + line - 2], fill=ink[BAR])
        draw.text((6, y), _fit(draw, f"{100 * p:5.1f}%  {name}", font, width - 12), fill=ink[TEXT], font=font)
    return canvas


def next_trail(trail: list[tuple[float, float]], step: OnlineStep, num_frames: int) -> list[tuple[float, float]]:
    """The trail drawn after `step`: the glimpse centres the model still holds (at most T - 1), `step`'s
    own the last. Callers start a new trail when a step is the first of its window (`step.t` 1)."""
    centre = ((step.box[0] + step.box[2]) / 2, (step.box[1] + step.box[3]) / 2)
    return [*trail, centre][-(num_frames - 1) :] if num_frames > 1 else []


# ------------------------------------------------------------------------------------------- output


def write_gif(images: list[Image.Image], path: Path, fps: float) -> None:
    """An endlessly looping GIF (every step differs in its text, so no frame is merged away)."""
    duration = max(20, round(1000 / fps))
    images[0].save(
        path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0, optimize=False
    )


# --------------------------------------------------------------------------------------------- main


def run_steps(
    student: Student,
    frames: Iterator[tuple[int, np.ndarray]],
    runtime: Runtime,
    side_by_side: bool = False,
    context: str = "sliding",
    top_k: int = 3,
    predictor: Any = None,
    glimpse_only: bool = False,
    calibration: Calibration | None = None,
) -> Iterator[tuple[np.ndarray, OnlineStep]]:
    """Feed (index, frame) pairs to the online predictor one at a time, under `runtime` as evaluation;
    yields (frame, OnlineStep) with `top_k` classes. With `side_by_side` each step carries the glimpse as
    the model saw it. `predictor` replaces evaluation's online predictor: one with `step`, `t`, `frames`,
    `glimpse_scale` and `glimpse_pixels` (`OnnxPredictor`; the student may then have no model). With
    `glimpse_only` the predictor reads only the pixels of its `next_box()` from the frame at evaluation's
    size, as a source that delivers just that window would (the numbers equal the whole-frame path's).
    With `calibration` the probabilities are calibrated with the temperature of their step."""
    if glimpse_only and side_by_side:
        raise GlitrError("glimpse-only input has no whole frame to cut the side-by-side glimpse from")
    transform = eval_transform(student.img_size, student.resize)
    resize = eval_resize(student.resize)  # glimpse-only: the frame at evaluation's size, not cropped
    k = min(top_k, len(student.class_names))
    if predictor is None:
        predictor = online_predictor(student.model.to(runtime.device), runtime, context=context)
    scale, side = predictor.glimpse_scale, predictor.glimpse_pixels
    window = 0
    for index, frame in frames:
        h, w = frame.shape[:2]
        pixels = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        read = None
        if glimpse_only:
            sized = resize(pixels)[0]  # (3, H', W') uint8, short side student.resize
            centre = CentreCrop.of(sized.shape[2], sized.shape[1], student.img_size, student.resize)
            box = predictor.next_box()[0].tolist()
            sx0, sy0, sx1, sy1 = centre.source_box(box)
            window_pixels = sized[:, sy0:sy1, sx0:sx1]
            read = window_pixels.shape[1] * window_pixels.shape[2]
            out = predictor.step(crop=centre.model_pixels(window_pixels, box)[None].to(runtime.device))
        else:
            x = transform(pixels).to(runtime.device)  # (1, 3, S, S)
            out = predictor.step(x)
        window += predictor.t == 1  # the first step, or the first after a restart
        number = predictor.frames if context == "sliding" else predictor.t
        loc = out.location[0].float()
        probs = out.probs[0] if calibration is None else calibration.probs(out.logits[0].float(), number)
        probs, classes = probs.float().topk(k)
        glimpse = None
        if side_by_side:
            crop = extract_glimpse(x, loc[None], (side, side), scale)[0]  # (3, g, g), normalised
            glimpse = (denormalize(crop).permute(1, 2, 0) * 255).round().byte().cpu().numpy()
        location = (float(loc[0]), float(loc[1]))
        geometry = CropGeometry.of(w, h, student.resize, student.img_size)
        yield (
            frame,
            OnlineStep(
                index=index,
                t=number,
                window=window,
                location=location,
                box=glimpse_box(location, geometry, scale),
                top=[(student.class_names[c], float(p)) for p, c in zip(probs.tolist(), classes.tolist(), strict=True)],
                glimpse=glimpse,
                pixels_read=read,
            ),
        )


def visualize(
    video: str | Path,
    *,
    checkpoint: str | Path | None = None,
    out: str | Path = "glimpses.gif",
    every: int | None = None,
    side_by_side: bool = False,
    json_path: str | Path | None = None,
    fps: float = 4.0,
    size: int = 384,
    device: str = "auto",
    runs: str | Path | None = None,
    console: Console | None = None,
    context: str = "sliding",
    calibrated: bool = False,
    calibration: str | Path | None = None,
    decide: float | None = None,
) -> dict[str, Any]:
    """`glitr visualize`: run a GliTr student online over `video` (by default its T evaluation frames,
    else every `every`-th frame) and write the glimpse animation to `out`; returns the `--json` record
    (the step that decided, with `calibrated`, `calibration` or `decide`, has `"decided": true`)."""
    console = console or Console(stderr=True)
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise GlitrError(f"--out {out}: the output must end in .gif or .mp4")
    if every is not None and every < 1:
        raise GlitrError(f"--every must be 1 or more, got {every}")
    if fps <= 0:
        raise GlitrError(f"--fps must be positive, got {fps}")
    if size < 0:
        raise GlitrError(f"--size must be 0 (source size) or more, got {size}")
    if context not in CONTEXTS:
        raise GlitrError(f"--context must be one of {', '.join(CONTEXTS)}, got {context!r}")
    source = FrameSource(video)  # checks the video exists before any model is loaded
    if checkpoint is None:
        checkpoint = find_checkpoint(runs)
        console.print(f"using the newest GliTr checkpoint: {checkpoint}", highlight=False, soft_wrap=True)
    student = load_student(checkpoint)
    found, threshold = decision_settings(
        checkpoint, student.num_frames, calibrated=calibrated, calibration=calibration, decide=decide, console=console
    )
    decider = None if threshold is None else OnlineDecider(threshold, student.num_frames, context == "sliding")
    runtime = Runtime.for_this_machine(student.recipe, device, workers=0)  # evaluation's precision; no loader
    runtime.apply()

    mp4 = out.suffix.lower() == ".mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")  # renamed into place only when complete
    images: list[Image.Image] = []
    writer = VideoWriter(tmp, fps, "h264") if mp4 else None
    record: list[dict[str, Any]] = []
    decisions: list[str] = []
    trail: list[tuple[float, float]] = []
    frames = step_frames(source, student.sampler, every)
    try:
        for frame, step in run_steps(student, frames, runtime, side_by_side, context, calibration=found):
            if step.t == 1:
                trail = []
            decision = None if decider is None else decider.update(step.t, step.window, *step.top[0])
            if decision is not None:
                decisions.append(f"step {step.t} (frame {step.index}): {decision.name} {decision.p:.0%}")
            image = render_step(
                frame, step, trail, student.num_frames, size, palette=not mp4, decided=decision is not None
            )
            if writer is not None:
                writer.write(np.asarray(image.convert("RGB")))
            else:
                images.append(image)
            trail = next_trail(trail, step, student.num_frames)
            record.append(
                {
                    "index": step.index,
                    "location": [round(v, 6) for v in step.location],
                    "box": [round(v, 2) for v in step.box],
                    "top": [[name, round(p, 6)] for name, p in step.top],
                    **({"decided": True} if decision is not None else {}),
                }
            )
        if not record:  # only reachable through a decoder that yields nothing without an error
            raise GlitrError(f"{video}: no frames to show")
        if writer is not None:
            writer.close()
            writer = None
        else:
            write_gif(images, tmp, fps)
        os.replace(tmp, out)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)

    result = {"frames": record}
    if json_path is not None:
        atomic_write_json(json_path, result)
    windows = -(-len(record) // student.num_frames)
    restarts = ""
    if windows > 1:
        restarts = (
            f", restarted every {student.num_frames} steps ({windows} windows)"
            if context == "restart"
            else f", each prediction from the last {student.num_frames} steps"
        )
    console.print(
        f"wrote {out}: {len(record)} steps of {student.path}{restarts}"
        + (f"; glimpses in {json_path}" if json_path is not None else "")
        + (f"; decided at tau = {threshold:g} at {', '.join(decisions)}" if decisions else ""),
        highlight=False,
        soft_wrap=True,
    )
    return result
