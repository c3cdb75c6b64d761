"""The fine-tuning recipes, typed as the README types them: your clips -> `prepare-data folder` ->
`train-teacher finetune_teacher` from a trained GliTr teacher -> `train-glitr finetune` -> `eval` ->
`predict`; and where their starting weights come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import model_weights
from data_helpers import encode_video, make_frames

from glitr_cli.engine.build import build_objective
from glitr_cli.recipe import load_recipe, resolve_recipe

# conftest's TINY geometry, one short epoch
TINY = [
    "data.num_frames=4", "data.img_size=64", "data.resize=64", "data.workers=0", "data.randaug_n=1",
    "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.patch_size=16", "model.glimpse_size=2",
    "model.temporal_depth=1", "model.temporal_heads=2",
    "optim.epochs=1", "optim.batch_size=2", "optim.backbone.warmup_epochs=0", "optim.classifier.warmup_epochs=0",
    "optim.locator.warmup_epochs=0", "optim.locator.hold_epochs=0",
    "train.threads=1", "log.progress=false", "eval.batch_size=4",
]  # fmt: skip
CLASSES = ["cat", "dog"]


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (the cwd) with clips/mine/{cat,dog}/ of three clips each, data under data/."""
    codecs = ["h264", "vp9", "mpeg4"]
    for k, (name, ext) in enumerate((c, e) for c in CLASSES for e in ("mp4", "webm", "avi")):
        encode_video(tmp_path / "clips" / "mine" / name / f"{k}.{ext}", make_frames(8, 48, 64, seed=k), codecs[k % 3])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GLITR_DATA", str(tmp_path / "data"))
    return tmp_path


def test_your_clips_to_predictions_with_the_finetune_recipes(project, trained_tiny, glitr):
    code, out, err = glitr("prepare-data", "folder", "--src", "clips/mine", "--short-side", "64")
    assert code == 0, out + err
    assert (project / "data/mine/category.txt").read_text() == "cat\ndog\n"

    tiny_teacher = trained_tiny / "runs/tiny_teacher/checkpoints/last.pt"  # 8 toy classes
    code, _, err = glitr(
        "train-teacher", "finetune_teacher", "data.dataset=mine", f"model.init_from={tiny_teacher}", *TINY
    )
    assert code == 0, err
    teacher = torch.load(project / "runs/finetune_teacher/checkpoints/last.pt", weights_only=True)
    assert teacher["class_names"] == CLASSES and teacher["model"]["classifier.head.weight"].shape[0] == 2

    code, _, err = glitr("train-glitr", "finetune", "data.dataset=mine", *TINY)
    assert code == 0, err
    student = torch.load(project / "runs/finetune/checkpoints/last.pt", weights_only=True)
    assert student["kind"] == "glitr" and student["class_names"] == CLASSES
    assert student["recipe"]["objective"]["teacher"] == "runs/finetune_teacher/checkpoints/last.pt"

    code, _, err = glitr("eval", "finetune", "data.dataset=mine", *TINY)
    assert code == 0, err
    result = json.loads((project / "runs/finetune/eval.json").read_text())
    assert result["clips"] == 2 and result["steps"] == 4 and "teacher" in result

    code, _, err = glitr("predict", "runs/finetune/checkpoints/last.pt", "clips/mine", "data/mine:val", "-o", "p.jsonl")
    assert code == 0, err
    records = [json.loads(line) for line in (project / "p.jsonl").read_text().splitlines()]
    assert len(records) == 6 + 2 and {r["top"][0][0] for r in records} <= set(CLASSES)


def test_the_teacher_starts_from_a_glitr_teacher_or_an_imagenet_vit(project, trained_tiny, tmp_path, glitr):
    assert glitr("prepare-data", "folder", "--src", "clips/mine", "--short-side", "64")[0] == 0
    tiny_teacher = trained_tiny / "runs/tiny_teacher/checkpoints/last.pt"
    given = model_weights(tiny_teacher)

    recipe = resolve_recipe(
        load_recipe("finetune_teacher", ["data.dataset=mine", f"model.init_from={tiny_teacher}", *TINY])
    )
    model = build_objective(recipe, CLASSES, console=None).model
    for key, value in model.state_dict().items():
        if key.startswith("classifier.head."):
            assert value.shape[0] == 2  # a new head for the new classes
        else:
            assert torch.equal(value, given[key]), key

    # a ViT's weights (here a file; by default timm's ImageNet DeiT-S, by name) for T_f alone
    vit = timm.create_model("vit_small_patch16_224", embed_dim=32, depth=1, num_heads=2, img_size=64, num_classes=0)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    recipe = resolve_recipe(
        load_recipe("finetune_teacher", ["data.dataset=mine", f"model.pretrained={tmp_path / 'vit.pth'}", *TINY])
    )
    model = build_objective(recipe, CLASSES, console=None).model
    assert torch.equal(
        model.backbone.state_dict()["blocks.0.attn.qkv.weight"], vit.state_dict()["blocks.0.attn.qkv.weight"]
    )
    shipped = load_recipe("finetune_teacher")
    assert shipped.model.pretrained == "deit_small_patch16_224.fb_in1k" and shipped.model.init_from is None


def test_the_shipped_imagenet_start_has_the_layout_of_the_teacher(tmp_path):
    """The default `model.pretrained` names timm's DeiT-S: its weights (here random, as the download
    is not reachable from the tests; the layout is what matters) load into the recipe's T_f as they
    are, and it was trained on the normalisation glitr feeds."""
    shipped = load_recipe("finetune_teacher")
    vit = timm.create_model(shipped.model.pretrained, pretrained=False, num_classes=0)
    assert vit.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and vit.pretrained_cfg["std"] == (0.229, 0.224, 0.225)
    torch.save(vit.state_dict(), tmp_path / "deit.pth")
    recipe = resolve_recipe(
        load_recipe("finetune_teacher", [f"model.pretrained={tmp_path / 'deit.pth'}", f"data.root={tmp_path}"])
    )
    model = build_objective(recipe, CLASSES, console=None).model
    for key, value in vit.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
