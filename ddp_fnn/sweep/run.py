"""Running one point of the sweep: its directory, its command (a namespace cluster or
torchrun on loopback) and its reuse when a complete run of the same settings is there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from ddp_fnn.core import fileio, units
from ddp_fnn import cluster
from ddp_fnn.sweep.grid import Point, SweepConfig

CLUSTER = cluster.script("netns-cluster.sh")
# The directory holding the ddp_fnn package: a point's workers import this same package,
# from a checkout or an installed wheel alike.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]



def point_dir(cfg: SweepConfig, p: Point) -> Path:
    return cfg.out / "points" / p.name


def _identity(cfg: SweepConfig, p: Point) -> dict:
    """What a complete point must have been run with to be reused."""
    ident = {"point": {**asdict(p), "name": p.name}, "launcher": cfg.launcher, "train_args": cfg.train_argv(p),
             "loss_node": cfg.loss_node}
    if p.all_reduce == "flat":
        ident["point"].pop("all_reduce")      # points run before --all-reduce existed are still these
    if cfg.topology is not None:
        ident["cluster"] = command(cfg, p, Path("."))[2:]   # workers a node, leaves, uplinks
    return ident


def command(cfg: SweepConfig, p: Point, pdir: Path) -> list[str]:
    train = cfg.train_argv(p)
    if cfg.launcher == "loopback":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(p.nodes),
                "-m", "ddp_fnn", "train", *train, "--output", str(pdir / "node0")]
    cmd = ["bash", str(CLUSTER), "--nodes", str(p.nodes), "--out", str(pdir)]
    if p.link_rate:
        cmd += ["--link-rate", units.tc_rate(p.link_rate)]      # tc's spelling of any rate the sweep takes
    if p.loss_percent > 0:
        cmd += ["--loss", f"{cfg.loss_node}:{p.loss_percent:g}"]
    if p.queue_limit_bytes:
        for k in range(p.nodes):
            cmd += ["--queue-limit", f"{k}:{p.queue_limit_bytes}"]
    if cfg.topology is not None:
        topo = cfg.fabric(p)
        if topo.gpus_per_server > 1:
            cmd += ["--nproc-per-node", str(topo.gpus_per_server)]
        if topo.leaf_groups > 1:
            # The leaves' uplinks at the file's rate (or its oversubscription of this point's
            # node links), in tc's bits per second.
            cmd += ["--leaves", str(topo.leaf_groups),
                    "--uplink-rate", f"{round(topo.uplink_bytes_per_second * 8)}bit"]
    return [*cmd, "--", *train]


def run_point(cfg: SweepConfig, p: Point) -> tuple[bool, Path]:
    """Run point p unless a complete run of the same settings is there. Returns (ok, dir).
    A directory left by an interrupted or failed run is replaced (main has already refused
    an --out holding a complete point of other settings)."""
    pdir = point_dir(cfg, p)
    done = pdir / "point.json"
    ident = _identity(cfg, p)
    if done.is_file():
        old = json.loads(done.read_text())
        if {k: old.get(k) for k in ident} == ident and old.get("ok"):
            return True, pdir
    if pdir.exists():
        shutil.rmtree(pdir)                  # a failed or interrupted run of this point: tried again
    pdir.mkdir(parents=True)
    # One thread a worker: compute_scale's premise. PYTHON: node.sh runs this interpreter.
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": path}
    with open(pdir / "run.log", "wb") as log:
        proc = subprocess.Popen(command(cfg, p, pdir), stdout=log, stderr=subprocess.STDOUT, env=env)
        rc = proc.wait()
    ok = rc == 0 and (pdir / "node0" / "summary.json").is_file()
    # pid: netns-cluster.sh names its namespaces ddpfnn-PID-*, so a check can find them.
    fileio.write_json(done, {**ident, "ok": ok, "exit_status": rc, "pid": proc.pid}, indent=2)
    return ok, pdir
