"""The documentation: the README stays short, every relative link points to a file and heading that
exist, and the recipe reference is the one the schema generates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from glitr_cli.recipe import REFERENCE_COMMAND, recipe_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of `page`: lowercase, punctuation dropped, spaces to '-'."""
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(anchor, 0)
        seen[anchor] = n + 1
        if n:  # a repeated heading gets -1, -2, ...
            seen[f"{anchor}-{n}"] = 1
    return set(seen)


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT)}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(file)):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_recipe_reference_is_up_to_date():
    """docs/recipes.md is what the schema gives; regenerate it after changing a key."""
    page = (ROOT / "docs" / "recipes.md").read_text()
    assert page == recipe_reference(), f"docs/recipes.md is out of date: run `{REFERENCE_COMMAND}`"


def test_the_recipe_reference_command_prints_it(glitr):
    code, out, _ = glitr("recipes", "reference")
    assert code == 0 and out == recipe_reference()
