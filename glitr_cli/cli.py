"""The `glitr` command line: one thin function per subcommand, no logic of its own.

Each command parses its options, calls one library function and lets `main` turn a
`GlitrError` (a user mistake) into one red line and exit code 2. The library is imported inside
each command, so `glitr --help` and a mistyped option answer without loading PyTorch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from typer.exceptions import TyperException

from glitr_cli import __version__
from glitr_cli.errors import PREEMPTED_EXIT_CODE, GlitrError, Preempted
from glitr_cli.paths import packaged_recipe, recipe_names

app = typer.Typer(
    name="glitr",
    help="GliTr: online action prediction from glimpses (WACV 2023), faithful and fast.",
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
        None, "--out", help="Directory for eval.json and accuracy.png (default: the run directory)."
    ),
) -> None:
    """Top-1/top-5 at every step t: learned, center and random glimpses, and the full-frame teacher."""
    from glitr_cli.engine import evaluate

    evaluate(recipe, overrides, checkpoint=checkpoint, out_dir=out)


_DATA_ROOT_HELP = "Moves the whole data tree (default: $GLITR_DATA, else ./data)."


@app.command("prepare-data")
def prepare_data(
    dataset: str = typer.Argument(..., help="ssv2, jester, toy, or folder (your own clips).", show_default=False),
    src: Path | None = typer.Option(
        None,
        "--src",
        help="The official download (default: <data root>/<dataset>/download; toy: <out>/download); "
        "folder: your clips, DIR/<class>/<video> or DIR/{train,val,test}/<class>/<video>.",
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Where the prepared dataset goes (default: <data root>/<dataset>; folder: <data root>/<name of --src>).",
    ),
    data_root: Path | None = typer.Option(None, "--data-root", help=_DATA_ROOT_HELP),
    workers: int = typer.Option(0, "--workers", "-j", help="Parallel workers; 0: the CPU count, at most 8."),
    short_side: int | None = typer.Option(
        None,
        "--short-side",
        help="Resize frames to this short side, 0 keeps them (ssv2, folder: 256; else keep).",
    ),
    quality: int | None = typer.Option(None, "--quality", help="JPEG quality of the written frames (default 95)."),
    videos: Path | None = typer.Option(None, "--videos", help="ssv2: the folder of <id>.webm files, if elsewhere."),
    frames: Path | None = typer.Option(None, "--frames", help="jester: the 20bn-jester-v1 frame folder, if elsewhere."),
    csv: Path | None = typer.Option(
        None,
        "--csv",
        help="folder: a CSV of path,label[,split] lines, paths relative to --src (instead of class folders).",
    ),
    val_fraction: float | None = typer.Option(
        None, "--val-fraction", help="folder without val clips: the training clips set aside per class (default 0.2)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="toy: random seed; folder: validation draw (default 0)."),
    toy_train: int | None = typer.Option(None, "--toy-train", help="toy: training videos (default 400)."),
    toy_val: int | None = typer.Option(None, "--toy-val", help="toy: validation videos (default 100)."),
    toy_test: int | None = typer.Option(None, "--toy-test", help="toy: unlabelled test videos (default 20)."),
    toy_frames: int | None = typer.Option(None, "--toy-frames", help="toy: frames per video (default 16)."),
    toy_size: int | None = typer.Option(None, "--toy-size", help="toy: frame side in pixels (default 112)."),
    toy_shapes: str | None = typer.Option(None, "--toy-shapes", help="toy: target shapes (default square,ring)."),
    toy_directions: str | None = typer.Option(
        None, "--toy-directions", help="toy: target directions (default left,right,up,down)."
    ),
    toy_distractors: int | None = typer.Option(None, "--toy-distractors", help="toy: grey distractors (default 4)."),
) -> None:
    """Turn the SSv2 or Jester download, a generated toy set or your own clips into frame folders and TSM lists."""
    from glitr_cli.data.folder import prepare_folder_dataset
    from glitr_cli.data.prepare import prepare_dataset

    options = dict(
        short_side=short_side, quality=quality, videos=videos, frames=frames, seed=seed, num_train=toy_train,
        num_val=toy_val, num_test=toy_test, num_frames=toy_frames, size=toy_size, shapes=toy_shapes,
        directions=toy_directions, distractors=toy_distractors, csv=csv, val_fraction=val_fraction,
    )  # fmt: skip
    if dataset == "folder":
        summary = prepare_folder_dataset(src, out, workers, root=data_root, **options)
    else:
        summary = prepare_dataset(dataset, src, out, workers, root=data_root, **options)
    typer.echo(summary.describe())
    if not summary.ok:
        raise typer.Exit(1)


@app.command("bench-loader")
def bench_loader(
    dataset: str = typer.Argument("toy", help="A prepared dataset folder, or ssv2/jester/toy under the data root."),
    split: str = typer.Option("train", "--split", help="train, val or test."),
    frames: int = typer.Option(16, "--frames", help="Frames per clip (T)."),
    size: int = typer.Option(224, "--size", help="Crop size (the toy recipes use 112)."),
    resize: int | None = typer.Option(None, "--resize", help="Eval: short side before the crop (size*256/224)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Clips per batch."),
    workers: int = typer.Option(2, "--workers", "-j", help="DataLoader worker processes."),
    batches: int = typer.Option(20, "--batches", help="Batches timed after two warm-up batches."),
    eval_mode: bool = typer.Option(False, "--eval", help="Evaluation transform instead of training augmentation."),
    data_root: Path | None = typer.Option(None, "--data-root", help=_DATA_ROOT_HELP),
) -> None:
    """Print the clips/s and frames/s the data loader delivers on a prepared dataset."""
    from glitr_cli.data.bench import benchmark_dataset, describe, resolve_dataset

    result = benchmark_dataset(
        resolve_dataset(dataset, data_root), split, frames, size, resize, batch_size, workers, batches, not eval_mode
    )
    typer.echo(describe(result))


@app.command("visualize")
def visualize(
    video: Path = typer.Argument(..., help="A video file PyAV reads (mp4, webm, avi, ...) or a folder of JPEG frames."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", "-c", help="GliTr checkpoint (default: the newest under runs/)."
    ),
    out: Path = typer.Option(Path("glimpses.gif"), "--out", "-o", help="Output animation: .gif, or .mp4."),
    every: int | None = typer.Option(
        None,
        "--every",
        help="Feed every Nth frame online instead of the T evaluation frames, as a camera would.",
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
) -> None:
    """Draw where a trained GliTr looks in a video, step by step, with its top-3 classes."""
    from glitr_cli.visualize import visualize as run

    run(
        video,
        checkpoint=checkpoint,
        out=out,
        every=every,
        side_by_side=side_by_side,
        json_path=json_path,
        fps=fps,
        size=size,
        device=device,
        context=context,
    )


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
        help="pytorch, onnx (the exported step in ONNX Runtime, CPU; needs glitr[export]) or onnx-int8 "
        "(the same with int8 linear layers: faster, approximate).",
    ),
    glimpse_only: bool = typer.Option(
        False, "--glimpse-only", help="Read only the window each glimpse needs; report its pixels against the frame's."
    ),
    threads: int = typer.Option(
        0, "--threads", help="CPU threads of the step (PyTorch's, or ONNX Runtime's intra-op threads); 0: every core."
    ),
) -> None:
    """Predict online as the frames of a file, stream or camera arrive; Ctrl-C stops with a summary."""
    from glitr_cli.stream import stream as run

    run(
        source,
        checkpoint=checkpoint,
        jsonl=jsonl,
        out=out,
        every=every,
        context=context,
        as_fast_as_possible=as_fast_as_possible,
        top_k=top_k,
        size=size,
        device=device,
        backend=backend,
        glimpse_only=glimpse_only,
        threads=threads,
    )


@app.command("export")
def export(
    checkpoint: Path = typer.Argument(
        ..., help="A GliTr (student) checkpoint, e.g. runs/demo/glitr/checkpoints/last.pt."
    ),
    out: Path = typer.Option(Path("model.onnx"), "--out", "-o", help="The ONNX file to write."),
    crop: bool = typer.Option(False, "--crop", help="Take the pixels of next_box instead of the whole model input."),
    batch_size: int = typer.Option(1, "--batch-size", help="Streams per call (fixed in the graph)."),
    int8: bool = typer.Option(
        False, "--int8", help="int8 linear layers (dynamic quantization): faster on a CPU, approximate."
    ),
) -> None:
    """The online step (frame and state in; probabilities, next location and state out) as ONNX."""
    from glitr_cli.export import export_onnx

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
) -> None:
    """A trained GliTr's classes after every step and its glimpse locations, for your clips."""
    from glitr_cli.engine.predict import predict as run

    summary = run(checkpoint, inputs, out=out, top_k=top_k, batch_size=batch_size, workers=workers, device=device)
    if not summary.ok:
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
    from glitr_cli.bench import BenchSettings, result_table, run_bench, write_json

    settings = BenchSettings(
        batch_size=batch_size,
        teacher_batch_size=teacher_batch_size,
        num_classes=num_classes,
        online_batch=online_batch,
        warmup=warmup,
        repeats=repeats,
        baseline=baseline,
        data=data,
    )
    result = run_bench(recipe, overrides, settings)
    Console(width=max(Console().width, 110)).print(result_table(result))
    if json_out is not None:
        write_json(result, json_out)


@app.command("demo")
def demo(
    out: Path = typer.Option(
        Path("runs/demo"), "--out", help="Folder for data/, teacher/, glitr/, gifs/ and the results."
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
) -> None:
    """Toy data, teacher, GliTr, evaluation against baselines and glimpse GIFs, in one resumable command."""
    from glitr_cli.demo import run_demo

    run_demo(out, quick=quick, epochs_scale=epochs_scale, train_videos=train_videos, gifs=gifs)


recipes_app = typer.Typer(help="The recipes shipped with glitr: list them, or copy one to edit.", no_args_is_help=False)
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
