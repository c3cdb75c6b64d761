"""DDP: a real two-process `torchrun` run with the gloo backend on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REPO, assert_same_weights, held_glitr, model_weights, read_metrics, tiny_recipe

from glitr_cli.engine.trainer import Trainer

# Each rank trains, then saves the weights it holds, so the test can compare them. With
# FAIL_AT_STEP set, rank 1 raises when it reaches that optimiser step (a crash in one process).
SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from glitr_cli.engine.distributed import cleanup_distributed
    from glitr_cli.engine.trainer import Trainer
    from glitr_cli.recipe import load_recipe

    trainer = Trainer(load_recipe(sys.argv[1], sys.argv[3:]))
    fail_at = int(os.environ.get("FAIL_AT_STEP", 0))

    class FailingStep:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            if trainer.runtime.rank == 1 and self.inner.updates == fail_at:
                raise RuntimeError(f"rank 1 crashed at step {fail_at}")
            return self.inner(*args, **kwargs)

    if fail_at:
        trainer.setup()
        trainer.train_step = FailingStep(trainer.train_step)
    trainer.fit()
    torch.save(trainer.model.state_dict(), f"{sys.argv[2]}/rank{trainer.runtime.rank}.pt")
    cleanup_distributed()
    """
)

# no mixup (pairs within a rank's half batch) and no drop-path (per-rank generators), so that
# two ranks x 2 clips compute what one process x 4 clips does
SAME_AS_ONE_PROCESS = ["objective.mixup=0", "objective.cutmix=0", "model.drop_path=0"]


def torchrun_command(tmp_path, toy_data, run: str, program: list[str], *overrides: str) -> list[str]:
    """`torchrun` of `program` (a script or `-m module` and its arguments) in two gloo processes,
    with the tiny teacher recipe (the last of `program`'s arguments) training into tmp_path/run."""
    tiny_recipe(tmp_path, toy_data, "teacher")  # writes tmp_path/tiny_teacher.yaml
    overrides = (f"data.root={toy_data / 'toy'}", f"output_dir={tmp_path / run}", *SAME_AS_ONE_PROCESS, *overrides)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [*launch, *program, *overrides]


def torchrun_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}


def torchrun(tmp_path, toy_data, run: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The tiny teacher recipe trained by two gloo processes into tmp_path/run (SCRIPT saves each rank's weights)."""
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    program = [str(script), str(tmp_path / "tiny_teacher.yaml"), str(tmp_path)]
    cmd = torchrun_command(tmp_path, toy_data, run, program)
    return subprocess.run(cmd, cwd=tmp_path, env=torchrun_env(env), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_torchrun_trains_identical_ranks(tmp_path, toy_data):
    out = torchrun(tmp_path, toy_data, "ddp")
    assert out.returncode == 0, out.stderr[-3000:]

    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert_same_weights(rank0, rank1)
    assert_same_weights(rank0, model_weights(tmp_path / "ddp/checkpoints/last.pt"))
    ckpt = torch.load(tmp_path / "ddp/checkpoints/last.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    records = read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in records if r["split"] == "train"] == list(range(1, 9))
    assert sum(1 for r in records if r["split"] == "val" and r["clips"] == 8) == 2  # all val clips, once each

    # the sampler gives the two ranks the clips one process would batch together, and DDP
    # averages their gradients: the same training as one process up to float rounding
    single = Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'one'}", *SAME_AS_ONE_PROCESS))
    single.fit()
    one = model_weights(tmp_path / "one/checkpoints/last.pt")
    for k in one:
        assert torch.allclose(one[k], rank0[k], atol=5e-5), k

    # one process stopped at step 3 of 8 (its periodic checkpoint), continued by two: the same
    # remaining updates on the same clips
    switch = Trainer(
        tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={tmp_path / 'switch'}", *SAME_AS_ONE_PROCESS)
    )
    switch.fit(max_steps=3)
    out = torchrun(tmp_path, toy_data, "switch")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "step 3)" in out.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "switch") if r["split"] == "train"] == list(range(1, 9))
    switched = model_weights(tmp_path / "switch/checkpoints/last.pt")
    for k in one:
        assert torch.allclose(one[k], switched[k], atol=5e-5), k


@pytest.mark.slow
def test_a_crashing_rank_ends_the_whole_job_quickly(tmp_path, toy_data):
    start = time.monotonic()
    out = torchrun(tmp_path, toy_data, "crash", env={"FAIL_AT_STEP": "3"})
    assert out.returncode != 0
    assert time.monotonic() - start < 60
    assert "rank 1 crashed at step 3" in out.stderr
    assert not (tmp_path / "rank0.pt").exists() and not (tmp_path / "rank1.pt").exists()


@pytest.mark.slow
def test_a_preempted_torchrun_job_saves_on_every_rank_and_resumes_as_if_never_stopped(tmp_path, toy_data):
    """SIGTERM to every process of a `glitr train-teacher` torchrun job (torchrun, both ranks and their
    loader workers, as a scheduler ending a job does): the ranks agree on the step, write one
    checkpoint there and the job ends; the same command again ends with the weights of a job that
    was never stopped."""
    program = ["-m", "glitr_cli", "train-teacher", str(tmp_path / "tiny_teacher.yaml")]
    longer = ["optim.epochs=4", "train.eval_every=0", "train.checkpoint_every=0", "data.workers=1"]  # 16 steps
    reference = torchrun_command(tmp_path, toy_data, "reference", program, *longer)
    done = subprocess.run(reference, cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    held, gate = held_glitr(tmp_path, 3)
    preempted = torchrun_command(tmp_path, toy_data, "preempted", [*held, *program[2:]], *longer)
    job = subprocess.Popen(
        preempted, cwd=tmp_path, env=torchrun_env(), stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not all((gate / f"held{rank}").exists() for rank in (0, 1)) and time.monotonic() < deadline:
        assert job.poll() is None, "the job ended before it could be stopped"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGTERM)
    (gate / "sent").touch()
    _, err = job.communicate(timeout=120)
    assert "stopped by SIGTERM at step 3" in err, err[-3000:]
    assert sorted(p.name for p in (tmp_path / "preempted/checkpoints").glob("step_*.pt")) == ["step_00000003.pt"]
    assert torch.load(tmp_path / "preempted/checkpoints/step_00000003.pt", weights_only=True)["progress"]["step"] == 3
    assert (tmp_path / "preempted/checkpoints/last.pt").samefile(tmp_path / "preempted/checkpoints/step_00000003.pt")

    rerun = torchrun_command(tmp_path, toy_data, "preempted", program, *longer)  # the plain command
    again = subprocess.run(rerun, cwd=tmp_path, env=torchrun_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "step 3)" in again.stderr, again.stderr[-3000:]
    assert_same_weights(
        model_weights(tmp_path / "preempted/checkpoints/last.pt"),
        model_weights(tmp_path / "reference/checkpoints/last.pt"),
    )


@pytest.mark.slow
def test_two_process_eval_gathers_every_clip_for_calibration_and_early_decisions(trained_tiny, toy_data, tmp_path):
    """Each rank evaluates its shard; the calibration and the decision curves cover every clip once,
    as one process computes them."""
    args = ["recipes/tiny.yaml", "eval.policies=[learned]"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launch, "-m", "glitr_cli", "eval", *args, "--out", str(tmp_path / "two")]
    env = torchrun_env({"GLITR_DATA": str(toy_data)})
    done = subprocess.run(cmd, cwd=trained_tiny, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cmd = [sys.executable, "-m", "glitr_cli", "eval", *args, "--out", str(tmp_path / "one")]
    done = subprocess.run(cmd, cwd=trained_tiny, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = (json.loads((tmp_path / run / "eval.json").read_text()) for run in ("two", "one"))
    assert two["clips"] == one["clips"] == 8
    # the shards' batches round the logits differently (~1e-7), and a temperature fitted where the NLL is
    # nearly flat (a large T) moves further than that: 1e-4
    for key in ("temperature", "ece", "ece_calibrated", "nll", "nll_calibrated"):
        assert two["calibration"][key] == pytest.approx(one["calibration"][key], rel=1e-4)
    for name in ("learned", "teacher"):
        for key, values in one["early"]["curves"][name].items():
            assert two["early"]["curves"][name][key] == pytest.approx(values, rel=1e-4), (name, key)
