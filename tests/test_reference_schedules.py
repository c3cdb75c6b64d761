"""The paper recipes' learning rates and weight decay equal the original's (reference-training fixture, `schedules`).

The fixture folder (tests/fixtures/reference-training, plus any folders listed in GLITR_TRAINING_FIXTURES,
os.pathsep-separated) gives, for each released training script, the updates per epoch and the learning rate of every
module group before chosen updates; the recipes, glitr's recipe loader and its schedule/optimiser builders supply the
rest. A listed folder that is missing or malformed fails the test (never skips).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from reference_utils import assert_close, fixture_folders, load_json

import glitr_cli
from glitr_cli.engine.loading import build_model
from glitr_cli.engine.optim import MODULES, build_optimizer, build_schedule
from glitr_cli.recipe import Recipe, load_recipe

ENV_VAR = "GLITR_TRAINING_FIXTURES"
SCRIPTS = ("ssv2_teacher", "ssv2", "jester_teacher", "jester")
RECIPES = Path(glitr_cli.__file__).parent / "recipes"
# The original's AdamW decay, on every parameter (tests/fixtures/reference-training/README.md, item 5).
WEIGHT_DECAY = 0.05
# Small sizes for the weight-decay check: the groups depend on which parameters exist, not on their sizes.
TINY = ["model.embed_dim=24", "model.depth=1", "model.num_heads=2", "model.patch_size=8", "model.temporal_depth=1"]


def read_schedules(folder: Path) -> tuple[dict, dict[str, float]]:
    """The fixture's `schedules` section and their tolerances (relative, absolute)."""
    if not folder.is_dir():
        pytest.fail(f"training fixture folder {folder} does not exist")
    try:
        schedules = load_json(folder, "cases.json")["schedules"]
        tolerance = load_json(folder, "tolerances.json")["schedules"]
        for script in SCRIPTS:
            for module in MODULES:
                entry = schedules[script][module]
                assert entry["lr_before_update"], f"{script}/{module}: no learning rates"
                assert min(entry["steps_per_epoch"], entry["total_updates"], entry["scaled_base"]) > 0, script
        assert min(tolerance["relative"], tolerance["absolute"]) >= 0, "negative tolerance"
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        pytest.fail(f"malformed training fixture folder {folder}: {type(e).__name__}: {e}")
    return schedules, tolerance


def paper_recipe(script: str, overrides: list[str] | None = None) -> Recipe:
    return load_recipe(RECIPES / f"{script}.yaml", overrides)


@pytest.mark.parametrize("folder", fixture_folders("reference-training", ENV_VAR), ids=lambda p: p.name)
def test_learning_rate_of_every_update(folder: Path) -> None:
    """Scaled base, run length and the rate before every listed update, per script and module group."""
    schedules, tol = read_schedules(folder)
    for script in SCRIPTS:
        optim = paper_recipe(script).optim
        groups = schedules[script]
        steps_per_epoch = {groups[m]["steps_per_epoch"] for m in MODULES}
        assert len(steps_per_epoch) == 1, f"{folder.name}/{script}: module groups disagree on steps_per_epoch"
        schedule = build_schedule(
            {m: getattr(optim, m) for m in MODULES},
            global_batch=optim.batch_size,
            lr_batch=optim.lr_batch,
            steps_per_epoch=steps_per_epoch.pop(),
            epochs=optim.epochs,
        )
        for module in MODULES:
            expected = groups[module]
            group = schedule.schedules[module]
            label = f"{folder.name}/{script}/{module}"
            assert group.total == expected["total_updates"], f"{label}: total updates"
            assert_close(f"{label}: scaled base", group.base, expected["scaled_base"], tol["relative"], tol["absolute"])
            updates = sorted(int(u) for u in expected["lr_before_update"])
            actual = [group(u - 1) for u in updates]  # update u (1-based) runs at step u - 1
            wanted = [expected["lr_before_update"][str(u)] for u in updates]
            assert_close(f"{label}: lr before updates {updates}", actual, wanted, tol["relative"], tol["absolute"])


@pytest.mark.parametrize("folder", fixture_folders("reference-training", ENV_VAR), ids=lambda p: p.name)
def test_weight_decay_on_every_parameter(folder: Path) -> None:
    """The optimiser of each paper recipe decays every parameter, norms, biases and embeddings included."""
    read_schedules(folder)
    for script in SCRIPTS:
        recipe = paper_recipe(script, TINY)
        assert recipe.optim.weight_decay == WEIGHT_DECAY, script
        data = recipe.data
        model = build_model(recipe.model, num_classes=5, num_frames=data.num_frames, img_size=data.img_size)
        optimizer = build_optimizer(
            model,
            weight_decay=recipe.optim.weight_decay,
            exclude_from_decay=recipe.optim.exclude_from_decay,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
        )
        decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        names = dict(model.named_parameters())
        assert {n: decay.get(id(p)) for n, p in names.items()} == dict.fromkeys(names, WEIGHT_DECAY), script
        for name in ("backbone.pos_embed", "backbone.norm.bias", "classifier.temporal_embed", "locator.init_loc"):
            assert name in names  # the parameters the check is about exist
        assert [g["module"] for g in optimizer.param_groups] == list(MODULES), script  # one group per module


def test_malformed_fixture_folder_fails(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match="does not exist"):
        read_schedules(tmp_path / "nope")
    (tmp_path / "cases.json").write_text('{"schedules": {}}')
    (tmp_path / "tolerances.json").write_text('{"schedules": {"relative": 0, "absolute": 0}}')
    with pytest.raises(pytest.fail.Exception, match="malformed"):
        read_schedules(tmp_path)
