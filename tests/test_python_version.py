"""pyproject.toml says requires-python >= 3.10: nothing in the package may need 3.11+.

vermin reads the package's syntax and standard-library use (modules, functions, keyword
arguments) and reports the minimum version each needs; the planted file shows it does
flag 3.11 features (tomllib, ExceptionGroup's except*), so a pass is not vacuous. Where a
Python 3.10 interpreter is installed, every module is also byte-compiled by it."""

import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

VERMIN = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
          "--target=3.10-", "--violations", "--no-tips", "--eval-annotations"]


def vermin(*paths) -> subprocess.CompletedProcess:
    return subprocess.run([*VERMIN, *map(str, paths)], capture_output=True, text=True, timeout=300)


def test_requires_python_is_the_version_checked():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^requires-python = ">=3\.10"$', text, re.M)


def test_the_package_needs_nothing_beyond_python_3_10():
    r = vermin(REPO / "ddp_fnn")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("source", [
    "import tomllib\n",
    "try:\n    pass\nexcept* ValueError:\n    pass\n",
    "import datetime\nprint(datetime.UTC)\n",
])
def test_a_planted_python_3_11_feature_is_caught(tmp_path, source):
    (tmp_path / "planted.py").write_text(source)
    r = vermin(tmp_path / "planted.py")
    assert r.returncode != 0 and "3.11" in r.stdout, r.stdout


def python_3_10() -> str | None:
    """A working Python 3.10 interpreter: python3.10 on PATH, or pyenv's, or None."""
    exe = shutil.which("python3.10")
    if exe and subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
        return exe
    if shutil.which("pyenv"):
        for v in subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True).stdout.split():
            if v.startswith("3.10"):
                prefix = subprocess.run(["pyenv", "prefix", v], capture_output=True, text=True).stdout.strip()
                if prefix and shutil.which("python3.10", path=prefix + "/bin"):
                    return prefix + "/bin/python3.10"
    return None


def test_python_3_10_compiles_every_module(tmp_path):
    exe = python_3_10()
    if exe is None:
        pytest.skip("no Python 3.10 interpreter here")
    r = subprocess.run([exe, "-c", "import compileall, sys; sys.exit(not compileall.compile_dir(sys.argv[1], "
                        "quiet=1, force=True))", str(REPO / "ddp_fnn")],
                       capture_output=True, text=True, timeout=300, env={"PYTHONPYCACHEPREFIX": str(tmp_path)})
    assert r.returncode == 0, r.stdout + r.stderr
