"""The own-videos path as a new user walks it, without a network: clips in class folders, then
`prepare-data folder`, `train-teacher`, `train-glitr`, `eval`, `predict`, `stream` and `export`,
with the commands `glitr --help` and docs/own-videos.md give and the keys that shrink the shipped
recipes for a CPU. Each mistake met on the way must end in one line that points the right way.

Nothing is mocked: the clips are H.264 files, training and prediction are the real commands in
process, and the model hub is a real closed port on 127.0.0.1 with an empty cache, so the
pretrained download meets what a machine without a network meets."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import pytest
from conftest import panels_drawn
from data_helpers import encode_video, make_frames

from glitr_cli.recipe import load_recipe

# the shipped finetune recipes shrunk for a CPU: a few thousand parameters, one epoch of 3 steps
SHRINK = [
    "data.num_frames=4",
    "data.img_size=64",
    "data.resize=64",
    "data.workers=0",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=2",
    "model.patch_size=16",
    "model.glimpse_size=2",
    "model.temporal_depth=1",
    "model.temporal_heads=2",
    "optim.epochs=1",
    "optim.batch_size=3",
    "eval.batch_size=4",
]
CLASSES = ("clap", "jump", "wave")


def one_error(result: tuple[int, str, str]) -> str:
    """The one `error:` line a failed command printed last (after any progress it reported)."""
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error:"), err
    assert "Traceback" not in err and sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


@pytest.fixture()
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The model hub at a closed port (bound, never listening: connections are refused) with an empty cache."""
    from huggingface_hub import constants

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield
    closed.close()


@pytest.mark.slow
def test_own_videos_from_clips_to_predictions_without_a_network(tmp_path, monkeypatch, glitr, offline):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GLITR_DATA", raising=False)  # the default data root, ./data
    for c, name in enumerate(CLASSES):
        for i in range(4):
            encode_video(Path("clips/mine", name, f"{i}.mp4"), make_frames(10, 48, 64, seed=10 * c + i), "h264")

    code, out, _ = glitr("--help")
    assert code == 0 and out.index("demo") < out.index("prepare-data") < out.index("train-teacher")

    code, out, err = glitr("prepare-data", "folder", "--src", "clips/mine", "-j", "1")
    assert code == 0, out + err
    assert Path("data/mine/category.txt").read_text().split() == list(CLASSES)
    line = one_error(glitr("train-teacher", "finetune_teacher", "data.dataset=mien", *SHRINK))  # a typo
    assert "no dataset at data/mien" in line and "did you mean data/mine?" in line
    assert "glitr prepare-data folder --src DIR" in line

    # the teacher: the pretrained weights cannot be downloaded; the line says so at once, with the ways on
    teacher = ("train-teacher", "finetune_teacher", "data.dataset=mine", *SHRINK)
    start = time.perf_counter()
    line = one_error(glitr(*teacher))
    assert time.perf_counter() - start < 10  # not a minute of retries
    assert "not in the local cache" in line and "cannot be reached" in line
    for way in ("model.pretrained=PATH", "model.init_from=", "model.allow_random_init=true"):
        assert way in line
    code, _, err = glitr(*teacher, "model.allow_random_init=true")
    assert code == 0, err
    assert err.count("weights are RANDOM") == 1  # said once
    assert re.search(r"epoch 1/1 .*loss \d", err)  # 3 steps, fewer than train.log_every: logged all the same
    records = [json.loads(r) for r in Path("runs/finetune_teacher/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [3]
    # no follow panel: that needs the toy data
    assert panels_drawn(Path("runs/finetune_teacher/curves.png")) == [True] * 5 + [False]

    # the student must read what its teacher read; the line says what differs and the keys to set
    line = one_error(glitr("train-glitr", "finetune", "data.dataset=mine", *SHRINK[1:], "data.num_frames=8"))
    assert "teacher runs/finetune_teacher/checkpoints/last.pt was trained on 4 frames of 64 px, " in line
    assert "the recipe reads 8 of 64" in line and "data.num_frames=4" in line
    code, _, err = glitr("train-glitr", "finetune", "data.dataset=mine", *SHRINK)
    assert code == 0, err
    assert load_recipe("finetune", ["name=off"]).name == "off"  # a name, not a boolean

    # eval with the shipped recipe reads other frames than the shrunk run: the line names the run's own recipe
    line = one_error(glitr("eval", "finetune", "data.dataset=mine"))
    assert "was trained on 4 frames of 64 px, the recipe reads 8 of 224" in line
    assert "glitr eval runs/finetune/recipe.yaml" in line
    code, _, err = glitr("eval", "runs/finetune/recipe.yaml")
    assert code == 0 and Path("runs/finetune/eval.json").is_file(), err

    # predict: a run folder, a typo and a split that is not there point at what is
    checkpoint = "runs/finetune/checkpoints/last.pt"
    line = one_error(glitr("predict", "runs/finetune", "data/mine:val"))
    assert "runs/finetune is a folder" in line and checkpoint in line and "--checkpoint" not in line
    line = one_error(glitr("predict", "runs/finetune/checkpoints/lats.pt", "data/mine:val"))
    assert f"did you mean {checkpoint}?" in line
    line = one_error(glitr("predict", checkpoint, "data/mine:valid"))
    assert "data/mine:train, data/mine:val" in line
    code, _, err = glitr("predict", checkpoint, "data/mine:val", "clips/mine/wave", "-o", "predictions.jsonl")
    assert code == 0, err
    predicted = [json.loads(r) for r in Path("predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == 3 + 4 and all(Path(r["clip"]).exists() for r in predicted)  # real paths

    code, _, err = glitr("stream", "clips/mine/jump/0.mp4", "-c", checkpoint, "--every", "2",
                         "--as-fast-as-possible", "--jsonl", "stream.jsonl")  # fmt: skip
    assert code == 0 and "done: 10 frames read, 5 processed" in err, err
    assert "each frame also waited for the model to finish the one before" in err

    pytest.importorskip("onnxscript")  # the export extra
    code, out, err = glitr("export", checkpoint, "-o", "mine.onnx")
    assert code == 0 and Path("mine.onnx").is_file(), err
    code, _, err = glitr("stream", "clips/mine/jump/0.mp4", "-c", "mine.onnx", "--backend", "onnx", "--every", "2",
                         "--as-fast-as-possible", "--jsonl", "stream_onnx.jsonl")  # fmt: skip
    assert code == 0 and "done: 10 frames read, 5 processed" in err, err
    lines = [[json.loads(r) for r in Path(f).read_text().splitlines()] for f in ("stream.jsonl", "stream_onnx.jsonl")]
    for a, b in zip(*lines, strict=True):
        if "frame" not in a:  # the summary
            continue  # the exported file predicts what the checkpoint does
        assert a["frame"] == b["frame"] and [n for n, _ in a["top"]] == [n for n, _ in b["top"]]
        assert [p for _, p in a["top"]] == pytest.approx([p for _, p in b["top"]], abs=1e-4)
