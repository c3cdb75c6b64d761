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

from glitr_cli.errors import PREEMPTED_EXIT_CODE


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
    assert {p.name for p in teacher_run.iterdir()} == {"recipe.yaml", "checkpoints", "metrics.jsonl", "curves.png"}
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


def start_training(project, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "glitr_cli", "train-teacher", "recipes/tiny_teacher.yaml", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )  # its own process group: a scheduler's signal to the whole job reaches the loader workers too


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 120
    while not condition() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {what}"


@pytest.mark.slow
def test_killed_or_preempted_runs_restarted_end_with_the_same_weights(project, glitr):
    longer = ["optim.epochs=8", "train.eval_every=0"]  # 32 optimiser steps
    code, _, err = glitr("train-teacher", "recipes/tiny_teacher.yaml", *longer, "output_dir=runs/reference")
    assert code == 0, err
    reference = model_weights(project / "runs/reference/checkpoints/last.pt")

    # SIGKILL: no chance to clean up (maybe mid-step, maybe mid-save); continues from a periodic checkpoint
    killed = [*longer, "train.checkpoint_every=1", "output_dir=runs/killed"]
    ckpts = project / "runs/killed/checkpoints"
    proc = start_training(project, killed)
    wait_for(lambda: list(ckpts.glob("step_0000000[5-9].pt")), proc, "it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.stem.removeprefix("step_")) for p in ckpts.glob("step_*.pt"))
    # killed mid-run; keep_last=2, plus one when the kill fell between writing a checkpoint and pruning
    assert 1 <= len(steps) <= 3 and steps[-1] < 32
    code, _, err = glitr("train-teacher", "recipes/tiny_teacher.yaml", *killed)
    assert code == 0 and "resumed from" in err, err
    assert_same_weights(model_weights(ckpts / "last.pt"), reference)

    # SIGTERM (a scheduler's preemption) to every process of the job, loader workers included: no
    # periodic checkpoints, yet no step is lost, and the process exits with the workers still alive
    preempted = [*longer, "train.checkpoint_every=0", "data.workers=2", "output_dir=runs/preempted"]
    metrics = project / "runs/preempted/metrics.jsonl"
    proc = start_training(project, preempted)
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc, "it could be stopped")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    (saved,) = (project / "runs/preempted/checkpoints").glob("step_*.pt")
    step = int(saved.stem.removeprefix("step_"))
    assert 3 <= step < 32
    assert f"stopped by SIGTERM at step {step}" in err and "rerun the same command to continue" in err
    assert "Traceback" not in err
    done = run_glitr("train-teacher", "recipes/tiny_teacher.yaml", *preempted, cwd=project, timeout=120)
    assert done.returncode == 0 and f"step {step})" in done.stderr, done.stderr  # ended, workers and all
    assert_same_weights(model_weights(project / "runs/preempted/checkpoints/last.pt"), reference)


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


def test_a_missing_checkpoint_names_what_exists_or_what_writes_it(project, glitr):
    """A typo suggests the file meant; a missing checkpoint names a command that exists: the run's
    saved recipe once the run has begun, else a recipe of the run's name, else RECIPE name=RUN."""
    line = one_error_line(glitr("eval", "recipes/tiny.yaml", "--checkpoint", "runs/mine/checkpoints/last.pt"))
    assert "glitr train-glitr RECIPE name=mine" in line  # no recipes/mine.yaml here, and none shipped
    line = one_error_line(glitr("eval", "recipes/tiny.yaml", "--checkpoint", "runs/toy/checkpoints/last.pt"))
    assert "glitr train-glitr recipes/toy.yaml" in line  # the shipped recipe of that name
    (project / "runs/mine").mkdir(parents=True)
    (project / "runs/mine/recipe.yaml").write_text("kind: glitr\n")
    line = one_error_line(glitr("eval", "recipes/tiny.yaml", "--checkpoint", "runs/mine/checkpoints/last.pt"))
    assert "glitr train-glitr runs/mine/recipe.yaml" in line  # the run's own recipe
    (project / "runs/mine/checkpoints").mkdir()
    (project / "runs/mine/checkpoints/last.pt").write_bytes(b"")
    line = one_error_line(glitr("eval", "recipes/tiny.yaml", "--checkpoint", "runs/mien/checkpoints/lst.pt"))
    assert "checkpoint runs/mien/checkpoints/lst.pt not found; did you mean runs/mine/checkpoints/last.pt?" in line


def test_wrong_kind_and_bad_checkpoint_exit_2(project, glitr):
    line = one_error_line(glitr("train-teacher", "recipes/tiny.yaml"))
    assert "run it with: glitr train-glitr recipes/tiny.yaml" in line
    bad = project / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    line = one_error_line(glitr("train-teacher", "recipes/tiny_teacher.yaml", "--resume", "bad.pt"))
    assert "bad.pt" in line and "not a readable PyTorch checkpoint" in line


def test_progress_written_to_a_file_reads_as_plain_lines(project):
    """Piped into a file (a cluster job's log), training reports plain lines with the step, loss, speed,
    elapsed time and ETA while the epoch runs, not only a bar's last state when it ends."""
    log = project / "train.log"
    with open(log, "w") as f:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        overrides = ["optim.epochs=1", "log.progress=true", "log.progress_every=0"]
        cmd = [sys.executable, "-m", "glitr_cli", "train-teacher", "recipes/tiny_teacher.yaml", *overrides]
        assert subprocess.run(cmd, cwd=project, env=env, stdout=f, stderr=subprocess.STDOUT).returncode == 0
    lines = log.read_text().splitlines()
    progress = [i for i, line in enumerate(lines) if line.startswith("epoch 1/1 ")]
    steps = [lines[i].split()[2] for i in progress]
    assert steps == ["1/4", "2/4", "3/4", "4/4"], lines
    first = lines[progress[0]]
    assert "loss " in first and "clips/s" in first and "elapsed 0:00:" in first and " eta 0:" in first, first
    end_of_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1: val top-1"))
    assert progress[-1] < end_of_epoch and "━" not in log.read_text()
