"""The training engine: one loop for the teacher and the GliTr student, and `glitr eval`.

`train` and `evaluate` are what the CLI calls: load a recipe, apply overrides, run, tidy up the
process group. Everything else lives in the submodules: trainer (the loop), objectives (what
differs between teacher and student), optim (AdamW groups and schedule), checkpoint, mixup,
metrics, distributed, evaluate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glitr_cli.errors import GlitrError


def train(
    recipe_path: str | Path, overrides: list[str] | None = None, *, kind: str, resume: str | Path | None = None
) -> None:
    """`glitr train-teacher` / `glitr train-glitr`: train the recipe's model (auto-resuming its run)."""
    from glitr_cli.engine.distributed import cleanup_distributed
    from glitr_cli.engine.trainer import Trainer
    from glitr_cli.recipe import COMMANDS, load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if recipe.kind != kind:
        raise GlitrError(
            f"{recipe_path} is a {recipe.kind} recipe (kind: {recipe.kind}); "
            f"run it with: glitr {COMMANDS[recipe.kind]} {recipe_path}"
        )
    try:
        Trainer(recipe, resume=resume).fit()
    finally:
        cleanup_distributed()


def evaluate(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    *,
    checkpoint: str | Path | None = None,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """`glitr eval`: per-step accuracy of a checkpoint for each glimpse policy (and the teacher)."""
    from glitr_cli.engine.distributed import cleanup_distributed
    from glitr_cli.engine.evaluate import run_eval
    from glitr_cli.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    try:
        return run_eval(recipe, checkpoint=checkpoint, out_dir=out_dir)
    finally:
        cleanup_distributed()
