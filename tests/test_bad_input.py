"""Bad input through the real CLI, in process: every class exits 2 with one `error:` line that names
the file, key or value, never a traceback, and leaves every file and folder as it was.

The files are real: recipes written here, checkpoints written by the trainer (and damaged copies),
videos encoded with PyAV, downloads in the official layouts."""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from data_helpers import JESTER_LABELS, encode_video, make_frames, make_jester_download, make_ssv2_download

from glitr_cli.engine.checkpoint import FORMAT


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `roots`: path -> (size, modification time in ns)."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.stat()
                seen[str(p)] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return seen


def assert_one_error(result: tuple[int, str, str], *needles: str) -> str:
    code, _, err = result
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, (needle, flat)
    return flat


@pytest.fixture()
def unchanged(project: Path, toy_data: Path):
    """Run the test body, then check that neither the project nor the data changed."""
    roots = (project, toy_data)

    class Check:
        def __init__(self) -> None:
            self.before = snapshot(*roots)

        def __call__(self) -> None:
            assert snapshot(*roots) == self.before

    return Check


# ------------------------------------------------------------------------------------------- recipes

RECIPE_FILES = {
    "not YAML": ("optim: [1, 2\n", ["bad.yaml", "not valid YAML", "line 2"]),
    "binary": (bytes(range(128, 256)), ["bad.yaml", "cannot be read as a text file"]),
    "empty": ("", ["bad.yaml", "is empty"]),
    "only a comment": ("# nothing here\n", ["bad.yaml", "is empty"]),
    "a list": ("- optim\n- data\n", ["bad.yaml", "must be a YAML mapping, found list"]),
    "a string": ("hello\n", ["bad.yaml", "must be a YAML mapping, found str"]),
    "unknown section": ("optimm: {epochs: 1}\n", ["unknown key 'optimm'", "bad.yaml", "did you mean 'optim'"]),
    "unknown key": ("optim: {epoch: 1}\n", ["unknown key 'optim.epoch'", "bad.yaml", "did you mean 'optim.epochs'"]),
    "wrong type": ("optim: {epochs: ten}\n", ["'optim.epochs'", "bad.yaml", "expects int", "'ten'"]),
    "section not a mapping": ("optim: 3\n", ["'optim'", "bad.yaml", "expects a mapping"]),
    "out of range": ("optim: {epochs: -3}\n", ["'optim.epochs'", "bad.yaml", "at least 1", "-3"]),
}


@pytest.mark.parametrize("case", list(RECIPE_FILES))
def test_bad_recipe_file(case, project, glitr, unchanged):
    content, needles = RECIPE_FILES[case]
    path = project / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    check = unchanged()
    assert_one_error(glitr("train-teacher", path), *needles)
    check()


# (override, what the line must name); the recipe is the tiny teacher recipe, which is valid
OVERRIDES = {
    "no '='": ("optim.epochs", ["'optim.epochs'", "not of the form section.key=value"]),
    "no key": ("=3", ["'=3'", "not of the form section.key=value"]),
    "wrong type": ("optim.epochs=abc", ["'optim.epochs'", "optim.epochs=abc", "expects int", "'abc'"]),
    "wrong type in a list": ("data.scale=[a, 1]", ["'data.scale'", "expects float, got 'a'"]),
    "unknown key": ("optim.epoc=3", ["unknown key 'optim.epoc'", "did you mean 'optim.epochs'"]),
    "epochs negative": ("optim.epochs=-3", ["'optim.epochs'", "at least 1", "-3"]),
    "epochs zero": ("optim.epochs=0", ["'optim.epochs'", "at least 1", "got 0"]),
    "batch size zero": ("optim.batch_size=0", ["'optim.batch_size'", "at least 1", "got 0"]),
    "accumulation zero": ("optim.accum_steps=0", ["'optim.accum_steps'", "at least 1"]),
    "no frames": ("data.num_frames=0", ["'data.num_frames'", "at least 1"]),
    "no minimum clip length": ("data.min_train_frames=-1", ["'data.min_train_frames'", "at least 0"]),
    "negative learning rate": ("optim.backbone.base=-1e-3", ["'optim.backbone.base'", "at least 0", "-0.001"]),
    "negative floor": ("optim.locator.floor=-1e-7", ["'optim.locator.floor'", "at least 0"]),
    "negative warm-up start": ("optim.classifier.warmup_start=-1", ["'optim.classifier.warmup_start'", "at least 0"]),
    "negative weight decay": ("optim.weight_decay=-0.05", ["'optim.weight_decay'", "at least 0", "-0.05"]),
    "zero eps": ("optim.eps=0", ["'optim.eps'", "above 0"]),
    "beta of 1": ("optim.betas=[0.9, 1.0]", ["'optim.betas'", "below 1, got (0.9, 1.0)"]),
    "probability above 1": ("data.erase_prob=2", ["'data.erase_prob'", "at least 0 and at most 1, got 2.0"]),
    "label smoothing of 1": ("objective.label_smoothing=1", ["'objective.label_smoothing'", "below 1, got 1.0"]),
    "crop scale reversed": ("data.scale=[0.9, 0.5]", ["'data.scale'", "low <= high"]),
    "log every 0": ("train.log_every=0", ["'train.log_every'", "at least 1"]),
    "eval batch zero": ("eval.batch_size=0", ["'eval.batch_size'", "at least 1"]),
    "batch not divisible by accumulation": (
        "optim.accum_steps=3",
        ["optim.batch_size=4 is not divisible by 1 process(es) x optim.accum_steps=3"],
    ),
    "unknown split": ("eval.split=nope", ["'eval.split'", "expects train, val or test, got 'nope'"]),
    "negative workers": ("data.workers=-1", ["'data.workers'", "at least 0"]),
    "workers neither a number nor auto": ("data.workers=many", ["'data.workers'", "expects int or 'auto'", "'many'"]),
    "decoding on the device, transforming in the loader": (
        "data.decode_on=device",
        ["'data.decode_on=device'", "needs data.augment_on=device"],
    ),
    "glimpse larger than the frame": (
        "model.glimpse_size=5",
        ["'model.glimpse_size'", "5 patches of 16 px (80 px)", "64 px frame", "at most 4"],
    ),
    "eval resize below the crop": ("data.resize=32", ["'data.resize'", "(32)", "data.img_size (64)"]),
}

CHECKED_AT_RUN_TIME = {"batch not divisible by accumulation"}  # needs the world size: the trainer's check


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_bad_override(case, project, glitr, unchanged):
    override, needles = OVERRIDES[case]
    check = unchanged()
    flat = assert_one_error(glitr("train-teacher", "recipes/tiny_teacher.yaml", override), *needles)
    if "=" in override and not override.startswith("=") and case not in CHECKED_AT_RUN_TIME:
        assert f"override '{override}'" in flat  # where the value came from
    check()


def test_glimpse_larger_than_the_frame_names_both_settings(project, glitr, unchanged):
    check = unchanged()
    flat = assert_one_error(
        glitr("train-glitr", "recipes/tiny.yaml", "model.patch_size=32", "model.glimpse_size=3"),
        "3 patches of 32 px (96 px)",
        "64 px frame",
        "at most 2",
    )
    assert "model.glimpse_size=3" in flat  # the last override that set one of the keys
    check()


# ---------------------------------------------------------------------------------------- checkpoints


class RunsCode:
    """A pickle that creates `marker` when unpickled (what `weights_only=True` must refuse)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture()
def in_trained(project: Path, trained_tiny: Path) -> Path:
    """The project with the trained tiny runs copied into it (runs/tiny_teacher, runs/tiny)."""
    shutil.copytree(trained_tiny / "runs", project / "runs")
    return project


def _bad_checkpoint(kind: str, project: Path) -> tuple[Path, list[str]]:
    path = project / f"{kind}.pt"
    student = project / "runs" / "tiny" / "checkpoints" / "last.pt"
    if kind == "random":
        path.write_bytes(random.Random(1).randbytes(4096))
        return path, [str(path), "not a readable PyTorch checkpoint"]
    if kind == "truncated":
        data = student.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, [str(path), "not a readable PyTorch checkpoint"]
    if kind == "empty":
        path.write_bytes(b"")
        return path, [str(path), "not a readable PyTorch checkpoint"]
    if kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
        return path, [str(path), "not a glitr training checkpoint"]
    if kind == "torch code":
        torch.save({"format": FORMAT, "kind": "glitr", "payload": RunsCode(project / "pwned")}, path)
        return path, [str(path), "not a readable PyTorch checkpoint", "unsupported GLOBAL"]
    if kind == "pickle code":
        with open(path, "wb") as f:
            pickle.dump(RunsCode(project / "pwned"), f)
        return path, [str(path), "not a readable PyTorch checkpoint"]
    if kind == "folder":
        return project / "runs" / "tiny", ["runs/tiny", "is a folder"]
    raise AssertionError(kind)


CHECKPOINTS = ["random", "truncated", "empty", "foreign", "torch code", "pickle code"]


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_bad_checkpoint_for_eval(kind, in_trained, glitr, unchanged):
    path, needles = _bad_checkpoint(kind, in_trained)
    check = unchanged()
    assert_one_error(glitr("eval", "recipes/tiny.yaml", "--checkpoint", path), *needles)
    assert not (in_trained / "pwned").exists()  # never unpickled with code
    check()


@pytest.mark.parametrize("kind", [*CHECKPOINTS, "folder"])
def test_bad_checkpoint_for_visualize(kind, in_trained, glitr, unchanged):
    video = encode_video(in_trained / "clip.mp4", make_frames(6, 48, 64), "h264")
    path, needles = _bad_checkpoint(kind, in_trained)
    check = unchanged()
    assert_one_error(glitr("visualize", video, "--checkpoint", path), *needles)  # default --out glimpses.gif
    assert not (in_trained / "pwned").exists()
    check()


@pytest.mark.parametrize("kind", [*CHECKPOINTS, "folder"])
def test_bad_checkpoint_for_predict(kind, in_trained, glitr, unchanged):
    video = encode_video(in_trained / "clip.mp4", make_frames(6, 48, 64), "h264")
    path, needles = _bad_checkpoint(kind, in_trained)
    check = unchanged()
    assert_one_error(glitr("predict", path, video), *needles)  # default --out predictions.jsonl
    assert not (in_trained / "pwned").exists()
    check()


def test_teacher_where_a_student_is_needed(in_trained, glitr, unchanged):
    video = encode_video(in_trained / "clip.mp4", make_frames(6, 48, 64), "h264")
    teacher = "runs/tiny_teacher/checkpoints/last.pt"
    check = unchanged()
    assert_one_error(glitr("visualize", video, "--checkpoint", teacher), teacher, "is a teacher checkpoint")
    assert_one_error(glitr("predict", teacher, video), teacher, "is a teacher checkpoint")
    assert_one_error(
        glitr("eval", "recipes/tiny.yaml", "--checkpoint", teacher), teacher, "is a teacher checkpoint", "tiny"
    )
    student = "runs/tiny/checkpoints/last.pt"
    assert_one_error(
        glitr("eval", "recipes/tiny_teacher.yaml", "--checkpoint", student), student, "is a glitr checkpoint"
    )
    check()


@pytest.mark.parametrize(
    "override, needle",
    [("data.num_frames=3", "4 frames of 64 px, the recipe reads 3 of 64"),
     ("data.img_size=48", "4 frames of 64 px, the recipe reads 4 of 48")],
)  # fmt: skip
def test_student_of_other_geometry_than_the_recipe(override, needle, in_trained, glitr, unchanged):
    check = unchanged()
    student = "runs/tiny/checkpoints/last.pt"
    assert_one_error(glitr("eval", "recipes/tiny.yaml", override, "--checkpoint", student), student, needle)
    check()


# --------------------------------------------------------------------------------------------- videos


def write_audio_only(path: Path) -> None:
    """A real encoded file with one audio stream and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        samples = (np.sin(np.arange(8000) / 5.0) * 3000).astype(np.int16)[None]
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


@pytest.mark.parametrize("kind", ["empty", "text", "random bytes", "audio only", "folder without frames", "missing"])
def test_bad_video(kind, in_trained, glitr, unchanged):
    name = {"folder without frames": "clip", "audio only": "clip.wav"}.get(kind, "clip.mp4")
    video = in_trained / name
    if kind == "empty":
        video.write_bytes(b"")
    elif kind == "text":
        video.write_text("not a video\n" * 50)
    elif kind == "random bytes":
        video.write_bytes(random.Random(0).randbytes(5000))
    elif kind == "audio only":
        write_audio_only(video)
    elif kind == "folder without frames":
        video.mkdir()
        (video / "notes.txt").write_text("no frames here\n")
    expected = {
        "folder without frames": "must hold .jpg/.jpeg/.png images",
        "missing": "no such video",
    }.get(kind, "cannot open as a video")
    check = unchanged()
    assert_one_error(glitr("visualize", video, "--checkpoint", "runs/tiny/checkpoints/last.pt"), str(video), expected)
    check()


# -------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--every", "0"], ["--every", "got 0"]),
        (["--every", "-2"], ["--every", "got -2"]),
        (["--out", "glimpses.png"], ["--out glimpses.png", ".gif or .mp4"]),
        (["--out", "glimpses"], ["--out glimpses", ".gif or .mp4"]),
        (["--fps", "0"], ["--fps", "got 0"]),
        (["--size", "-1"], ["--size", "got -1"]),
        (["--device", "cuda:7"], ["--device=cuda:7"]),
        (["--device", "nonsense"], ["--device='nonsense'", "expected auto, cpu, cuda or cuda:N"]),
    ],
)
def test_bad_visualize_option(args, needles, in_trained, glitr, unchanged):
    video = encode_video(in_trained / "clip.mp4", make_frames(6, 48, 64), "h264")
    check = unchanged()
    assert_one_error(glitr("visualize", video, "--checkpoint", "runs/tiny/checkpoints/last.pt", *args), *needles)
    check()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--top-k", "0"], ["--top-k", "got 0"]),
        (["--out", "p.txt"], ["--out p.txt", ".jsonl or .csv"]),
        (["--batch-size", "0"], ["--batch-size", "got 0"]),
        (["--workers", "-1"], ["--workers", "got -1"]),
        (["--device", "nonsense"], ["--device='nonsense'", "expected auto, cpu, cuda or cuda:N"]),
        (["--device", "cuda:7"], ["--device=cuda:7"]),
    ],
)
def test_bad_predict_option(args, needles, in_trained, glitr, unchanged):
    video = encode_video(in_trained / "clip.mp4", make_frames(6, 48, 64), "h264")
    check = unchanged()
    assert_one_error(glitr("predict", "runs/tiny/checkpoints/last.pt", video, *args), *needles)
    check()


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
        (["--repeats", "0"], ["--repeats must be at least 1, got 0"]),
        (["--num-classes", "0"], ["--num-classes must be at least 1, got 0"]),
        (["--warmup", "-1"], ["--warmup must be at least 0, got -1"]),
        (["train.device=nonsense"], ["train.device='nonsense'", "expected auto, cpu, cuda or cuda:N"]),
        (["train.device=cuda:7"], ["train.device=cuda:7"]),
    ],
)
def test_bad_bench_option(args, needles, project, glitr, unchanged):
    check = unchanged()
    assert_one_error(glitr("bench", "recipes/tiny.yaml", *args, "--json", "bench.json"), *needles)
    check()


def test_bad_training_device(project, glitr, unchanged):
    check = unchanged()
    assert_one_error(glitr("train-teacher", "recipes/tiny_teacher.yaml", "train.device=cuda:7"), "train.device=cuda:7")
    check()


# ------------------------------------------------------------------------------------------- datasets


def test_unknown_dataset(project, glitr, unchanged):
    check = unchanged()
    assert_one_error(glitr("prepare-data", "nope"), "No such command 'nope'", "prepare-data --help")
    check()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["toy", "--quality", "0"], "--quality must lie in 1..100, got 0"),
        (["toy", "--short-side", "4"], "--short-side must be at least 8 pixels, got 4"),
        (["toy", "--workers", "-1"], "--workers must be 0 (automatic) or more, got -1"),
        (["toy", "--toy-size", "3"], "--toy-size: expected an even frame side of at least 64 pixels, got 3"),
        (["toy", "--toy-frames", "2"], "--toy-frames: expected at least 4 frames, got 2"),
        (["toy", "--toy-shapes", "square,hexagon"], "--toy-shapes"),
        (["ssv2", "--seed", "3"], "No such option: --seed"),
        (["folder", "--src", "clips", "--val-fraction", "1"], "--val-fraction must lie strictly between 0 and 1"),
    ],
)
def test_bad_prepare_option(args, needle, project, glitr, unchanged):
    (project / "clips" / "cat").mkdir(parents=True)
    encode_video(project / "clips" / "cat" / "a.mp4", make_frames(4, 32, 32), "h264")
    check = unchanged()
    assert_one_error(glitr("prepare-data", *args, "--out", project / "out"), needle)
    assert not (project / "out").exists()
    check()


def _ssv2(src: Path) -> None:
    make_ssv2_download(src, [("1", "train", 0, "vp9", (32, 32), 4), ("2", "validation", 1, "vp9", (32, 32), 4)])


@pytest.mark.parametrize(
    "case, needles",
    [
        ("no label files", ["no Something-Something-V2 download", "missing labels, train, validation label file"]),
        ("no train labels", ["no Something-Something-V2 download", "missing train label file"]),
        ("labels not JSON", ["something-something-v2-labels.json"]),
        ("train labels not a list", ["something-something-v2-train.json"]),
    ],
)
def test_bad_ssv2_download(case, needles, project, glitr, unchanged):
    src = project / "dl"
    _ssv2(src)
    if case == "no label files":
        for p in src.glob("*.json"):
            p.unlink()
    elif case == "no train labels":
        (src / "something-something-v2-train.json").unlink()
    elif case == "labels not JSON":
        (src / "something-something-v2-labels.json").write_text('{"Pushing": "0",\n')
    elif case == "train labels not a list":
        (src / "something-something-v2-train.json").write_text('{"id": "1"}\n')
    check = unchanged()
    assert_one_error(glitr("prepare-data", "ssv2", "--src", src, "--out", project / "out"), *needles)
    assert not (project / "out").exists()
    check()


@pytest.mark.parametrize(
    "content, needle",
    [("1;Swiping Left\n2;Swiping Up\n", "jester-v1-train.csv:2: class 'Swiping Up' is not in the labels file"),
     ("1;Swiping Left\n2\n", "jester-v1-train.csv:2: expected <id>;<class>, got '2'")],
)  # fmt: skip
def test_bad_jester_labels(content, needle, project, glitr, unchanged):
    src = project / "dl"
    make_jester_download(src, [("1", "train", JESTER_LABELS[0], 3), ("2", "validation", JESTER_LABELS[1], 3)])
    (src / "jester-v1-train.csv").write_text(content)
    check = unchanged()
    assert_one_error(glitr("prepare-data", "jester", "--src", src, "--out", project / "out"), needle)
    assert not (project / "out").exists()
    check()


@pytest.mark.parametrize(
    "argv",
    [
        ["train-glitr", "recipes/tiny.yaml", "objective.teacher={ckpt}"],
        ["train-teacher", "recipes/tiny_teacher.yaml", "--resume", "{ckpt}"],
        ["train-teacher", "recipes/tiny_teacher.yaml", "model.pretrained={ckpt}"],
        ["train-teacher", "recipes/tiny_teacher.yaml", "objective.videomae={ckpt}"],
    ],
    ids=["teacher", "resume", "pretrained", "videomae"],
)
def test_no_checkpoint_read_runs_code(argv, project, glitr, unchanged):
    path = project / "code.pt"
    torch.save({"format": FORMAT, "model": RunsCode(project / "pwned")}, path)
    check = unchanged()
    assert_one_error(glitr(*(a.format(ckpt=path) for a in argv)), str(path), "not a readable PyTorch checkpoint")
    assert not (project / "pwned").exists() and not (project / "runs").exists()
    check()


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["eval", "recipes/tiny.yaml", "--nope"], ["No such option: --nope", "glitr eval --help"]),
        (["visualize"], ["Missing argument 'video'", "glitr visualize --help"]),
        (["visualize", "clip.mp4", "--every", "abc"], ["'--every'", "valid int"]),  # typer 0.28: int, later: integer
        (["trian-teacher"], ["No such command 'trian-teacher'"]),
    ],
)
def test_a_mistyped_command_line_is_one_line(argv, needles, project, glitr, unchanged):
    check = unchanged()
    assert_one_error(glitr(*argv), *needles)
    check()
