"""Shared test helpers. Tests that launch several real processes are marked `slow`."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """`python -m ddp_fnn ARGS` in a real subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ddp_fnn", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def torchrun(nproc: int, *args: str, env: dict | None = None, timeout: float = 300,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m ddp_fnn ARGS` in a real subprocess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *extra, "-m", "ddp_fnn", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture
def port() -> int:
    return free_port()
