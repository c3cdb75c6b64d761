"""Check that the installed version of each direct dependency of glitr (with the extras named in argv[1],
comma-separated) is its declared floor: the highest `>=` bound pyproject.toml gives it. Run in the
environment that `uv pip install --resolution lowest-direct` made; a floor that the resolver had to
raise (another package needs more) fails here, naming the version to declare."""

from __future__ import annotations

import sys
from importlib.metadata import requires, version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def floors(extras: set[str]) -> dict[str, Version]:
    """Each direct dependency's highest `>=` bound, for the core and `extras` (glitr[...] inside an
    extra adds those extras)."""
    requirements = [Requirement(line) for line in requires("glitr") or []]
    wanted, seen = {""} | extras, set()
    while wanted - seen:  # extras that name further extras of glitr
        seen |= wanted
        for r in requirements:
            if r.name == "glitr" and any(r.marker is None or r.marker.evaluate({"extra": e}) for e in seen):
                wanted |= r.extras
    out: dict[str, Version] = {}
    for r in requirements:
        if r.name == "glitr" or not any(r.marker is None or r.marker.evaluate({"extra": e}) for e in seen):
            continue
        for s in r.specifier:
            if s.operator == ">=":
                name = canonicalize_name(r.name)
                out[name] = max(out.get(name, Version(s.version)), Version(s.version))
    return out


def main() -> None:
    extras = set(filter(None, sys.argv[1].split(","))) if len(sys.argv) > 1 else set()
    wrong = []
    for name, floor in sorted(floors(extras).items()):
        installed = Version(version(name))
        print(f"{name:20} floor {floor!s:10} installed {installed}")
        if installed != floor:
            wrong.append(f"{name}: pyproject.toml says >={floor}, the lowest resolution installs {installed}")
    if wrong:
        sys.exit("floors that are not what is installed:\n" + "\n".join(wrong))


if __name__ == "__main__":
    main()
