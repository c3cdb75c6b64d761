"""Building the models a recipe names, with their starting weights, and the datasets it reads.

Pretrained inputs (iBOT T_f, VideoMAE, an SSv2 teacher for Jester, a GliTr teacher for the
student) must exist; when one is missing the run stops with one line naming the file and, for
our own runs, the command that produces it. `model.allow_random_init=true` turns a missing
pretrained file into a loud warning and random weights instead (for smoke tests).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn
from rich.console import Console

from glitr_cli.errors import GlitrError
from glitr_cli.model import GliTr, build_glitr
from glitr_cli.model.weights import load_backbone, load_jester_teacher_init, load_state_dict_checked
from glitr_cli.recipe import RUNS_DIR, DataConfig, ModelConfig, recipe_from_dict


def warn(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def producing_command(path: str | Path, command: str) -> str:
    """`glitr <command> recipes/<name>.yaml` when `path` lies in runs/<name>/, else a generic hint."""
    parts = Path(path).parts
    if RUNS_DIR in parts and parts.index(RUNS_DIR) + 1 < len(parts):
        name = parts[parts.index(RUNS_DIR) + 1]
        return f"glitr {command} recipes/{name}.yaml"
    return f"glitr {command} RECIPE"


def build_model(
    cfg: ModelConfig, *, num_classes: int, num_frames: int, img_size: int, drop_path: float | None = None
) -> GliTr:
    """GliTr with random weights in the geometry of `cfg`."""
    return build_glitr(
        num_classes=num_classes,
        num_frames=num_frames,
        img_size=img_size,
        glimpse_size=cfg.glimpse_size,
        backbone=cfg.backbone,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        temporal_dim=cfg.temporal_dim,
        temporal_depth=cfg.temporal_depth,
        temporal_heads=cfg.temporal_heads,
        drop_path=cfg.drop_path if drop_path is None else drop_path,
        fused_attn=cfg.fused_attn,
        stem=cfg.stem,
    )


def _is_file_source(source: str) -> bool:
    return Path(source).suffix in (".pth", ".pt", ".bin") or "/" in source or Path(source).exists()


def _present(path: str, what: str, key: str, allow_random: bool, console: Console | None, hint: str = "") -> bool:
    """True when `path` exists; else a GlitrError, or a warning when random weights are allowed."""
    if Path(path).is_file():
        return True
    if not allow_random:
        raise GlitrError(
            f"{what} {path} not found ({key}); {hint or 'put the file there'}, "
            "or set model.allow_random_init=true to start from random weights"
        )
    warn(console, f"{what} {path} not found; {key} is IGNORED and the weights are RANDOM (model.allow_random_init)")
    return False


def model_from_checkpoint(ckpt: dict[str, Any], source: str) -> GliTr:
    """The GliTr a training checkpoint holds, rebuilt from the recipe saved inside it (no drop-path)."""
    recipe = recipe_from_dict(ckpt["recipe"], f"the recipe stored in {source}")
    model = build_model(
        recipe.model,
        num_classes=len(ckpt["class_names"]),
        num_frames=recipe.data.num_frames,
        img_size=recipe.data.img_size,
        drop_path=0.0,
    )
    load_state_dict_checked(model, ckpt["model"], source)
    return model


def load_run_checkpoint(path: str | Path, *, produced_by: str) -> dict[str, Any]:
    """A checkpoint of one of our runs; a missing one names the command that writes it."""
    from glitr_cli.engine.checkpoint import load_checkpoint

    if not Path(path).is_file():
        raise GlitrError(f"checkpoint {path} not found; produce it first: {producing_command(path, produced_by)}")
    return load_checkpoint(path)


def init_teacher_weights(model: GliTr, cfg: ModelConfig, *, num_frames: int, console: Console | None) -> None:
    """A teacher's starting weights: another teacher (`init_from`), else T_f from `pretrained`."""
    if cfg.init_from is not None:
        if not _present(
            cfg.init_from,
            "teacher checkpoint",
            "model.init_from",
            cfg.allow_random_init,
            console,
            f"produce it first: {producing_command(cfg.init_from, 'train-teacher')}",
        ):
            return
        ckpt = load_run_checkpoint(cfg.init_from, produced_by="train-teacher")
        load_jester_teacher_init(model, ckpt["model"], str(cfg.init_from))
        return
    if cfg.pretrained is None:  # the recipe asks for random T_f weights (the toy recipes)
        return
    if _is_file_source(cfg.pretrained) and not _present(
        cfg.pretrained, "pretrained backbone", "model.pretrained", cfg.allow_random_init, console
    ):
        return
    load_backbone(model, cfg.pretrained)


def build_videomae_teacher(
    path: str | None, *, num_classes: int, allow_random: bool, console: Console | None
) -> nn.Module | None:
    """The frozen VideoMAE the SSv2 teacher distils from (None when `objective.videomae` is null)."""
    if path is None:
        return None
    from glitr_cli.model.videomae import build_videomae, load_videomae

    if _present(path, "VideoMAE checkpoint", "objective.videomae", allow_random, console):
        videomae = load_videomae(Path(path), num_classes=num_classes)
    else:
        videomae = build_videomae(num_classes=num_classes)
    return videomae.freeze()


def clip_train_transform(cfg: DataConfig) -> Any:
    """The training transform the recipe describes: uint8 clip (T, 3, H, W) -> normalised float32."""
    from glitr_cli.data.transforms import train_transform

    return train_transform(
        cfg.img_size,
        randaug_m=cfg.randaug_m,
        randaug_n=cfg.randaug_n,
        randaug_mstd=cfg.randaug_mstd,
        scale=cfg.scale,
        ratio=cfg.ratio,
        erase_prob=cfg.erase_prob,
        randaug_prob=cfg.randaug_prob,
    )


def build_dataset(cfg: DataConfig, split: str, *, train: bool) -> Any:
    """The clips of `split` under `cfg.root` (resolved), with training or evaluation transforms.

    Training clips stay uint8 when `cfg.augment_on` is "device" (the trainer transforms them).
    A missing or unprepared dataset is the dataset's own `GlitrError`, naming `glitr prepare-data`."""
    from glitr_cli.data.dataset import VideoFolderDataset
    from glitr_cli.data.transforms import eval_transform

    assert cfg.root is not None, "resolve the recipe first"
    if train:
        transform = None if cfg.augment_on == "device" else clip_train_transform(cfg)
    else:
        transform = eval_transform(cfg.img_size, cfg.resize)
    return VideoFolderDataset(cfg.root, split, num_frames=cfg.num_frames, transform=transform, train=train)
