"""Where things live: the data root, the runs folder, and the recipes shipped inside the package.

The bottom layer of glitr: it imports nothing of the package but `errors`, so any module may use it.
"""

from __future__ import annotations

import difflib
import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from glitr_cli.errors import GlitrError

RUNS_DIR = "runs"
RECIPE_SUFFIX = ".yaml"
RECIPE_FILE = "recipe.yaml"  # the resolved recipe a run saves beside its checkpoints/ folder


def data_root() -> Path:
    """Where datasets live: `$GLITR_DATA` if set, else `data` (relative to the working directory)."""
    env = os.environ.get("GLITR_DATA")
    return Path(env) if env else Path("data")


def run_dir(name: str) -> Path:
    """The default output folder of run `name`: runs/<name>."""
    return Path(RUNS_DIR) / name


def run_of(checkpoint: str | Path) -> Path:
    """The run folder a training checkpoint lies in: runs/<name>/checkpoints/last.pt -> runs/<name>."""
    return Path(checkpoint).parent.parent


def closest_existing(path: str | Path) -> Path | None:
    """What a mistyped `path` most likely meant: each part that does not exist replaced by the
    closest name in its folder, when that gives an existing path; None when nothing close exists."""
    path = Path(path)
    found, parts = (Path(path.anchor), path.parts[1:]) if path.anchor else (Path(), path.parts)
    for part in parts:
        if not (found / part).exists():
            try:
                names = [p.name for p in found.iterdir()]
            except OSError:
                return None
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
            if not close:
                return None
            part = close[0]
        found = found / part
    return found if found != path and found.exists() else None


def _packaged() -> Traversable:
    return files("glitr_cli") / "recipes"


def recipe_names() -> list[str]:
    """The recipes shipped with glitr, by name (the file stem), sorted."""
    return sorted(p.name[: -len(RECIPE_SUFFIX)] for p in _packaged().iterdir() if p.name.endswith(RECIPE_SUFFIX))


def packaged_recipe(name: str) -> Traversable:
    """The shipped recipe `name` (e.g. `ssv2`); an unknown name is a GlitrError with a suggestion."""
    names = recipe_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise GlitrError(f"no recipe named {name!r}; {hint}shipped recipes: {', '.join(names)}")
    return _packaged() / f"{name}{RECIPE_SUFFIX}"


def find_recipe(spec: str | Path) -> Path | Traversable:
    """A recipe given on the command line: an existing file, else the shipped recipe it names.

    `ssv2`, `ssv2.yaml` and `recipes/ssv2.yaml` all name the shipped SSv2 student recipe when no
    such file exists here, so the commands the README shows work in any folder.
    """
    path = Path(spec)
    if path.is_file():
        return path
    stem = path.name[: -len(RECIPE_SUFFIX)] if path.name.endswith(RECIPE_SUFFIX) else path.name
    if path.parent in (Path("."), Path("recipes")) and stem in recipe_names():
        return packaged_recipe(stem)
    names = recipe_names()
    close = difflib.get_close_matches(stem, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise GlitrError(f"recipe {spec} not found; {hint}shipped recipes (`glitr recipes`): {', '.join(names)}")


def recipe_stem(recipe: Path | Traversable) -> str:
    """The run name a recipe file gives by default: its file name without `.yaml`."""
    name = recipe.name
    return name[: -len(RECIPE_SUFFIX)] if name.endswith(RECIPE_SUFFIX) else Path(name).stem
