"""Shared fixtures for the engine tests: a tiny generated toy dataset and tiny recipes.

The data is the real toy generator (`prepare_toy`) at its smallest; the
recipes describe models of a few thousand parameters, so a training run takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from glitr_cli.data.prepare import prepare_toy

REPO = Path(__file__).resolve().parents[1]

# a tiny GliTr on 64x64 frames: 4x4 patches of 16 px, 2x2-patch glimpses, T = 4
TINY = """\
kind: {kind}
data: {{dataset: toy, num_frames: 4, img_size: 64, resize: 64, workers: 0, scale: [0.6, 1.0], randaug_n: 1}}
model: {{embed_dim: 32, depth: 1, num_heads: 2, patch_size: 16, glimpse_size: 2, temporal_depth: 1,
        temporal_heads: 2, drop_path: 0.1}}
objective: {objective}
optim:
  epochs: 2
  batch_size: 4
  backbone: {{base: 1.0e-3, floor: 1.0e-5}}
  classifier: {{base: 1.0e-3, floor: 1.0e-5}}
  locator: {{base: 1.0e-3, floor: 1.0e-5, warmup_epochs: 1}}
train: {{log_every: 1, checkpoint_every: 3, keep_last: 2, threads: 1}}
log: {{progress: false}}
eval: {{batch_size: 8}}
"""
TEACHER_OBJECTIVE = "{mixup: 0.8, cutmix: 1.0, label_smoothing: 0.1}"
STUDENT_OBJECTIVE = "{label_smoothing: 0.1}"


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root holding `toy/`: 16 train and 8 val clips of 8 frames at 64x64, 8 classes."""
    root = tmp_path_factory.mktemp("data")
    prepare_toy(root / "toy", workers=1, progress=False, num_train=16, num_val=8, num_test=0, num_frames=8, size=64)
    return root


@pytest.fixture()
def project(tmp_path: Path, toy_data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory (the cwd) with recipes/tiny_teacher.yaml and recipes/tiny.yaml; data from `toy_data`."""
    write_tiny_recipes(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLITR_DATA", str(toy_data))
    return tmp_path


def write_tiny_recipes(project: Path) -> None:
    recipes = project / "recipes"
    recipes.mkdir(exist_ok=True)
    (recipes / "tiny_teacher.yaml").write_text(TINY.format(kind="teacher", objective=TEACHER_OBJECTIVE))
    (recipes / "tiny.yaml").write_text(TINY.format(kind="glitr", objective=STUDENT_OBJECTIVE))


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory, toy_data: Path) -> Path:
    """A project directory whose runs/tiny_teacher and runs/tiny hold trained tiny models (shared, read-only)."""
    from glitr_cli.engine.trainer import Trainer
    from glitr_cli.recipe import load_recipe

    project = tmp_path_factory.mktemp("trained")
    write_tiny_recipes(project)
    old_cwd, old_env = Path.cwd(), os.environ.get("GLITR_DATA")
    os.chdir(project)
    os.environ["GLITR_DATA"] = str(toy_data)
    try:
        Trainer(load_recipe("recipes/tiny_teacher.yaml")).fit()
        Trainer(load_recipe("recipes/tiny.yaml")).fit()
    finally:
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("GLITR_DATA", None)
        else:
            os.environ["GLITR_DATA"] = old_env
    return project


def run_glitr(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    """Run the CLI (`python -m glitr_cli`) in `cwd`; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "glitr_cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli(argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `glitr ARGV` in this process through the console-script entry point; (exit code, stdout, stderr)."""
    from glitr_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["glitr", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def glitr(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """`glitr ARGS` in this process, in the test's cwd and environment: (exit code, stdout, stderr)."""
    return lambda *argv: run_cli([str(a) for a in argv], monkeypatch, capsys)


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def panels_drawn(png: Path) -> list[bool]:
    """Whether each of curves.png's panels shows something in matplotlib's first colour: loss,
    learning rate, top-1, clips/s and, after validations that logged them, glimpse spread and
    toy follow (a figure of 7 or 10 inches, 100 dpi)."""
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    first = np.abs(image - [31, 119, 180]).sum(-1) < 60  # (H, W)
    h, w = first.shape
    n = 3 if h > 800 else 2
    rows = [slice(i * h // n, (i + 1) * h // n) for i in range(n)]
    cols = (slice(0, w // 2), slice(w // 2, w))
    return [bool(first[r, c].any()) for r in rows for c in cols]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_recipe(tmp: Path, toy_data: Path, kind: str = "teacher", *overrides: str):
    """The tiny recipe of `kind` (written to `tmp`), reading `toy_data`, with `overrides`."""
    from glitr_cli.recipe import load_recipe

    name = "tiny_teacher" if kind == "teacher" else "tiny"
    path = tmp / f"{name}.yaml"
    objective = TEACHER_OBJECTIVE if kind == "teacher" else STUDENT_OBJECTIVE
    path.write_text(TINY.format(kind=kind, objective=objective))
    return load_recipe(path, [f"data.root={toy_data / 'toy'}", *overrides])


@pytest.fixture(scope="session")
def exported_tiny(trained_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the trained tiny student's last.pt whose online steps (float32 and int8) are exported and
    cached beside it (`last.pt.step.onnx`, `last.pt.step-int8.onnx`), as `glitr stream --backend onnx`
    leaves them (shared, read-only)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import shutil

    from glitr_cli.engine.onnx import cached_step

    folder = tmp_path_factory.mktemp("exported")
    checkpoint = Path(shutil.copy2(trained_tiny / "runs" / "tiny" / "checkpoints" / "last.pt", folder / "last.pt"))
    for int8 in (False, True):
        cached_step(checkpoint, int8=int8)
    return checkpoint


# `glitr` held after optimiser step N until the test has sent its signal: the signal then arrives
# at that step on any machine, however loaded (without the hold a fast run can finish first)
HELD = textwrap.dedent(
    """
    import os
    import sys
    import time
    from pathlib import Path
    from glitr_cli.cli import main
    from glitr_cli.engine.step import TrainStep

    gate, at = Path(sys.argv.pop(1)), int(sys.argv.pop(1))
    step = TrainStep.__call__

    def held_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        if self.updates == at and not (gate / "sent").exists():
            (gate / f"held{os.environ.get('RANK', '0')}").touch()
            deadline = time.monotonic() + 300
            while not (gate / "sent").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        return out

    TrainStep.__call__ = held_step
    main()
    """
)


def held_glitr(tmp_path: Path, at_step: int) -> tuple[list[str], Path]:
    """What to run instead of `-m glitr_cli` for `glitr` held after optimiser step `at_step` until
    gate/sent exists (each process touches gate/held<RANK> when it waits): (that, gate)."""
    script, gate = tmp_path / "held.py", tmp_path / "gate"
    script.write_text(HELD)
    gate.mkdir()
    return [str(script), str(gate), str(at_step)], gate
