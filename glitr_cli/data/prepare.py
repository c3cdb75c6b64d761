"""`glitr prepare-data`: official downloads (and the generated toy set) to TSM frame folders
(docs/training.md#prepare-the-data). Each video is decoded into `<out>/frames/.partial-<id>/` and
renamed to `<out>/frames/<id>/` only when complete, so a rerun skips finished videos and redoes
half-written ones; a video that cannot be decoded goes to `failed.txt` and does not stop the others.
This module imports no torch, so worker processes start quickly.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from glitr_cli.data.formats import (
    DatasetInfo,
    SplitEntry,
    VideoRecord,
    parse_jester_labels,
    parse_jester_split,
    parse_ssv2_labels,
    parse_ssv2_split,
    write_categories,
    write_dataset_info,
    write_list,
)
from glitr_cli.data.parallel import default_workers, map_tasks
from glitr_cli.data.toy import TOY_FLAGS, ToyConfig, generate_toy, read_record, settings_conflict, toy_settings
from glitr_cli.data.video import iter_clip_frames
from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_json, atomic_write_text
from glitr_cli.paths import data_root

SPLIT_LISTS = {"train": "train_videofolder.txt", "val": "val_videofolder.txt", "test": "test_videofolder.txt"}
SSV2_VIDEO_DIR = "20bn-something-something-v2"
JESTER_FRAME_DIR = "20bn-jester-v1"
PARTIAL_PREFIX = ".partial-"
SETTINGS_FILE = "glitr_prepare.json"  # the settings the frames were made with, written before the first frame
NOT_VIDEO_SUFFIXES = {".json", ".csv", ".txt", ".md", ".tar", ".gz", ".zip"}


@dataclass
class PrepareSummary:
    """What one preparation did. `failed` holds (video id, reason) pairs."""

    name: str
    out: Path
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    listed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no video failed."""
        return not self.failed

    def describe(self, max_failures: int = 5) -> str:
        """A summary line (done / skipped / failed, videos per list file, time), then the
        first `max_failures` failures, one per line."""
        lists = ", ".join(f"{k} {v}" for k, v in self.listed.items())
        failed = f"{len(self.failed)} failed"
        if self.failed:
            failed += f" (listed in {self.out / 'failed.txt'})"
        lines = [
            f"{self.name} prepared in {self.out}: {self.done} done, {self.skipped} skipped (already prepared), "
            f"{failed}; videos listed: {lists or 'none'}; {self.seconds:.1f} s"
        ]
        lines += [f"  failed {vid}: {reason}" for vid, reason in self.failed[:max_failures]]
        if len(self.failed) > max_failures:
            lines.append(f"  ... and {len(self.failed) - max_failures} more")
        return "\n".join(lines)


def _count_jpegs(folder: Path) -> int:
    try:
        return sum(1 for e in os.scandir(folder) if e.name.lower().endswith(".jpg"))
    except OSError:
        return 0


def _extract_video(task: tuple[str, str, str, int | None, int]) -> tuple[str, int, str | None]:
    """Worker: decode one video (a file, or a folder of images) into `<frames_root>/<id>/%06d.jpg`
    via a partial folder. Returns (id, frames written, failure reason or None)."""
    vid, src, frames_root, short_side, quality = task
    root = Path(frames_root)
    tmp = root / f"{PARTIAL_PREFIX}{vid}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    n = 0
    try:
        for n, arr in enumerate(iter_clip_frames(src, short_side), start=1):
            Image.fromarray(arr).save(tmp / f"{n:06d}.jpg", quality=quality)
    except Exception as e:  # any bad video is reported, never allowed to stop the others
        shutil.rmtree(tmp, ignore_errors=True)
        reason = str(e) if isinstance(e, GlitrError) else f"{src}: {type(e).__name__}: {e}"
        return vid, 0, " ".join(reason.split())
    os.rename(tmp, root / vid)
    return vid, n, None


def _check_frame_folder(task: tuple[str, str, str]) -> tuple[str, int, str | None]:
    """Worker: count the frames of one Jester folder and check that it starts at frame 1."""
    vid, folder, template = task
    p = Path(folder)
    if not p.is_dir():
        return vid, 0, f"{p}: frame folder missing"
    n = _count_jpegs(p)
    if n == 0:
        return vid, 0, f"{p}: no JPEG frames"
    if not (p / (template % 1)).is_file():
        return vid, 0, f"{p}: frames are not numbered from {template % 1}"
    return vid, n, None


# ----------------------------------------------------------------------------- options


def checked_options(workers: int, short_side: int | None, quality: int) -> tuple[int, int | None]:
    """The worker count (0: `default_workers()`) and short side (0 or None: native size) to use, after
    checking them and the JPEG quality."""
    if workers < 0:
        raise GlitrError(f"--workers must be 0 (automatic) or more, got {workers}")
    if not 1 <= quality <= 100:
        raise GlitrError(f"--quality must lie in 1..100, got {quality}")
    if short_side and short_side < 8:
        raise GlitrError(f"--short-side must be at least 8 pixels, got {short_side}")
    return workers or default_workers(), short_side or None


def default_paths(name: str, src: Path | None, out: Path | None, root: Path | None) -> tuple[Path, Path]:
    """(src, out) with their defaults: `<root>/<name>/download` and `<root>/<name>`, `root` the data root;
    a toy download goes into `<out>/download`."""
    base = (root if root is not None else data_root()) / name
    out = out if out is not None else base
    return (src if src is not None else out / "download" if name == "toy" else base / "download"), out


# ----------------------------------------------------------------------------- settings


def prepare_settings(
    name: str, short_side: int | None, quality: int | None, toy: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What changes the prepared frames: the dataset, the short side (0: native size), the JPEG quality
    (None where no frame is written) and a toy set's generator settings."""
    return {"dataset": name, "short_side": short_side or 0, "quality": quality, **({"toy": toy} if toy else {})}


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to continue `out` when its recorded settings differ from `settings` (one line naming the
    option and both values); a folder without a record (new, or prepared before records) passes."""
    record = out / SETTINGS_FILE
    old = read_record(record, f"prepare into another --out, or remove {out}")
    if old is None:
        return

    def flat(d: dict[str, Any]) -> dict[str, Any]:  # the toy settings beside the others, as the options set them
        toy = d.get("toy") if isinstance(d.get("toy"), dict) else {}
        return {**{k: v for k, v in d.items() if k != "toy"}, **toy}

    flags = {"dataset": "the dataset", "short_side": "--short-side", "quality": "--quality", **TOY_FLAGS}
    conflict = settings_conflict(flat(old), flat(settings), flags)
    if conflict is not None:
        flag, there, now = conflict
        raise GlitrError(
            f"{out} was prepared with {flag} {there}, this run asks for {now}: rerun with {flag} {there} to "
            f"resume it, or prepare into another --out (see {record})"
        )


def record_settings(out: Path, settings: dict[str, Any]) -> None:
    """Check `out` against `settings`, then record them there before any frame is written."""
    _check_settings(out, settings)
    atomic_write_json(out / SETTINGS_FILE, settings)


# ----------------------------------------------------------------------------- outputs


def write_outputs(
    out: Path,
    class_names: list[str],
    splits: dict[str, list[SplitEntry]],
    counts: dict[str, int],
    failed: list[tuple[str, str]],
    info: DatasetInfo,
) -> dict[str, int]:
    """Write the list files, `category.txt`, `failed.txt` (`failed` sorted in place into the order of the
    split files, whatever order the workers finished in) and `glitr_dataset.json` last."""
    order = {vid: i for i, vid in enumerate(dict.fromkeys(e.id for entries in splits.values() for e in entries))}
    failed.sort(key=lambda f: order[f[0]])
    out.mkdir(parents=True, exist_ok=True)
    failed_path = out / "failed.txt"
    if failed:
        atomic_write_text(failed_path, "".join(f"{vid}\t{reason}\n" for vid, reason in failed))
    elif failed_path.exists():
        failed_path.unlink()
    write_categories(out / "category.txt", class_names)
    listed = {}
    for split, entries in splits.items():
        records = [VideoRecord(e.id, counts[e.id], e.label) for e in entries if e.id in counts]
        write_list(out / SPLIT_LISTS[split], records)
        listed[split] = len(records)
    write_dataset_info(out, info)
    return listed


def _frames_info_dir(frames: Path, out: Path) -> str:
    """Store the frames folder relative to the dataset root when inside it, else absolute."""
    try:
        return frames.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(frames.resolve())


def extract_all(
    name: str,
    out: Path,
    jobs: list[tuple[str, Path]],
    workers: int,
    short_side: int | None,
    quality: int,
    progress: bool,
) -> tuple[dict[str, int], list[tuple[str, str]], int, int]:
    """Decode every (id, video path) job not yet finished; returns counts, failures, done, skipped."""
    frames = out / "frames"
    frames.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    todo = []
    for vid, path in jobs:
        final = frames / vid
        if final.is_dir():
            counts[vid] = _count_jpegs(final)
        else:
            todo.append((vid, str(path), str(frames), short_side, quality))
    skipped = len(counts)
    failed: list[tuple[str, str]] = []
    for vid, n, reason in map_tasks(_extract_video, todo, workers, progress, f"{name}: decoding videos"):
        if reason is None:
            counts[vid] = n
        else:
            failed.append((vid, reason))
    return counts, failed, len(todo) - len(failed), skipped


# ----------------------------------------------------------------------------- SSv2


def _ssv2_label_files(src: Path) -> dict[str, Path | None]:
    files: dict[str, Path | None] = {}
    for key in ("labels", "train", "validation", "test"):
        old = src / f"something-something-v2-{key}.json"
        new = src / "labels" / f"{key}.json"
        files[key] = old if old.is_file() else new if new.is_file() else None
    return files


def _ssv2_missing(src: Path, what: str) -> GlitrError:
    return GlitrError(
        f"no Something-Something-V2 download in {src} ({what}): put the label files "
        f"something-something-v2-{{labels,train,validation,test}}.json "
        f"(or labels/{{labels,train,validation,test}}.json) in {src}/ "
        f"and the videos <id>.webm in {src / SSV2_VIDEO_DIR}/ (or directly in {src}/), or pass --src DIR"
    )


def _index_videos(dirs: Iterable[Path]) -> dict[str, Path]:
    """Map video id (file name up to its first dot) to file, preferring .webm; the file is
    later decoded by its content, so any extension works."""
    found: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for e in sorted(os.scandir(d), key=lambda e: e.name):
            if not e.is_file() or e.name.startswith("."):
                continue
            p = Path(e.path)
            if p.suffix.lower() in NOT_VIDEO_SUFFIXES:
                continue
            vid = e.name.split(".", 1)[0]
            if vid not in found or (p.suffix.lower() == ".webm" and found[vid].suffix.lower() != ".webm"):
                found[vid] = p
    return found


def prepare_ssv2(
    src: Path | None = None,
    out: Path | None = None,
    *,
    root: Path | None = None,
    workers: int = 0,
    short_side: int | None = 256,
    quality: int = 95,
    videos: Path | None = None,
    progress: bool = True,
    name: str = "ssv2",
    toy: dict[str, Any] | None = None,
) -> PrepareSummary:
    """Prepare Something-Something-V2 (or anything in its layout, such as `toy`) from `src`
    (docs/training.md#download-the-datasets; the videos in `videos` if given), frames at short side
    `short_side` (None: native size) as JPEG of `quality`; `toy` is recorded with the settings."""
    t0 = time.perf_counter()
    workers, short_side = checked_options(workers, short_side, quality)
    src, out = default_paths(name, src, out, root)
    files = _ssv2_label_files(src)
    missing = [k for k in ("labels", "train", "validation") if files[k] is None]
    if missing:
        raise _ssv2_missing(src, f"missing {', '.join(missing)} label file")
    class_names = parse_ssv2_labels(files["labels"])  # type: ignore[arg-type]
    class_index = {n: i for i, n in enumerate(class_names)}
    splits = {
        "train": parse_ssv2_split(files["train"], class_index),  # type: ignore[arg-type]
        "val": parse_ssv2_split(files["validation"], class_index),  # type: ignore[arg-type]
    }
    if files["test"] is not None:
        splits["test"] = parse_ssv2_split(files["test"], None)
    video_dirs = [videos] if videos is not None else [src / SSV2_VIDEO_DIR, src]
    index = _index_videos(video_dirs)
    if not index:
        where = videos if videos is not None else src / SSV2_VIDEO_DIR
        raise _ssv2_missing(src, f"no video files in {where}")
    ids = list(dict.fromkeys(e.id for entries in splits.values() for e in entries))
    jobs = [(vid, index[vid]) for vid in ids if vid in index]
    where = " or ".join(str(d) for d in video_dirs)
    failed = [(vid, f"no video file {vid}.* in {where}") for vid in ids if vid not in index]
    record_settings(out, prepare_settings(name, short_side, quality, toy))
    counts, decode_failed, done, skipped = extract_all(name, out, jobs, workers, short_side, quality, progress)
    failed += decode_failed
    listed = write_outputs(out, class_names, splits, counts, failed, DatasetInfo(name))
    return PrepareSummary(name, out, done, skipped, failed, listed, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- Jester


def _jester_missing(src: Path, what: str) -> GlitrError:
    return GlitrError(
        f"no Jester download in {src} ({what}): put jester-v1-{{labels,train,validation,test}}.csv in {src}/ "
        f"and the frame folders <id>/00001.jpg in {src / JESTER_FRAME_DIR}/ (or pass --frames DIR), "
        f"or pass --src DIR"
    )


def prepare_jester(
    src: Path | None = None,
    out: Path | None = None,
    *,
    root: Path | None = None,
    workers: int = 0,
    frames: Path | None = None,
    short_side: int | None = None,
    quality: int = 95,
    progress: bool = True,
) -> PrepareSummary:
    """Prepare 20BN-Jester: list files counting the frames present in each official folder.

    Frames stay where they are (`src/20bn-jester-v1/<id>/%05d.jpg`, or `frames`) unless
    `short_side` is given, in which case they are copied resized to `<out>/frames/<id>/`."""
    t0 = time.perf_counter()
    workers, short_side = checked_options(workers, short_side, quality)
    src, out = default_paths("jester", src, out, root)
    csv = {k: src / f"jester-v1-{k}.csv" for k in ("labels", "train", "validation", "test")}
    missing = [p.name for k, p in csv.items() if k != "test" and not p.is_file()]
    if missing:
        raise _jester_missing(src, f"missing {', '.join(missing)}")
    frame_dir = frames if frames is not None else src / JESTER_FRAME_DIR
    if not frame_dir.is_dir():
        raise _jester_missing(src, f"no frame folder {frame_dir}")
    class_names = parse_jester_labels(csv["labels"])
    class_index = {n: i for i, n in enumerate(class_names)}
    splits = {
        "train": parse_jester_split(csv["train"], class_index),
        "val": parse_jester_split(csv["validation"], class_index),
    }
    if csv["test"].is_file():
        splits["test"] = parse_jester_split(csv["test"], None)
    template = "%05d.jpg"
    record_settings(out, prepare_settings("jester", short_side, quality if short_side else None))
    ids = list(dict.fromkeys(e.id for entries in splits.values() for e in entries))
    if short_side is not None:  # copied resized into <out>/frames/, like the frames of a video
        jobs = [(vid, frame_dir / vid) for vid in ids]
        counts, failed, done, skipped = extract_all("jester", out, jobs, workers, short_side, quality, progress)
        info = DatasetInfo("jester")
    else:
        counts, failed, skipped = {}, [], 0
        checks = [(vid, str(frame_dir / vid), template) for vid in ids]
        for vid, n, reason in map_tasks(
            _check_frame_folder, checks, workers, progress, "jester: counting frames", threads=True
        ):
            if reason is None:
                counts[vid] = n
            else:
                failed.append((vid, reason))
        done = len(counts)
        info = DatasetInfo("jester", _frames_info_dir(frame_dir, out), template)
    listed = write_outputs(out, class_names, splits, counts, failed, info)
    return PrepareSummary("jester", out, done, skipped, failed, listed, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- toy


def prepare_toy(
    out: Path | None = None,
    src: Path | None = None,
    *,
    root: Path | None = None,
    workers: int = 0,
    short_side: int | None = None,
    quality: int = 95,
    progress: bool = True,
    **toy_options: Any,
) -> PrepareSummary:
    """Generate the toy dataset's raw videos and SSv2 JSON files in `src` (default `<out>/download`), then
    run the SSv2 preparation on them into `out` (frames at their native size unless `short_side`).
    `toy_options` are `ToyConfig` fields (seed, num_train, num_val, num_test, num_frames, size, shapes,
    directions, distractors)."""
    t0 = time.perf_counter()
    workers, short_side = checked_options(workers, short_side, quality)
    src, out = default_paths("toy", src, out, root)
    config = ToyConfig.from_options(**toy_options)
    settings = toy_settings(config)
    _check_settings(out, prepare_settings("toy", short_side, quality, settings))  # before the download is touched
    generate_toy(src, config, workers=workers, progress=progress)
    summary = prepare_ssv2(
        src, out, workers=workers, short_side=short_side, quality=quality, progress=progress, name="toy", toy=settings
    )
    summary.seconds = time.perf_counter() - t0
    return summary
