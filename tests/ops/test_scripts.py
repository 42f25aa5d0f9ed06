"""scripts/dev and scripts/test install into .venv only when pyproject.toml changed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Stands in for the venv's python (the outside world here is pip): records each call.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../../pip-calls"
"""


def install_once(checkout: Path, target: str) -> None:
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f"source scripts/install.sh && install_once '{target}'"],
        cwd=checkout,
        check=True,
        timeout=60,
    )


def pip_calls(checkout: Path) -> list[str]:
    log = checkout / "pip-calls"
    return log.read_text().splitlines() if log.exists() else []


def test_install_runs_only_when_pyproject_changed(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "install.sh", tmp_path / "scripts" / "install.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "cascade").write_text("#!/bin/sh\n")
    (bin_dir / "cascade").chmod(0o755)

    install_once(tmp_path, ".")
    install_once(tmp_path, ".")
    assert len(pip_calls(tmp_path)) == 1
    assert pip_calls(tmp_path)[0].endswith("install --quiet --disable-pip-version-check -e .")

    install_once(tmp_path, ".[dev]")  # other extras: installed once too
    install_once(tmp_path, ".[dev]")
    assert len(pip_calls(tmp_path)) == 2

    with (tmp_path / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# a new dependency\n")
    install_once(tmp_path, ".")
    install_once(tmp_path, ".")
    assert len(pip_calls(tmp_path)) == 3


def test_scripts_use_the_stamped_install() -> None:
    for script in ("dev", "test"):
        text = (ROOT / "scripts" / script).read_text()
        assert "source scripts/install.sh" in text
        assert "pip install" not in text
    # Never fails for want of root or apt-get: the browser test skips instead.
    assert "command -v apt-get" in (ROOT / "scripts" / "test").read_text()
