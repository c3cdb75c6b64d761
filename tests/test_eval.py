"""`glitr eval`: per-step accuracy of each policy and of the teacher, eval.json and accuracy.png."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics
from rich.console import Console

from glitr_cli.data.dataset import build_dataset
from glitr_cli.engine.evaluation import covered_by_step, predict_clips, run_eval
from glitr_cli.engine.loading import load_student
from glitr_cli.engine.online import visualize
from glitr_cli.errors import GlitrError
from glitr_cli.model import build_glitr, glimpse_area_fraction
from glitr_cli.recipe import load_recipe, resolve_recipe
from glitr_cli.runtime import Runtime


@pytest.fixture()
def in_project(trained_tiny: Path, toy_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(trained_tiny)
    monkeypatch.setenv("GLITR_DATA", str(toy_data))
    return trained_tiny


def test_student_eval_json_plot_and_baselines(in_project, tmp_path):
    result = run_eval(load_recipe("recipes/tiny.yaml"), out_dir=tmp_path)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["steps"] == 4 and saved["clips"] == 8 and saved["kind"] == "glitr"
    assert set(saved["policies"]) == {"learned", "center", "random"} and "teacher" in saved
    for entry in [*saved["policies"].values(), saved["teacher"]]:
        assert len(entry["top1"]) == len(entry["top5"]) == 4
        assert all(0 <= a <= b <= 1 for a, b in zip(entry["top1"], entry["top5"], strict=True))
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the learned policy is what training validated: same model, same clips, no randomness
    last_val = [r for r in read_metrics(in_project / "runs/tiny") if r["split"] == "val"][-1]
    assert saved["policies"]["learned"]["top1"] == pytest.approx(last_val["top1"])
    teacher_val = [r for r in read_metrics(in_project / "runs/tiny_teacher") if r["split"] == "val"][-1]
    assert saved["teacher"]["top1"] == pytest.approx(teacher_val["top1"])
    # and, labelled apart, what the paper reports: per t the best top-1 over the run's validations
    vals = [r for r in read_metrics(in_project / "runs/tiny") if r["split"] == "val"]
    best = saved["best_over_epochs"]
    assert best["of"] == "learned" and best["split"] == "val" and best["validations"] == len(vals) >= 2
    assert best["top1"] == [max(r["top1"][t] for r in vals) for t in range(4)]
    for t in range(4):
        assert best["top1"][t] == next(r for r in vals if r["epoch"] == best["epoch"][t])["top1"][t]
    # one 2x2-patch glimpse of a 4x4 grid is a quarter of the frame; centred glimpses always cover it
    assert saved["glimpse_area"] == pytest.approx(0.25)
    assert saved["policies"]["center"]["covered_area"] == pytest.approx(0.25, abs=0.05)
    assert saved["policies"]["random"]["covered_area"] > saved["policies"]["center"]["covered_area"]
    # calibration of the learned policy, and early decisions of every source with its own temperatures
    calibration, early = saved["calibration"], saved["early"]
    assert calibration["of"] == "learned" and calibration["bins"] == 15
    assert all(len(calibration[k]) == 4 for k in ("temperature", "ece", "ece_calibrated", "nll", "nll_calibrated"))
    assert set(early["curves"]) == {"learned", "center", "random", "teacher"}
    assert early["thresholds"][0] < 1 / 8  # 8 classes: the top probability always reaches it
    for name, curve in early["curves"].items():
        top1 = (saved["teacher"] if name == "teacher" else saved["policies"][name])["top1"]
        assert curve["last_step_accuracy"] == pytest.approx(top1[-1])
        assert curve["accuracy"][0] == pytest.approx(top1[0]) and curve["mean_frames"][0] == 1.0
        assert all(1 <= f <= 4 for f in curve["mean_frames"])
    assert (tmp_path / "early.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_random_policy_is_seeded(in_project, tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", ["eval.policies=[random]", "eval.teacher=false"])
    a = run_eval(recipe, out_dir=tmp_path / "a")
    b = run_eval(recipe, out_dir=tmp_path / "b")
    c = run_eval(load_recipe("recipes/tiny.yaml", ["eval.policies=[random]", "eval.seed=1"]), out_dir=tmp_path / "c")
    assert a["policies"] == b["policies"] and "teacher" not in a
    assert c["policies"]["random"]["covered_area"] != a["policies"]["random"]["covered_area"]


def test_teacher_checkpoint_reports_full_frame_accuracy(in_project):
    result = run_eval(load_recipe("recipes/tiny_teacher.yaml"))  # default: its own run dir and last.pt
    assert result["kind"] == "teacher" and len(result["teacher"]["top1"]) == 4
    assert (in_project / "runs/tiny_teacher/eval.json").is_file()
    assert (in_project / "runs/tiny_teacher/accuracy.png").is_file()


def test_eval_of_a_missing_checkpoint_names_the_training_command(in_project, tmp_path):
    recipe = load_recipe("recipes/tiny.yaml", [f"output_dir={tmp_path / 'nothing'}"])
    with pytest.raises(GlitrError, match=r"not found; produce it first: glitr train-glitr"):
        run_eval(recipe)


def test_covered_share_of_the_frame_by_step():
    model = build_glitr(
        num_classes=3, num_frames=2, img_size=112, glimpse_size=3, embed_dim=32, depth=1, num_heads=2,
        temporal_depth=1, temporal_heads=2,
    )  # fmt: skip
    nominal = glimpse_area_fraction(112, 16, 3)
    assert nominal == pytest.approx((48 / 112) ** 2)
    centre = torch.zeros(1, 2, 2)
    assert covered_by_step(model, centre, (112, 112))[0].tolist() == pytest.approx([nominal] * 2, rel=0.05)
    apart = torch.tensor([[[-0.6, -0.6], [0.6, 0.6]]])  # two glimpses that do not overlap
    assert covered_by_step(model, apart, (112, 112))[0].tolist() == pytest.approx([nominal, 2 * nominal], rel=0.05)
    outside = torch.tensor([[[3.0, 3.0], [3.0, 3.0]]])
    assert covered_by_step(model, outside, (112, 112))[0].tolist() == [0.0, 0.0]


def test_eval_and_visualize_give_the_same_probabilities(in_project, tmp_path):
    """For a validation clip and the run's checkpoint, what `glitr eval` computes (its batched pass under
    the run's runtime) and what `glitr visualize` reports step by step (the online predictor under the
    same runtime) are the same probabilities."""
    recipe = resolve_recipe(load_recipe("recipes/tiny.yaml"))
    checkpoint = in_project / "runs/tiny/checkpoints/last.pt"
    student = load_student(checkpoint)
    dataset = build_dataset(recipe.data, "val", train=False)
    for i in (0, 5):
        clip, _ = dataset[i]
        probs = predict_clips(student.model, clip[None], Runtime.from_recipe(recipe)).logits.softmax(-1)[0]  # (T, C)
        frames = dataset.frames_dir / dataset.records[i].id  # the JPEG frames eval decodes
        quiet = Console(file=io.StringIO())
        result = visualize(frames, checkpoint=checkpoint, out=tmp_path / f"{i}.gif", console=quiet)
        assert len(result["frames"]) == probs.shape[0] == 4
        for t, step in enumerate(result["frames"]):
            assert [name for name, _ in step["top"]] == [student.class_names[c] for c in probs[t].topk(3).indices]
            for name, p in step["top"]:
                assert p == pytest.approx(probs[t, student.class_names.index(name)].item(), abs=1e-5)
