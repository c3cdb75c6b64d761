"""`glitr demo --quick`: every stage runs on the shipped toy recipes, and a rerun skips them all."""

from __future__ import annotations

import io
import json
import re

from conftest import panels_drawn, run_cli
from PIL import Image
from rich.console import Console

from glitr_cli.demo import run_demo, scaled_epochs
from glitr_cli.engine.loading import load_student


def test_quick_demo_runs_every_stage_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "demo_seed3"
    screen = io.StringIO()
    res = run_demo(out, quick=True, gifs=2, seed=3, console=Console(file=screen, width=80))
    headers = [line for line in screen.getvalue().splitlines() if line.startswith("demo ")]
    assert [h[:8] for h in headers] == [f"demo {i}/5" for i in range(1, 6)]
    assert all(re.fullmatch(r"demo \d/5 · [^…]+ · \d+ s ─+", h) for h in headers), headers  # whole in 80 columns

    assert res.teacher.is_file() and res.student.is_file()
    assert (out / "data" / "val_videofolder.txt").is_file()
    result = json.loads(res.eval_json.read_text())
    assert set(result["policies"]) == {"learned", "center", "random"} and "teacher" in result
    assert res.plot.is_file()
    follow = json.loads(res.follow_json.read_text())
    assert list(follow) == ["left", "right", "up", "down", "all"] and all(0 <= v <= 1 for v in follow.values())
    t = load_student(res.student).num_frames
    assert result["steps"] == t
    assert len(res.gifs) == 2
    for gif in res.gifs:
        with Image.open(gif) as im:
            assert im.n_frames == t
    captured = capsys.readouterr()
    printed = captured.out
    assert captured.err.count("teacher from random weights (model.pretrained: null)") == 1  # said, once
    assert "learned glimpses at t=" in printed and str(res.student) in printed
    curves = [res.teacher.parents[1] / "curves.png", res.student.parents[1] / "curves.png"]
    assert all(c.is_file() and str(c) in printed for c in curves)
    assert all(panels_drawn(c) == [True] * 4 for c in curves)  # one epoch of 2 steps, logged and drawn
    assert "the glimpse holds the whole target at" in printed

    for run in (res.teacher, res.student):
        assert "seed: 3" in (run.parents[1] / "recipe.yaml").read_text()

    # a rerun (through the CLI; --seed 3 picks the folder) finds every stage done and rewrites nothing
    stamps = {p: p.stat().st_mtime_ns for p in (res.teacher, res.student, res.eval_json, res.follow_json, *res.gifs)}
    code, _, err = run_cli(["demo", "--quick", "--seed", "3", "--gifs", "2"], monkeypatch, capsys)
    assert code == 0, err
    assert "24 skipped" in err and "already trained" in err and "up to date" in err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_demo_mistakes_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, expected in [
        (["demo", "--epochs-scale", "0"], "--epochs-scale must be positive"),
        (["demo", "--train-videos", "3"], "--train-videos must be at least 8"),
        (["demo", "--seed", "-1"], "--seed must be 0 or more"),
    ]:
        code, _, err = run_cli(argv, monkeypatch, capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_epochs_scale_scales_the_hold_of_a_held_module():
    assert scaled_epochs("toy_teacher", 0.5) == ["optim.epochs=15", "optim.locator.hold_epochs=10"]
    assert scaled_epochs("toy", 2.0) == ["optim.epochs=30"]  # nothing held
