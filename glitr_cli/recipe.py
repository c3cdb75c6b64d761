"""Recipes: one YAML file describes a whole run; every default lives in the dataclasses below, each key a
`setting(default, help)` from which `recipe_reference` writes docs/recipes.md. YAML, then
`section.key=value` overrides; a wrong key or value is a `GlitrError` naming it. `resolve_recipe` fills
the layout defaults (docs/training.md#recipes-overrides-and-runs); the resolved recipe is what a run saves.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console

from glitr_cli.errors import GlitrError, warn
from glitr_cli.files import atomic_write_text
from glitr_cli.paths import data_root, find_recipe, packaged_recipe, recipe_names, recipe_stem, run_dir
from glitr_cli.progress import PROGRESS_EVERY

COMMANDS = {"teacher": "train-teacher", "glitr": "train-glitr"}  # the command that trains each recipe kind


def setting(default: Any, help: str, within: str | None = None) -> Any:
    """A recipe key with its default, one line on what it does and, for a number, the interval it must lie
    in (`[` and `]` include the bound, `(` and `)` exclude it, `inf` is none; every element of a sequence
    must lie in it, None passes). `recipe_reference` prints all three. A list default is copied for every
    recipe; a dataclass type is a section of that type."""
    metadata = {"help": help, "within": within}
    if isinstance(default, type):
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Where clips come from and how they are sampled and augmented."""

    dataset: str = setting("toy", "prepared dataset: the folder name under the data root (ssv2, jester, toy, yours)")
    root: str | None = setting(
        None, "the dataset folder; null: <data root>/<dataset>, the data root $GLITR_DATA or ./data"
    )
    train_split: str = setting("train", "list the training clips come from (train, val or test)")
    val_split: str = setting("val", "list validated on during training")
    num_frames: int = setting(16, "T: frames per clip, one from each of T equal segments (TSN sampling)", "[1, inf)")
    sampling: Literal["original", "whole_clip"] = setting(
        "original", "where the segments lie: the release's (the last N mod T frames never trained on) or the whole clip"
    )
    min_train_frames: int = setting(
        3, "the training list drops clips with fewer frames; evaluation keeps them", "[0, inf)"
    )
    img_size: int = setting(
        224, "side of the square model input: the training crop and evaluation's centre crop", "[1, inf)"
    )
    resize: int = setting(
        256, "evaluation: the short side the frames are resized to before the centre crop", "[1, inf)"
    )
    randaug_m: float = setting(
        7, "RandAugment magnitude on the 0-10 scale; the same ops for every frame of a clip", "[0, 10]"
    )
    randaug_n: int = setting(4, "RandAugment ops drawn per clip; 0 turns RandAugment off", "[0, inf)")
    randaug_mstd: float = setting(
        0.5, "standard deviation of the per-clip magnitude, drawn around randaug_m", "[0, inf)"
    )
    randaug_prob: float = setting(0.5, "probability that each drawn op is applied", "[0, 1]")
    scale: tuple[float, float] = setting(
        (0.08, 1.0), "random-resized crop: range of the crop's share of the frame area", "(0, 1]"
    )
    ratio: tuple[float, float] = setting(
        (0.75, 1.3333333333333333), "random-resized crop: range of the crop's aspect ratio (width / height)", "(0, inf)"
    )
    crop_resize: Literal["original", "antialiased"] = setting(
        "original",
        "how the crop is resized: the normalised frames bilinearly (the release), or uint8 bicubic antialiased",
    )
    erase_prob: float = setting(0.0, "probability of random erasing (a box of random values) per clip", "[0, 1]")
    workers: int | Literal["auto"] = setting(
        "auto", "loader processes per training process; auto: the cores the training process leaves free", "[0, inf)"
    )
    decode_on: Literal["loader", "device"] = setting(
        "loader", "device: the training process decodes the batch's JPEGs on its device (needs augment_on: device)"
    )
    augment_on: Literal["loader", "device"] = setting(
        "loader", "device: the training transform runs in the training process, on its device"
    )
    max_bad_fraction: float = setting(
        0.01, "stop training when a larger share of an epoch's clips had unreadable frames"
    )


@dataclass
class ModelConfig:
    """GliTr's geometry and where its starting weights come from; null keeps the timm model's value."""

    backbone: str = setting("vit_small_patch16_224", "timm ViT that T_f is built as (DeiT-S geometry by default)")
    embed_dim: int | None = setting(None, "T_f's feature size; null: the backbone's", "[1, inf)")
    depth: int | None = setting(None, "T_f's blocks; null: the backbone's", "[1, inf)")
    num_heads: int | None = setting(None, "T_f's attention heads; null: the backbone's", "[1, inf)")
    patch_size: int | None = setting(None, "T_f's patch side in pixels; null: the backbone's", "[1, inf)")
    stem: Literal["patch", "conv"] = setting(
        "patch", "T_f's patch embedding: one linear patch projection (the original) or a convolutional stem"
    )
    temporal_dim: int | None = setting(None, "feature size of T_c and T_l; null: 2 x embed_dim", "[1, inf)")
    temporal_depth: int = setting(4, "blocks of T_c and of T_l", "[1, inf)")
    temporal_heads: int = setting(6, "attention heads of T_c and T_l", "[1, inf)")
    glimpse_size: int = setting(6, "glimpse side in patches (6 patches of 16 px: 96x96 pixels)", "[1, inf)")
    drop_path: float = setting(0.1, "stochastic depth rate of T_f, T_c and T_l (their last block's)", "[0, 1)")
    fused_attn: bool = setting(True, "attention through scaled_dot_product_attention instead of an explicit softmax")
    pretrained: str | None = setting(
        None, "teacher: T_f's starting weights, an iBOT/ViT .pth file or a timm model name; null: random"
    )
    init_from: str | None = setting(
        None, "teacher: start from all the weights of another GliTr teacher checkpoint (class head replaced)"
    )
    allow_random_init: bool = setting(
        False,
        "teacher: starting weights that cannot be had (a missing pretrained, init_from or videomae file; timm "
        "weights neither cached nor downloadable, the hub unreachable) warn once and it starts from random "
        "weights (without distillation for videomae) instead of failing",
    )


@dataclass
class ObjectiveConfig:
    """What the loss sees: the targets (smoothing, mixup/cutmix) and the models it learns from."""

    label_smoothing: float = setting(0.0, "share of the target spread evenly over the classes", "[0, 1)")
    mixup: float = setting(0.0, "teacher: mixup's Beta alpha; 0: off", "[0, inf)")
    cutmix: float = setting(0.0, "teacher: cutmix's Beta alpha, the same box on every frame; 0: off", "[0, inf)")
    mixup_prob: float = setting(1.0, "probability that a batch is mixed at all", "[0, 1]")
    mixup_switch_prob: float = setting(0.5, "probability of cutmix instead of mixup when both are on", "[0, 1]")
    videomae: str | None = setting(None, "teacher: VideoMAE checkpoint whose predictions it distils; null: none")
    teacher: str | None = setting(
        None, "student: its teacher's checkpoint; null: runs/<name>_teacher/checkpoints/last.pt"
    )
    glimpse_reading: float = setting(
        0.0,
        "teacher: weight of a loss that trains T_f to read glimpses: the MSE of the feature of a glimpse at "
        "a random place in each frame to the frame's full-frame feature; 0: off",
        "[0, inf)",
    )
    loc_centring: float = setting(
        0.0,
        "teacher: weight of a penalty, while T_l trains, on the squared distance of the batch's mean glimpse "
        "location from the frame centre at each step (against one direction taking every clip's glimpse); "
        "0: off",
        "[0, inf)",
    )


@dataclass
class GroupLR:
    """Learning rate of one module: held at 0 for `hold_epochs`, then a per-iteration cosine from
    `base` to `floor` whose first `warmup_epochs` are a linear warm-up from `warmup_start`."""

    base: float = setting(1e-5, "peak learning rate, scaled by optim.batch_size / optim.lr_batch", "[0, inf)")
    floor: float = setting(1e-7, "learning rate at the end of the cosine (not scaled)", "[0, inf)")
    warmup_epochs: float = setting(0.0, "epochs of linear warm-up at the start of the cosine", "[0, inf)")
    warmup_start: float = setting(1e-6, "learning rate the warm-up starts from (not scaled)", "[0, inf)")
    hold_epochs: float = setting(
        0.0,
        "epochs the module is held still first: no update, no AdamW state, and for the teacher's locator no "
        "location losses; the warm-up and cosine run over the rest",
        "[0, inf)",
    )


@dataclass
class OptimConfig:
    """AdamW with one parameter group per module (T_f backbone, T_c classifier, T_l locator)."""

    epochs: int = setting(10, "passes over the training split", "[1, inf)")
    batch_size: int = setting(64, "global batch: all processes and accumulation steps together", "[1, inf)")
    accum_steps: int = setting(
        1, "gradient accumulation steps; each process's batch is batch_size / (processes x accum_steps)", "[1, inf)"
    )
    lr_batch: int = setting(128, "reference batch: learning rate = base x batch_size / lr_batch", "[1, inf)")
    weight_decay: float = setting(0.05, "AdamW weight decay", "[0, inf)")
    exclude_from_decay: bool = setting(
        True, "no weight decay on norms, biases, embeddings and the initial location; false: on all (the original)"
    )
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW's betas", "[0, 1)")
    eps: float = setting(1e-8, "AdamW's epsilon", "(0, inf)")
    clip_grad: float | None = setting(None, "largest global gradient norm; null: no clipping", "(0, inf)")
    fused: bool = setting(True, "AdamW's fused kernel when the parameters are on a GPU (the same update)")
    backbone: GroupLR = setting(GroupLR, "learning rate of T_f, the spatial encoder")
    classifier: GroupLR = setting(GroupLR, "learning rate of T_c, the temporal classifier")
    locator: GroupLR = setting(GroupLR, "learning rate of T_l, the temporal locator")


@dataclass
class TrainConfig:
    """How the loop runs: seed, device, precision, checkpoint and evaluation cadence."""

    seed: int = setting(
        0, "seed of the run's random draws: initial weights, clip order, augmentation, mixup, drop-path", "[0, inf)"
    )
    device: str = setting("auto", "auto, cpu, cuda or cuda:N; under torchrun: cuda:LOCAL_RANK")
    precision: Literal["bf16", "fp16", "fp32"] = setting("bf16", "autocast on CUDA; a CPU always runs fp32")
    compile: bool = setting(False, "torch.compile T_f, T_c and T_l (fixed-shape calls; the loop over t stays eager)")
    cuda_graphs: bool = setting(True, "one GPU: replay each forward + backward as a CUDA graph; eager under torchrun")
    grad_checkpointing: bool = setting(
        False, "recompute T_f's, T_c's and T_l's activations in the backward pass: less memory, more compute"
    )
    keep_freed_memory: bool = setting(
        True, "glibc: reuse freed host memory for new tensors instead of fresh pages each time"
    )
    threads: int = setting(
        0, "PyTorch CPU threads; 0: $OMP_NUM_THREADS, else the cores the loader workers leave free", "[0, inf)"
    )
    checkpoint_every: int = setting(
        0, "also save every N optimiser steps; 0: only at the end of each epoch", "[0, inf)"
    )
    keep_last: int = setting(3, "numbered checkpoints kept besides last.pt; 0: keep all", "[0, inf)")
    eval_every: int = setting(1, "validate every N epochs; 0: never during training", "[0, inf)")
    log_every: int = setting(
        10, "write a metrics.jsonl record every N optimiser steps, and at least one per epoch", "[1, inf)"
    )


@dataclass
class LogConfig:
    """Where metrics go besides metrics.jsonl."""

    progress: bool = setting(True, "progress: a live bar on a terminal, else plain lines")
    progress_every: float = setting(
        PROGRESS_EVERY,
        "seconds between the plain progress lines written where the output is not a terminal",
        "[0, inf)",
    )
    tensorboard: bool = setting(
        False, "also write TensorBoard events to <run>/tensorboard (pip install glitr[tensorboard])"
    )
    wandb: bool = setting(False, "also log to Weights & Biases (pip install glitr[wandb])")
    wandb_project: str = setting("glitr", "the Weights & Biases project")


@dataclass
class EvalConfig:
    """`glitr eval`: which policies, on which split, with what batch."""

    split: str = setting("val", "list to evaluate on (train, val or test)")
    batch_size: int = setting(16, "clips per batch and process", "[1, inf)")
    policies: list[str] = setting(
        ["learned", "center", "random"], "glimpse policies: learned (T_l's), center (fixed), random"
    )
    seed: int = setting(0, "seed of the random policy's locations", "[0, inf)")
    teacher: bool = setting(True, "a GliTr run also reports its teacher's full-frame accuracy")
    online_cuda_graphs: bool = setting(
        True, "online inference (visualize, stream, bench) replays CUDA graphs on a GPU; glitr eval never does"
    )


@dataclass
class Recipe:
    """A complete run: `kind` says which command trains it."""

    name: str | None = setting(None, "the run's name; null: the recipe file's stem")
    kind: Literal["teacher", "glitr"] = setting(
        "teacher", "teacher: trained by glitr train-teacher; glitr: the student, by glitr train-glitr"
    )
    output_dir: str | None = setting(None, "where the run writes; null: runs/<name>")
    data: DataConfig = setting(DataConfig, "the clips")
    model: ModelConfig = setting(ModelConfig, "the model")
    objective: ObjectiveConfig = setting(ObjectiveConfig, "the loss")
    optim: OptimConfig = setting(OptimConfig, "the optimiser and its schedules")
    train: TrainConfig = setting(TrainConfig, "the training loop")
    log: LogConfig = setting(LogConfig, "logging")
    eval: EvalConfig = setting(EvalConfig, "glitr eval")


# The recipes that replay the paper's training, and the value each deliberate deviation from the
# original has in them (a test checks both): an option that computes something else on purpose.
PAPER_RECIPES = ("ssv2_teacher", "ssv2", "jester_teacher", "jester")
ORIGINAL_VALUES: dict[str, Any] = {
    "data.sampling": "original",
    "data.crop_resize": "original",
    "model.stem": "patch",
    "optim.exclude_from_decay": False,
    "objective.glimpse_reading": 0.0,
    "objective.loc_centring": 0.0,
    **{f"optim.{group}.hold_epochs": 0.0 for group in ("backbone", "classifier", "locator")},
}


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


def recipe_value(recipe: Recipe, key: str) -> Any:
    """The value of dotted `key` (`data.img_size`) in `recipe`."""
    value: Any = recipe
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _intervals(section: Any, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, value, interval) of every key of `section` that has an interval."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            yield from _intervals(value, f"{prefix}{f.name}.")
        elif f.metadata["within"] is not None:
            yield prefix + f.name, value, f.metadata["within"]


def check_ranges(recipe: Recipe, source: str, overrides: list[str]) -> None:
    """Every numeric value of `recipe` inside its interval (`setting`), and the few values that must fit
    together; a value out of range is a `GlitrError` naming the key, where it was set (`source` or
    the last override that set it), what it expects and what it got."""

    def where(*keys: str) -> str:
        for override in reversed(overrides):
            set_key = override.partition("=")[0].strip()
            if any(k == set_key or k.startswith(set_key + ".") for k in keys):
                return f"override '{override}'"
        return source

    for key, value, interval in _intervals(recipe):
        low_text, high_text = interval[1:-1].split(",")
        low, high = float(low_text), float(high_text)
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
        if recipe_value(recipe, key) not in ("train", "val", "test"):
            raise GlitrError(f"'{key}' in {where(key)} expects train, val or test, got {recipe_value(recipe, key)!r}")

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


def _annotation(key: str) -> Any:
    """The schema's type of dotted `key`; None for a key the schema does not have."""
    tp: Any = Recipe
    for part in key.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _takes_text(tp: Any) -> bool:
    """Whether a key of type `tp` holds a string and never a bool or a number (a name, a path)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return str in args and not any(a in (bool, int, float) for a in args)


def _override_dict(override: str) -> dict[str, Any]:
    """`section.key=value` as a nested dict; the value is read as YAML (`true`, `5`, `[0.2, 1.0]`,
    `null`), except that a key holding text takes the text as typed where YAML would read something
    else (`name=off` is the name "off", not false)."""
    key, eq, text = override.partition("=")
    key = key.strip()
    if not eq or not key or any(not part for part in key.split(".")):
        raise GlitrError(f"override {override!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    if not isinstance(value, str | None) and _takes_text(_annotation(key)):
        value = text.strip()
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


# -------------------------------------------------------------------------------------------- reference

REFERENCE_COMMAND = "glitr recipes reference > docs/recipes.md"


def _yaml_value(value: Any) -> str:
    """`value` as it is written in a recipe (YAML flow style), escaped for a markdown table."""
    value = list(value) if isinstance(value, tuple) else value
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).removesuffix("...\n").strip()
    return f"`{text}`".replace("|", "\\|")


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe mapping as dotted keys."""
    out = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _sections(cls: type = Recipe, path: str = "", out: dict | None = None) -> dict[type, list[str]]:
    """Every section type of the schema, in the order it first appears, with the paths it sits at."""
    out = {cls: [path]} if out is None else out
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            key = f"{path}.{f.name}".lstrip(".")
            out.setdefault(tp, []).append(key)
            if len(out[tp]) == 1:
                _sections(tp, key, out)
    return out


def recipe_reference() -> str:
    """docs/recipes.md: every key of the schema with its default, values and meaning, the keys each
    shipped recipe sets, and the deliberate deviations from the original (`REFERENCE_COMMAND`)."""
    out = [
        "# Recipe reference",
        "",
        f"<!-- Generated from glitr_cli/recipe.py by `{REFERENCE_COMMAND}`; do not edit by hand. -->",
        "",
        "A recipe is a YAML file of the sections below; a key it leaves out has the default listed here.",
        "Any key can be changed on the command line as `section.key=value` after the recipe",
        "(`glitr train-glitr ssv2 optim.accum_steps=4`). An unknown key, a value of the wrong type or one",
        "outside its range is an error naming the key. How recipes and runs work:",
        "[training.md](training.md#recipes-overrides-and-runs).",
    ]
    helps = {}  # every dotted key, sections included: what it does
    for cls, paths in _sections().items():
        title = ", ".join(f"`{p}`" for p in paths) if paths != [""] else "Top level"
        doc = " ".join((cls.__doc__ or "").split("\n\n")[0].split())
        out += ["", f"## {title}", "", doc, "", "| key | default | values | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            keys = [f"{p}.{f.name}".lstrip(".") for p in paths]
            helps.update(dict.fromkeys(keys, f.metadata["help"]))
            if dataclasses.is_dataclass(tp):
                default, values = "", "a section"
            else:
                default = _yaml_value(f.default if f.default is not dataclasses.MISSING else f.default_factory())
                within = f.metadata["within"]
                values = _type_name(tp).replace("|", "\\|") + (f", {within}" if within else "")
            out.append(f"| `{keys[0]}` | {default} | {values} | {f.metadata['help']} |")

    shipped = {name: _flat(yaml.safe_load(packaged_recipe(name).read_text())) for name in recipe_names()}
    defaults = _flat(recipe_to_dict(Recipe()))
    others = sorted(
        set(shipped) - set(PAPER_RECIPES), key=lambda n: (n.removesuffix("_teacher"), n == n.removesuffix("_teacher"))
    )
    out += [
        "",
        "## The shipped recipes",
        "",
        "The keys each shipped recipe sets (`glitr recipes cp NAME DEST` copies one to edit); a blank",
        "cell is the default. The four paper recipes replay the original release's training.",
    ]
    for names in (list(PAPER_RECIPES), others):
        out += ["", "| key | default | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 2) + "|"]
        for k in (k for k in defaults if any(k in shipped[n] for n in names)):
            cells = [_yaml_value(shipped[n][k]) if k in shipped[n] else "" for n in names]
            out.append(f"| `{k}` | {_yaml_value(defaults[k])} | " + " | ".join(cells) + " |")
    out += [
        "",
        "## Deliberate deviations",
        "",
        "Options that compute something other than the original on purpose. The four paper recipes keep",
        "the original's value (a test checks it); the toy and fine-tuning recipes turn some on where they",
        "help.",
        "",
        "| key | the original | what the option does |",
        "|---|---|---|",
        *(f"| `{k}` | {_yaml_value(v)} | {helps[k]} |" for k, v in ORIGINAL_VALUES.items()),
    ]
    return "\n".join(out) + "\n"
