"""Shared by the reference-fixture tests: folder discovery, the paper recipes, seeded weights,
tolerance checks."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from glitr_cli.recipe import Recipe, load_recipe

FIXTURES = Path(__file__).parent / "fixtures"
PAPER_RECIPES = ("ssv2_teacher", "ssv2", "jester_teacher", "jester")  # the settings of the paper's runs


def fixture_folders(default: str, env_var: str) -> list[Path]:
    """The shipped folder plus every folder listed in `env_var` (os.pathsep-separated)."""
    extra = [Path(p) for p in os.environ.get(env_var, "").split(os.pathsep) if p.strip()]
    return [FIXTURES / default, *extra]


def paper_recipe(name: str) -> Recipe:
    """One of `PAPER_RECIPES` as shipped, read by glitr's recipe loader."""
    if name not in PAPER_RECIPES:
        raise ValueError(f"{name!r} is not a paper recipe: {', '.join(PAPER_RECIPES)}")
    return load_recipe(name)


def load_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"fixture folder {folder} has no {name}")
    return json.loads(path.read_text())


def seeded_tensor(entry: dict) -> np.ndarray:
    """One weight tensor from its keys.json entry: 0.02*N or 1 + 0.1*N, float32 arithmetic."""
    n = np.random.RandomState(entry["rng_seed"]).standard_normal(entry["shape"]).astype(np.float32)
    if entry["rule"] == "0.02*N":
        return np.float32(0.02) * n
    if entry["rule"] == "1.0 + 0.1*N":
        return np.float32(1.0) + np.float32(0.1) * n
    raise ValueError(f"unknown weight rule {entry['rule']!r} for {entry['key']}")


def sha256_le(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def seeded_state_dict(entries: list[dict]) -> dict[str, torch.Tensor]:
    return {e["key"]: torch.from_numpy(seeded_tensor(e)) for e in entries}


def assert_close(name: str, actual: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != expected {expected.shape}"
    excess = np.abs(actual - expected) - (atol + rtol * np.abs(expected))
    worst = float(excess.max()) if excess.size else 0.0
    assert worst <= 0, (
        f"{name}: max |diff| {np.abs(actual - expected).max():.3g} exceeds atol {atol:g} + rtol {rtol:g}*|expected| "
        f"(by {worst:.3g})"
    )
