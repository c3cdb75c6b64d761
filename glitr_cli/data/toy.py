"""The generated `toy` action dataset: a small, real video dataset in which *where to look* decides the
answer (docs/demo.md#what-it-does). Every nuisance is drawn before and independently of the shape, so
two clips that differ only in shape are pixel-identical inside the central region. It is written in
SSv2's format (VP9 `.webm` videos, the JSON files) and prepared as SSv2 is: the path of the real data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from glitr_cli.data.formats import template_to_class
from glitr_cli.data.parallel import map_tasks
from glitr_cli.data.sampling import FrameSampler
from glitr_cli.data.video import encode_video
from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_text

SHAPES = ("square", "ring", "triangle", "cross", "diamond")
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
PALETTE = ((230, 40, 40), (40, 200, 70), (40, 110, 240), (240, 200, 30), (220, 50, 220), (30, 210, 220), (250, 130, 20))
SPLITS = ("train", "validation", "test")
GENERATOR_VERSION = 2  # 2: default shapes square and ring (1: square and triangle)
VIDEO_DIR = "20bn-something-something-v2"
SETTINGS_FILE = "toy.json"  # in the download folder: the ToyConfig (and generator version) it was made with


@dataclass(frozen=True)
class ToyConfig:
    """Sizes of the toy dataset; `shapes x directions` classes (8 by default)."""

    seed: int = 0
    num_train: int = 400
    num_val: int = 100
    num_test: int = 20
    num_frames: int = 16
    size: int = 112
    shapes: tuple[str, ...] = ("square", "ring")
    directions: tuple[str, ...] = ("left", "right", "up", "down")
    distractors: int = 4
    fps: int = 12
    centre_fraction: float = field(default=3 / 7)

    def __post_init__(self) -> None:
        def bad(flag: str, want: str, got: Any) -> GlitrError:
            return GlitrError(f"toy option {flag}: expected {want}, got {got!r}")

        if self.num_train < 1 or self.num_val < 1 or self.num_test < 0:
            raise bad(
                "--toy-train/--toy-val/--toy-test",
                "at least 1 train and 1 val video",
                (self.num_train, self.num_val, self.num_test),
            )
        if self.num_frames < 4:
            raise bad("--toy-frames", "at least 4 frames", self.num_frames)
        if self.size < 64 or self.size % 2:
            raise bad("--toy-size", "an even frame side of at least 64 pixels", self.size)
        if not self.shapes or len(set(self.shapes)) != len(self.shapes) or set(self.shapes) - set(SHAPES):
            raise bad("--toy-shapes", f"distinct names from {','.join(SHAPES)}", ",".join(self.shapes))
        if (
            not self.directions
            or len(set(self.directions)) != len(self.directions)
            or set(self.directions) - set(DIRECTIONS)
        ):
            raise bad("--toy-directions", f"distinct names from {','.join(DIRECTIONS)}", ",".join(self.directions))
        if self.num_classes < 2:
            raise bad("--toy-shapes/--toy-directions", "at least two classes", self.num_classes)
        if self.distractors < 0:
            raise bad("--toy-distractors", "0 or more", self.distractors)

    @classmethod
    def from_options(cls, **options: Any) -> ToyConfig:
        """Build from CLI-style options; `shapes`/`directions` may be comma-separated strings."""
        for key in ("shapes", "directions"):
            if isinstance(options.get(key), str):
                options[key] = tuple(s.strip() for s in options[key].split(",") if s.strip())
            elif key in options:
                options[key] = tuple(options[key])
        unknown = set(options) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise GlitrError(f"unknown toy option(s): {', '.join(sorted(unknown))}")
        return cls(**options)

    @property
    def num_classes(self) -> int:
        """shapes x directions."""
        return len(self.shapes) * len(self.directions)

    @property
    def centre_side(self) -> int:
        """Side in pixels of the central region a centred glimpse sees (48 for 112)."""
        return round(self.size * self.centre_fraction)

    def class_of(self, label: int) -> tuple[str, str]:
        """(shape, direction) of class index `label`."""
        return self.shapes[label // len(self.directions)], self.directions[label % len(self.directions)]

    @property
    def class_names(self) -> list[str]:
        """Class names in index order, e.g. 'Square moving left'."""
        return [template_to_class(template_for(*self.class_of(i))) for i in range(self.num_classes)]


def template_for(shape: str, direction: str) -> str:
    """The SSv2-style template of a class; brackets removed it is the class name."""
    return f"[{shape.capitalize()}] moving {direction}"


@dataclass
class ToyClip:
    """Everything needed to draw one clip; coordinates are pixel centres (x, y)."""

    shape: str
    direction: str
    background: np.ndarray  # (H, W, 3) uint8
    colour: tuple[int, int, int]
    radius: float
    path: np.ndarray  # (T, 2) target centre per frame
    distractors: list[tuple[str, int, float, np.ndarray]]  # (shape, grey level, radius, (T, 2) path)


# ----------------------------------------------------------------------------- sampling


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    g = size // 8 + 1
    low = rng.uniform(85, 175, (g, g, 1)) + rng.uniform(-12, 12, (g, g, 3))
    img = np.asarray(
        Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    )
    fine = rng.normal(0.0, 7.0, (size, size, 1))
    return np.clip(img + fine, 0, 255).astype(np.uint8)


def sample_clip(rng: np.random.Generator, cfg: ToyConfig, shape: str, direction: str) -> ToyClip:
    """Draw one clip's nuisances from `rng`. The stream is consumed identically whatever
    the shape and direction, so clips that differ only in shape share everything else."""
    s = float(cfg.size)
    c = s / 2
    half = cfg.centre_side / 2
    t_len = cfg.num_frames
    r = rng.uniform(0.075, 0.09) * s
    colour = PALETTE[int(rng.integers(len(PALETTE)))]
    background = _background(rng, cfg.size)
    # target: along/perpendicular offsets from the centre in the direction's frame
    u = np.array(DIRECTIONS[direction])
    v = np.array([-u[1], u[0]])
    a0, p0 = rng.uniform(-0.05, 0.05, 2) * s
    margin = max(1.0, 0.02 * s)
    a_exit = half + r + margin + rng.uniform(0.0, 0.03) * s  # fully outside the central region
    a_max = c - r - margin
    a_end = rng.uniform(min(a_exit + 0.02 * s, a_max), a_max)
    k = max(1, round(0.3 * (t_len - 1)))  # the target has left the centre by 30 % of the clip
    t = np.arange(t_len, dtype=np.float64)
    along = np.where(t <= k, a0 + (a_exit - a0) * t / k, a_exit + (a_end - a_exit) * (t - k) / max(1, t_len - 1 - k))
    perp = np.clip(p0 + np.cumsum(rng.normal(0.0, 0.01 * s, t_len)), -a_max, a_max)
    path = c + along[:, None] * u + perp[:, None] * v
    # distractors: grey shapes (the class shapes and dots) on random walks that bounce
    kinds = (*cfg.shapes, "dot")
    distractors = []
    for _ in range(cfg.distractors):
        kind = kinds[int(rng.integers(len(kinds)))]
        grey = int(rng.integers(30, 71)) if rng.random() < 0.5 else int(rng.integers(185, 231))
        rd = rng.uniform(0.06, 0.09) * s
        pos = rng.uniform(rd, s - rd, 2)
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(0.01, 0.035) * s
        turns = rng.normal(0.0, 0.35, t_len)
        dpath = np.empty((t_len, 2))
        for i in range(t_len):
            dpath[i] = pos
            angle += turns[i]
            step = speed * np.array([np.cos(angle), np.sin(angle)])
            pos = pos + step
            for d in range(2):  # bounce off the frame border
                if pos[d] < rd or pos[d] > s - rd:
                    pos[d] = np.clip(pos[d], rd, s - rd)
                    angle = np.pi - angle if d == 0 else -angle
        distractors.append((kind, grey, rd, dpath))
    return ToyClip(shape, direction, background, colour, r, path, distractors)


def target_revealed(clip: ToyClip, cfg: ToyConfig) -> np.ndarray:
    """(T,) bool: frames where the target shows its shape, i.e. its whole bounding box lies
    outside the central region. Before that it is drawn as a plain dot."""
    c = cfg.size / 2
    half = cfg.centre_side / 2
    off = np.abs(clip.path - c).max(axis=1) - clip.radius
    return np.maximum.accumulate(off > half + 0.5)


def target_in_glimpse(
    clip: ToyClip,
    cfg: ToyConfig,
    indices: Sequence[int],
    locs: np.ndarray,
    scale: float,
    *,
    resize: int | None = None,
    crop: int | None = None,
) -> np.ndarray:
    """(T,) bool: whether the glimpse at `locs` (T, 2) on frames `indices` holds the whole target.

    `locs` are glimpse centres in the model's coordinates (`F.affine_grid`, align_corners) on
    frames that evaluation resized to `resize` and centre-cropped to `crop` (both default to
    the toy's frame size), and `scale` the fraction s of the frame a glimpse covers, so a
    glimpse spans [l - s, l + s]. The target counts as whole when its bounding square, of
    half-side 0.85 radius (the drawn shapes' extent, near enough), lies within that span."""
    resize = resize or cfg.size
    crop = crop or resize
    zoom = resize / cfg.size
    half = (crop - 1) / 2
    # pixel-centre coordinates in the crop, then affine_grid's [-1, 1]
    centre = (clip.path[list(indices)] * zoom - (resize - crop) / 2 - 0.5 - half) / half
    reach = scale - 0.85 * clip.radius * zoom / half
    return np.abs(np.asarray(locs) - centre).max(axis=1) < reach


class FollowMeter:
    """How often glimpses hold the whole toy target, per direction of motion: over the steps at
    which the target shows its shape (it has left the centre, `target_revealed`), the share whose
    glimpse holds it (`target_in_glimpse`). `add` one clip at a time; the counts add across ranks.

    `download` is the toy download folder (its toy.json redraws each clip's path), `sampler` picks
    the evaluated frames of a video (`FrameSampler`), the rest as `target_in_glimpse` takes them."""

    def __init__(
        self, download: Path, sampler: FrameSampler, scale: float, *, resize: int | None, crop: int | None
    ) -> None:
        self.cfg = read_toy_config(download)
        self.videos = {v.id: v for v in plan_videos(self.cfg)}
        self.indices = list(sampler.indices(self.cfg.num_frames, train=False))
        self.scale, self.resize, self.crop = scale, resize, crop
        self.counts = np.zeros((len(self.cfg.directions), 2))  # (direction, [held, revealed])

    def add(self, video_id: str, locs: np.ndarray) -> None:
        video = self.videos[video_id]
        shape, direction = self.cfg.class_of(video.label)
        clip = sample_clip(clip_rng(self.cfg, video), self.cfg, shape, direction)
        inside = target_in_glimpse(clip, self.cfg, self.indices, locs, self.scale, resize=self.resize, crop=self.crop)
        seen = inside[target_revealed(clip, self.cfg)[self.indices]]
        self.counts[self.cfg.directions.index(direction)] += (seen.sum(), seen.size)

    def rates(self, counts: np.ndarray | None = None) -> dict[str, float]:
        """{direction: share, ..., "all": share} of `counts` (default: this meter's), for the
        directions with a revealed step."""
        counts = self.counts if counts is None else counts
        rates = {d: float(h / n) for d, (h, n) in zip(self.cfg.directions, counts, strict=True) if n}
        rates["all"] = float(counts[:, 0].sum() / max(counts[:, 1].sum(), 1))
        return rates


def _mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if kind == "dot":
        return dx * dx + dy * dy <= (0.6 * r) ** 2
    if kind == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if kind == "ring":  # the square's outline with a hole: its edges are the square's
        return (np.maximum(ax, ay) <= 0.85 * r) & (np.maximum(ax, ay) > 0.45 * r)
    if kind == "triangle":
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) / 1.8)
    if kind == "cross":
        return ((ax <= r) & (ay <= 0.33 * r)) | ((ay <= r) & (ax <= 0.33 * r))
    if kind == "diamond":
        return ax + ay <= r
    raise ValueError(kind)


def _draw(frame: np.ndarray, kind: str, centre: np.ndarray, r: float, colour: Sequence[int]) -> None:
    h, w = frame.shape[:2]
    x0, x1 = max(0, int(centre[0] - r) - 1), min(w, int(centre[0] + r) + 2)
    y0, y1 = max(0, int(centre[1] - r) - 1), min(h, int(centre[1] + r) + 2)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1]
    m = _mask(kind, xs + 0.5 - centre[0], ys + 0.5 - centre[1], r)
    frame[y0:y1, x0:x1][m] = colour


def render_clip(clip: ToyClip, cfg: ToyConfig) -> np.ndarray:
    """Draw a clip: uint8 array (T, H, W, 3), RGB."""
    revealed = target_revealed(clip, cfg)
    frames = np.repeat(clip.background[None], cfg.num_frames, axis=0)
    for t in range(cfg.num_frames):
        for kind, grey, rd, dpath in clip.distractors:
            _draw(frames[t], kind, dpath[t], rd, (grey, grey, grey))
        _draw(frames[t], clip.shape if revealed[t] else "dot", clip.path[t], clip.radius, clip.colour)
    return frames


# ----------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class ToyVideo:
    """One planned video: SSv2 id, split, running index within the split, class index."""

    id: str
    split: str
    index: int
    label: int


def plan_videos(cfg: ToyConfig) -> list[ToyVideo]:
    """Every video of the dataset with its class: balanced classes, shuffled per split."""
    videos = []
    next_id = 1
    for code, (split, n) in enumerate(zip(SPLITS, (cfg.num_train, cfg.num_val, cfg.num_test), strict=True)):
        labels = np.arange(n) % cfg.num_classes
        np.random.default_rng([cfg.seed, code, 0x70]).shuffle(labels)
        for i, label in enumerate(labels):
            videos.append(ToyVideo(str(next_id), split, i, int(label)))
            next_id += 1
    return videos


def clip_rng(cfg: ToyConfig, video: ToyVideo) -> np.random.Generator:
    """The random stream of one video (independent of every other video and of workers)."""
    return np.random.default_rng([cfg.seed, SPLITS.index(video.split), video.index])


def make_clip(cfg: ToyConfig, video: ToyVideo) -> np.ndarray:
    """Render a planned video: uint8 (T, H, W, 3)."""
    shape, direction = cfg.class_of(video.label)
    return render_clip(sample_clip(clip_rng(cfg, video), cfg, shape, direction), cfg)


def _make_video(task: tuple[ToyConfig, ToyVideo, str]) -> str:
    """Worker: render and encode one video, written under a temporary name then renamed."""
    cfg, video, path = task
    tmp = f"{path}.partial"
    # single-threaded and bitexact, so a seed gives the same bytes
    options = {"crf": "8", "row-mt": "0"}
    encode_video(tmp, make_clip(cfg, video), "vp9", cfg.fps, options=options, bitexact=True, threads=1)
    os.replace(tmp, path)
    return video.id


def _ssv2_json(cfg: ToyConfig, videos: list[ToyVideo]) -> dict[str, Any]:
    labels = {name: str(i) for i, name in enumerate(cfg.class_names)}
    files: dict[str, Any] = {"labels": labels}
    for split in SPLITS:
        entries = []
        for v in (v for v in videos if v.split == split):
            if split == "test":
                entries.append({"id": v.id})
                continue
            shape, direction = cfg.class_of(v.label)
            entries.append(
                {
                    "id": v.id,
                    "label": f"{shape} moving {direction}",
                    "template": template_for(shape, direction),
                    "placeholders": [shape],
                }
            )
        files[split] = entries
    return files


def read_toy_config(download: Path) -> ToyConfig:
    """The settings a toy download was generated with (its toy.json)."""
    path = download / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GlitrError(f"{path}: cannot read the toy settings ({e}); make it with `glitr prepare-data toy`") from e
    if not isinstance(settings, dict) or settings.pop("generator", None) != GENERATOR_VERSION:
        raise GlitrError(f"{path}: not a toy download of generator version {GENERATOR_VERSION}; regenerate it")
    return ToyConfig.from_options(**settings)


# the option that sets each recorded toy setting, for messages
TOY_FLAGS = {
    "generator": "the toy generator version",
    "seed": "--seed",
    "num_train": "--toy-train",
    "num_val": "--toy-val",
    "num_test": "--toy-test",
    "num_frames": "--toy-frames",
    "size": "--toy-size",
    "shapes": "--toy-shapes",
    "directions": "--toy-directions",
    "distractors": "--toy-distractors",
}


def toy_settings(cfg: ToyConfig) -> dict[str, Any]:
    """What a toy download records in its toy.json (JSON types only)."""
    settings = {"generator": GENERATOR_VERSION, **asdict(cfg)}
    settings["shapes"], settings["directions"] = list(cfg.shapes), list(cfg.directions)
    return settings


def _show(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


def read_record(record: Path, remedy: str) -> dict[str, Any] | None:
    """The settings a preparation recorded in `record`, None when there is no such file; a file that is
    no record is an error that says `remedy`."""
    if not record.is_file():
        return None
    try:
        old = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):
        raise GlitrError(f"{record} is not a settings record: {remedy}")
    return old


def settings_conflict(old: dict[str, Any], new: dict[str, Any], flags: dict[str, str]) -> tuple[str, str, str] | None:
    """The first setting in which recorded settings `old` differ from `new`: (the option that sets
    it, its recorded value, its value now); None when they agree."""
    for key, value in new.items():
        if old.get(key) != value:
            recorded = _show(old[key]) if key in old else "not recorded"
            return (flags.get(key, key), recorded, _show(value))
    extra = sorted(set(old) - set(new))
    return (flags.get(extra[0], extra[0]), _show(old[extra[0]]), "not set") if extra else None


def generate_toy(download: Path, cfg: ToyConfig, workers: int = 1, progress: bool = True) -> int:
    """Write the toy download in the SSv2 layout under `download`; returns videos generated.

    Resumable: existing videos are kept. A `toy.json` records the settings; a folder made
    with other settings is an error rather than a silent mix."""
    settings = toy_settings(cfg)
    record = download / SETTINGS_FILE
    old = read_record(record, f"remove {download} or choose another --out")
    if old is not None:
        conflict = settings_conflict(old, settings, TOY_FLAGS)
        if conflict is not None:
            flag, there, now = conflict
            raise GlitrError(
                f"{download} holds a toy download made with other settings ({flag} {there} there, {now} now): "
                f"remove that folder or choose another --out"
            )
    else:
        download.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, json.dumps(settings, indent=1) + "\n")
    videos = plan_videos(cfg)
    for key, data in _ssv2_json(cfg, videos).items():
        atomic_write_text(download / f"something-something-v2-{key}.json", json.dumps(data, indent=1) + "\n")
    vdir = download / VIDEO_DIR
    vdir.mkdir(exist_ok=True)
    tasks = [(cfg, v, str(vdir / f"{v.id}.webm")) for v in videos if not (vdir / f"{v.id}.webm").is_file()]
    n = 0
    for _ in map_tasks(_make_video, tasks, workers, progress, "toy: generating videos"):
        n += 1
    return n
