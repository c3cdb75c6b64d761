"""Label and list file formats: SSv2 JSON, Jester CSV, TSM list files and `category.txt`, as the official
downloads and the TSM generators write them (docs/training.md#download-the-datasets). Every parser
raises a `GlitrError` naming the file, the line and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_text

DATASETS = ("ssv2", "jester", "toy")  # what `glitr prepare-data` knows by name
_DECODER = json.JSONDecoder()
_SPACE = json.decoder.WHITESPACE  # the json module's own pattern of the whitespace between values


@dataclass(frozen=True)
class VideoRecord:
    """One line of a TSM list file: a video id, its frame count and its class (None for test)."""

    id: str
    num_frames: int
    label: int | None


@dataclass(frozen=True)
class SplitEntry:
    """One video of an official split file: its id, its class index (None for test) and source line."""

    id: str
    label: int | None
    line: int


# ----------------------------------------------------------------------------- helpers


def read_text(path: Path, what: str) -> str:
    """The text of a UTF-8 file (a byte-order mark left by some editors dropped); a failure names `what`."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise GlitrError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as e:
        raise GlitrError(
            f"{path}: expected a UTF-8 text file ({what}), got undecodable bytes at offset {e.start}"
        ) from None
    except OSError as e:
        raise GlitrError(f"{path}: cannot read {what}: {e.strerror}") from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_error(path: Path, e: json.JSONDecodeError, what: str) -> GlitrError:
    return GlitrError(f"{path}:{e.lineno}: malformed JSON in {what} (column {e.colno}: {e.msg})")


def _json_array_items(path: Path, what: str) -> list[tuple[int, Any]]:
    """Parse a top-level JSON array item by item (`raw_decode`), returning (line, item) pairs so that
    errors can name the line of the item."""
    text = read_text(path, what)
    pos = _SPACE.match(text).end()
    if not text.startswith("[", pos):
        raise GlitrError(f"{path}:{_line_of(text, pos)}: expected a JSON list of videos ({what})")
    pos += 1
    items: list[tuple[int, Any]] = []
    while items or not text.startswith("]", _SPACE.match(text, pos).end()):
        pos = _SPACE.match(text, pos).end()
        try:
            item, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _json_error(path, e, what) from None
        items.append((_line_of(text, pos), item))
        pos = _SPACE.match(text, end).end()
        if not text.startswith(",", pos):
            break
        pos += 1
    pos = _SPACE.match(text, pos).end()
    if not text.startswith("]", pos):
        raise GlitrError(f"{path}:{_line_of(text, pos)}: malformed JSON in {what} (expected ',' or ']')")
    if text[pos + 1 :].strip():
        raise GlitrError(f"{path}:{_line_of(text, pos + 1)}: malformed JSON in {what} (extra data after the list)")
    return items


# ----------------------------------------------------------------------------- SSv2


def template_to_class(template: str) -> str:
    """The SSv2 class of a template: the template with its square brackets removed."""
    return template.replace("[", "").replace("]", "")


def parse_ssv2_labels(path: Path) -> list[str]:
    """Read an SSv2 labels JSON (class name -> index) into the class names in index order."""
    text = read_text(path, "SSv2 labels file")
    try:
        pairs = json.loads(text, object_pairs_hook=lambda kv: kv)  # [(name, index), ...] in file order
    except json.JSONDecodeError as e:
        raise _json_error(path, e, "SSv2 labels file") from None
    if not isinstance(pairs, list) or (pairs and not isinstance(pairs[0], tuple)):
        raise GlitrError(f"{path}:1: expected a JSON object mapping class names to indices, got {type(pairs).__name__}")

    def line_of_key(key: str) -> int:
        pos = text.find(json.dumps(key))
        return _line_of(text, pos) if pos >= 0 else 1

    by_index: dict[int, str] = {}
    for name, value in pairs:
        line = line_of_key(name)
        try:
            idx = int(value)
            if isinstance(value, bool) or (isinstance(value, float) and value != idx):
                raise ValueError
        except (TypeError, ValueError):
            raise GlitrError(f"{path}:{line}: class {name!r} has index {value!r}, expected an integer") from None
        if not name.strip():
            raise GlitrError(f"{path}:{line}: empty class name")
        if idx in by_index:
            raise GlitrError(f"{path}:{line}: classes {by_index[idx]!r} and {name!r} share the index {idx}")
        by_index[idx] = name
    if not by_index:
        raise GlitrError(f"{path}:1: the labels file lists no classes")
    expected = set(range(len(by_index)))
    if set(by_index) != expected:
        missing = sorted(expected - set(by_index))[:5]
        raise GlitrError(f"{path}: class indices must be 0..{len(by_index) - 1} without gaps; missing {missing}")
    names = [by_index[i] for i in range(len(by_index))]
    if len(set(names)) != len(names):
        raise GlitrError(f"{path}: a class name appears twice")
    return names


def parse_ssv2_split(path: Path, class_index: dict[str, int] | None) -> list[SplitEntry]:
    """Read an SSv2 split JSON. With `class_index` (train/validation) every entry needs a
    template naming a known class; with None (test) only ids are read."""
    what = "SSv2 split file"
    entries: list[SplitEntry] = []
    seen: dict[str, int] = {}
    for line, item in _json_array_items(path, what):
        if not isinstance(item, dict):
            raise GlitrError(f'{path}:{line}: expected an object with an "id", got {type(item).__name__}')
        vid = item.get("id")
        if isinstance(vid, int) and not isinstance(vid, bool):
            vid = str(vid)
        if not isinstance(vid, str) or not vid.strip() or any(c.isspace() or c in "/\\" for c in vid):
            raise GlitrError(
                f'{path}:{line}: expected "id" to be a non-empty name without spaces or slashes, got {vid!r}'
            )
        if vid in seen:
            raise GlitrError(f"{path}:{line}: video id {vid!r} already listed on line {seen[vid]}")
        seen[vid] = line
        label: int | None = None
        if class_index is not None:
            template = item.get("template")
            if not isinstance(template, str):
                raise GlitrError(f'{path}:{line}: video {vid!r} has no "template" string')
            name = template_to_class(template)
            if name not in class_index:
                raise GlitrError(f"{path}:{line}: template {template!r} (class {name!r}) is not in the labels file")
            label = class_index[name]
        entries.append(SplitEntry(vid, label, line))
    return entries


# ----------------------------------------------------------------------------- Jester


def _csv_rows(path: Path, what: str) -> list[tuple[int, list[str]]]:
    rows = []
    for i, raw in enumerate(read_text(path, what).splitlines(), start=1):
        s = raw.strip()
        if not s:
            continue
        rows.append((i, [f.strip() for f in s.split(";")]))
    return rows


def parse_jester_labels(path: Path) -> list[str]:
    """Read `jester-v1-labels.csv` into class names in alphabetical order (the TSM index order)."""
    names: dict[str, int] = {}
    for line, fields in _csv_rows(path, "Jester labels file"):
        if len(fields) != 1 or not fields[0]:
            raise GlitrError(f"{path}:{line}: expected one class name per line, got {';'.join(fields)!r}")
        if fields[0] in names:
            raise GlitrError(f"{path}:{line}: class {fields[0]!r} already listed on line {names[fields[0]]}")
        names[fields[0]] = line
    if not names:
        raise GlitrError(f"{path}:1: the labels file lists no classes")
    return sorted(names)


def parse_jester_split(path: Path, class_index: dict[str, int] | None) -> list[SplitEntry]:
    """Read a Jester split CSV: `<id>;<class>` lines, or `<id>` lines when `class_index` is None."""
    entries: list[SplitEntry] = []
    seen: dict[str, int] = {}
    for line, fields in _csv_rows(path, "Jester split file"):
        want = 1 if class_index is None else 2
        if len(fields) != want or not fields[0]:
            shape = "<id>" if want == 1 else "<id>;<class>"
            raise GlitrError(f"{path}:{line}: expected {shape}, got {';'.join(fields)!r}")
        vid = fields[0]
        if any(c.isspace() or c in "/\\" for c in vid):
            raise GlitrError(f"{path}:{line}: video id {vid!r} contains spaces or slashes")
        if vid in seen:
            raise GlitrError(f"{path}:{line}: video id {vid!r} already listed on line {seen[vid]}")
        seen[vid] = line
        label = None
        if class_index is not None:
            if fields[1] not in class_index:
                raise GlitrError(f"{path}:{line}: class {fields[1]!r} is not in the labels file")
            label = class_index[fields[1]]
        entries.append(SplitEntry(vid, label, line))
    return entries


# ----------------------------------------------------------------------------- TSM lists


def format_list(records: Iterable[VideoRecord]) -> str:
    """TSM list-file text: `<id> <num_frames> <label>` lines (`<id> <num_frames>` if unlabelled)."""
    out = []
    for r in records:
        out.append(f"{r.id} {r.num_frames}" if r.label is None else f"{r.id} {r.num_frames} {r.label}")
    return "".join(line + "\n" for line in out)


def write_list(path: Path, records: Iterable[VideoRecord]) -> None:
    """Write a TSM list file atomically."""
    atomic_write_text(path, format_list(records))


def read_list(path: Path, num_classes: int | None = None) -> list[VideoRecord]:
    """Read a TSM list file; each line is `<id> <num_frames> [<label>]`.

    With `num_classes`, labels must lie in [0, num_classes)."""
    records = []
    for i, raw in enumerate(read_text(path, "list file").splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise GlitrError(f"{path}:{i}: expected '<id> <num_frames> <label>', got {raw.strip()!r}")
        try:
            n = int(fields[1])
            label = int(fields[2]) if len(fields) == 3 else None
        except ValueError:
            raise GlitrError(f"{path}:{i}: expected integer frame count and label, got {raw.strip()!r}") from None
        if n < 1:
            raise GlitrError(f"{path}:{i}: video {fields[0]!r} has {n} frames, expected at least 1")
        if label is not None and (label < 0 or (num_classes is not None and label >= num_classes)):
            hi = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise GlitrError(f"{path}:{i}: label {label} of video {fields[0]!r} is outside {hi}")
        records.append(VideoRecord(fields[0], n, label))
    return records


def write_categories(path: Path, names: list[str]) -> None:
    """Write `category.txt`: one class name per line in index order."""
    atomic_write_text(path, "".join(n + "\n" for n in names))


def read_categories(path: Path) -> list[str]:
    """Read `category.txt` (line i = class i); blank lines inside the file are an error."""
    lines = read_text(path, "category file").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for i, name in enumerate(lines, start=1):
        if not name.strip():
            raise GlitrError(f"{path}:{i}: empty class name (line i must name class i-1)")
    if not lines:
        raise GlitrError(f"{path}:1: the category file lists no classes")
    return [n.strip() for n in lines]


# ----------------------------------------------------------------------------- dataset info

DATASET_INFO = "glitr_dataset.json"


@dataclass(frozen=True)
class DatasetInfo:
    """Where a prepared dataset keeps its frames: `<root>/<frames_dir>/<id>/<template % index>`
    with 1-based frame indices. `frames_dir` is relative to the dataset root or absolute."""

    name: str
    frames_dir: str = "frames"
    template: str = "%06d.jpg"


def write_dataset_info(root: Path, info: DatasetInfo) -> None:
    """Write `<root>/glitr_dataset.json`, the last file a preparation writes."""
    data = {"name": info.name, "frames_dir": info.frames_dir, "template": info.template}
    atomic_write_text(root / DATASET_INFO, json.dumps(data, indent=2) + "\n")


def read_dataset_info(root: Path) -> DatasetInfo | None:
    """Read `<root>/glitr_dataset.json`; None when the folder has none (a plain TSM layout)."""
    path = root / DATASET_INFO
    if not path.is_file():
        return None
    text = read_text(path, "dataset info")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(path, e, "dataset info") from None
    if not isinstance(data, dict):
        raise GlitrError(f"{path}:1: expected a JSON object with name, frames_dir and template")
    info = DatasetInfo(
        name=str(data.get("name", "")),
        frames_dir=str(data.get("frames_dir", "frames")),
        template=str(data.get("template", "%06d.jpg")),
    )
    try:
        info.template % 1
    except (TypeError, ValueError):
        raise GlitrError(f'{path}: "template" must hold one %d field such as %06d.jpg, got {info.template!r}') from None
    return info
