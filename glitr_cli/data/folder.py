"""`glitr prepare-data folder`: your own clips (video files or frame folders, in class folders or listed
in a CSV) to the TSM frame folders the dataset class reads; layouts, splits and clip ids:
docs/own-videos.md. The clips then take the SSv2 preparation's path (`extract_all`, `write_outputs`);
`sources.txt` maps each id back to its clip (`<id>\\t<split>\\t<path>`). This module imports no torch.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from csv import reader as csv_reader
from dataclasses import dataclass
from pathlib import Path

from glitr_cli.data.formats import DatasetInfo, SplitEntry, read_text
from glitr_cli.data.prepare import (
    NOT_VIDEO_SUFFIXES,
    PrepareSummary,
    checked_options,
    extract_all,
    prepare_settings,
    record_settings,
    write_outputs,
)
from glitr_cli.data.video import IMAGE_SUFFIXES
from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_text
from glitr_cli.paths import data_root

SPLIT_NAMES = ("train", "val", "test")
SOURCES_FILE = "sources.txt"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Clip:
    """One clip of the user's folder: where it is, its class name and split (None: not given)."""

    path: Path
    rel: str  # the path relative to src, with `/`
    label: str
    split: str | None
    line: int = 0  # the CSV line, 0 for the folder layout

    @property
    def id(self) -> str:
        return clip_id(self.rel)


def clip_id(rel: str) -> str:
    """The id of the clip at `rel` (relative to src, `/`-separated): see the module docstring."""
    parts = [p for p in rel.split("/") if p]
    joined = "__".join(parts)
    safe = _SAFE.sub("_", joined)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != joined or any("__" in p for p in parts):  # `a__b` must not meet `a/b`
        safe += "-" + hashlib.sha1(rel.encode("utf-8")).hexdigest()[:8]
    return safe


def _visible(entries: list[os.DirEntry]) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _scandir(path: Path) -> list[os.DirEntry]:
    try:
        return _visible(list(os.scandir(path)))
    except OSError as e:
        raise GlitrError(f"{path}: cannot list the folder ({e.strerror})") from None


def find_clips(folder: Path) -> list[Path]:
    """Every clip under `folder`, recursively, sorted: its video files, and each folder holding
    images as one clip (a frame folder, not searched further). Hidden entries and files with a
    non-video suffix are left out."""
    entries = _scandir(folder)
    if any(e.is_file() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES for e in entries):
        return [folder]
    clips: list[Path] = []
    for e in entries:
        if e.is_dir():
            clips += find_clips(Path(e.path))
        elif e.is_file() and Path(e.name).suffix.lower() not in NOT_VIDEO_SUFFIXES:
            clips.append(Path(e.path))
    return clips


def _class_clips(class_dir: Path, src: Path, split: str | None) -> list[Clip]:
    """The clips of one class folder: its video files and frame folders."""
    clips = []
    for e in _scandir(class_dir):
        p = Path(e.path)
        if e.is_file():
            suffix = p.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                raise GlitrError(
                    f"{p}: an image directly in the class folder {class_dir}; put each clip's frames "
                    f"in a folder of its own ({class_dir}/<clip>/000001.jpg ...)"
                )
            if suffix in NOT_VIDEO_SUFFIXES:
                continue
        elif not e.is_dir():
            continue
        clips.append(Clip(p, p.relative_to(src).as_posix(), class_dir.name, split))
    if not clips:
        raise GlitrError(f"{class_dir}: class {class_dir.name!r} has no videos (video files or folders of frames)")
    return clips


def _class_folders(folder: Path, src: Path, split: str | None) -> list[Clip]:
    clips = []
    for e in _scandir(folder):
        p = Path(e.path)
        if e.is_dir():
            clips += _class_clips(p, src, split)
        elif p.suffix.lower() not in NOT_VIDEO_SUFFIXES:
            raise GlitrError(f"{p}: a clip outside a class folder; put it in {folder}/<class>/")
    return clips


def scan_class_folders(src: Path) -> list[Clip]:
    """The clips of `src/<class>/<clip>` or `src/{train,val,test}/<class>/<clip>`, sorted by path."""
    if not src.is_dir():
        raise GlitrError(f"--src {src}: no such folder (expected {src}/<class>/<video>, or pass --csv FILE)")
    tops = [e for e in _scandir(src) if e.is_dir()]
    if not any(e.name in SPLIT_NAMES for e in tops):
        clips = _class_folders(src, src, None)
        if not clips:
            raise GlitrError(f"--src {src}: no class folders; expected {src}/<class>/<video>, or pass --csv FILE")
        return clips
    for e in _scandir(src):  # split layout: nothing but split folders
        if e.name not in SPLIT_NAMES and (e.is_dir() or Path(e.name).suffix.lower() not in NOT_VIDEO_SUFFIXES):
            raise GlitrError(
                f"{e.path}: unknown split name {e.name!r}; with split folders, {src} holds only train/, val/ and test/"
            )
    return [c for e in tops for c in _class_folders(Path(e.path), src, e.name)]


def read_clip_csv(path: Path, src: Path) -> list[Clip]:
    """The clips a CSV of `path,label[,split]` lines lists, paths relative to `src`, in file order."""
    clips: list[Clip] = []
    seen: dict[str, int] = {}
    first = True
    for line, raw in enumerate(read_text(path, "CSV listing (--csv)").splitlines(), start=1):
        if not raw.strip():
            continue
        fields = [f.strip() for f in next(csv_reader([raw]))]
        if first and fields[0].lower() == "path":  # the header line
            first = False
            continue
        first = False
        if len(fields) not in (2, 3) or not fields[0] or not fields[1]:
            raise GlitrError(f"{path}:{line}: expected path,label[,split], got {raw.strip()!r}")
        split = fields[2] if len(fields) == 3 and fields[2] else None
        if split is not None and split not in SPLIT_NAMES:
            raise GlitrError(f"{path}:{line}: unknown split name {split!r}; expected train, val, test or nothing")
        rel = os.path.normpath(fields[0].replace("\\", "/")).replace(os.sep, "/")
        clip_path = src / rel
        if not clip_path.exists():
            raise GlitrError(f"{path}:{line}: {clip_path} not found (paths are relative to --src {src})")
        key = os.path.normcase(os.path.realpath(clip_path))
        if key in seen:
            raise GlitrError(f"{path}:{line}: {fields[0]} is already listed on line {seen[key]}")
        seen[key] = line
        clips.append(Clip(clip_path, rel, fields[1], split, line))
    if not clips:
        raise GlitrError(f"{path}: lists no clips; expected path,label[,split] lines")
    return clips


def class_names_of(clips: list[Clip], source: str) -> list[str]:
    """Sorted class names, or "0".."N-1" when every label is an integer index (then every index needs a clip)."""
    labels = {c.label for c in clips}
    if not all(re.fullmatch(r"\d+", label) for label in labels):
        return sorted(labels)
    indices = {int(label) for label in labels}
    missing = sorted(set(range(max(indices) + 1)) - indices)
    if missing:
        raise GlitrError(
            f"{source}: class {missing[0]} has no videos (integer labels must be the classes 0..{max(indices)})"
        )
    return [str(i) for i in range(max(indices) + 1)]


def assign_splits(clips: list[Clip], val_fraction: float, seed: int) -> dict[str, list[Clip]]:
    """Clips by split. Without any `val` clip, `val_fraction` of each class's training clips (at
    least one when the class has two or more, never all) become the validation split."""
    splits: dict[str, list[Clip]] = {s: [c for c in clips if (c.split or "train") == s] for s in SPLIT_NAMES}
    if splits["val"]:
        return splits
    by_class: dict[str, list[Clip]] = {}
    for c in splits["train"]:
        by_class.setdefault(c.label, []).append(c)
    chosen: set[str] = set()
    for label, members in sorted(by_class.items()):
        n = len(members)
        k = min(max(round(n * val_fraction), 1 if n >= 2 else 0), n - 1)
        ordered = sorted(members, key=lambda c: c.rel)
        random.Random(f"{seed}:{label}").shuffle(ordered)  # str seeds hash the same in every process
        chosen.update(c.rel for c in ordered[:k])
    splits["val"] = [c for c in splits["train"] if c.rel in chosen]
    splits["train"] = [c for c in splits["train"] if c.rel not in chosen]
    return splits


def prepare_folder(
    src: Path,
    out: Path | None = None,
    *,
    root: Path | None = None,
    workers: int = 0,
    csv: Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    short_side: int | None = 256,
    quality: int = 95,
    progress: bool = True,
) -> PrepareSummary:
    """Prepare the clips under `src` (class folders, or the `csv` listing) into `out`, by default
    `<root>/<name of src>` (`root`: the data root), so `src` clips/mine gives the dataset `mine`; see the
    module docstring. Frames are resized to short side `short_side` (None or 0 keeps them)."""
    t0 = time.perf_counter()
    workers, short_side = checked_options(workers, short_side, quality)
    out = out if out is not None else (root if root is not None else data_root()) / src.resolve().name
    if not 0 < val_fraction < 1:
        raise GlitrError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    if csv is not None:
        if not src.is_dir():
            raise GlitrError(f"--src {src}: no such folder (the CSV's paths are relative to it)")
        clips = read_clip_csv(csv, src)
        class_names = class_names_of(clips, str(csv))
    else:
        clips = scan_class_folders(src)
        class_names = sorted({c.label for c in clips})
    index = {name: i for i, name in enumerate(class_names)}
    splits = assign_splits(clips, val_fraction, seed)
    for split in ("train", "val"):
        if not splits[split]:
            raise GlitrError(
                f"{csv or src}: no {split} clips"
                + ("; every class has a single clip, so none can be set aside for validation" if split == "val" else "")
            )

    ordered = [c for s in SPLIT_NAMES for c in splits[s]]
    assert len({c.id for c in ordered}) == len(ordered), "distinct paths have distinct ids (clip_id)"
    record_settings(out, prepare_settings("folder", short_side, quality))
    atomic_write_text(out / SOURCES_FILE, "".join(f"{c.id}\t{s}\t{c.rel}\n" for s in SPLIT_NAMES for c in splits[s]))
    jobs = [(c.id, c.path) for c in ordered]
    counts, failed, done, skipped = extract_all("folder", out, jobs, workers, short_side, quality, progress)
    entries = {s: [SplitEntry(c.id, index[c.label], c.line) for c in splits[s]] for s in SPLIT_NAMES}
    listed = write_outputs(out, class_names, entries, counts, failed, DatasetInfo("folder"))
    return PrepareSummary("folder", out, done, skipped, failed, listed, time.perf_counter() - t0)
