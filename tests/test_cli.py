import subprocess
import sys

from glitr_cli import __version__


def test_version_and_module_alias():
    out = subprocess.run([sys.executable, "-m", "glitr_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"glitr {__version__}"


def test_unknown_command_exits_2():
    out = subprocess.run([sys.executable, "-m", "glitr_cli", "no-such-command"], capture_output=True, text=True)
    assert out.returncode == 2
    assert "No such command" in out.stderr
