"""A wheel built from this checkout works on its own: recipes and the demo, in an empty folder.

The wheel goes into a fresh venv; its dependencies (torch etc.) come from the test's own venv
through a `.pth` line, so nothing is downloaded and the checkout is nowhere on the path.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_lists_recipes_and_runs_the_quick_demo(tmp_path):
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, REPO, cwd=tmp_path)
    (wheel,) = dist.glob("glitr-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    where = run(python, "-c", "import glitr_cli; print(glitr_cli.__file__)", cwd=empty)
    assert Path(where.strip()).is_relative_to(site), where

    glitr = venv / "bin" / "glitr"
    listed = run(glitr, "recipes", cwd=empty)
    for name in ("ssv2", "ssv2_teacher", "jester", "jester_teacher", "toy", "toy_teacher"):
        assert name in listed
    out = run(glitr, "demo", "--quick", "--gifs", "1", cwd=empty)
    assert (empty / "runs" / "demo").is_dir(), out
