"""The runtime inference chooses on the machine it runs on, and the ending of loader workers."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from data_helpers import encode_video, make_frames

from glitr_cli import runtime as runtime_module
from glitr_cli.engine.loading import load_student
from glitr_cli.runtime import Runtime


def threads_after(glitr, commands: dict[str, list]) -> dict[str, int]:
    """The PyTorch threads each `glitr` command (run in-process, started from one thread) leaves set."""
    before, chosen = torch.get_num_threads(), {}
    try:
        for name, command in commands.items():
            torch.set_num_threads(1)
            code, _, err = glitr(*command)
            assert code == 0, err
            chosen[name] = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return chosen


def test_inference_chooses_this_machines_threads_not_the_training_nodes(
    trained_tiny, toy_data, tmp_path, monkeypatch, glitr
):
    """A checkpoint's recipe records the training node's threads (the tiny runs record 1) and its
    malloc setting; `predict`, `visualize` and `eval` choose threads for the machine they run on
    ($OMP_NUM_THREADS=3 here) and leave malloc alone."""
    checkpoint = trained_tiny / "runs/tiny/checkpoints/last.pt"
    recipe = load_student(checkpoint).recipe
    assert recipe.train.threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    recipe.train.keep_freed_memory = True
    chosen = Runtime.for_this_machine(recipe, "cpu")
    assert (chosen.threads, chosen.keep_freed_memory) == (3, False)
    assert Runtime.for_this_machine(recipe, "cpu", threads=2).threads == 2  # `glitr stream --threads 2`

    video = encode_video(tmp_path / "clip.mp4", make_frames(8, 48, 64), "h264")
    monkeypatch.chdir(trained_tiny)
    monkeypatch.setenv("GLITR_DATA", str(toy_data))
    commands = {
        "predict": ["predict", checkpoint, video, "-o", tmp_path / "p.jsonl", "--device", "cpu"],
        "visualize": ["visualize", video, "-c", checkpoint, "-o", tmp_path / "v.gif", "--device", "cpu"],
        "eval": ["eval", "runs/tiny/recipe.yaml", "eval.policies=[learned]", "--out", tmp_path / "eval"],
    }
    assert threads_after(glitr, commands) == dict.fromkeys(commands, 3)


def test_stream_and_visualize_give_every_core_to_the_model(trained_tiny, tmp_path, monkeypatch, glitr):
    """They read frames without a loader: a recipe's loader workers (one here, what `data.workers:
    auto` leaves on two cores) take no core from the model."""
    ckpt = torch.load(trained_tiny / "runs/tiny/checkpoints/last.pt", weights_only=False)
    ckpt["recipe"]["data"]["workers"] = 1
    checkpoint = tmp_path / "last.pt"
    torch.save(ckpt, checkpoint)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    video = encode_video(tmp_path / "clip.mp4", make_frames(8, 48, 64), "h264")
    commands = {
        "stream": ["stream", video, "-c", checkpoint, "--jsonl", tmp_path / "s.jsonl", "--as-fast-as-possible"],
        "visualize": ["visualize", video, "-c", checkpoint, "-o", tmp_path / "v.gif", "--device", "cpu"],
    }
    assert threads_after(glitr, commands) == dict.fromkeys(commands, runtime_module.available_cores())


@pytest.fixture()
def running_loader():
    """A runtime loader whose one persistent worker is running (and ignores SIGTERM)."""
    rt = Runtime(torch.device("cpu"), "fp32", False, False, False, False, threads=1, workers=1)
    loader = rt.loader(list(range(8)), batch_size=2)
    assert next(iter(loader)).tolist() == [0, 1]
    yield loader
    runtime_module.stop_workers(loader)


def test_the_private_members_that_end_loader_workers_exist(running_loader):
    """`stop_workers` ends the workers through PyTorch's private `_shutdown_workers` (and its fallback
    through `_workers`): this fails the day a PyTorch release renames them."""
    iterator = running_loader._iterator
    assert callable(iterator._shutdown_workers)
    assert [p.is_alive() for p in iterator._workers] == [True]


def ignored_signals(pid: int) -> int:
    """The mask of the signals process `pid` ignores (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no SigIgn in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the signal mask in /proc")
def test_without_pytorchs_private_shutdown_the_workers_are_killed(running_loader, monkeypatch):
    """Should `_shutdown_workers` disappear, `stop_workers` still ends a worker that ignores SIGTERM."""
    iterator = running_loader._iterator
    (worker,) = iterator._workers
    assert ignored_signals(worker.pid) & (1 << (signal.SIGTERM - 1))  # SIGTERM would not end it
    with monkeypatch.context() as patched:
        patched.delattr(type(iterator), "_shutdown_workers")
        runtime_module.stop_workers(running_loader)
    assert running_loader._iterator is None
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL
    del iterator  # its own clean-up (PyTorch's method is back) finds the worker gone
