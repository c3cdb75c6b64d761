"""TensorBoard and Weights & Biases, the real packages: what a run stopped and resumed leaves in their files."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import read_metrics, tiny_recipe

from glitr_cli.engine.trainer import Trainer

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def stopped_and_resumed(tmp_path: Path, toy_data: Path, *overrides: str) -> Path:
    """The tiny teacher stopped after step 7 (the newest checkpoint is step 6, so step 7 is logged
    twice) and run again to its end (step 8); returns its run directory."""
    run = tmp_path / "run"
    Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={run}", *overrides)).fit(max_steps=7)
    Trainer(tiny_recipe(tmp_path, toy_data, "teacher", f"output_dir={run}", *overrides)).fit()
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == list(range(1, 9))
    return run


def test_tensorboard_shows_each_step_of_a_resumed_run_once(tmp_path, toy_data):
    run = stopped_and_resumed(tmp_path, toy_data, "log.tensorboard=true")
    events = EventAccumulator(str(run / "tensorboard"))  # what TensorBoard shows
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr/backbone", "val/top1/t4", "data/bad_clips"} <= set(tags)
    for tag in tags:
        steps = [event.step for event in events.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag}: steps {steps}"
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 9))


def test_a_resumed_run_continues_its_wandb_run(tmp_path, toy_data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.chdir(tmp_path)  # nothing W&B writes outside tmp_path
    for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        folder = tmp_path / "wandb_home" / name.lower()
        folder.mkdir(parents=True)  # older W&B writes to the working directory where one is missing
        monkeypatch.setenv(f"WANDB_{name}", str(folder))
    run = stopped_and_resumed(tmp_path, toy_data, "log.wandb=true")
    offline_runs = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))  # offline-run-DATE_TIME-ID
    ids = {name.rsplit("-", 1)[1] for name in offline_runs}
    assert len(offline_runs) == 2 and len(ids) == 1, offline_runs
    assert ids == {(run / "wandb_id.txt").read_text().strip()}
