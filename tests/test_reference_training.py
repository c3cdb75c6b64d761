"""The training data path against numbers produced by the original release
(tests/fixtures/reference-training): frame sampling, each RandAugment op, the random-resized crop
and the evaluation resize.

Everything goes through what training uses: datasets made by `build_dataset` from the four paper
recipes (read by glitr's recipe loader), their own frame sampler and transforms, at the T and sizes
each fixture case holds (that the recipes hold the paper's is a test of its own). Every case and
tolerance comes from the fixture folder; extra folders of the same layout, of any T and sizes, are
read from GLITR_TRAINING_FIXTURES. A listed folder that is missing or malformed fails. (The folder's
learning-rate schedules are checked by test_reference_schedules.py.)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_utils import PAPER_RECIPES, fixture_folders, load_json, paper_recipe

from glitr_cli.data.dataset import VideoFolderDataset, build_dataset
from glitr_cli.data.randaugment import FILL, apply_op, op_argument
from glitr_cli.data.transforms import denormalize
from glitr_cli.recipe import DataConfig

FOLDERS = fixture_folders("reference-training", "GLITR_TRAINING_FIXTURES")
IDS = [p.name for p in FOLDERS]


class Fixture:
    """One fixture folder: cases.json, tolerances.json and the arrays of expected.npz."""

    def __init__(self, folder: Path) -> None:
        self.cases = load_json(folder, "cases.json")
        self.tol = load_json(folder, "tolerances.json")
        if not (folder / "expected.npz").is_file():
            raise FileNotFoundError(f"fixture folder {folder} has no expected.npz")
        with np.load(folder / "expected.npz") as z:
            self.arrays = {k: z[k] for k in z.files}

    def array(self, key: str) -> np.ndarray:
        name = key.replace("/", "__")
        if name not in self.arrays:
            raise KeyError(f"expected.npz has no array {name!r}")
        return self.arrays[name]

    def clip(self, key: str) -> torch.Tensor:
        """A stored uint8 clip (T, H, W, 3) as glitr's layout (T, 3, H, W)."""
        return torch.from_numpy(self.array(key)).permute(0, 3, 1, 2).contiguous()


@functools.cache
def load(folder: Path) -> Fixture:
    return Fixture(folder)  # inside each test, so that a broken folder fails it rather than erroring


def _datasets(cfg: DataConfig, num_frames: list[int], root: Path) -> tuple[VideoFolderDataset, VideoFolderDataset]:
    """The training and validation datasets `cfg` builds over list files of one clip per length."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "frames").mkdir(exist_ok=True)  # the samplers and transforms never open a frame here
    (root / "category.txt").write_text("something\n")
    listing = "".join(f"clip{n} {n} 0\n" for n in num_frames)
    for split in ("train", "val"):
        (root / f"{split}_videofolder.txt").write_text(listing)
    cfg = dataclasses.replace(cfg, root=str(root), train_split="train", val_split="val")
    return build_dataset(cfg, "train", train=True), build_dataset(cfg, "val", train=False)


def _diff(actual: torch.Tensor, expected: np.ndarray) -> np.ndarray:
    actual = actual.numpy().astype(np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    return np.abs(actual - expected.astype(np.float64))


# the data settings of the paper's runs: T frames per clip, the evaluation short side and crop
PAPER_DATA = {
    "ssv2": {"num_frames": 16, "resize": 256, "img_size": 224},
    "jester": {"num_frames": 8, "resize": 256, "img_size": 224},
}


def test_paper_recipes_use_the_papers_frames_and_sizes():
    """The fixture tests below run each paper recipe's data settings at the fixture's T and sizes; this is
    where the recipes themselves are held to the paper's, and the shipped fixture to the same shapes."""
    for name in PAPER_RECIPES:
        cfg = paper_recipe(name).data
        assert {k: getattr(cfg, k) for k in PAPER_DATA[cfg.dataset]} == PAPER_DATA[cfg.dataset], name
    shipped = load(FOLDERS[0]).cases
    assert sorted(shipped["sampling"]["segments"]) == sorted({d["num_frames"] for d in PAPER_DATA.values()})
    for dataset, data in PAPER_DATA.items():
        assert shipped["eval"][f"eval/{dataset}"] == {"resize": data["resize"], "crop": data["img_size"]}


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_frame_sampling_matches_the_release(folder, tmp_path):
    """Every paper recipe's sampling, at each T the fixture holds."""
    fixture = load(folder)
    s = fixture.cases["sampling"]
    lengths = [int(n) for n in s["num_frames"]]
    for name in PAPER_RECIPES:
        for segments in s["segments"]:
            cfg = dataclasses.replace(paper_recipe(name).data, num_frames=int(segments))
            train, val = _datasets(cfg, lengths, tmp_path / f"{name}_{segments}")
            t, where = str(segments), f"{name} at T={segments}"
            for n in lengths:
                support = [[lo + 1, hi + 1] for lo, hi in train.sampler.support(n)]  # the fixture counts from 1
                assert support == s["train"][t][str(n)], f"{where}: training support of a {n}-frame clip"
                drawn = train.sampler.indices(n, train=True)
                assert all(lo <= i + 1 <= hi for i, (lo, hi) in zip(drawn, support, strict=True)), f"{where}: N={n}"
                indices = [i + 1 for i in val.sampler.indices(n, train=False)]
                assert indices == s["eval"][t][str(n)], f"{where}: validation frames of a {n}-frame clip"
            shortest = s["min_train_frames"]
            assert [r.num_frames for r in train.records] == [n for n in lengths if n >= shortest], where
            assert train.dropped_clips == sum(n < shortest for n in lengths) and val.dropped_clips == 0, where
            assert [r.num_frames for r in val.records] == lengths, f"{where}: evaluation keeps every clip"


def _timm_config(config: str) -> dict[str, float]:
    """timm's RandAugment string, e.g. rand-m7-n4-mstd0.5-inc1 -> {m: 7, n: 4, mstd: 0.5, inc: 1}."""
    name, *parts = config.split("-")
    assert name == "rand", config
    return {m[1]: float(m[2]) for m in (re.fullmatch(r"([a-z]+)([\d.]+)", p) for p in parts)}


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_randaugment_ops_match_the_release(folder, tmp_path):
    fixture = load(folder)
    r = fixture.cases["randaug"]
    tol = fixture.tol["randaug"]
    config = _timm_config(r["config"])
    assert config["inc"] == 1 and r["fill"] == [FILL] * 3 and r["interpolation"] == "bicubic"
    for name in PAPER_RECIPES:
        train, _ = _datasets(paper_recipe(name).data, [16], tmp_path / name)
        ra = train.transform.randaugment
        assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.prob) == (
            config["n"],
            config["m"],
            config["mstd"],
            r["op_prob"],
        ), name
        assert list(ra.ops) == r["ops_in_order"], name
    clip = fixture.clip("randaug_input")
    point, geometric = tol["point_ops"], tol["geometric_ops"]
    for case in r["cases"]:
        op, m, negate = case["op"], case["magnitude"], case["negated"]
        argument = op_argument(op, m, negate)
        assert case["level_args"] == ([] if argument is None else [pytest.approx(argument)]), case["key"]
        diff = _diff(apply_op(clip, op, m, negate).permute(0, 2, 3, 1), fixture.array(case["key"]))
        if op in point["ops"]:
            assert diff.max() <= point["max_abs"], f"{case['key']}: max |diff| {diff.max()}"
        else:
            assert op in geometric["ops"], f"{case['key']}: tolerances.json does not list {op}"
            assert diff.mean() <= geometric["mean_abs"], f"{case['key']}: mean |diff| {diff.mean():.3f}"
            above = float((diff > 2).mean())
            assert above <= geometric["fraction_above_2"], f"{case['key']}: {above:.4f} of the values off by > 2"


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_crop_matches_the_release(folder, tmp_path):
    fixture = load(folder)
    c = fixture.cases["crop"]
    clip = fixture.clip("randaug_input")
    for name in PAPER_RECIPES:
        cfg = dataclasses.replace(paper_recipe(name).data, img_size=c["size"])
        train, _ = _datasets(cfg, [16], tmp_path / name)
        for k, box in enumerate(c["boxes_i_j_h_w"]):
            diff = _diff(train.transform.crop(clip, box=tuple(box)), fixture.array(f"crop/{k}"))
            assert diff.max() <= fixture.tol["crop"]["max_abs"], f"{name} box {box}: max |diff| {diff.max():.3g}"


@pytest.mark.parametrize("folder", FOLDERS, ids=IDS)
def test_evaluation_resize_matches_the_release(folder, tmp_path):
    """The evaluation transform of every paper recipe on the case's dataset, at the case's sizes."""
    fixture = load(folder)
    tol = fixture.tol["eval"]
    for key, size in fixture.cases["eval"].items():
        dataset = key.split("/")[-1]
        names = [n for n in PAPER_RECIPES if paper_recipe(n).data.dataset == dataset]
        assert names, f"{key}: no paper recipe trains on {dataset}"
        for name in names:
            cfg = dataclasses.replace(paper_recipe(name).data, resize=size["resize"], img_size=size["crop"])
            _, val = _datasets(cfg, [16], tmp_path / name)
            out = (denormalize(val.transform(fixture.clip(f"{key}/input"))) * 255).round()  # back to grey levels
            diff = _diff(out.permute(0, 2, 3, 1), fixture.array(f"{key}/output"))
            assert diff.max() <= tol["max_abs"] and diff.mean() <= tol["mean_abs"], (
                f"{name} {key}: max |diff| {diff.max()}, mean {diff.mean():.4f}"
            )
