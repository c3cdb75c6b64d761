"""`glitr predict` on a prepared split (against `glitr eval`), on video files and frame folders, and on
inputs that cannot be read."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import encode_video, make_frames, truncate

from glitr_cli.data.dataset import build_dataset
from glitr_cli.engine.decisions import calibrate, decision_steps
from glitr_cli.engine.evaluation import predict_clips
from glitr_cli.engine.loading import load_student
from glitr_cli.recipe import load_recipe, resolve_recipe
from glitr_cli.runtime import Runtime


@pytest.fixture()
def in_project(trained_tiny: Path, toy_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(trained_tiny)
    monkeypatch.setenv("GLITR_DATA", str(toy_data))
    return trained_tiny


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predictions_on_a_split_are_evals_clip_by_clip(in_project, toy_data, tmp_path, glitr):
    checkpoint = in_project / "runs/tiny/checkpoints/last.pt"
    split = f"{toy_data / 'toy'}:val"
    code, _, summary = glitr("predict", checkpoint, split, "--out", tmp_path / "preds.jsonl", "--batch-size", "3")
    assert code == 0, summary
    records = read_jsonl(tmp_path / "preds.jsonl")

    # eval's per-clip predictions, through eval's own dataset, loader and batched pass
    recipe = resolve_recipe(load_recipe("recipes/tiny.yaml"))
    runtime = Runtime.from_recipe(recipe)
    student = load_student(checkpoint)
    dataset = build_dataset(recipe.data, "val", train=False)
    probs, labels = [], []
    for clips, y in runtime.loader(dataset, batch_size=recipe.eval.batch_size):
        probs.append(predict_clips(student.model, clips, runtime).logits.float().softmax(-1))  # (B, T, C)
        labels.append(y)
    p, y = torch.cat(probs), torch.cat(labels)  # (N, T, C), (N,)

    assert len(records) == len(dataset) == p.shape[0] == 8
    names = student.class_names
    for i, (r, record) in enumerate(zip(records, dataset.records, strict=True)):
        assert r["clip"] == str(toy_data / "toy" / "frames" / record.id) and r["id"] == record.id
        assert r["label"] == dataset.class_names[record.label]
        assert r["top"][0][0] == names[int(p[i, -1].argmax())]  # eval's top-1 at the last step
        assert len(r["steps"]) == 4 and len(r["top"]) == 5
        for t, step in enumerate(r["steps"]):
            assert step["top"][0][0] == names[int(p[i, t].argmax())]
            for name, prob in step["top"]:
                assert prob == pytest.approx(p[i, t, names.index(name)].item(), abs=1e-5)
    assert r["top"] == r["steps"][-1]["top"]

    # and the accuracy those predictions give is the learned policy's in eval.json
    code, _, err = glitr("eval", "recipes/tiny.yaml", "eval.policies=[learned]", "--out", tmp_path / "eval")
    assert code == 0, err
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    correct = sum(r["top"][0][0] == r["label"] for r in records)
    assert result["policies"]["learned"]["top1"][-1] == pytest.approx(correct / len(records))
    assert f"top-1 at the last step on the 8 labelled clips: {correct / 8:.2%}" in summary.replace("\n", " ")


def test_videos_frame_folders_and_unreadable_inputs(in_project, toy_data, tmp_path, glitr):
    checkpoint = in_project / "runs/tiny/checkpoints/last.pt"
    clips = tmp_path / "clips"
    encode_video(clips / "a.mp4", make_frames(9, 48, 64, seed=1), "h264")
    encode_video(clips / "sub" / "b.webm", make_frames(3, 64, 48, seed=2), "vp9")  # shorter than T = 4
    encode_video(clips / "sub" / "c.webm", make_frames(24, 48, 64, seed=3), "vp9")
    truncate(clips / "sub" / "c.webm", 0.5)
    (clips / "sub" / "d.avi").write_bytes(b"not a video\n" * 40)
    (clips / "notes.txt").write_text("not a clip\n")
    # a frame folder straight from the prepared dataset: the same pixels as its split's clip
    val = (toy_data / "toy" / "val_videofolder.txt").read_text().split()[0]
    frames = toy_data / "toy" / "frames" / val

    out = tmp_path / "out" / "preds.jsonl"
    code, out_text, err = glitr("predict", checkpoint, clips, frames, f"{toy_data / 'toy'}:val", "-o", out, "-j", "2")
    assert code == 1, out_text + err  # two inputs failed
    assert "predicted, 2 failed" in err.replace("\n", " ")
    failed = dict(
        line.split("\t", 1) for line in (tmp_path / "out" / "preds.jsonl.failed.txt").read_text().splitlines()
    )
    assert list(failed) == [str(clips / "sub" / "c.webm"), str(clips / "sub" / "d.avi")]
    assert "truncated" in failed[str(clips / "sub" / "c.webm")]
    assert "cannot open as a video" in failed[str(clips / "sub" / "d.avi")]
    records = read_jsonl(out)
    assert [r["clip"] for r in records[:3]] == [str(clips / "a.mp4"), str(clips / "sub" / "b.webm"), str(frames)]
    assert len(records) == 3 + 8
    for r in records:
        assert len(r["steps"]) == 4 and all(-3 < v < 3 for s in r["steps"] for v in s["location"])
        assert sum(p for _, p in r["top"]) <= 1 + 1e-6
    from_split = next(r for r in records if r.get("id") == val)
    for a, b in zip(records[2]["steps"], from_split["steps"], strict=True):
        assert [n for n, _ in a["top"]] == [n for n, _ in b["top"]]
        assert a["location"] == pytest.approx(b["location"], abs=1e-5)

    # CSV: a row per clip and step, the final prediction at step T
    code, _, err = glitr("predict", checkpoint, clips / "a.mp4", "--out", tmp_path / "p.csv", "--top-k", "2")
    assert code == 0, err
    rows = list(csv.reader((tmp_path / "p.csv").read_text().splitlines()))
    assert rows[0] == ["clip", "label", "step", "x", "y", "top1", "p1", "top2", "p2"]
    assert [row[2] for row in rows[1:]] == ["1", "2", "3", "4"]
    assert rows[-1][5] == records[0]["top"][0][0]


def test_the_failed_clips_of_a_prediction_in_a_datasets_folder_leave_its_failed_txt(in_project, tmp_path, glitr):
    """Predictions written into a prepared dataset's folder list their failures in a file named after the
    output, not in the dataset's own failed.txt; a later run without failures removes that list."""
    checkpoint = in_project / "runs/tiny/checkpoints/last.pt"
    mine = tmp_path / "mine"
    own = "videos/lost.mp4\tcannot open as a video (Invalid data found when processing input)\n"
    (mine / "videos").mkdir(parents=True)
    (mine / "failed.txt").write_text(own)  # as `glitr prepare-data folder` leaves it
    encode_video(mine / "videos" / "a.mp4", make_frames(9, 48, 64, seed=1), "h264")
    (mine / "videos" / "broken.mp4").write_bytes(b"not a video\n" * 40)
    out = mine / "preds.jsonl"
    code, _, err = glitr("predict", checkpoint, mine / "videos", "-o", out)
    assert code == 1, err
    assert (mine / "failed.txt").read_text() == own
    listed = (mine / "preds.jsonl.failed.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(mine / "videos" / "broken.mp4")]
    assert f"listed in {mine / 'preds.jsonl.failed.txt'}" in err.replace("\n", "")
    (mine / "videos" / "broken.mp4").unlink()
    code, _, err = glitr("predict", checkpoint, mine / "videos", "-o", out)
    assert code == 0, err
    assert not (mine / "preds.jsonl.failed.txt").exists() and (mine / "failed.txt").read_text() == own


def test_mistakes_are_one_line_errors(in_project, tmp_path, glitr):
    student = in_project / "runs/tiny/checkpoints/last.pt"
    teacher = in_project / "runs/tiny_teacher/checkpoints/last.pt"
    video = encode_video(tmp_path / "a.webm", make_frames(4, 32, 32), "vp9")
    cases = [
        ((student, video, "--out", tmp_path / "p.txt"), "must end in .jsonl or .csv"),
        ((teacher, video), "is a teacher checkpoint, not a GliTr"),
        ((student, tmp_path / "nothing.mp4"), "no such video file or folder"),
        ((student, f"{tmp_path}:val"), "is not a prepared dataset"),
        ((student, f"{tmp_path}:dev"), "no such video file or folder (a prepared split is written DIR:split)"),
    ]
    for args, message in cases:
        code, _, err = glitr("predict", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert message in err


def eval_logits(checkpoint: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """`glitr eval`'s per-clip logits (N, T, C) and labels (N,) of the tiny student on the val split,
    through eval's own dataset, loader and batched pass."""
    recipe = resolve_recipe(load_recipe("recipes/tiny.yaml"))
    runtime = Runtime.from_recipe(recipe)
    model = load_student(checkpoint).model
    logits, labels = [], []
    for clips, y in runtime.loader(build_dataset(recipe.data, "val", train=False), batch_size=recipe.eval.batch_size):
        logits.append(predict_clips(model, clips, runtime).logits.float())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def test_decisions_are_evals_clip_by_clip(in_project, toy_data, tmp_path, glitr):
    checkpoint = in_project / "runs/tiny/checkpoints/last.pt"
    split = f"{toy_data / 'toy'}:val"
    code, _, err = glitr("eval", "recipes/tiny.yaml", "eval.policies=[learned]", "--out", tmp_path / "eval")
    assert code == 0, err
    evaluation = tmp_path / "eval" / "eval.json"
    result = json.loads(evaluation.read_text())
    curve, chosen = result["early"]["curves"]["learned"], result["early"]["chosen"]
    assert chosen is not None and (tmp_path / "eval" / "early.png").is_file()
    i = result["early"]["thresholds"].index(chosen["threshold"])
    assert (curve["mean_frames"][i], curve["accuracy"][i]) == (chosen["mean_frames"], chosen["accuracy"])

    # without --decide: the threshold eval chose, and eval's figures for it
    out = tmp_path / "chosen.jsonl"
    code, _, summary = glitr("predict", checkpoint, split, "--calibration", evaluation, "--out", out)
    assert code == 0, summary
    records = read_jsonl(out)
    assert f"decided at tau = {chosen['threshold']:g} after {chosen['mean_frames']:.2f} frames" in summary
    assert np.mean([r["decided_at"] for r in records]) == pytest.approx(chosen["mean_frames"])
    assert np.mean([r["decided"][0] == r["label"] for r in records]) == pytest.approx(chosen["accuracy"])

    # a threshold that splits the clips: predict's decided_at is eval's decision step, clip by clip
    logits, labels = eval_logits(checkpoint)
    probs = calibrate(logits, result["calibration"]["temperature"])  # (N, T, C)
    confidence = probs.amax(-1)  # (N, T)
    first = confidence[:, 0].sort().values
    tau = round(float(first[3] + first[4]) / 2, 6)  # halfway: no clip near it
    steps = decision_steps(confidence, tau)
    assert len(set(steps.tolist())) > 1  # not every clip decided at the same step
    out = tmp_path / "tau.jsonl"
    code, _, summary = glitr("predict", checkpoint, split, "--calibration", evaluation, "--decide", tau, "-o", out)
    assert code == 0, summary
    records = read_jsonl(out)
    names = load_student(checkpoint).class_names
    for r, step, p in zip(records, steps.tolist(), probs, strict=True):
        assert r["decided_at"] == step + 1
        assert r["decided"][0] == names[int(p[step].argmax())]
        assert r["decided"][1] == pytest.approx(float(p[step].max()), abs=1e-5)
        for t, s in enumerate(r["steps"]):  # calibrated probabilities throughout
            assert s["top"][0][1] == pytest.approx(float(p[t].max()), abs=1e-5)

    # CSV: the decided step's row is marked
    code, _, err = glitr(
        "predict", checkpoint, split, "--calibration", evaluation, "--decide", tau, "-o", tmp_path / "p.csv"
    )
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "p.csv").read_text().splitlines()))
    assert [int(row["step"]) for row in rows if row["decided"] == "1"] == [step + 1 for step in steps.tolist()]


def test_calibrated_finds_the_run_s_evaluation(in_project, toy_data, tmp_path, glitr):
    # the demo's layout: DIR/glitr/checkpoints/last.pt, its evaluation in DIR/eval.json
    checkpoint = tmp_path / "demo" / "glitr" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(in_project / "runs/tiny/checkpoints/last.pt", checkpoint)
    split = f"{toy_data / 'toy'}:val"
    code, _, err = glitr("predict", checkpoint, split, "--calibrated", "-o", tmp_path / "p.jsonl")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--calibrated: no eval.json in {checkpoint.parents[1]} or {checkpoint.parents[2]}" in err.replace("\n", "")
    args = ("eval.policies=[learned]", "eval.teacher=false", "--checkpoint", checkpoint, "--out", tmp_path / "demo")
    code, _, err = glitr("eval", "recipes/tiny.yaml", *args)
    assert code == 0, err
    result = json.loads((tmp_path / "demo" / "eval.json").read_text())
    code, _, summary = glitr("predict", checkpoint, split, "--calibrated", "-o", tmp_path / "p.jsonl")
    assert code == 0, summary
    assert f"decided at tau = {result['early']['chosen']['threshold']:g}" in summary
    assert all("decided_at" in r for r in read_jsonl(tmp_path / "p.jsonl"))
    # the evaluation of one checkpoint does not calibrate another
    code, _, err = glitr(
        "predict", in_project / "runs/tiny/checkpoints/last.pt", split, "--calibration", tmp_path / "demo/eval.json"
    )
    assert code == 2 and "evaluates" in err and "evaluate this checkpoint" in err
    code, _, err = glitr("predict", checkpoint, split, "--decide", "1.5")
    assert code == 2 and "--decide must be a probability in (0, 1], got 1.5" in err
