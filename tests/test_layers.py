"""The import contract: each floor of the package imports only the floors below it, and
the packages on one floor not each other (pyproject.toml [tool.importlinter], checked by
import-linter's own `lint-imports`, the command anyone can run)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("lint-imports is not installed (the test extra has import-linter)")
    return exe


def test_every_import_contract_is_kept():
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_back_edge_breaks_the_contract(tmp_path):
    """The contract can fail: a copy of the package where the core imports train is refused."""
    copy = tmp_path / "ddp_fnn"
    shutil.copytree(REPO / "ddp_fnn", copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (copy / "core" / "units.py").write_text((copy / "core" / "units.py").read_text()
                                            + "\nfrom ddp_fnn.train import loop  # noqa: E402,F401\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([_lint_imports(), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode != 0
    assert "ddp_fnn.core.units -> ddp_fnn.train.loop" in proc.stdout


def test_the_core_imports_no_torch():
    """The torch-free floor loads in an interpreter where torch cannot be imported."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import ddp_fnn.core.units, ddp_fnn.core.wire, ddp_fnn.core.intervals, ddp_fnn.core.fileio, "
            "ddp_fnn.core.errors, ddp_fnn.core.figures, ddp_fnn.config\n"
            "print(ddp_fnn.core.units.parse_rate('400Gbit/s'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == 5e10
