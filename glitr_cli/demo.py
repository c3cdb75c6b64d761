"""`glitr demo`: the whole pipeline on the generated toy dataset, in one resumable command.

Stages, all under one folder DIR (default runs/demo, so `glitr visualize` finds the model):

1. data     `prepare-data toy` into DIR/data (raw WebM videos in DIR/data/download)
2. teacher  recipes/toy_teacher.yaml, trained into DIR/teacher
3. glitr    recipes/toy.yaml, the GliTr student distilled from DIR/teacher, into DIR/glitr
4. eval     learned glimpses against the centre and random baselines (and the full-frame
            teacher): DIR/eval.json and the accuracy-vs-t plot DIR/accuracy.png
5. gifs     a few validation videos drawn by `glitr visualize` into DIR/gifs/

Each stage is skipped when its result is there: finished toy videos are kept, the engine
resumes a run from its checkpoints/last.pt (and does nothing for a finished one), evaluation
and GIFs are redone only when the student checkpoint is newer than them. So an interrupted
demo continues where it stopped. The recipes run as written except for the folders above
and, when asked, the number of epochs (`epochs_scale`); `quick` shrinks everything to a
smoke test of under a minute that proves the plumbing, not the accuracy.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from glitr_cli.errors import GlitrError

TEACHER_RECIPE = "toy_teacher.yaml"
STUDENT_RECIPE = "toy.yaml"
EVAL_FILE = "eval.json"
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


def recipes_dir() -> Path:
    """The shipped recipes/ folder of this checkout (the demo needs a source install)."""
    here = Path(__file__).resolve().parent.parent / "recipes"
    if not (here / TEACHER_RECIPE).is_file() or not (here / STUDENT_RECIPE).is_file():
        raise GlitrError(
            f"the toy recipes {TEACHER_RECIPE} and {STUDENT_RECIPE} are not in {here}; "
            "run the demo from a source checkout installed with `pip install -e .`"
        )
    return here


@dataclass
class DemoResult:
    """Where everything went, and the evaluation record (eval.json)."""

    out: Path
    data: Path
    teacher: Path
    student: Path
    eval_json: Path
    plot: Path
    gifs: list[Path] = field(default_factory=list)
    result: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _quoted(path: Path) -> str:
    return json.dumps(str(path))  # a YAML string whatever characters the path holds


def _newer(path: Path, than: Path) -> bool:
    return path.is_file() and than.is_file() and path.stat().st_mtime >= than.stat().st_mtime


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _epochs(recipe: Path, scale: float) -> int:
    from glitr_cli.recipe import load_recipe

    return max(1, round(load_recipe(recipe).optim.epochs * scale))


def pick_videos(data: Path, n: int) -> list[tuple[Path, str]]:
    """Up to `n` validation videos of different classes: (raw video or frame folder, class name)."""
    from glitr_cli.data.formats import read_categories, read_list
    from glitr_cli.data.prepare import SPLIT_LISTS
    from glitr_cli.data.toy import VIDEO_DIR

    names = read_categories(data / "category.txt")
    picked: list[tuple[Path, str]] = []
    seen: set[int] = set()
    for record in read_list(data / SPLIT_LISTS["val"], len(names)):
        if len(picked) == n:
            break
        if record.label is None or record.label in seen:
            continue
        seen.add(record.label)
        raw = data / "download" / VIDEO_DIR / f"{record.id}.webm"
        picked.append((raw if raw.is_file() else data / "frames" / record.id, names[record.label]))
    return picked


def _evaluate_quietly(recipe_path: Path, overrides: list[str], out: Path) -> dict[str, Any]:
    """`glitr eval` into `out`, leaving the printing of its table to the final report."""
    import io

    from glitr_cli.engine.distributed import cleanup_distributed
    from glitr_cli.engine.evaluate import run_eval
    from glitr_cli.recipe import load_recipe

    try:
        return run_eval(load_recipe(recipe_path, overrides), out_dir=out, console=Console(file=io.StringIO()))
    finally:
        cleanup_distributed()


def run_demo(
    out: str | Path = "runs/demo",
    *,
    quick: bool = False,
    epochs_scale: float = 1.0,
    train_videos: int | None = None,
    gifs: int = 4,
    console: Console | None = None,
) -> DemoResult:
    """Run (or finish) the demo in `out`; see the module docstring for the stages."""
    from glitr_cli.data.prepare import prepare_dataset
    from glitr_cli.engine import train
    from glitr_cli.engine.evaluate import result_table
    from glitr_cli.visualize import visualize

    console = console or Console(stderr=True)
    if epochs_scale <= 0:
        raise GlitrError(f"--epochs-scale must be positive, got {epochs_scale}")
    if train_videos is not None and train_videos < 8:
        raise GlitrError(f"--train-videos must be at least 8, got {train_videos}")
    if gifs < 0:
        raise GlitrError(f"--gifs must be 0 or more, got {gifs}")
    start = time.perf_counter()
    recipes = recipes_dir()
    out = Path(out)
    res = DemoResult(
        out=out,
        data=out / "data",
        teacher=out / "teacher" / "checkpoints" / "last.pt",
        student=out / "glitr" / "checkpoints" / "last.pt",
        eval_json=out / EVAL_FILE,
        plot=out / PLOT_FILE,
    )

    def stage(i: int, text: str) -> None:
        console.rule(f"[bold]demo {i}/5[/] · {text} · {time.perf_counter() - start:.0f} s", align="left")

    toy: dict[str, Any] = dict(QUICK_TOY) if quick else {}
    if train_videos is not None:
        toy["num_train"] = train_videos
    stage(1, f"toy dataset -> {res.data}")
    summary = prepare_dataset("toy", out=res.data, progress=not quick, **toy)
    console.print(summary.describe(), highlight=False, soft_wrap=True)
    if not summary.ok:
        raise GlitrError(f"the toy dataset in {res.data} has videos that failed to decode: see {res.data}/failed.txt")

    common = [f"data.root={_quoted(res.data)}", *(QUICK_OVERRIDES if quick else [])]
    teacher_recipe, student_recipe = recipes / TEACHER_RECIPE, recipes / STUDENT_RECIPE
    teacher_overrides = [f"output_dir={_quoted(out / 'teacher')}", *common]
    student_overrides = [
        f"output_dir={_quoted(out / 'glitr')}",
        f"objective.teacher={_quoted(res.teacher)}",
        *common,
    ]
    if not quick and epochs_scale != 1.0:
        teacher_overrides.append(f"optim.epochs={_epochs(teacher_recipe, epochs_scale)}")
        student_overrides.append(f"optim.epochs={_epochs(student_recipe, epochs_scale)}")

    stage(2, f"teacher (full frames) -> {res.teacher.parent.parent}")
    train(teacher_recipe, teacher_overrides, kind="teacher")
    stage(3, f"GliTr student (glimpses) -> {res.student.parent.parent}")
    train(student_recipe, student_overrides, kind="glitr")

    stage(4, "evaluation: learned vs center vs random glimpses")
    if _newer(res.eval_json, res.student):
        res.result = json.loads(res.eval_json.read_text())
        console.print(f"up to date: {res.eval_json}", highlight=False)
    else:
        res.result = _evaluate_quietly(student_recipe, student_overrides, out)

    stage(5, f"glimpse GIFs -> {out / 'gifs'}")
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
    under_runs = "runs" in res.out.parts
    lines = [
        f"demo done in {res.seconds / 60:.1f} min; everything is in {res.out}/",
        f"  data      {res.data}/  (raw videos in {res.data}/download/)",
        f"  teacher   {res.teacher}",
        f"  glitr     {res.student}",
        f"  accuracy  {res.eval_json}, {res.plot}",
        f"  gifs      {', '.join(str(g) for g in res.gifs) or 'none'}",
        "next: glitr visualize VIDEO --out glimpses.gif"
        + ("  (takes the newest GliTr under runs/)" if under_runs else f" --checkpoint {res.student}"),
    ]
    console.print("\n".join(lines), highlight=False, soft_wrap=True)
