"""demo.sh chooses where to install before it installs anything.

The README's first command must work on a system Python that refuses pip ("externally
managed", PEP 668), so demo.sh installs into the active virtual or conda environment, else into
``./.venv``. The script runs for real here, offline and in milliseconds, against fake
interpreters on ``PATH`` that log what they are asked to do: the "system" ``python3`` refuses
pip like Debian's, and the virtual environment it creates holds a fake ``python`` and
``latdiff_demo``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SYSTEM_PYTHON = """#!/bin/sh
echo "system $*" >> "$FAKE_LOG"
if [ "$1 $2" = "-m venv" ]; then
  mkdir -p "$3/bin"
  [ -n "$FAKE_VENV_FAILS" ] && exit 1
  cp "$FAKE_TEMPLATES"/* "$3/bin/"
  exit 0
fi
if [ "$1 $2" = "-m pip" ]; then
  echo "error: externally-managed-environment" >&2
  exit 1
fi
"""
LOGGING_TOOL = '#!/bin/sh\necho "{who} $*" >> "$FAKE_LOG"\n'  # a python or latdiff_demo that succeeds
ACTIVATE = 'VIRTUAL_ENV="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"\nPATH="$VIRTUAL_ENV/bin:$PATH"\nexport VIRTUAL_ENV PATH\n'
INSTALL_AND_RUN = ["-m pip install -q torch==2.13.0", "-m pip install -q -e .[test]"]


def _script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path):
    """A copy of demo.sh in ``repo/`` and a PATH whose python3/python is a PEP 668 system Python."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "demo.sh", repo / "demo.sh")
    for name in ("python3", "python"):
        _script(tmp_path / "system" / name, SYSTEM_PYTHON)
    templates = tmp_path / "templates"
    _script(templates / "python", LOGGING_TOOL.format(who="venv"))
    _script(templates / "latdiff_demo", LOGGING_TOOL.format(who="venv-demo"))
    _script(templates / "activate", ACTIVATE)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON")}
    env.update(PATH=f"{tmp_path / 'system'}:/usr/bin:/bin", FAKE_LOG=str(tmp_path / "log"),
               FAKE_TEMPLATES=str(templates))

    def run(**extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        (tmp_path / "log").write_text("")
        result = subprocess.run(["bash", str(repo / "demo.sh")], env={**env, **extra}, capture_output=True,
                                text=True, timeout=30)
        return result, (tmp_path / "log").read_text().splitlines()

    return repo, run


def test_demo_sh_parses():
    subprocess.run(["bash", "-n", str(REPO / "demo.sh")], check=True)


def test_without_an_environment_creates_then_reuses_dot_venv(machine):
    repo, run = machine
    result, log = run()
    assert result.returncode == 0, result.stderr
    assert f"creating a virtual environment in {repo / '.venv'}" in result.stdout
    assert log == ["system -m venv .venv"] + [f"venv {c}" for c in INSTALL_AND_RUN] + ["venv-demo --budget-minutes 15"]

    result, log = run()
    assert result.returncode == 0, result.stderr
    assert f"existing virtual environment {repo / '.venv'}" in result.stdout
    assert log == [f"venv {c}" for c in INSTALL_AND_RUN] + ["venv-demo --budget-minutes 15"]


@pytest.mark.parametrize("variable, kind", [("VIRTUAL_ENV", "virtual"), ("CONDA_PREFIX", "conda")])
def test_an_active_environment_is_used_as_is(machine, tmp_path, variable, kind):
    repo, run = machine
    active = tmp_path / "active"
    _script(active / "bin" / "python", LOGGING_TOOL.format(who="active"))
    _script(active / "bin" / "latdiff_demo", LOGGING_TOOL.format(who="active-demo"))
    result, log = run(**{variable: str(active), "PATH": f"{active / 'bin'}:{tmp_path / 'system'}:/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert f"installing into the active {kind} environment {active}" in result.stdout
    assert log == [f"active {c}" for c in INSTALL_AND_RUN] + ["active-demo --budget-minutes 15"]
    assert not (repo / ".venv").exists()


def test_a_failed_venv_is_removed_and_explained(machine):
    repo, run = machine
    result, log = run(FAKE_VENV_FAILS="1")
    assert result.returncode == 2
    assert "apt install python3-venv" in result.stderr
    assert log == ["system -m venv .venv"] and not (repo / ".venv").exists()
