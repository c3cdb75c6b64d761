"""Where the glimpses go, logged at every validation: a locator that stops moving (or never
follows the target one way) shows it in metrics.jsonl and curves.png while the run goes on."""

from __future__ import annotations

import torch
from conftest import panels_drawn, read_metrics, tiny_recipe

from glitr_cli.engine.trainer import Trainer

DIRECTIONS = ["left", "right", "up", "down", "all"]


def validations(run):
    return [r for r in read_metrics(run) if r["split"] == "val"]


def test_validations_log_the_glimpse_spread_and_the_toy_follow_rates(trained_tiny):
    for name in ("tiny_teacher", "tiny"):
        run = trained_tiny / "runs" / name
        records = validations(run)
        assert records, name
        for record in records:
            glimpses = record["glimpses"]
            locations = glimpses["locations"]
            assert set(locations) == {"x_mean", "x_std", "y_mean", "y_std"}
            assert all(len(v) == 4 for v in locations.values())  # T = 4
            # the first glimpse is T_l's learned initial location, the same for every clip
            assert locations["x_std"][0] == locations["y_std"][0] == 0
            assert max(locations["x_std"][1:] + locations["y_std"][1:]) > 0  # later ones depend on the clip
            assert list(glimpses["follow"]) == DIRECTIONS and all(0 <= v <= 1 for v in glimpses["follow"].values())
        assert ("covered_area" in records[-1]["glimpses"]) == (name == "tiny")
        assert panels_drawn(run / "curves.png") == [True] * 6


def test_a_locator_that_never_moves_shows_no_spread(trained_tiny, toy_data, tmp_path):
    """A student whose T_l head is zero (its teacher's, edited) and held for the whole run looks at
    the same place in every clip: every validation logs a spread of exactly zero."""
    ckpt = torch.load(trained_tiny / "runs/tiny_teacher/checkpoints/last.pt", weights_only=False)
    ckpt["model"]["locator.head.weight"].zero_()
    teacher = tmp_path / "still_teacher.pt"
    torch.save(ckpt, teacher)
    held = ["optim.locator.hold_epochs=2", "optim.locator.warmup_epochs=0", "train.checkpoint_every=0"]
    recipe = tiny_recipe(
        tmp_path, toy_data, "glitr", f"output_dir={tmp_path / 'still'}", f"objective.teacher={teacher}", *held
    )
    Trainer(recipe).fit()
    records = validations(tmp_path / "still")
    assert len(records) == 2
    for record in records:
        locations = record["glimpses"]["locations"]
        assert all(v == 0 for key in ("x_std", "y_std") for v in locations[key])
