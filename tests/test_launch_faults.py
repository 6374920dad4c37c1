"""Faults in real multi-process jobs under torchrun (Gloo on CPU): a worker killed and the
job restarted from its checkpoint, a frozen worker, NaN losses, diverged replicas.

Workers are found and signalled from outside, as an operator (or the kernel's OOM killer)
would: the children of the torchrun process, told apart by the RANK in their environment.
Every wait polls with a deadline.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_checkpoint import _data_with_one_nan_row, _steps_touching
from ddp_fnn.config import TrainConfig

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])     # fields after "(comm)": state ppid ...
        if ppid == pid:
            kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Job:
    """``torchrun --standalone --nproc-per-node N [--max-restarts K] -m ddp_fnn train ARGS``."""

    def __init__(self, tmp: Path, args, nproc: int = 2, max_restarts: int = 0, module=("-m", "ddp_fnn", "train")):
        tmp.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = tmp / "torchrun.out", tmp / "torchrun.err"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--max-restarts={max_restarts}", "--monitor-interval=0.1", *module, *map(str, args)]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)

    def workers(self) -> dict[int, int]:
        """{rank: pid} of the current worker group."""
        found = {}
        for pid in _children(self.proc.pid):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = pid
        return found

    def stdout(self) -> str:
        return self.out_path.read_text()

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"torchrun still running after {timeout:.0f} s:\n{self.stderr()[-3000:]}") from None

    def cleanup(self) -> None:
        """Kill what is left of this job (its workers, then torchrun), by pid."""
        if self.proc.poll() is None:
            for pid in self.workers().values():
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            self.proc.kill()
            self.proc.wait(timeout=30)


def _model(out: Path) -> dict:
    return torch.load(out / "model.pt", weights_only=True)


# ---------------------------------------------------------------------------------------
# a worker SIGKILLed mid-run: torchrun restarts the group, which resumes bit for bit
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer,compression", [("sgd", "none"), ("adam", "powersgd")])
def test_killed_worker_restarts_from_checkpoint_with_bitwise_the_same_model(tmp_path, optimizer, compression):
    steps, every = 600, 25
    args = ["--layers", "16,64,64,1", "--samples", "4096", "--global-batch-size", "64", "--max-steps", steps,
            "--optimizer", optimizer, "--compression", compression, "--lr", "0.01", "--momentum", "0.9",
            "--checkpoint-every", every, "--metrics-port", "0", "--progress", "none", "--log-every", "50"]
    t0 = time.monotonic()
    # The reference, never interrupted, runs alongside (same settings, its own directories).
    ref = Job(tmp_path / "ref", [*args, "--checkpoint-dir", tmp_path / "ref" / "ck", "--output", tmp_path / "ref" / "out"],
              max_restarts=2)
    job = Job(tmp_path / "job", [*args, "--checkpoint-dir", tmp_path / "job" / "ck", "--output", tmp_path / "job" / "out"],
              max_restarts=2)
    try:
        ck = tmp_path / "job" / "ck"
        wait_until(lambda: any(ck.glob("step-*.pt")), 180, "the first checkpoint")
        victim = job.workers()[1]
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        assert job.wait(300) == 0, job.stderr()[-3000:]
        t_job = time.monotonic()
        assert ref.wait(300) == 0, ref.stderr()[-3000:]
    finally:
        job.cleanup()
        ref.cleanup()
    # Each start of the worker group after a failure says where it resumed. (A restart may
    # also follow a worker that aborted at exit, after the last checkpoint: "step 600 of 600".)
    resumes = [int(m) for m in re.findall(r"step-\d{8}\.pt \(step (\d+) of %d\)" % steps, job.stderr())]
    mid_run = [s for s in resumes if s < steps]
    assert mid_run and mid_run[0] > 0 and mid_run[0] % every == 0, job.stderr()[-3000:]
    assert json.loads((tmp_path / "job" / "out" / "summary.json").read_text())["steps"] == steps
    assert all(int(m) == steps for m in re.findall(r"\(step (\d+) of", ref.stderr()))   # never mid-run
    resumed = mid_run[0]
    a, b = _model(tmp_path / "job" / "out"), _model(tmp_path / "ref" / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    print(f"\n[{optimizer}/{compression}] killed rank 1 at +{t_kill - t0:.1f} s, resumed from step {resumed}, "
          f"restarted job done at +{t_job - t0:.1f} s")


# ---------------------------------------------------------------------------------------
# a frozen worker: the other one gives up after --timeout-s, with one line saying so
# ---------------------------------------------------------------------------------------

def test_frozen_worker_makes_the_other_exit_after_the_timeout(tmp_path):
    timeout_s = 10
    job = Job(tmp_path, ["--layers", "8,16,1", "--samples", "512", "--global-batch-size", "32", "--epochs", "100000",
                         "--timeout-s", timeout_s, "--metrics-port", "0", "--progress", "json", "--log-every", "20"])
    try:
        wait_until(lambda: '"step"' in job.stdout(), 180, "training to start")
        workers = job.workers()
        os.kill(workers[1], signal.SIGSTOP)
        t_stop = time.monotonic()
        message = f"ddp-fnn: error: rank 0: a collective did not complete within --timeout-s {timeout_s}"
        wait_until(lambda: message in job.stderr(), timeout_s + 30, "rank 0's timeout message", interval=0.1)
        t_msg = time.monotonic()
        wait_until(lambda: not _alive(workers[0]), 30, "rank 0 to exit")
        lines = [line for line in job.stderr().splitlines() if line.startswith("ddp-fnn: error:")]
        assert lines == [message + " (a peer died or froze?)"], job.stderr()[-3000:]
        os.kill(workers[1], signal.SIGKILL)          # torchrun's SIGTERM waits while it is stopped
        assert job.wait(60) != 0
    finally:
        job.cleanup()
    assert re.search(r"rank      : 0 \(local_rank: 0\)\n\s+exitcode  : 1 ", job.stderr()), job.stderr()[-2000:]
    print(f"\nrank 1 frozen; rank 0 reported the timeout after {t_msg - t_stop:.1f} s (--timeout-s {timeout_s})")


# ---------------------------------------------------------------------------------------
# NaN losses with 2 ranks
# ---------------------------------------------------------------------------------------

def test_absurd_learning_rate_stops_naming_rank_and_step_and_writes_no_nan(tmp_path):
    job = Job(tmp_path, ["--layers", "8,64,64,64,64,1", "--samples", "1024", "--global-batch-size", "32",
                         "--lr", "1e10", "--max-steps", "50", "--checkpoint-dir", tmp_path / "ck",
                         "--checkpoint-every", "1", "--output", tmp_path / "out", "--metrics-port", "0",
                         "--progress", "none"])
    try:
        assert job.wait(300) != 0
    finally:
        job.cleanup()
    errors = [line for line in job.stderr().splitlines() if line.startswith("ddp-fnn: error:")]
    assert errors and all("loss is" in e and "at step 2 " in e and "--on-nan stop" in e for e in errors), errors
    assert any(e.startswith("ddp-fnn: error: rank 0:") or e.startswith("ddp-fnn: error: rank 1:") for e in errors)
    assert not (tmp_path / "out" / "model.pt").exists()
    for p in (tmp_path / "ck").glob("step-*.pt"):
        assert all(torch.isfinite(t).all() for t in torch.load(p, weights_only=True)["model"].values()), p


def test_nan_on_one_rank_skips_that_step_on_every_rank(tmp_path):
    data = tmp_path / "d_x.npy"
    _data_with_one_nan_row(data, nan_row=17)
    cfg = TrainConfig.of(layers=(3, 8, 1), data=str(data), global_batch_size=16, epochs=3, eval_fraction=0.1)
    hits = _steps_touching(cfg, 17, world=2)
    assert hits
    job = Job(tmp_path, ["--layers", "3,8,1", "--data", data, "--global-batch-size", "16", "--epochs", "3",
                         "--eval-fraction", "0.1", "--on-nan", "skip", "--check-replicas-every", "5",
                         "--output", tmp_path / "out", "--metrics-port", "0", "--progress", "none"])
    try:
        rc = job.wait(300)
    finally:
        job.cleanup()
    assert rc == 0, job.stderr()[-3000:]
    for step, rank in hits:
        assert f"step {step}: non-finite loss on rank {rank}; skipped on every rank" in job.stderr()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped_steps"] == len(hits)
    assert all(torch.isfinite(t).all() for t in _model(tmp_path / "out").values())


# ---------------------------------------------------------------------------------------
# replicas that differ are caught
# ---------------------------------------------------------------------------------------

REPLICA_SCRIPT = """
import sys, torch, torch.distributed as dist
from ddp_fnn.train import checkpoint as ckpt
from ddp_fnn.model import build_fnn
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model = build_fnn((4, 8, 1), seed=0)
ckpt.check_replicas(model, rank, world, 10, torch.device("cpu"))      # equal: passes
if rank == 1:
    with torch.no_grad():
        model.layers[0].bias[0] += 1e-7
try:
    ckpt.check_replicas(model, rank, world, 20, torch.device("cpu"))
except ckpt.ReplicaMismatchError as e:
    sys.stderr.write(f"ddp-fnn: error: {e}\\n")
    sys.exit(1)
"""


def test_diverged_replica_is_named(tmp_path):
    script = tmp_path / "replicas.py"
    script.write_text(REPLICA_SCRIPT)
    job = Job(tmp_path, [], nproc=3, module=(str(script),))
    try:
        assert job.wait(300) != 0
    finally:
        job.cleanup()
    # Every rank reaches the same verdict; torchrun may stop the others once the first exits.
    errors = set(re.findall(r"ddp-fnn: error: rank \d: replicas diverged .*?\(--check-replicas-every\)", job.stderr()))
    expected = {f"ddp-fnn: error: rank {r}: replicas diverged at step 20: parameters differ between "
                f"ranks 0,2 vs ranks 1 (--check-replicas-every)" for r in range(3)}
    assert errors and errors <= expected, job.stderr()[-2000:]


# ---------------------------------------------------------------------------------------
# stop and resume at 3 ranks (where a gradient's place in a bucket decides the order of
# the ring all-reduce's sums), and an elastic resume at another world size
# ---------------------------------------------------------------------------------------

def test_resume_at_three_ranks_is_bitwise_and_elastic_resume_is_announced(tmp_path):
    args = ["--layers", "16,64,64,1", "--samples", "4096", "--global-batch-size", "96", "--momentum", "0.9",
            "--checkpoint-every", "20", "--metrics-port", "0", "--progress", "none"]
    ref = Job(tmp_path / "ref", [*args, "--max-steps", "60", "--checkpoint-dir", tmp_path / "ref" / "ck",
                                 "--output", tmp_path / "ref" / "out"], nproc=3)
    part = Job(tmp_path / "part", [*args, "--max-steps", "30", "--checkpoint-dir", tmp_path / "part" / "ck"], nproc=3)
    try:
        assert part.wait(300) == 0, part.stderr()[-3000:]
        assert ref.wait(300) == 0, ref.stderr()[-3000:]
    finally:
        part.cleanup()
        ref.cleanup()
    start = tmp_path / "part" / "ck" / "step-00000030.pt"
    assert start.exists()
    resumed = Job(tmp_path / "resumed", [*args, "--max-steps", "60", "--resume", start,
                                         "--checkpoint-dir", tmp_path / "resumed" / "ck",
                                         "--output", tmp_path / "resumed" / "out"], nproc=3)
    elastic = Job(tmp_path / "elastic", [*args, "--max-steps", "60", "--resume", start,
                                         "--checkpoint-dir", tmp_path / "elastic" / "ck",
                                         "--output", tmp_path / "elastic" / "out"], nproc=2)
    try:
        assert resumed.wait(300) == 0, resumed.stderr()[-3000:]
        assert elastic.wait(300) == 0, elastic.stderr()[-3000:]
    finally:
        resumed.cleanup()
        elastic.cleanup()
    a, b = _model(tmp_path / "resumed" / "out"), _model(tmp_path / "ref" / "out")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "written at world size 3, this run has 2" in elastic.stderr()
    e = _model(tmp_path / "elastic" / "out")
    for k in e:                                  # the same math, summed in another order
        assert torch.allclose(e[k], b[k], rtol=1e-4, atol=1e-5), k


def test_a_lost_peer_is_named_by_the_address_in_gloos_message():
    """Gloo names the peer whose connection broke as [address]:port; the error line says
    which host that is (the container or namespace node), and nothing when it names none."""
    from ddp_fnn.job import _collective_failure

    line = _collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                                            "[127.0.0.1]:45678"), 3, 20)
    assert line.startswith("rank 3: a peer left the job during a collective (connection closed by peer from 127.0.0.1")
    assert "(localhost)" in line or line.endswith("127.0.0.1)")
    assert _collective_failure(RuntimeError("Connection reset by peer"), 1, 20) == \
        "rank 1: a peer left the job during a collective (connection reset by peer)"
