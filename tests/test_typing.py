"""The package type-checks, and the extension module's stubs match what it exports (mypy and mypy.stubtest)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tensohelp import ROOT

pytest.importorskip("mypy")
pytestmark = pytest.mark.slow


def _mypy(tmp_path, *args: str) -> subprocess.CompletedProcess:
    # The installed `tenso` (the wheel under test), with the project's [tool.mypy] settings; run in tmp_path, where
    # mypy leaves its cache.
    cmd = [sys.executable, "-m", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_package_type_checks(tmp_path):
    done = _mypy(tmp_path, "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "tenso")
    assert done.returncode == 0, done.stdout + done.stderr


def test_extension_stubs_match_the_module(tmp_path):
    done = _mypy(tmp_path, "mypy.stubtest", "--mypy-config-file", str(ROOT / "pyproject.toml"), "tenso.tenso_rs")
    assert done.returncode == 0, done.stdout + done.stderr
