"""Recipes: one YAML file describes a whole run; every default lives in the dataclasses below.

Precedence is YAML, then `section.key=value` overrides from the command line. Unknown keys and
values of the wrong type are a `GlitrError` naming the key, where it came from and the closest
valid key. `resolve_recipe` fills the paths that default to the project layout (data from
`data/<dataset>/`, output to `runs/<name>/`, a GliTr run's teacher from
`runs/<name>_teacher/checkpoints/last.pt`); the resolved recipe is what a run saves.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console

from glitr_cli.errors import GlitrError, warn
from glitr_cli.files import atomic_write_text
from glitr_cli.paths import data_root, find_recipe, recipe_stem, run_dir
from glitr_cli.progress import PROGRESS_EVERY

COMMANDS = {"teacher": "train-teacher", "glitr": "train-glitr"}  # the command that trains each recipe kind


@dataclass
class DataConfig:
    """Where clips come from and how they are sampled and augmented (DESIGN §4)."""

    dataset: str = "toy"  # folder name under the data root: ssv2 | jester | toy
    root: str | None = None  # None: <data root>/<dataset>; data root = $GLITR_DATA or ./data
    train_split: str = "train"
    val_split: str = "val"
    num_frames: int = 16  # T: one frame per equal segment (TSN sampling)
    sampling: Literal["original", "whole_clip"] = "original"  # segments as the release cut them, or over every frame
    min_train_frames: int = 3  # training lists drop shorter clips (evaluation keeps them)
    img_size: int = 224  # training crop and evaluation centre crop
    resize: int = 256  # evaluation: short side before the centre crop
    randaug_m: float = 7  # RandAugment magnitude on the 0-10 scale, the same ops for every frame
    randaug_n: int = 4  # ops per clip; 0 turns RandAugment off
    randaug_mstd: float = 0.5
    randaug_prob: float = 0.5  # each drawn op is applied with this probability (timm's rand-m7-n4)
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized crop area range
    ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    crop_resize: Literal["original", "antialiased"] = "original"  # normalised bilinear, or uint8 bicubic antialiased
    erase_prob: float = 0.0  # random erasing probability
    workers: int | Literal["auto"] = "auto"  # loader processes per training process; auto: from the cores (runtime.py)
    decode_on: Literal["loader", "device"] = "loader"  # device: training JPEGs decoded on the GPU (with augment_on)
    augment_on: Literal["loader", "device"] = "loader"  # device: the training transform runs on the GPU
    max_bad_fraction: float = 0.01  # stop training when more of an epoch's clips had unreadable frames


@dataclass
class ModelConfig:
    """GliTr geometry and where its starting weights come from; None keeps the timm model's value."""

    backbone: str = "vit_small_patch16_224"  # timm ViT name for T_f (DeiT-S geometry)
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    stem: Literal["patch", "conv"] = "patch"  # T_f's patch embedding: one linear patch projection, or a conv stack
    temporal_dim: int | None = None  # None: 2 * embed_dim
    temporal_depth: int = 4
    temporal_heads: int = 6
    glimpse_size: int = 6  # glimpse side in patches (g)
    drop_path: float = 0.1
    fused_attn: bool = True
    pretrained: str | None = None  # teacher: T_f weights, an iBOT/ViT .pth file or a timm pretrained name
    init_from: str | None = None  # teacher: start from another GliTr teacher checkpoint (Jester from SSv2)
    allow_random_init: bool = False  # a missing pretrained/init_from/videomae file warns instead of failing


@dataclass
class ObjectiveConfig:
    """What the loss sees: targets (smoothing, mixup/cutmix) and the models it learns from."""

    label_smoothing: float = 0.0
    mixup: float = 0.0  # teacher: mixup Beta alpha, 0 = off
    cutmix: float = 0.0  # teacher: cutmix Beta alpha, 0 = off (same box on every frame)
    mixup_prob: float = 1.0  # probability that a batch is mixed at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    videomae: str | None = None  # teacher: VideoMAE checkpoint to distil from (SSv2), None = no distillation
    teacher: str | None = None  # GliTr run: teacher checkpoint; None: runs/<name>_teacher/checkpoints/last.pt


@dataclass
class GroupLR:
    """Learning rate of one module: held at 0 for `hold_epochs`, then a per-iteration cosine from
    `base` to `floor` whose first `warmup_epochs` are a linear warm-up from `warmup_start`."""

    base: float = 1e-5  # scaled by global batch / optim.lr_batch
    floor: float = 1e-7  # not scaled
    warmup_epochs: float = 0.0
    warmup_start: float = 1e-6  # not scaled
    # held still for this many epochs first (no update, no AdamW state, the teacher's location losses not
    # computed for a held locator); the warm-up + cosine runs over the rest
    hold_epochs: float = 0.0


@dataclass
class OptimConfig:
    """AdamW with one parameter group per module (T_f backbone, T_c classifier, T_l locator)."""

    epochs: int = 10
    batch_size: int = 64  # global: all processes and accumulation steps together
    accum_steps: int = 1  # gradient accumulation; per-process batch = batch_size / (world * accum_steps)
    lr_batch: int = 128  # lr = base * batch_size / lr_batch
    weight_decay: float = 0.05
    exclude_from_decay: bool = True  # no decay on norms, biases, embeddings; False decays all (the original)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float | None = None  # max global gradient norm, None = no clipping
    fused: bool = True  # AdamW's fused kernel when the parameters are on a GPU (same update, fewer launches)
    backbone: GroupLR = field(default_factory=GroupLR)
    classifier: GroupLR = field(default_factory=GroupLR)
    locator: GroupLR = field(default_factory=GroupLR)


@dataclass
class TrainConfig:
    """How the loop runs: seed, device, precision, checkpoint and evaluation cadence."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast on CUDA only; CPU always runs fp32
    compile: bool = False  # torch.compile T_f, T_c and T_l (fixed-shape calls; the loop over t stays eager)
    cuda_graphs: bool = True  # one GPU: replay each micro-step (fwd + bwd) as a CUDA graph; eager under torchrun
    grad_checkpointing: bool = False  # recompute T_f's (and T_c's, T_l's) activations in backward: less memory
    keep_freed_memory: bool = True  # glibc: reuse freed host memory for new tensors instead of fresh pages each time
    threads: int = 0  # PyTorch CPU threads; 0: $OMP_NUM_THREADS, else the cores data.workers leave free (recorded)
    checkpoint_every: int = 0  # also save every N optimiser steps (0 = only at the end of each epoch)
    keep_last: int = 3  # numbered checkpoints kept besides last.pt (0 = keep all)
    eval_every: int = 1  # validate every N epochs (0 = never during training)
    log_every: int = 10  # write a metrics.jsonl line every N optimiser steps


@dataclass
class LogConfig:
    """Where metrics go besides metrics.jsonl."""

    progress: bool = True  # progress: a live bar on a terminal, else plain lines
    progress_every: float = PROGRESS_EVERY  # seconds between plain progress lines where output is not a terminal
    tensorboard: bool = False  # needs `pip install glitr[tensorboard]`
    wandb: bool = False  # needs `pip install glitr[wandb]`
    wandb_project: str = "glitr"


@dataclass
class EvalConfig:
    """`glitr eval`: which policies, on which split, with what batch."""

    split: str = "val"
    batch_size: int = 16  # per process
    policies: list[str] = field(default_factory=lambda: ["learned", "center", "random"])
    seed: int = 0  # random-policy locations
    teacher: bool = True  # a GliTr run also reports its teacher's full-frame accuracy
    online_cuda_graphs: bool = True  # online inference (visualize, stream, bench) replays CUDA graphs on a GPU


@dataclass
class Recipe:
    """A complete run: `kind` says which command trains it."""

    name: str | None = None  # None: the recipe file's stem
    kind: Literal["teacher", "glitr"] = "teacher"
    output_dir: str | None = None  # None: runs/<name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------- validation


def _valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a dataclass schema, sections included."""
    keys = []
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        keys.append(key)
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _valid_keys(tp, key + ".")
    return keys


def _unknown_key(key: str, siblings: list[str], source: str) -> GlitrError:
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"
    else:
        anywhere = difflib.get_close_matches(key, _valid_keys(Recipe), n=1, cutoff=0.6)
        hint = f"did you mean '{anywhere[0]}'?" if anywhere else f"valid keys here: {', '.join(siblings)}"
    return GlitrError(f"unknown key '{key}' in {source}; {hint}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return str(tp).replace("typing.", "")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """`value` checked against (and, for numbers and sequences, converted to) the annotation `tp`."""

    def wrong() -> GlitrError:
        return GlitrError(f"'{key}' in {source} expects {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise wrong()
        return _build(tp, value, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise wrong()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source)
            except GlitrError:
                pass
        raise wrong()
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise wrong()
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise wrong()
        return tuple(_convert(v, a, key, source) for v, a in zip(value, args, strict=True))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise wrong()
        (arg,) = typing.get_args(tp)
        return [_convert(v, arg, key, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong()
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong() from None
        raise wrong()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise wrong()
    raise AssertionError(f"unsupported recipe annotation {tp!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if not isinstance(key, str) or key not in names:
            raise _unknown_key(prefix + str(key), names, source)
        kwargs[key] = _convert(value, hints[key], prefix + key, source)
    return cls(**kwargs)


# The range of every numeric key, as an interval: `[` and `]` include the bound, `(` and `)` exclude
# it, `inf` is no bound; a sequence's every element must lie in it, None (where allowed) passes. A
# key not listed is not numeric, or is checked where it is used (names, paths, policies).
_LR_RANGES = {k: "[0, inf)" for k in ("base", "floor", "warmup_epochs", "warmup_start", "hold_epochs")}
RANGES: dict[str, str] = {
    "data.num_frames": "[1, inf)",
    "data.min_train_frames": "[0, inf)",
    "data.img_size": "[1, inf)",
    "data.resize": "[1, inf)",
    "data.randaug_m": "[0, 10]",
    "data.randaug_n": "[0, inf)",
    "data.randaug_mstd": "[0, inf)",
    "data.randaug_prob": "[0, 1]",
    "data.scale": "(0, 1]",
    "data.ratio": "(0, inf)",
    "data.erase_prob": "[0, 1]",
    "data.workers": "[0, inf)",
    "model.embed_dim": "[1, inf)",
    "model.depth": "[1, inf)",
    "model.num_heads": "[1, inf)",
    "model.patch_size": "[1, inf)",
    "model.temporal_dim": "[1, inf)",
    "model.temporal_depth": "[1, inf)",
    "model.temporal_heads": "[1, inf)",
    "model.glimpse_size": "[1, inf)",
    "model.drop_path": "[0, 1)",
    "objective.label_smoothing": "[0, 1)",
    "objective.mixup": "[0, inf)",
    "objective.cutmix": "[0, inf)",
    "objective.mixup_prob": "[0, 1]",
    "objective.mixup_switch_prob": "[0, 1]",
    "optim.epochs": "[1, inf)",
    "optim.batch_size": "[1, inf)",
    "optim.accum_steps": "[1, inf)",
    "optim.lr_batch": "[1, inf)",
    "optim.weight_decay": "[0, inf)",
    "optim.betas": "[0, 1)",
    "optim.eps": "(0, inf)",
    "optim.clip_grad": "(0, inf)",
    **{f"optim.{group}.{k}": r for group in ("backbone", "classifier", "locator") for k, r in _LR_RANGES.items()},
    "train.seed": "[0, inf)",
    "train.threads": "[0, inf)",
    "train.checkpoint_every": "[0, inf)",
    "train.keep_last": "[0, inf)",
    "train.eval_every": "[0, inf)",
    "train.log_every": "[1, inf)",
    "log.progress_every": "[0, inf)",
    "eval.batch_size": "[1, inf)",
    "eval.seed": "[0, inf)",
}


def check_ranges(recipe: Recipe, source: str, overrides: list[str]) -> None:
    """Every numeric value of `recipe` inside its range (`RANGES`), and the few values that must fit
    together; a value out of range is a `GlitrError` naming the key, where it was set (`source` or
    the last override that set it), what it expects and what it got."""

    def where(*keys: str) -> str:
        for override in reversed(overrides):
            set_key = override.partition("=")[0].strip()
            if any(k == set_key or k.startswith(set_key + ".") for k in keys):
                return f"override '{override}'"
        return source

    def get(key: str) -> Any:
        value: Any = recipe
        for part in key.split("."):
            value = getattr(value, part)
        return value

    for key, interval in RANGES.items():
        low_text, high_text = interval[1:-1].split(",")
        low, high = float(low_text), float(high_text)
        value = get(key)
        for v in value if isinstance(value, tuple) else (value,):
            if v is None or isinstance(v, str):  # None or a named value ('auto')
                continue
            low_ok = v > low or (interval[0] == "[" and v == low)
            high_ok = v < high or (interval[-1] == "]" and v == high)
            if low_ok and high_ok:
                continue
            want = [f"{'at least' if interval[0] == '[' else 'above'} {low_text.strip()}"]
            if high != float("inf"):
                want.append(f"{'at most' if interval[-1] == ']' else 'below'} {high_text.strip()}")
            raise GlitrError(f"'{key}' in {where(key)} expects {' and '.join(want)}, got {value!r}")

    for key in ("data.train_split", "data.val_split", "eval.split"):  # the lists a prepared dataset has
        if get(key) not in ("train", "val", "test"):
            raise GlitrError(f"'{key}' in {where(key)} expects train, val or test, got {get(key)!r}")

    d, m = recipe.data, recipe.model
    if d.decode_on == "device" and d.augment_on != "device":
        raise GlitrError(
            f"'data.decode_on=device' in {where('data.decode_on', 'data.augment_on')} needs data.augment_on=device: "
            "frames decoded on the device are transformed there"
        )
    pairs = [("data.scale", d.scale), ("data.ratio", d.ratio)]
    for key, (lo, hi) in pairs:
        if lo > hi:
            raise GlitrError(f"'{key}' in {where(key)} expects [low, high] with low <= high, got {[lo, hi]}")
    if d.resize < d.img_size:
        raise GlitrError(
            f"'data.resize' ({d.resize}) in {where('data.resize', 'data.img_size')} must be at least "
            f"data.img_size ({d.img_size}): evaluation centre-crops img_size from a short side of resize"
        )
    patch = m.patch_size
    if patch is None:
        found = re.search(r"patch(\d+)", m.backbone)
        patch = int(found.group(1)) if found else None
    if patch is not None and m.glimpse_size * patch > d.img_size:
        raise GlitrError(
            f"'model.glimpse_size' in {where('model.glimpse_size', 'model.patch_size', 'data.img_size')}: "
            f"a glimpse of {m.glimpse_size} patches of {patch} px ({m.glimpse_size * patch} px) is larger than "
            f"the {d.img_size} px frame (data.img_size); expects model.glimpse_size at most {d.img_size // patch}"
        )


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), as YAML and checkpoints store it."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(recipe))


# keys that were renamed: old dotted key -> new one (in the same section); old recipes and checkpoints still load
RENAMED = {"eval.cuda_graphs": "eval.online_cuda_graphs"}


def _renamed(data: Any, source: str, prefix: str = "") -> Any:
    """`data` with the old keys of `RENAMED` under their new names, each with a warning."""
    if not isinstance(data, dict):
        return data
    out = {}
    for key, value in data.items():
        new = RENAMED.get(f"{prefix}{key}")
        if new is not None:
            warn(Console(stderr=True), f"'{prefix}{key}' in {source} is now called '{new}'")
            key = new.rpartition(".")[2]
        out[key] = _renamed(value, source, f"{prefix}{key}.")
    return out


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise GlitrError(f"{source}: a recipe must be a YAML mapping, found {type(data).__name__}")
    return _build(Recipe, _renamed(data, source), "", source)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _override_dict(override: str) -> dict[str, Any]:
    key, eq, text = override.partition("=")
    key = key.strip()
    if not eq or not key or any(not part for part in key.split(".")):
        raise GlitrError(f"override {override!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe (a file, or the name of a shipped one: `find_recipe`), apply `section.key=value`
    overrides, validate every key and type."""
    path = find_recipe(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise GlitrError(f"recipe {path} cannot be read as a text file: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise GlitrError(f"recipe {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise GlitrError(f"recipe {path} is empty; start from a shipped one: glitr recipes cp toy {path}")
    recipe = recipe_from_dict(data, str(path))  # file errors name the file
    merged = recipe_to_dict(recipe)
    for override in overrides or []:
        one = _renamed(_override_dict(override), f"override '{override}'")
        _build(Recipe, _merge(recipe_to_dict(Recipe()), one), "", f"override '{override}'")  # names the override
        merged = _merge(merged, one)
    recipe = recipe_from_dict(merged, str(path))
    check_ranges(recipe, str(path), overrides or [])
    if recipe.name is None:
        recipe.name = recipe_stem(path)
    return recipe


def resolve_recipe(recipe: Recipe) -> Recipe:
    """A copy with the layout defaults filled in: data root, output dir, a GliTr run's teacher."""
    out = recipe_from_dict(recipe_to_dict(recipe))
    if out.name is None:
        raise GlitrError("the recipe has no name; set name: in the recipe")
    if out.data.root is None:
        out.data.root = str(Path(data_root()) / out.data.dataset)
    if out.output_dir is None:
        out.output_dir = str(run_dir(out.name))
    if out.kind == "glitr" and out.objective.teacher is None:
        out.objective.teacher = str(run_dir(f"{out.name}_teacher") / "checkpoints" / "last.pt")
    return out


def save_recipe(recipe: Recipe, path: str | Path, header: str = "") -> None:
    """Write `recipe` as YAML (keys in schema order) after optional comment lines `header`."""
    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(path, comments + text)
