"""The command line itself: version, module alias, help, unknown commands, the shipped recipes."""

import re
import subprocess
import sys

import pytest
from conftest import run_cli

from glitr_cli import __version__
from glitr_cli.cli import USER_PATH
from glitr_cli.paths import recipe_names
from glitr_cli.recipe import load_recipe


def test_version_through_the_module_alias():
    """`python -m glitr_cli` is the same program as `glitr` (the one check that needs a new interpreter)."""
    out = subprocess.run([sys.executable, "-m", "glitr_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"glitr {__version__}"


def test_unknown_command_exits_2(monkeypatch, capsys):
    code, _, err = run_cli(["no-such-command"], monkeypatch, capsys)
    assert code == 2 and "No such command" in err


@pytest.mark.parametrize("command", ["train-teacher", "train-glitr", "eval", "bench"])
def test_help_explains_overrides(command, monkeypatch, capsys):
    code, out, _ = run_cli([command, "--help"], monkeypatch, capsys)
    assert code == 0 and "section.key=value" in out


def test_help_of_every_command(monkeypatch, capsys):
    code, out, _ = run_cli(["--help"], monkeypatch, capsys)
    assert code == 0
    listed = re.findall(r"^│ ([a-z][a-z-]*) ", out, flags=re.MULTILINE)
    assert listed == list(USER_PATH) and listed[0] == "demo"  # the order a new user takes
    commands = [
        "prepare-data",
        "train-teacher",
        "train-glitr",
        "eval",
        "visualize",
        "demo",
        "bench",
        "recipes",
        "export",
    ]
    for command in commands:
        assert command in out
        code, text, _ = run_cli([command, "--help"], monkeypatch, capsys)
        assert code == 0 and "Usage" in text, command
    code, out, _ = run_cli(["eval", "--help"], monkeypatch, capsys)
    assert "--checkpoint" in out and "--out" in out


def test_recipes_lists_the_shipped_ones_and_copies_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: the package's own are listed
    code, out, _ = run_cli(["recipes"], monkeypatch, capsys)
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == recipe_names()
    assert {"ssv2", "ssv2_teacher", "jester", "jester_teacher", "toy", "toy_teacher"} <= set(listed)

    code, out, _ = run_cli(["recipes", "cp", "ssv2", "mine.yaml"], monkeypatch, capsys)
    assert code == 0 and "glitr train-glitr mine.yaml" in out
    copied, shipped = load_recipe(tmp_path / "mine.yaml"), load_recipe("ssv2")
    copied.name = shipped.name  # the name comes from the file name
    assert copied == shipped
    (tmp_path / "edit").mkdir()
    code, _, _ = run_cli(["recipes", "cp", "toy", "edit"], monkeypatch, capsys)
    assert code == 0 and (tmp_path / "edit/toy.yaml").is_file()

    code, _, err = run_cli(["recipes", "cp", "ssv2", "mine.yaml"], monkeypatch, capsys)
    assert code == 2 and "mine.yaml already exists" in err
    code, _, err = run_cli(["recipes", "cp", "ssv3", "x.yaml"], monkeypatch, capsys)
    assert code == 2 and "did you mean 'ssv2'?" in err


def test_a_shipped_recipe_is_found_by_name_or_by_its_checkout_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a checkout: recipes/ssv2.yaml does not exist here
    for spec in ("ssv2", "ssv2.yaml", "recipes/ssv2.yaml"):
        recipe = load_recipe(spec)
        assert recipe.name == "ssv2" and recipe.kind == "glitr" and recipe.data.num_frames == 16
    (tmp_path / "ssv2.yaml").write_text("kind: teacher\n")  # a file of that name wins
    assert load_recipe("ssv2.yaml").kind == "teacher"


def _commands(group, path=()):
    """(argv prefix, click command) of every command and subcommand under `group`, the group itself first."""
    yield path, group
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*path, name))


def test_every_help_shows_all_of_its_text(monkeypatch, capsys):
    """Every `--help` holds each command's docstring and each argument's and option's help whole, as
    written: nothing taken for markup (`glitr[export]`), nothing cut."""
    import typer

    from glitr_cli.cli import app

    def squeezed(text: str) -> str:  # no whitespace and no panel borders: wrapping and boxes do not matter
        return re.sub(r"[\s│╭╮╰╯─]+", "", text)

    checked = 0
    for path, command in _commands(typer.main.get_command(app)):
        code, out, err = run_cli([*path, "--help"], monkeypatch, capsys)
        assert code == 0, err
        shown = squeezed(out)
        texts = [command.help, *(getattr(p, "help", None) for p in command.params)]
        for text in filter(None, texts):
            written = text.replace("\\[", "[")  # rich's escape of a literal bracket
            assert squeezed(written) in shown, f"glitr {' '.join(path)} --help lost text of: {written!r}"
            checked += 1
    assert checked > 50
