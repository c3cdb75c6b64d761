"""The CLI end to end: train-teacher -> train-glitr -> eval typed bare, kills, and user mistakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, assert_same_weights, model_weights, run_glitr


@pytest.fixture()
def glitr(project, glitr):
    """The in-process `glitr`, in the project folder."""
    return glitr


def one_error_line(result: tuple[int, str, str]) -> str:
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.slow
def test_teacher_then_glitr_then_eval_typed_bare(project, glitr):
    code, _, err = glitr("train-teacher", "recipes/tiny_teacher.yaml")
    assert code == 0, err
    teacher_run = project / "runs/tiny_teacher"
    assert {p.name for p in teacher_run.iterdir()} == {"recipe.yaml", "checkpoints", "metrics.jsonl"}
    assert (teacher_run / "checkpoints/last.pt").is_file()
    assert (teacher_run / "recipe.yaml").read_text().startswith("# resolved recipe of run tiny_teacher")

    code, _, err = glitr("train-glitr", "recipes/tiny.yaml")  # finds runs/tiny_teacher by itself
    assert code == 0, err
    code, out, err = glitr("eval", "recipes/tiny.yaml")
    assert code == 0, err
    assert "learned" in out and "center" in out and "random" in out
    result = json.loads((project / "runs/tiny/eval.json").read_text())
    assert set(result["policies"]) == {"learned", "center", "random"} and "teacher" in result
    assert (project / "runs/tiny/accuracy.png").is_file()

    checkpoint = "runs/tiny_teacher/checkpoints/last.pt"
    code, _, err = glitr("eval", "recipes/tiny_teacher.yaml", "--checkpoint", checkpoint, "--out", "elsewhere")
    assert code == 0, err
    assert json.loads((project / "elsewhere/eval.json").read_text())["kind"] == "teacher"

    code, _, err = glitr("train-teacher", "recipes/tiny_teacher.yaml")  # finished: nothing to do
    assert code == 0 and "already trained" in err


@pytest.mark.slow
def test_sigkilled_run_restarted_ends_with_the_same_weights(project):
    longer = ["optim.epochs=4", "train.checkpoint_every=1", "train.eval_every=0"]
    out = run_glitr("train-teacher", "recipes/tiny_teacher.yaml", *longer, "output_dir=runs/reference", cwd=project)
    assert out.returncode == 0, out.stderr

    cmd = [sys.executable, "-m", "glitr_cli", "train-teacher", "recipes/tiny_teacher.yaml", *longer]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = project / "runs/tiny_teacher/checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob("step_0000000[5-9].pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: maybe mid-step, maybe mid-save
    proc.wait()
    steps = sorted(int(p.stem.removeprefix("step_")) for p in ckpts.glob("step_*.pt"))
    assert 1 <= len(steps) <= 2 and steps[-1] < 16  # killed mid-run (16 steps in all), keep_last=2 kept

    out = run_glitr("train-teacher", "recipes/tiny_teacher.yaml", *longer, cwd=project)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stderr
    assert_same_weights(model_weights(ckpts / "last.pt"), model_weights(project / "runs/reference/checkpoints/last.pt"))


def test_recipe_typo_exits_2_with_key_and_suggestion(project, glitr):
    (project / "recipes/typo.yaml").write_text("kind: teacher\noptim:\n  epoch: 3\n")
    line = one_error_line(glitr("train-teacher", "recipes/typo.yaml"))
    assert "unknown key 'optim.epoch' in recipes/typo.yaml; did you mean 'optim.epochs'?" in line
    line = one_error_line(glitr("train-teacher", "recipes/tiny_teacher.yaml", "optim.lr=1"))
    assert "unknown key 'optim.lr' in override 'optim.lr=1'" in line
    line = one_error_line(glitr("eval", "recipes/tiny.yaml", "train.seed=x"))
    assert "'train.seed' in override 'train.seed=x' expects int" in line


def test_missing_inputs_name_the_command_that_makes_them(project, glitr, tmp_path, monkeypatch):
    line = one_error_line(glitr("train-glitr", "recipes/tiny.yaml"))
    assert "runs/tiny_teacher/checkpoints/last.pt not found" in line
    assert "glitr train-teacher recipes/tiny_teacher.yaml" in line
    line = one_error_line(glitr("eval", "recipes/tiny.yaml"))
    assert "glitr train-glitr recipes/tiny.yaml" in line
    line = one_error_line(glitr("train-teacher", "recipes/nope.yaml"))
    assert "recipe recipes/nope.yaml not found" in line
    line = one_error_line(glitr("train-teacher", "recipes/tiny_teacher.yaml", "model.pretrained=pretrained/ibot.pth"))
    assert "pretrained/ibot.pth not found" in line and "model.allow_random_init=true" in line
    empty = tmp_path / "no_data"
    empty.mkdir()
    monkeypatch.setenv("GLITR_DATA", str(empty))
    line = one_error_line(glitr("train-teacher", "recipes/tiny_teacher.yaml"))
    assert "glitr prepare-data toy" in line


def test_wrong_kind_and_bad_checkpoint_exit_2(project, glitr):
    line = one_error_line(glitr("train-teacher", "recipes/tiny.yaml"))
    assert "run it with: glitr train-glitr recipes/tiny.yaml" in line
    bad = project / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    line = one_error_line(glitr("train-teacher", "recipes/tiny_teacher.yaml", "--resume", "bad.pt"))
    assert "bad.pt" in line and "not a readable PyTorch checkpoint" in line
