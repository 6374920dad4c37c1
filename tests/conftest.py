"""Shared test helpers. Tests that launch several real processes are marked `slow`."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Every launch script (launch/local.sh, node.sh, netns-cluster.sh) the suite starts runs the
# interpreter running pytest, whatever environment is active, not a checkout's .venv or
# the first python3 on PATH. Subprocesses inherit it from here.
os.environ["PYTHON"] = sys.executable


def gloo_threads_left(timeout_s: float = 5.0) -> int:
    """This process's Gloo threads once they have finished exiting (0), or how many are still
    there after ``timeout_s``. A destroyed group's threads are joined, but a joined thread
    can still be listed in /proc for a few milliseconds while the kernel finishes its exit;
    a group that something still holds keeps its threads for good."""
    from ddp_fnn import dist as ddist
    deadline = time.monotonic() + timeout_s
    while (n := ddist.gloo_threads_alive()) and time.monotonic() < deadline:
        time.sleep(0.001)
    return n


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


def torchrun_nodes(nnodes: int, nproc: int, *args: str, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """``nnodes`` torchrun agents on this machine, each a "node" of ``nproc`` workers, meeting
    through a c10d rendezvous on loopback (what launch/node.sh runs on each node); node k's
    workers get ranks k*nproc .. k*nproc+nproc-1. Returns each agent's completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", f"test-{os.getpid()}",
           "-m", "ddp_fnn", *args]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(nnodes)]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


@pytest.fixture
def port() -> int:
    return free_port()


def dataset_of(cfg):
    """The data set a TrainConfig names, as the trainer loads it (data, model, seed)."""
    from ddp_fnn.data.datasets import load_dataset
    return load_dataset(cfg.data, cfg.model, cfg.seed)
