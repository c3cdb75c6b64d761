"""The `glitr` command line: one thin function per subcommand, no logic of its own.

Each command parses its options, calls one library function and lets `main` turn a
`GlitrError` (a user mistake) into one red line and exit code 2. The library is imported inside
each command, so `glitr --help` and a mistyped option answer without loading PyTorch.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from glitr_cli import __version__
from glitr_cli.errors import PREEMPTED_EXIT_CODE, GlitrError, Preempted
from glitr_cli.paths import packaged_recipe, recipe_names
from glitr_cli.progress import PROGRESS_EVERY, set_progress_every

# `glitr --help` lists the commands in the order a new user needs them, whatever order they are
# defined in (typer would list the subcommand groups last)
USER_PATH = (
    "demo",
    "prepare-data",
    "train-teacher",
    "train-glitr",
    "eval",
    "predict",
    "visualize",
    "stream",
    "export",
    "bench",
    "recipes",
)


class _UserPathGroup(typer.core.TyperGroup):
    def list_commands(self, ctx: typer.Context) -> list[str]:
        return sorted(super().list_commands(ctx), key=USER_PATH.index)


# Help texts are rich markup: a literal `[` is written `\\[` (tests/test_cli.py renders every --help)
app = typer.Typer(
    name="glitr",
    help="GliTr: online action prediction from glimpses (WACV 2023), faithful and fast.",
    cls=_UserPathGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"glitr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """GliTr: online action prediction from glimpses."""


def _library(path: str) -> Any:
    """The library function a command calls, imported only when the command runs."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


_OVERRIDES_HELP = "Recipe overrides, section.key=value, e.g. optim.epochs=5 train.device=cpu."
_RESUME_HELP = (
    "Continue from this checkpoint. Without it a run continues from its own checkpoints/last.pt when there is one."
)


@app.command("train-teacher")
def train_teacher(
    recipe: Path = typer.Argument(..., help="Teacher recipe: a YAML file or a shipped name, e.g. toy_teacher."),
    overrides: list[str] | None = typer.Argument(None, help=_OVERRIDES_HELP, show_default=False),
    resume: Path | None = typer.Option(None, "--resume", help=_RESUME_HELP),
) -> None:
    """Train the full-frame teacher of a recipe into runs/<name>/ (torchrun for many GPUs)."""
    from glitr_cli.engine import train

    train(recipe, overrides, kind="teacher", resume=resume)


@app.command("train-glitr")
def train_glitr(
    recipe: Path = typer.Argument(..., help="GliTr recipe: a YAML file or a shipped name, e.g. toy."),
    overrides: list[str] | None = typer.Argument(None, help=_OVERRIDES_HELP, show_default=False),
    resume: Path | None = typer.Option(None, "--resume", help=_RESUME_HELP),
) -> None:
    """Train the GliTr student from its teacher (runs/<name>_teacher/) into runs/<name>/."""
    from glitr_cli.engine import train

    train(recipe, overrides, kind="glitr", resume=resume)


@app.command("eval")
def eval_(
    recipe: Path = typer.Argument(..., help="The recipe the checkpoint was trained with, e.g. toy."),
    overrides: list[str] | None = typer.Argument(None, help=_OVERRIDES_HELP, show_default=False),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="Checkpoint to evaluate (default: the run's checkpoints/last.pt)."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Directory for eval.json, accuracy.png and early.png (default: the run directory)."
    ),
) -> None:
    """Top-1/top-5 at every step t (learned, center and random glimpses, the full-frame teacher), calibration and
    early decisions."""
    from glitr_cli.engine import evaluate

    evaluate(recipe, overrides, checkpoint=checkpoint, out_dir=out)


prepare_app = typer.Typer(
    help="Turn the SSv2 or Jester download, a generated toy set or your own clips into frame folders and TSM lists.",
    no_args_is_help=True,
)
app.add_typer(prepare_app, name="prepare-data")
_OUT = typer.Option(None, "--out", help="Where the prepared dataset goes (default: <data root>/<dataset>).")
_DATA_ROOT = typer.Option(None, "--data-root", help="Moves the whole data tree (default: $GLITR_DATA, else ./data).")
_WORKERS = typer.Option(0, "--workers", "-j", help="Parallel workers; 0: the CPU count, at most 8.")
_QUALITY = typer.Option(95, "--quality", help="JPEG quality of the written frames.")
_PROGRESS_EVERY = typer.Option(
    PROGRESS_EVERY, "--progress-every", help="Seconds between progress lines when the output is not a terminal."
)
_CALIBRATED_HELP = (
    "Calibrated probabilities, with the temperatures `glitr eval` fitted: from the run's eval.json (RUN/eval.json "
    "beside checkpoints/, else the folder above RUN, where `glitr demo` writes it)."
)
_CALIBRATION_HELP = "The same with the temperatures in this eval.json."
_DECIDE_HELP = (
    "Decide at the first step whose top probability reaches TAU, else at the last (default with --calibrated or "
    "--calibration: the threshold `glitr eval` chose)."
)


def _prepare(function: str, progress_every: float, **options: Any) -> None:
    """Run a preparation of `data/` with the command's options; exit code 1 when a clip failed."""
    set_progress_every(progress_every)
    summary = _library(f"glitr_cli.data.{function}")(**options)
    typer.echo(summary.describe())
    if not summary.ok:
        raise typer.Exit(1)


@prepare_app.command("ssv2")
def prepare_ssv2(
    src: Path | None = typer.Option(None, "--src", help="The official download (default: <data root>/ssv2/download)."),
    out: Path | None = _OUT,
    root: Path | None = _DATA_ROOT,
    workers: int = _WORKERS,
    short_side: int = typer.Option(256, "--short-side", help="Resize frames to this short side; 0 keeps them."),
    quality: int = _QUALITY,
    videos: Path | None = typer.Option(None, "--videos", help="The folder of <id>.webm files, if elsewhere."),
    progress_every: float = _PROGRESS_EVERY,
) -> None:
    """Something-Something-V2: decode every video into JPEG frames and write the TSM lists."""
    _prepare("prepare.prepare_ssv2", **locals())


@prepare_app.command("jester")
def prepare_jester(
    src: Path | None = typer.Option(
        None, "--src", help="The official download (default: <data root>/jester/download)."
    ),
    out: Path | None = _OUT,
    root: Path | None = _DATA_ROOT,
    workers: int = _WORKERS,
    short_side: int = typer.Option(
        0, "--short-side", help="Copy the frames resized to this short side; 0 keeps them in place."
    ),
    quality: int = _QUALITY,
    frames: Path | None = typer.Option(None, "--frames", help="The 20bn-jester-v1 frame folder, if elsewhere."),
    progress_every: float = _PROGRESS_EVERY,
) -> None:
    """Jester: list files over the official frame folders (or resized copies of them)."""
    _prepare("prepare.prepare_jester", **locals())


@prepare_app.command("toy")
def prepare_toy(
    out: Path | None = _OUT,
    src: Path | None = typer.Option(None, "--src", help="Where the generated raw videos go (default: <out>/download)."),
    root: Path | None = _DATA_ROOT,
    workers: int = _WORKERS,
    short_side: int = typer.Option(0, "--short-side", help="Resize frames to this short side; 0 keeps them."),
    quality: int = _QUALITY,
    seed: int | None = typer.Option(None, "--seed", help="Random seed of the generator (default 0)."),
    toy_train: int | None = typer.Option(None, "--toy-train", help="Training videos (default 400)."),
    toy_val: int | None = typer.Option(None, "--toy-val", help="Validation videos (default 100)."),
    toy_test: int | None = typer.Option(None, "--toy-test", help="Unlabelled test videos (default 20)."),
    toy_frames: int | None = typer.Option(None, "--toy-frames", help="Frames per video (default 16)."),
    toy_size: int | None = typer.Option(None, "--toy-size", help="Frame side in pixels (default 112)."),
    toy_shapes: str | None = typer.Option(None, "--toy-shapes", help="Target shapes (default square,ring)."),
    toy_directions: str | None = typer.Option(
        None, "--toy-directions", help="Target directions (default left,right,up,down)."
    ),
    toy_distractors: int | None = typer.Option(None, "--toy-distractors", help="Grey distractors (default 4)."),
    progress_every: float = _PROGRESS_EVERY,
) -> None:
    """The generated toy set: where to look decides the class (shape x direction)."""
    toy = dict(seed=seed, num_train=toy_train, num_val=toy_val, num_test=toy_test, num_frames=toy_frames,
               size=toy_size, shapes=toy_shapes, directions=toy_directions, distractors=toy_distractors)  # fmt: skip
    toy = {key: value for key, value in toy.items() if value is not None}  # the rest: ToyConfig's defaults
    common = dict(out=out, src=src, root=root, workers=workers, short_side=short_side, quality=quality)
    _prepare("prepare.prepare_toy", progress_every, **common, **toy)


@prepare_app.command("folder")
def prepare_folder(
    src: Path = typer.Option(
        ..., "--src", help="Your clips: DIR/<class>/<video> or DIR/{train,val,test}/<class>/<video>."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Where the prepared dataset goes (default: <data root>/<name of --src>)."
    ),
    root: Path | None = _DATA_ROOT,
    workers: int = _WORKERS,
    short_side: int = typer.Option(256, "--short-side", help="Resize frames to this short side; 0 keeps them."),
    quality: int = _QUALITY,
    csv: Path | None = typer.Option(
        None, "--csv", help="A CSV of path,label[,split] lines, paths relative to --src (instead of class folders)."
    ),
    val_fraction: float = typer.Option(
        0.2, "--val-fraction", help="Without val clips: the share of each class's training clips set aside."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation draw."),
    progress_every: float = _PROGRESS_EVERY,
) -> None:
    """Your own clips (video files or frame folders), by class folders or a CSV listing."""
    _prepare("folder.prepare_folder", **locals())


@app.command("visualize")
def visualize(
    video: Path = typer.Argument(..., help="A video file PyAV reads (mp4, webm, avi, ...) or a folder of JPEG frames."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="GliTr checkpoint (default: the newest under runs/)."
    ),
    out: Path = typer.Option(Path("glimpses.gif"), "--out", "-o", help="Output animation: .gif, or .mp4."),
    every: int | None = typer.Option(
        None, "--every", help="Feed every Nth frame online instead of the T evaluation frames, as a camera would."
    ),
    context: str = typer.Option(
        "sliding",
        "--context",
        help="After T steps: sliding (predict from the last T frames) or restart (a new stream every T steps).",
    ),
    side_by_side: bool = typer.Option(False, "--side-by-side", help="Add the glimpse crop as the model sees it."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write every step's location, box and top-3 here."),
    fps: float = typer.Option(4.0, "--fps", help="Output frames (model steps) per second."),
    size: int = typer.Option(384, "--size", help="Longer side of the drawn frame in pixels (0: the video's own size)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    calibrated: bool = typer.Option(False, "--calibrated", help=_CALIBRATED_HELP),
    calibration: Path | None = typer.Option(None, "--calibration", metavar="EVAL_JSON", help=_CALIBRATION_HELP),
    decide: float | None = typer.Option(
        None, "--decide", metavar="TAU", help=_DECIDE_HELP + " Marks the step that decides."
    ),
) -> None:
    """Draw where a trained GliTr looks in a video, step by step, with its top-3 classes."""
    _library("glitr_cli.engine.online.visualize")(**locals())


@app.command("stream")
def stream(
    source: str = typer.Argument(
        ...,
        help="A video file, a URL (http, https, rtsp, rtmp, udp) or a camera: /dev/video0, avfoundation:0, "
        "dshow:video=NAME.",
        show_default=False,
    ),
    checkpoint: Path | None = typer.Option(
        None,
        "--checkpoint",
        "-c",
        help="GliTr checkpoint (default: the newest under runs/); with --backend onnx or onnx-int8 also a file "
        "that glitr export wrote.",
    ),
    jsonl: str = typer.Option("-", "--jsonl", help="One JSON line per processed frame, then the summary; - : stdout."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Also draw the processed frames into this .mp4."),
    every: int | None = typer.Option(
        None, "--every", help="Feed every Nth frame (default: spaced as the training clips, from the frame rate)."
    ),
    context: str = typer.Option(
        "sliding", "--context", help="After T steps: sliding (the last T frames) or restart (a new window)."
    ),
    as_fast_as_possible: bool = typer.Option(
        False, "--as-fast-as-possible", help="Do not pace a file on its frame rate; process every chosen frame."
    ),
    top_k: int = typer.Option(3, "--top-k", help="Classes (with probabilities) per line."),
    size: int = typer.Option(384, "--size", help="--out: longer side of the drawn frame (0: the source size)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    backend: str = typer.Option(
        "pytorch",
        "--backend",
        help="pytorch, onnx (the exported step in ONNX Runtime, CPU; needs glitr\\[export]) or onnx-int8 "
        "(the same with int8 linear layers: faster, approximate).",
    ),
    glimpse_only: bool = typer.Option(
        False, "--glimpse-only", help="Read only the window each glimpse needs; report its pixels against the frame's."
    ),
    threads: int = typer.Option(
        0, "--threads", help="CPU threads of the step (PyTorch's, or ONNX Runtime's intra-op threads); 0: every core."
    ),
    calibrated: bool = typer.Option(False, "--calibrated", help=_CALIBRATED_HELP),
    calibration: Path | None = typer.Option(None, "--calibration", metavar="EVAL_JSON", help=_CALIBRATION_HELP),
    decide: float | None = typer.Option(
        None, "--decide", metavar="TAU", help=_DECIDE_HELP + ' Writes a {"decision": ...} line then.'
    ),
    stop_on_decision: bool = typer.Option(
        False, "--stop-on-decision", help="End the stream at the first decision, with its summary."
    ),
) -> None:
    """Predict online as the frames of a file, stream or camera arrive; Ctrl-C stops with a summary."""
    _library("glitr_cli.stream.stream")(**locals())


@app.command("export")
def export(
    checkpoint: Path = typer.Argument(
        ..., help="A GliTr (student) checkpoint, e.g. runs/demo/glitr/checkpoints/last.pt."
    ),
    out: Path = typer.Option(Path("model.onnx"), "--out", "-o", help="The ONNX file to write."),
    crop: bool = typer.Option(False, "--crop", help="Take the pixels of next_box instead of the whole model input."),
    batch_size: int = typer.Option(1, "--batch-size", help="Streams per call (fixed in the graph)."),
    int8: bool = typer.Option(
        False, "--int8", help="int8 linear layers (ONNX Runtime only): faster on a CPU, approximate."
    ),
) -> None:
    """The online step (frame and state in; probabilities, next location and state out) as ONNX."""
    from glitr_cli.engine.onnx import export_onnx

    meta = export_onnx(checkpoint, out, crop=crop, batch_size=batch_size, int8=int8)
    typer.echo(f"wrote {out}: {meta['input']} input, T={meta['num_frames']}, S={meta['img_size']}, {meta['precision']}")


@app.command("predict")
def predict(
    checkpoint: Path = typer.Argument(
        ..., help="A GliTr (student) checkpoint, e.g. runs/finetune/checkpoints/last.pt."
    ),
    inputs: list[str] = typer.Argument(
        ...,
        help="Video files, folders of videos (searched recursively) or prepared splits DIR:split.",
        show_default=False,
    ),
    out: Path = typer.Option(
        Path("predictions.jsonl"), "--out", "-o", help="Output: .jsonl, or .csv (a row per step)."
    ),
    top_k: int = typer.Option(5, "--top-k", help="Classes (with probabilities) reported after every step."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Clips per batch (default: the recipe's eval)."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="Decoding processes (default: the recipe's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    calibrated: bool = typer.Option(False, "--calibrated", help=_CALIBRATED_HELP),
    calibration: Path | None = typer.Option(None, "--calibration", metavar="EVAL_JSON", help=_CALIBRATION_HELP),
    decide: float | None = typer.Option(
        None, "--decide", metavar="TAU", help=_DECIDE_HELP + " Adds decided_at and decided to every clip."
    ),
) -> None:
    """A trained GliTr's classes after every step and its glimpse locations, for your clips."""
    if not _library("glitr_cli.engine.predict.predict")(**locals()).ok:
        raise typer.Exit(1)


@app.command("bench")
def bench(
    recipe: Path = typer.Argument(..., help="Recipe whose models and shapes to measure, e.g. ssv2."),
    overrides: list[str] | None = typer.Argument(None, help=_OVERRIDES_HELP, show_default=False),
    batch_size: int | None = typer.Option(
        None, "--batch-size", "-b", help="Clips per step (default: the recipe's batch per process)."
    ),
    teacher_batch_size: int | None = typer.Option(
        None, "--teacher-batch-size", help="Clips per teacher step (default: --batch-size)."
    ),
    num_classes: int = typer.Option(
        174, "--num-classes", help="Classes of the synthetic task (--data: the dataset's)."
    ),
    online_batch: int = typer.Option(64, "--online-batch", help="Streams at once for the batched online figure."),
    repeats: int = typer.Option(5, "--repeats", help="Timed repeats per measurement (median, min, max shown)."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed calls before each measurement."),
    baseline: bool = typer.Option(
        True, "--baseline/--no-baseline", help="Also time the plain path (the original's algorithm, fp32, unfused)."
    ),
    data: bool = typer.Option(
        False, "--data", help="Also time training end to end from the recipe's prepared dataset, stage by stage."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the figures to this JSON file."),
) -> None:
    """Speed of training, evaluation and online inference against a plain reimplementation of the original."""
    from glitr_cli.bench import BenchSettings, result_table, run_bench
    from glitr_cli.files import atomic_write_json

    settings = BenchSettings(batch_size, teacher_batch_size, num_classes, online_batch, warmup, repeats, baseline, data)
    result = run_bench(recipe, overrides, settings)
    Console(width=max(Console().width, 110)).print(result_table(result))
    if json_out is not None:
        atomic_write_json(json_out, result)


@app.command("demo")
def demo(
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Folder for data/, teacher/, glitr/, gifs/ and results (default runs/demo; runs/demo_seedN for --seed N).",
        show_default=False,
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A smoke test of under a minute: a few clips, one epoch (not accurate)."
    ),
    epochs_scale: float = typer.Option(
        1.0, "--epochs-scale", help="Multiply both toy recipes' epochs (0.5: quicker, 2: better)."
    ),
    train_videos: int | None = typer.Option(
        None, "--train-videos", help="Toy training videos (default 400; more: slower, better)."
    ),
    gifs: int = typer.Option(4, "--gifs", help="Validation videos to draw as glimpse GIFs."),
    seed: int = typer.Option(0, "--seed", help="Seed of both trainings (train.seed); the data stay the same."),
) -> None:
    """Start here: toy data, teacher, GliTr, evaluation against baselines and glimpse GIFs, in one resumable command."""
    _library("glitr_cli.demo.run_demo")(**locals())


recipes_app = typer.Typer(
    help="The recipes shipped with glitr: list them, copy one to edit, or print every key.", no_args_is_help=False
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.callback(invoke_without_command=True)
def recipes_list(ctx: typer.Context) -> None:
    """List the shipped recipes; any command takes one by name (glitr train-glitr ssv2)."""
    if ctx.invoked_subcommand is not None:
        return
    for name in recipe_names():
        first = packaged_recipe(name).read_text().splitlines()[0].lstrip("# ")
        typer.echo(f"{name:<16} {first}")


@recipes_app.command("cp")
def recipes_cp(
    name: str = typer.Argument(..., help="A shipped recipe, e.g. ssv2 (see `glitr recipes`)."),
    dest: Path = typer.Argument(..., help="A new file, or a folder to put NAME.yaml in."),
) -> None:
    """Copy a shipped recipe to edit it; then pass the copy to any command."""
    from glitr_cli.files import atomic_write_text
    from glitr_cli.recipe import COMMANDS, load_recipe

    text = packaged_recipe(name).read_text()
    target = dest / f"{name}.yaml" if dest.is_dir() else dest
    if target.exists():
        raise GlitrError(f"{target} already exists; choose another destination")
    atomic_write_text(target, text)
    typer.echo(f"copied {name} to {target}; edit it, then run: glitr {COMMANDS[load_recipe(target).kind]} {target}")


@recipes_app.command("reference")
def recipes_reference() -> None:
    """Print the recipe reference (every key, its default and meaning) as markdown: docs/recipes.md."""
    from glitr_cli.recipe import recipe_reference

    typer.echo(recipe_reference(), nl=False)


def main() -> None:
    """Entry point of the `glitr` console script."""
    try:
        code = app(standalone_mode=False)  # usage errors come here too, to be printed as one line
    except GlitrError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            err_console.print(f"[bold yellow]preempted:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(PREEMPTED_EXIT_CODE)
    except typer.Abort:  # Ctrl-C
        err_console.print("aborted", highlight=False)
        sys.exit(130)
    except TyperException as e:  # the command line itself: unknown option, missing or malformed argument
        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "glitr"
        if e.format_message():  # empty after `glitr` alone, which has printed the help
            message = f"[bold red]error:[/] {escape(e.format_message())} (see {where} --help)"
            err_console.print(message, highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
