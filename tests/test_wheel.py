"""The built wheel is the whole product: installed away from the checkout, its
`ddp-fnn sweep` finds its own launch scripts and runs real jobs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    # --no-build-isolation: the build uses the setuptools already installed (no index needed).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(REPO)], check=True, capture_output=True, timeout=300)
    (path,) = dist.glob("ddp_fnn-*.whl")
    return path


def test_the_wheel_carries_the_cluster_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for script in ("netns-cluster.sh", "node.sh", "tbf.sh"):
        assert f"ddp_fnn/cluster/{script}" in names
    assert "ddp_fnn/train/loop.py" in names and "ddp_fnn/sweep/grid.py" in names


@pytest.mark.slow
def test_an_installed_wheels_sweep_runs_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The installed copy comes first on the path, ahead of any checkout or editable install.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import ddp_fnn.cluster as c; print(c.script('node.sh'))"],
                           capture_output=True, text=True, env=env, cwd=work, check=True).stdout.strip()
    assert where.startswith(str(site)), where
    res = subprocess.run([sys.executable, "-m", "ddp_fnn", "sweep", "--out", "out", "--launcher", "loopback",
                          "--nodes", "2", "--layers", "16,64,4", "--rows-per-rank", "8", "--steps", "4"],
                         capture_output=True, text=True, env=env, cwd=work, timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    with open(work / "out" / "sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok"]
