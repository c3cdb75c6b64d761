"""The engine: training, evaluation, online use, checkpoints and the public API for trained models.
`train` and `evaluate` are what the CLI calls; the submodules are mapped in docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glitr_cli.engine.distributed import cleanup_distributed
from glitr_cli.engine.evaluation import run_eval
from glitr_cli.engine.loading import Student, find_checkpoint, load_student
from glitr_cli.engine.trainer import Trainer
from glitr_cli.errors import GlitrError
from glitr_cli.recipe import COMMANDS, load_recipe

__all__ = ["Student", "Trainer", "evaluate", "find_checkpoint", "load_student", "train"]


def train(
    recipe_path: str | Path, overrides: list[str] | None = None, *, kind: str, resume: str | Path | None = None
) -> None:
    """`glitr train-teacher` / `glitr train-glitr`: train the recipe's model (auto-resuming its run)."""
    recipe = load_recipe(recipe_path, overrides)
    if recipe.kind != kind:
        raise GlitrError(
            f"{recipe_path} is a {recipe.kind} recipe (kind: {recipe.kind}); "
            f"run it with: glitr {COMMANDS[recipe.kind]} {recipe_path}"
        )
    Trainer(recipe, resume=resume).fit()
    cleanup_distributed()  # only after success: see cleanup_distributed


def evaluate(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    *,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`glitr eval`: per-step accuracy of a checkpoint for each glimpse policy (and the teacher)."""
    recipe = load_recipe(recipe_path, overrides)
    result = run_eval(recipe, checkpoint=checkpoint, out_dir=out_dir)
    cleanup_distributed()
    return result
