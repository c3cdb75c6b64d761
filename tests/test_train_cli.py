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


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.slow
def test_teacher_then_glitr_then_eval_typed_bare(project):
    out = run_glitr("train-teacher", "recipes/tiny_teacher.yaml", cwd=project)
    assert out.returncode == 0, out.stderr
    teacher_run = project / "runs/tiny_teacher"
    assert {p.name for p in teacher_run.iterdir()} == {"recipe.yaml", "checkpoints", "metrics.jsonl"}
    assert (teacher_run / "checkpoints/last.pt").is_file()
    assert (teacher_run / "recipe.yaml").read_text().startswith("# resolved recipe of run tiny_teacher")

    out = run_glitr("train-glitr", "recipes/tiny.yaml", cwd=project)  # finds runs/tiny_teacher by itself
    assert out.returncode == 0, out.stderr
    out = run_glitr("eval", "recipes/tiny.yaml", cwd=project)
    assert out.returncode == 0, out.stderr
    assert "learned" in out.stdout and "center" in out.stdout and "random" in out.stdout
    result = json.loads((project / "runs/tiny/eval.json").read_text())
    assert set(result["policies"]) == {"learned", "center", "random"} and "teacher" in result
    assert (project / "runs/tiny/accuracy.png").is_file()

    out = run_glitr(
        "eval", "recipes/tiny_teacher.yaml", "--checkpoint", "runs/tiny_teacher/checkpoints/last.pt",
        "--out", "elsewhere", cwd=project,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads((project / "elsewhere/eval.json").read_text())["kind"] == "teacher"

    out = run_glitr("train-teacher", "recipes/tiny_teacher.yaml", cwd=project)  # finished: nothing to do
    assert out.returncode == 0 and "already trained" in out.stderr


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
    assert len(list(ckpts.glob("step_*.pt"))) < 16

    out = run_glitr("train-teacher", "recipes/tiny_teacher.yaml", *longer, cwd=project)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stderr
    assert_same_weights(model_weights(ckpts / "last.pt"), model_weights(project / "runs/reference/checkpoints/last.pt"))


def test_recipe_typo_exits_2_with_key_and_suggestion(project):
    (project / "recipes/typo.yaml").write_text("kind: teacher\noptim:\n  epoch: 3\n")
    line = one_error_line(run_glitr("train-teacher", "recipes/typo.yaml", cwd=project))
    assert "unknown key 'optim.epoch' in recipes/typo.yaml; did you mean 'optim.epochs'?" in line
    line = one_error_line(run_glitr("train-teacher", "recipes/tiny_teacher.yaml", "optim.lr=1", cwd=project))
    assert "unknown key 'optim.lr' in override 'optim.lr=1'" in line
    line = one_error_line(run_glitr("eval", "recipes/tiny.yaml", "train.seed=x", cwd=project))
    assert "'train.seed' in override 'train.seed=x' expects int" in line


def test_missing_inputs_name_the_command_that_makes_them(project, tmp_path):
    line = one_error_line(run_glitr("train-glitr", "recipes/tiny.yaml", cwd=project))
    assert "runs/tiny_teacher/checkpoints/last.pt not found" in line
    assert "glitr train-teacher recipes/tiny_teacher.yaml" in line
    line = one_error_line(run_glitr("eval", "recipes/tiny.yaml", cwd=project))
    assert "glitr train-glitr recipes/tiny.yaml" in line
    empty = tmp_path / "no_data"
    empty.mkdir()
    line = one_error_line(
        run_glitr("train-teacher", "recipes/tiny_teacher.yaml", cwd=project, env={"GLITR_DATA": str(empty)})
    )
    assert "glitr prepare-data toy" in line
    line = one_error_line(run_glitr("train-teacher", "recipes/nope.yaml", cwd=project))
    assert "recipe recipes/nope.yaml not found" in line
    line = one_error_line(
        run_glitr("train-teacher", "recipes/tiny_teacher.yaml", "model.pretrained=pretrained/ibot.pth", cwd=project)
    )
    assert "pretrained/ibot.pth not found" in line and "model.allow_random_init=true" in line


def test_wrong_kind_and_bad_checkpoint_exit_2(project):
    line = one_error_line(run_glitr("train-teacher", "recipes/tiny.yaml", cwd=project))
    assert "run it with: glitr train-glitr recipes/tiny.yaml" in line
    bad = project / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    line = one_error_line(run_glitr("train-teacher", "recipes/tiny_teacher.yaml", "--resume", "bad.pt", cwd=project))
    assert "bad.pt" in line and "not a readable PyTorch checkpoint" in line


def test_help_explains_each_command():
    for command in ("train-teacher", "train-glitr", "eval"):
        out = subprocess.run([sys.executable, "-m", "glitr_cli", command, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "section.key=value" in out.stdout
    out = subprocess.run([sys.executable, "-m", "glitr_cli", "eval", "--help"], capture_output=True, text=True)
    assert "--checkpoint" in out.stdout and "--out" in out.stdout
