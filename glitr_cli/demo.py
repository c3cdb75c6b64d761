"""`glitr demo`: the whole pipeline on the generated toy dataset, in one resumable command.

Stages, all under one folder DIR (default runs/demo, so `glitr visualize` finds the model): the toy
data (DIR/data), the teacher (recipe toy_teacher, DIR/teacher), the GliTr student (recipe toy,
DIR/glitr), evaluation against the centre and random baselines and the teacher (DIR/eval.json,
DIR/accuracy.png) with how often the learned glimpse holds the whole target once it has left the
centre (DIR/follow.json, `follow_rates`), and glimpse GIFs of a few validation videos (DIR/gifs/).

A stage whose result is there is skipped (finished videos are kept, a run resumes from its
checkpoints/last.pt, evaluation and GIFs are redone only when the student is newer), so an interrupted
demo continues where it stopped. The recipes run as written but for the folders and, when asked, the
epochs (`epochs_scale`, which scales `hold_epochs` too); `quick` is a smoke test of the plumbing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from glitr_cli.data.dataset import build_dataset
from glitr_cli.data.formats import read_categories, read_list
from glitr_cli.data.prepare import SPLIT_LISTS, prepare_toy
from glitr_cli.data.toy import VIDEO_DIR, FollowMeter, read_toy_config
from glitr_cli.engine import train
from glitr_cli.engine.distributed import cleanup_distributed
from glitr_cli.engine.evaluation import result_table, run_eval
from glitr_cli.engine.loading import load_student
from glitr_cli.engine.metrics import CURVES_FILE
from glitr_cli.engine.online import visualize
from glitr_cli.engine.optim import MODULES
from glitr_cli.errors import GlitrError
from glitr_cli.files import atomic_write_json
from glitr_cli.recipe import load_recipe
from glitr_cli.runtime import Runtime, stop_workers

TEACHER_RECIPE = "toy_teacher"  # shipped recipes, by name
STUDENT_RECIPE = "toy"
EVAL_FILE = "eval.json"
FOLLOW_FILE = "follow.json"
PLOT_FILE = "accuracy.png"

# --quick: a handful of clips and one epoch, enough to run every stage end to end
QUICK_TOY = {"num_train": 16, "num_val": 8, "num_test": 0}
QUICK_OVERRIDES = [
    "optim.epochs=1",
    "optim.batch_size=8",
    "train.eval_every=0",
    "train.checkpoint_every=0",
    "eval.batch_size=8",
    "data.workers=0",
    "log.progress=false",
]


@dataclass
class DemoResult:
    """Where everything went, and the evaluation record (eval.json)."""

    out: Path
    data: Path
    teacher: Path
    student: Path
    eval_json: Path
    plot: Path
    follow_json: Path
    gifs: list[Path] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    follow: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _quoted(path: Path) -> str:
    return json.dumps(str(path))  # a YAML string whatever characters the path holds


def _newer(path: Path, than: Path) -> bool:
    return path.is_file() and than.is_file() and path.stat().st_mtime >= than.stat().st_mtime


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def scaled_epochs(recipe: str, scale: float) -> list[str]:
    """Overrides that train `recipe` for `scale` times its epochs; a module held still for some
    epochs (`hold_epochs`) is held for the same share of them."""
    optim = load_recipe(recipe).optim
    epochs = max(1, round(optim.epochs * scale))
    held = [(m, getattr(optim, m).hold_epochs) for m in MODULES]
    return [f"optim.epochs={epochs}"] + [
        f"optim.{m}.hold_epochs={hold * epochs / optim.epochs:g}" for m, hold in held if hold
    ]


def pick_videos(data: Path, n: int) -> list[tuple[Path, str]]:
    """Up to `n` validation videos of different classes, every direction before any repeats and
    the shapes taken in turn: (raw video or frame folder, class name)."""
    cfg = read_toy_config(data / "download")
    n_dir, n_shape = len(cfg.directions), len(cfg.shapes)
    order = [i % n_dir + n_dir * ((i % n_shape + i // n_dir) % n_shape) for i in range(cfg.num_classes)]
    names = read_categories(data / "category.txt")
    first: dict[int, str] = {}
    for record in read_list(data / SPLIT_LISTS["val"], len(names)):
        if record.label is not None:
            first.setdefault(record.label, record.id)
    picked: list[tuple[Path, str]] = []
    for label in (c for c in order if c in first):
        if len(picked) == n:
            break
        raw = data / "download" / VIDEO_DIR / f"{first[label]}.webm"
        picked.append((raw if raw.is_file() else data / "frames" / first[label], names[label]))
    return picked


def follow_rates(checkpoint: Path, data: Path, *, batch_size: int = 50) -> dict[str, float]:
    """How well a GliTr checkpoint's learned glimpses follow the toy target on the validation
    split (`FollowMeter`): per direction, and "all"."""
    student = load_student(checkpoint)
    model = student.model
    dataset = build_dataset(dataclasses.replace(student.recipe.data, root=str(data)), "val", train=False)
    loader = Runtime.for_this_machine(student.recipe, "cpu").loader(dataset, batch_size=batch_size)
    meter = FollowMeter(
        data / "download",
        student.sampler,
        model.backbone.glimpse_scale[0],
        resize=student.resize,
        crop=student.img_size,
    )
    records = iter(dataset.records)
    try:
        for clips, _ in loader:
            with torch.no_grad():
                locs_batch = model.forward_student(clips).locs.numpy()
            for locs in locs_batch:
                meter.add(next(records).id, locs)
    finally:
        stop_workers(loader)
    return meter.rates()


def _evaluate_quietly(recipe_path: str, overrides: list[str], out: Path) -> dict[str, Any]:
    """`glitr eval` into `out`, leaving the printing of its table to the final report."""
    result = run_eval(load_recipe(recipe_path, overrides), out_dir=out, console=Console(file=io.StringIO()))
    cleanup_distributed()
    return result


def run_demo(
    out: str | Path | None = None,
    *,
    quick: bool = False,
    epochs_scale: float = 1.0,
    train_videos: int | None = None,
    gifs: int = 4,
    seed: int = 0,
    console: Console | None = None,
) -> DemoResult:
    """Run (or finish) the demo in `out` (default runs/demo, runs/demo_seedN for another seed: a
    finished run in the folder is kept whatever its seed); see the module docstring for the stages."""
    console = console or Console(stderr=True)
    if seed < 0:
        raise GlitrError(f"--seed must be 0 or more, got {seed}")
    if out is None:
        out = "runs/demo" if seed == 0 else f"runs/demo_seed{seed}"
    if epochs_scale <= 0:
        raise GlitrError(f"--epochs-scale must be positive, got {epochs_scale}")
    if train_videos is not None and train_videos < 8:
        raise GlitrError(f"--train-videos must be at least 8, got {train_videos}")
    if gifs < 0:
        raise GlitrError(f"--gifs must be 0 or more, got {gifs}")
    start = time.perf_counter()
    out = Path(out)
    res = DemoResult(
        out=out,
        data=out / "data",
        teacher=out / "teacher" / "checkpoints" / "last.pt",
        student=out / "glitr" / "checkpoints" / "last.pt",
        eval_json=out / EVAL_FILE,
        plot=out / PLOT_FILE,
        follow_json=out / FOLLOW_FILE,
    )

    def stage(i: int, text: str) -> None:  # short enough for an 80-column terminal; each stage says where it writes
        console.rule(f"[bold]demo {i}/5[/] · {text} · {time.perf_counter() - start:.0f} s", align="left")

    toy: dict[str, Any] = dict(QUICK_TOY) if quick else {}
    if train_videos is not None:
        toy["num_train"] = train_videos
    stage(1, "toy dataset")
    summary = prepare_toy(res.data, progress=not quick, **toy)
    console.print(summary.describe(), highlight=False, soft_wrap=True)
    if not summary.ok:
        raise GlitrError(f"the toy dataset in {res.data} has videos that failed to decode: see {res.data}/failed.txt")

    common = [f"data.root={_quoted(res.data)}", f"train.seed={seed}", *(QUICK_OVERRIDES if quick else [])]
    teacher_recipe, student_recipe = TEACHER_RECIPE, STUDENT_RECIPE
    teacher_overrides = [f"output_dir={_quoted(out / 'teacher')}", *common]
    student_overrides = [
        f"output_dir={_quoted(out / 'glitr')}",
        f"objective.teacher={_quoted(res.teacher)}",
        *common,
    ]
    if not quick and epochs_scale != 1.0:
        teacher_overrides += scaled_epochs(teacher_recipe, epochs_scale)
        student_overrides += scaled_epochs(student_recipe, epochs_scale)

    stage(2, "teacher (full frames)")
    train(teacher_recipe, teacher_overrides, kind="teacher")
    stage(3, "GliTr student (glimpses)")
    train(student_recipe, student_overrides, kind="glitr")

    stage(4, "evaluation: learned, centre and random glimpses")
    if _newer(res.eval_json, res.student) and _newer(res.follow_json, res.student):
        res.result = json.loads(res.eval_json.read_text())
        res.follow = json.loads(res.follow_json.read_text())
        console.print(f"up to date: {res.eval_json}, {res.follow_json}", highlight=False)
    else:
        res.result = _evaluate_quietly(student_recipe, student_overrides, out)
        res.follow = follow_rates(res.student, res.data)
        atomic_write_json(res.follow_json, res.follow)

    stage(5, "glimpse GIFs")
    for video, name in pick_videos(res.data, gifs):
        gif = out / "gifs" / f"{video.stem}_{_slug(name)}.gif"
        if not _newer(gif, res.student):
            visualize(video, checkpoint=res.student, out=gif, side_by_side=True, console=console)
        res.gifs.append(gif)
    res.seconds = time.perf_counter() - start
    report(res, result_table)
    return res


def report(res: DemoResult, result_table: Any, console: Console | None = None) -> None:
    """The final table, the margins of the learned policy and where everything is (stdout)."""
    console = console or Console()
    r = res.result
    console.print(result_table(r))
    t = r["steps"]
    policies = r["policies"]
    if "learned" in policies:
        learned = policies["learned"]["top1"][-1]
        margins = [
            f"{100 * (learned - policies[b]['top1'][-1]):+.1f} points over {b}"
            for b in ("center", "random")
            if b in policies
        ]
        console.print(f"learned glimpses at t={t}: {100 * learned:.1f}% top-1, " + ", ".join(margins), highlight=False)
    if res.follow:
        per_direction = ", ".join(f"{d} {100 * v:.0f}%" for d, v in res.follow.items() if d != "all")
        console.print(
            f"the glimpse holds the whole target at {100 * res.follow['all']:.0f}% of the steps after the target "
            f"left the centre ({per_direction})",
            highlight=False,
        )
    under_runs = "runs" in res.out.parts
    lines = [
        f"demo done in {res.seconds / 60:.1f} min; everything is in {res.out}/",
        f"  data      {res.data}/  (raw videos in {res.data}/download/)",
        f"  teacher   {res.teacher}",
        f"  glitr     {res.student}",
        f"  curves    {res.teacher.parents[1] / CURVES_FILE}, {res.student.parents[1] / CURVES_FILE}",
        f"  accuracy  {res.eval_json}, {res.plot}, {res.follow_json}",
        f"  gifs      {', '.join(str(g) for g in res.gifs) or 'none'}",
        "next: glitr visualize VIDEO --out glimpses.gif"
        + ("  (takes the newest GliTr under runs/)" if under_runs else f" --checkpoint {res.student}"),
    ]
    console.print("\n".join(lines), highlight=False, soft_wrap=True)
