"""`glitr predict`: a trained GliTr's classes and glimpse locations for your clips, one record per clip.

Inputs are video files, folders (searched recursively) and prepared splits `DIR:split`; every clip is
preprocessed as evaluation does it and run under the checkpoint recipe's runtime, so a prepared split
gets exactly the numbers `glitr eval` computes. The output formats (.jsonl or .csv), the failed-clip
list and the early decisions: docs/online.md#glitr-predict.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import Dataset

from glitr_cli.data.dataset import SPLITS, VideoFolderDataset, build_dataset
from glitr_cli.data.folder import find_clips
from glitr_cli.data.sampling import FrameSampler
from glitr_cli.data.transforms import eval_transform
from glitr_cli.data.video import FrameSource
from glitr_cli.engine.decisions import calibrate, decision_steps
from glitr_cli.engine.evaluation import decision_settings, predict_clips
from glitr_cli.engine.loading import Student, load_student
from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_text
from glitr_cli.progress import ProgressLine
from glitr_cli.recipe import DataConfig
from glitr_cli.runtime import Runtime, stop_workers

OUTPUT_SUFFIXES = (".jsonl", ".csv")
FAILED_SUFFIX = ".failed.txt"  # the list of failed clips is named after the output


@dataclass(frozen=True)
class ClipRef:
    """One clip to predict: a video file or frame folder (`path`), or record `index` of prepared split
    `split` (an index into `PredictionInputs.splits`)."""

    name: str
    path: Path | None = None
    split: int = -1
    index: int = -1
    id: str | None = None
    label: str | None = None


def failed_file(out: Path) -> Path:
    """Where `predict` lists the clips that failed for output `out`."""
    return out.with_name(out.name + FAILED_SUFFIX)


def is_split_spec(spec: str) -> bool:
    """True for `DIR:split` (and no file or folder of that name exists)."""
    head, sep, split = spec.rpartition(":")
    return bool(sep and head) and split in SPLITS and not Path(spec).exists()


def resolve_inputs(specs: list[str], data: DataConfig) -> tuple[list[ClipRef], list[VideoFolderDataset]]:
    """The clips the command line names, in order, and the prepared splits they come from (each read
    with evaluation's dataset and `data`'s frames and sizes)."""
    refs: list[ClipRef] = []
    splits: list[VideoFolderDataset] = []
    for spec in specs:
        path = Path(spec)
        if is_split_spec(spec):
            root, _, split = spec.rpartition(":")
            if not Path(root).is_dir():
                raise GlitrError(f"{spec}: no prepared dataset folder {root}")
            dataset = build_dataset(dataclasses.replace(data, root=root), split, train=False)
            for i, record in enumerate(dataset.records):
                label = None if record.label is None else dataset.class_names[record.label]
                name = str(dataset.frames_dir / record.id)
                refs.append(ClipRef(name, split=len(splits), index=i, id=record.id, label=label))
            splits.append(dataset)
        elif path.is_file():
            refs.append(ClipRef(str(path), path))
        elif path.is_dir():
            if (path / "category.txt").is_file() and any(path.glob("*_videofolder.txt")):
                raise GlitrError(f"{spec} is a prepared dataset; name one of its splits, e.g. {spec}:val")
            found = find_clips(path)
            if not found:
                raise GlitrError(f"{spec}: no video files or frame folders in it")
            refs += [ClipRef(str(p), p) for p in found]
        else:
            root, colon, split = spec.rpartition(":")
            if colon and root and (Path(root) / "category.txt").is_file():  # a prepared dataset, another split
                there = [f"{root}:{s}" for s in SPLITS if _has_clips(Path(root) / f"{s}_videofolder.txt")]
                raise GlitrError(f"{spec}: {root} has no split {split!r}; its splits: {', '.join(there)}")
            raise GlitrError(f"{spec}: no such video file or folder (a prepared split is written DIR:split)")
    return refs, splits


def _has_clips(list_file: Path) -> bool:
    return list_file.is_file() and list_file.stat().st_size > 0


def read_clip(path: Path, sampler: FrameSampler) -> torch.Tensor:
    """Evaluation's T frames of a video file or frame folder, as `sampler` picks them: uint8 (T, 3, H, W)."""
    source = FrameSource(path)
    frames = [f for _, f in source.sample(lambda n: sampler.indices(n, train=False))]
    if len({f.shape for f in frames}) > 1:
        raise GlitrError(f"{path}: frames of different sizes")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # (T, H, W, 3) -> (T, 3, H, W)


class PredictionInputs(Dataset):
    """`(position, clip or None, failure reason or None)`: the clip a float (T, 3, S, S) after
    evaluation's transform. A prepared split's clip comes from its dataset (which replaces a corrupt
    frame by its nearest readable neighbour); a video that cannot be read gives its reason."""

    def __init__(self, refs: list[ClipRef], splits: list[VideoFolderDataset], sampler: FrameSampler, transform: Any):
        self.refs = refs
        self.splits = splits
        self.sampler = sampler
        self.transform = transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        ref = self.refs[i]
        if ref.path is None:
            return i, self.splits[ref.split][ref.index][0], None
        try:
            return i, self.transform(read_clip(ref.path, self.sampler)), None
        except Exception as e:  # any unreadable clip is reported, never allowed to stop the others
            reason = str(e) if isinstance(e, GlitrError) else f"{ref.path}: {type(e).__name__}: {e}"
            return i, None, " ".join(reason.split())


def collate(batch: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[list[int], torch.Tensor | None, list]:
    """(positions of the readable clips, their clips stacked (B, T, 3, S, S) or None, [(position, reason)])."""
    ok = [(i, clip) for i, clip, _ in batch if clip is not None]
    failed = [(i, reason) for i, clip, reason in batch if clip is None]
    clips = torch.stack([clip for _, clip in ok]) if ok else None
    return [i for i, _ in ok], clips, failed


def clip_record(
    ref: ClipRef, probs: torch.Tensor, locs: torch.Tensor, class_names: list[str], k: int, decided: int | None = None
) -> dict:
    """The output record of one clip from its per-step probabilities (T, C) and locations (T, 2), and
    the step (0-based) that decided it, if any."""
    top_p, top_c = probs.topk(k, dim=-1)  # (T, k)

    def top(t: int) -> list[list[Any]]:
        return [[class_names[c], round(p, 6)] for p, c in zip(top_p[t].tolist(), top_c[t].tolist(), strict=True)]

    record: dict[str, Any] = {"clip": ref.name}
    if ref.id is not None:
        record["id"] = ref.id
    if ref.label is not None:
        record["label"] = ref.label
    record["top"] = top(probs.shape[0] - 1)
    if decided is not None:
        record["decided_at"] = decided + 1
        record["decided"] = top(decided)[0]
    record["steps"] = [{"location": [round(v, 6) for v in locs[t].tolist()], "top": top(t)} for t in range(len(locs))]
    return record


def format_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def format_csv(records: list[dict], k: int) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    decided = any("decided_at" in r for r in records)
    columns = [f"{c}{i}" for i in range(1, k + 1) for c in ("top", "p")]
    writer.writerow(["clip", "label", "step", "x", "y", *columns, *(["decided"] if decided else [])])
    for r in records:
        for t, step in enumerate(r["steps"], start=1):
            tops = [v for name, p in step["top"] for v in (name, p)]
            marks = [int(r["decided_at"] == t)] if decided else []
            writer.writerow([r["clip"], r.get("label", ""), t, *step["location"], *tops, *marks])
    return buf.getvalue()


@dataclass
class PredictSummary:
    """What one `predict` did: clips predicted, (clip, reason) failures, and on the labelled clips
    (those of prepared splits) how many the last step got right."""

    out: Path
    predicted: int
    failed: list[tuple[str, str]]
    labelled: int = 0
    correct: int = 0
    threshold: float | None = None  # the decision threshold, when deciding
    mean_decided_at: float = 0.0  # over the predicted clips
    decided_correct: int = 0  # labelled clips whose decided class is right

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.labelled, 1)

    def describe(self, max_failures: int = 5) -> str:
        failed = f"{len(self.failed)} failed"
        if self.failed:
            failed += f" (listed in {failed_file(self.out)})"
        lines = [f"wrote {self.out}: {self.predicted} clips predicted, {failed}"]
        if self.labelled:
            lines[0] += f"; top-1 at the last step on the {self.labelled} labelled clips: {self.accuracy:.2%}"
        if self.threshold is not None:
            lines.append(f"decided at tau = {self.threshold:g} after {self.mean_decided_at:.2f} frames on average")
            if self.labelled:
                lines[-1] += f"; top-1 of the decisions: {self.decided_correct / self.labelled:.2%}"
        lines += [f"  failed {name}: {reason}" for name, reason in self.failed[:max_failures]]
        if len(self.failed) > max_failures:
            lines.append(f"  ... and {len(self.failed) - max_failures} more")
        return "\n".join(lines)


@torch.no_grad()
def predict(
    checkpoint: str | Path,
    inputs: list[str],
    *,
    out: str | Path = "predictions.jsonl",
    top_k: int = 5,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    calibrated: bool = False,
    calibration: str | Path | None = None,
    decide: float | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> PredictSummary:
    """Predict every clip `inputs` name with the GliTr student in `checkpoint`; write `out` (.jsonl or
    .csv) and, when clips fail, `<out>.failed.txt` beside it. `batch_size` and `workers` default to the
    checkpoint recipe's `eval.batch_size` and `data.workers`. `calibrated`, `calibration` and `decide`:
    see the module docstring and `decision_settings`."""
    console = console or Console(stderr=True)
    out = Path(out)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise GlitrError(f"--out {out}: the output must end in .jsonl or .csv")
    if top_k < 1:
        raise GlitrError(f"--top-k must be 1 or more, got {top_k}")
    if batch_size is not None and batch_size < 1:
        raise GlitrError(f"--batch-size must be 1 or more, got {batch_size}")
    if workers is not None and workers < 0:
        raise GlitrError(f"--workers must be 0 or more, got {workers}")
    if not inputs:
        raise GlitrError("name at least one INPUT: a video file, a folder of videos, or a prepared split DIR:split")
    student: Student = load_student(checkpoint)
    found, threshold = decision_settings(
        checkpoint, student.num_frames, calibrated=calibrated, calibration=calibration, decide=decide, console=console
    )
    data = student.recipe.data
    refs, splits = resolve_inputs(inputs, data)
    runtime = Runtime.for_this_machine(student.recipe, device, workers=workers)
    runtime.apply()
    model = student.model.to(runtime.device).eval()
    k = min(top_k, len(student.class_names))

    dataset = PredictionInputs(refs, splits, student.sampler, eval_transform(data.img_size, data.resize))
    loader = runtime.loader(dataset, batch_size=batch_size or student.recipe.eval.batch_size, collate_fn=collate)
    records: list[dict | None] = [None] * len(refs)
    failed: list[tuple[int, str]] = []
    every = student.recipe.log.progress_every
    with ProgressLine(console, "predicting", len(refs), enabled=progress, every=every) as bar:
        try:
            for positions, clips, batch_failed in loader:
                failed += batch_failed
                if clips is not None:
                    result = predict_clips(model, clips, runtime)
                    logits = result.logits.float().cpu()  # (B, T, C)
                    probs = logits.softmax(-1) if found is None else calibrate(logits, found.temperatures)
                    locs = result.locs.float().cpu()  # (B, T, 2)
                    decided = None if threshold is None else decision_steps(probs.amax(-1), threshold).tolist()
                    for j, i in enumerate(positions):
                        at = None if decided is None else decided[j]
                        records[i] = clip_record(refs[i], probs[j], locs[j], student.class_names, k, at)
                bar.advance(len(positions) + len(batch_failed))
        finally:
            stop_workers(loader)

    done = [r for r in records if r is not None]
    text = format_csv(done, k) if out.suffix.lower() == ".csv" else format_jsonl(done)
    atomic_write_text(out, text)
    named = [(refs[i].name, reason) for i, reason in sorted(failed)]
    if named:
        atomic_write_text(failed_file(out), "".join(f"{name}\t{reason}\n" for name, reason in named))
    else:  # one left by an earlier run to the same output would not describe this one
        failed_file(out).unlink(missing_ok=True)
    labelled = [r for r in done if "label" in r]
    correct = sum(r["top"][0][0] == r["label"] for r in labelled)
    summary = PredictSummary(out, len(done), named, len(labelled), correct)
    if threshold is not None:
        summary.threshold = threshold
        summary.mean_decided_at = float(np.mean([r["decided_at"] for r in done])) if done else 0.0
        summary.decided_correct = sum(r["decided"][0] == r["label"] for r in labelled)
    console.print(summary.describe(), highlight=False, soft_wrap=True, markup=False)
    return summary
