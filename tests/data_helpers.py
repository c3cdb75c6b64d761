"""Helpers for the data tests: tiny real videos (PyAV-encoded), JPEG folders and downloads
in the official SSv2 and Jester layouts. Nothing is mocked: every file is a real file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from glitr_cli.data.video import encode_video as glitr_encode_video


def make_frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth, moving test frames: uint8 (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 2 * np.pi, 3)
    frames = []
    for t in range(n):
        chans = [127 + 100 * np.sin(xx / 7.0 + yy / 11.0 + base[c] + 0.4 * t) for c in range(3)]
        frames.append(np.stack(chans, -1))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def encode_video(path: Path, frames: np.ndarray, codec: str = "vp9", fps: int = 12) -> Path:
    """Encode frames (T, H, W, 3) with glitr's own writer (`glitr_cli.data.video.CODECS`), fast."""
    return glitr_encode_video(path, frames, codec, fps, options={"preset": "ultrafast"} if "h264" in codec else None)


def truncate(path: Path, fraction: float) -> None:
    """Cut a file to `fraction` of its bytes, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def write_jpeg(path: Path, frame: np.ndarray, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path, quality=quality)


SSV2_CLASSES = {  # index -> name; deliberately not in file order
    2: "Pushing something from left to right",
    0: "Holding something next to something",
    1: "Moving something up",
}
SSV2_TEMPLATES = {
    "Pushing something from left to right": "Pushing [something] from left to right",
    "Holding something next to something": "Holding [something] next to [something]",
    "Moving something up": "Moving [something] up",
}


def make_ssv2_download(
    src: Path,
    videos: list[tuple[str, str, int, str, tuple[int, int], int]],
    layout: str = "old",
    in_subdir: bool = True,
) -> None:
    """Write an SSv2-layout download: `videos` are (id, split, class index, codec,
    (height, width), frames); split is train/validation/test. `layout` "old" uses
    something-something-v2-*.json, "new" labels/*.json. The video files are named
    <id>.webm whatever their codec (the preparation decodes by content)."""
    src.mkdir(parents=True, exist_ok=True)
    labels = {SSV2_CLASSES[i]: str(i) for i in (2, 0, 1)}
    splits: dict[str, list] = {"train": [], "validation": [], "test": []}
    vdir = src / "20bn-something-something-v2" if in_subdir else src
    for k, (vid, split, label, codec, (h, w), n) in enumerate(videos):
        name = SSV2_CLASSES[label]
        if split == "test":
            splits["test"].append({"id": vid})
        else:
            splits[split].append(
                {"id": vid, "label": name.lower(), "template": SSV2_TEMPLATES[name], "placeholders": []}
            )
        encode_video(vdir / f"{vid}.webm", make_frames(n, h, w, seed=k), codec)
    files = {"labels": labels, **splits}
    for key, data in files.items():
        path = src / f"something-something-v2-{key}.json" if layout == "old" else src / "labels" / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))


JESTER_LABELS = ["Swiping Left", "Doing other things", "Zooming In With Two Fingers", "No gesture"]


def make_jester_download(
    src: Path, videos: list[tuple[str, str, str | None, int]], size: tuple[int, int] = (40, 56)
) -> Path:
    """Write a Jester-layout download: `videos` are (id, split, class name or None for
    test, frames); split is train/validation/test. Frames are real JPEGs 00001.jpg ...
    in src/20bn-jester-v1/<id>/. Returns the frame folder."""
    frames_dir = src / "20bn-jester-v1"
    rows: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for k, (vid, split, label, n) in enumerate(videos):
        for i, f in enumerate(make_frames(n, *size, seed=k), start=1):
            write_jpeg(frames_dir / vid / f"{i:05d}.jpg", f)
        rows[split].append(vid if label is None else f"{vid};{label}")
    (src / "jester-v1-labels.csv").write_text("".join(c + "\n" for c in JESTER_LABELS))
    for split, lines in rows.items():
        (src / f"jester-v1-{split}.csv").write_text("".join(line + "\n" for line in lines))
    return frames_dir


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> content), for comparing two outputs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
