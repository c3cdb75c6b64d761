"""Recipes: every default in the schema, YAML + overrides, clear errors, resolution and round trip."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from rich.console import Console

from glitr_cli.engine.build import build_objective
from glitr_cli.errors import GlitrError
from glitr_cli.paths import recipe_names
from glitr_cli.recipe import (
    ORIGINAL_VALUES,
    PAPER_RECIPES,
    Recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    resolve_recipe,
    save_recipe,
)

RECIPES = Path(__file__).resolve().parents[1] / "glitr_cli" / "recipes"  # shipped in the package
SHIPPED = ["ssv2_teacher", "ssv2", "jester_teacher", "jester", "toy_teacher", "toy", "finetune_teacher", "finetune"]


def test_the_shipped_recipes_are_the_packaged_ones():
    assert recipe_names() == sorted(SHIPPED)
    assert sorted(p.stem for p in RECIPES.glob("*.yaml")) == sorted(SHIPPED)


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_field_has_a_default():
    def check(cls: type) -> None:
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                check(f.default_factory)

    check(Recipe)
    assert recipe_from_dict({}) == Recipe()


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load_and_show_their_command(name):
    path = RECIPES / f"{name}.yaml"
    recipe = load_recipe(path)
    assert recipe.name == name
    command = "train-teacher" if name.endswith("teacher") else "train-glitr"
    assert recipe.kind == ("teacher" if command == "train-teacher" else "glitr")
    lines = path.read_text().splitlines()
    assert lines[0] == f"# glitr {command} recipes/{name}.yaml"
    assert lines[1].startswith(f"# override example: glitr {command} recipes/{name}.yaml ")
    # the override example itself is valid
    load_recipe(path, lines[1].split(f"recipes/{name}.yaml ", 1)[1].split())


def test_every_key_says_what_it_does():
    def check(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help", "").strip(), f"{prefix}{f.name} has no help in recipe.py"
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                check(f.default_factory, f"{prefix}{f.name}.")

    check(Recipe, "")


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipes_keep_the_original_where_an_option_deviates(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    for key, original in ORIGINAL_VALUES.items():
        value = recipe
        for part in key.split("."):
            value = getattr(value, part)
        assert value == original, f"{name}: {key} is {value!r}, the original computes {original!r}"


def test_paper_settings():
    t = load_recipe(RECIPES / "ssv2_teacher.yaml")
    assert (t.optim.batch_size, t.optim.epochs, t.data.num_frames, t.model.glimpse_size) == (60, 40, 16, 6)
    assert (t.optim.backbone.base, t.optim.classifier.base, t.optim.locator.base) == (1e-5, 1e-4, 1e-4)
    assert (t.optim.backbone.floor, t.optim.classifier.floor, t.optim.locator.floor) == (1e-7, 1e-6, 1e-6)
    assert t.optim.locator.warmup_epochs == 15 and t.optim.backbone.warmup_epochs == 0
    assert (t.objective.mixup, t.objective.cutmix, t.objective.label_smoothing, t.data.erase_prob) == (
        0.8,
        1.0,
        0.1,
        0.25,
    )
    assert t.model.drop_path == 0.1 and t.optim.weight_decay == 0.05 and t.objective.videomae
    s = load_recipe(RECIPES / "ssv2.yaml")
    assert (s.optim.batch_size, s.optim.epochs, s.objective.label_smoothing, s.objective.mixup) == (360, 100, 0.1, 0)
    jt = load_recipe(RECIPES / "jester_teacher.yaml")
    assert (jt.optim.batch_size, jt.optim.epochs, jt.data.num_frames) == (100, 50, 8)
    assert jt.model.init_from == "runs/ssv2_teacher/checkpoints/last.pt"
    j = load_recipe(RECIPES / "jester.yaml")
    assert (j.optim.batch_size, j.optim.epochs, j.optim.locator.floor) == (800, 150, 1e-7)
    # the original validates every epoch and reports, per t, the best top-1 over the epochs
    assert all(r.train.eval_every == 1 for r in (t, s, jt, j))


def test_typo_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "optim:\n  epoch: 3\n")
    with pytest.raises(GlitrError, match=r"unknown key 'optim.epoch' in .*r.yaml; did you mean 'optim.epochs'\?"):
        load_recipe(path)
    path = write(tmp_path, "optimm:\n  epochs: 3\n")
    with pytest.raises(GlitrError, match=r"unknown key 'optimm'.*did you mean 'optim'\?"):
        load_recipe(path)
    path = write(tmp_path, "optim:\n  backbone:\n    bse: 1.0\n")
    with pytest.raises(GlitrError, match=r"'optim.backbone.bse'.*did you mean 'optim.backbone.base'"):
        load_recipe(path)


@pytest.mark.parametrize(
    "text, key",
    [
        ("optim:\n  epochs: three\n", "optim.epochs"),
        ("optim:\n  epochs: 2.5\n", "optim.epochs"),
        ("train:\n  compile: 1\n", "train.compile"),
        ("kind: student\n", "kind"),
        ("data:\n  scale: [0.1]\n", "data.scale"),
        ("optim: 3\n", "optim"),
        ("train:\n  precision: fp8\n", "train.precision"),
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(GlitrError, match=rf"'{key}' in .*r.yaml expects"):
        load_recipe(path)


def test_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  epochs: 3\n")
    r = load_recipe(
        path,
        [
            "optim.epochs=5",
            "optim.backbone.base=1e-4",  # YAML reads 1e-4 as a string; floats accept it
            "model.embed_dim=32",
            "model.embed_dim=null",
            "eval.policies=[learned, center]",
            "data.scale=[0.5, 1.0]",
            "name=other",
            "objective.teacher=runs/x/checkpoints/last.pt",
        ],
    )
    assert r.optim.epochs == 5 and r.optim.backbone.base == 1e-4 and r.model.embed_dim is None
    assert r.eval.policies == ["learned", "center"] and r.data.scale == (0.5, 1.0) and r.name == "other"
    assert r.objective.teacher == "runs/x/checkpoints/last.pt"
    assert r.optim.classifier.base == Recipe().optim.classifier.base  # siblings untouched


def test_a_key_that_holds_text_takes_the_text_as_typed(tmp_path):
    path = write(tmp_path, "kind: teacher\n")
    for text in ("off", "no", "yes", "on", "1e5", "0x10", "2024-01-01"):  # YAML: a bool, number or date
        assert load_recipe(path, [f"name={text}"]).name == text
        assert load_recipe(path, [f"model.pretrained={text}"]).model.pretrained == text
    r = load_recipe(path, ["model.pretrained=null", "output_dir='runs/a b'", "train.compile=on", "data.workers=2"])
    assert r.model.pretrained is None and r.output_dir == "runs/a b"  # null and quotes as YAML reads them
    assert r.train.compile is True and r.data.workers == 2  # bool and number keys keep YAML's reading
    with pytest.raises(GlitrError, match=r"'train.compile' in override 'train.compile=off-ish' expects bool"):
        load_recipe(path, ["train.compile=off-ish"])


def test_override_errors(tmp_path):
    path = write(tmp_path, "kind: teacher\n")
    with pytest.raises(GlitrError, match=r"unknown key 'optim.epoc' in override 'optim.epoc=3'; did you mean"):
        load_recipe(path, ["optim.epoc=3"])
    with pytest.raises(GlitrError, match=r"'optim.epochs' in override 'optim.epochs=x' expects int"):
        load_recipe(path, ["optim.epochs=x"])
    with pytest.raises(GlitrError, match="not of the form section.key=value"):
        load_recipe(path, ["optim.epochs"])
    with pytest.raises(GlitrError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = write(tmp_path, "optim: [1, 2\n", "bad.yaml")
    with pytest.raises(GlitrError, match="not valid YAML"):
        load_recipe(bad)


def test_resolve_fills_layout_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("GLITR_DATA", str(tmp_path / "d"))
    r = resolve_recipe(load_recipe(write(tmp_path, "kind: glitr\ndata:\n  dataset: toy\n", "toy.yaml")))
    assert r.data.root == str(tmp_path / "d" / "toy")
    assert r.output_dir == str(Path("runs") / "toy")
    assert r.objective.teacher == str(Path("runs") / "toy_teacher" / "checkpoints" / "last.pt")
    t = resolve_recipe(load_recipe(write(tmp_path, "kind: teacher\n", "toy_teacher.yaml")))
    assert t.objective.teacher is None  # a teacher has no teacher


def test_saved_recipe_round_trips(tmp_path):
    r = load_recipe(RECIPES / "ssv2_teacher.yaml", ["optim.epochs=7", "data.scale=[0.2, 1.0]"])
    save_recipe(r, tmp_path / "recipe.yaml", header="resolved\nsecond line")
    text = (tmp_path / "recipe.yaml").read_text()
    assert text.startswith("# resolved\n# second line\n")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == r
    assert recipe_to_dict(again)["data"]["scale"] == [0.2, 1.0]


# ------------------------------------------------------------------- paper recipes build their models

PAPER = {"ssv2_teacher": 174, "ssv2": 174, "jester_teacher": 27, "jester": 27}


def _build(name: str, *overrides: str):
    """The objective (models included) a paper recipe trains, built without data or training."""
    recipe = resolve_recipe(load_recipe(RECIPES / f"{name}.yaml", list(overrides)))
    console = Console(file=io.StringIO(), width=400)
    objective = build_objective(recipe, [f"class {i}" for i in range(PAPER[name])], console)
    return objective, console.file.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ssv2_teacher", "jester_teacher"])
def test_paper_teacher_recipes_build_with_random_weights_only_when_allowed(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretrained/ and no runs/ here
    missing = "pretrained/ibot_vits_16_checkpoint_teacher.pth" if name == "ssv2_teacher" else "runs/ssv2_teacher"
    with pytest.raises(GlitrError, match=rf"{missing}.* not found .*model.allow_random_init=true"):
        _build(name)
    objective, printed = _build(name, "model.allow_random_init=true")
    assert "RANDOM" in printed and "warning" in printed
    model = objective.model
    assert (model.num_frames, model.img_size, model.glimpse_size, model.patch_size) == (
        16 if name == "ssv2_teacher" else 8,
        224,
        6,
        16,
    )
    assert model.backbone.embed_dim == 384 and len(model.backbone.blocks) == 12 and model.num_classes == PAPER[name]
    assert model.classifier.temporal_embed.shape[-1] == 768 and model.classifier.depth == 4
    # a missing VideoMAE under allow_random_init drops the distillation term, never distils from noise
    assert objective.loss_module.videomae is None
    assert ("distillation term is DROPPED" in printed) == (name == "ssv2_teacher")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ssv2", "jester"])
def test_paper_glitr_recipes_build_from_their_teacher(name, tmp_path, monkeypatch):
    from glitr_cli.engine.checkpoint import save_checkpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(GlitrError, match=rf"runs/{name}_teacher/checkpoints/last.pt not found.*"
                       rf"glitr train-teacher recipes/{name}_teacher.yaml"):  # fmt: skip
        _build(name)
    # a teacher checkpoint as train-teacher writes it (random weights, no training)
    teacher, _ = _build(f"{name}_teacher", "model.allow_random_init=true", "objective.videomae=null")
    state = {
        "kind": "teacher",
        "model": teacher.model.state_dict(),
        "recipe": recipe_to_dict(load_recipe(RECIPES / f"{name}_teacher.yaml")),
        "class_names": [f"class {i}" for i in range(PAPER[name])],
        "progress": {"epoch": 0, "step": 0},
    }
    save_checkpoint(state, tmp_path / f"runs/{name}_teacher/checkpoints", step=0, keep_last=1)
    student, _ = _build(name)
    assert student.kind == "glitr" and student.model.glimpse_size == 6
    for key, value in teacher.model.state_dict().items():  # the student starts as its teacher
        assert torch.equal(student.model.state_dict()[key], value), key


def test_renamed_keys_still_load_with_a_warning(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("eval: {cuda_graphs: false}\n")
    assert load_recipe(old).eval.online_cuda_graphs is False
    assert load_recipe(old, ["eval.cuda_graphs=true"]).eval.online_cuda_graphs is True
    err = " ".join(capsys.readouterr().err.split())
    assert f"'eval.cuda_graphs' in {old} is now called 'eval.online_cuda_graphs'" in err
    assert "'eval.cuda_graphs' in override 'eval.cuda_graphs=true' is now called" in err
