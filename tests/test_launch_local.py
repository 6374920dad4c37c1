"""launch/local.sh (one node, N workers) and launch/node.sh's settings checks.

A short 2-worker training through local.sh runs real torchrun processes (slow). Bad
input must be caught by local.sh's one-process --dry-run before any worker starts: one
line, exit status 2, no traceback, no torchrun failure report.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO

LOCAL = REPO / "launch" / "local.sh"
NODE = REPO / "launch" / "node.sh"


def run(script, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The single stderr line of a rejected launch; fails unless status 2 and nothing else."""
    assert r.returncode == 2, f"status {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr + r.stdout
    assert "torch.distributed.elastic" not in r.stderr   # no torchrun failure report
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.slow
def test_two_workers_train_to_completion(tmp_path, port):
    r = run(LOCAL, "-n", "2", "--max-steps", "10", "--metrics-port", str(port), "--progress", "none",
            "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 10
    assert (tmp_path / "model.pt").is_file()


@pytest.mark.slow
def test_worker_count_from_environment(tmp_path, port):
    r = run(LOCAL, "--max-steps", "3", "--metrics-port", str(port), "--progress", "none",
            "--global-batch-size", "240", "--output", str(tmp_path), env={"NPROC_PER_NODE": "3"})
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == 3


@pytest.mark.parametrize("args, expected", [
    # The world size comes from -n: 2 samples cannot feed 3 workers.
    (["-n", "3", "--global-batch-size", "2"],
     "ddp-fnn: error: --global-batch-size 2 is smaller than world size x grad-accum = 3 x 1"),
    # ...nor 5 samples 3 workers x 2 micro-steps.
    (["-n", "3", "--global-batch-size", "5", "--grad-accum", "2"],
     "ddp-fnn: error: --global-batch-size 5 is smaller than world size x grad-accum = 3 x 2"),
    (["-n", "2", "--lr", "-1"], "ddp-fnn: error: --lr must be a positive number, got -1.0"),
    (["-n", "2", "--no-such-option"], "ddp-fnn: error: No such option"),
    (["-n", "0"], "local.sh: error: the worker count (-n or NPROC_PER_NODE) must be a positive integer, got '0'"),
    (["-n"], "local.sh: error: -n needs a value"),
])
def test_bad_input_is_one_line_and_status_2(args, expected):
    r = run(LOCAL, *args, timeout=120)
    line = one_line_error(r)
    assert line.startswith(expected), line
    assert r.stdout == ""                  # no worker started, so no progress either


def test_help_shows_the_launcher_and_the_train_options():
    r = run(LOCAL, "--help", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "launch/local.sh [-n N]" in r.stdout
    assert "--global-batch-size" in r.stdout


# ---------------------------------------------------------------------------------------
# node.sh: settings it rejects before starting anything
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"NNODES": "2"}, "RDZV_ENDPOINT (host:port of the rendezvous store) is required when NNODES=2"),
    ({"NNODES": "2:x", "RDZV_ENDPOINT": "node0:29400"}, "NNODES must be N or MIN:MAX"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE must be a positive integer, got '0'"),
    ({"NNODES": "2", "RDZV_ENDPOINT": "node0"}, "RDZV_ENDPOINT must be host:port, got 'node0'"),
    ({"METRICS_PORT": "http"}, "METRICS_PORT must be a non-negative integer, got 'http'"),
    ({"LINK_RATE": "fast"}, "LINK_RATE must be a tc rate like 1gbit"),
    ({"LINK_RATE": "1gbit", "LINK_IFACE": "no-such-if0"}, "LINK_IFACE no-such-if0: no such interface"),
    ({"LINK_LIMIT": "64k"}, "LINK_LIMIT must be a positive number of bytes, got '64k'"),
    ({"LINK_LIMIT": "30000"}, "LINK_LIMIT=30000 needs LINK_RATE"),
])
def test_node_settings_errors_are_one_line(env, expected):
    base = {k: "" for k in ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "METRICS_PORT", "LINK_RATE")}
    line = one_line_error(run(NODE, env={**base, **env}, timeout=60))
    assert line.startswith(f"node.sh: error: {expected}"), line


def test_node_reads_every_documented_variable():
    """The header lists each variable, and the script reads each one from the environment."""
    text = NODE.read_text()
    header = text.split("set -euo pipefail", 1)[0]
    for name in ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "METRICS_ADDR", "METRICS_PORT",
                 "TRAIN_ARGS", "OUTPUT_DIR", "MAX_RESTARTS", "LINK_RATE", "LINK_IFACE", "LINK_LIMIT", "PYTHON"):
        assert f"#   {name} " in header, name
        assert "${" + name + ":-" in text or "${" + name + "}" in text, name
