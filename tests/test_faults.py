"""train/faults.py: injected faults are read once at set-up, for this rank only, and
installed only where asked; and the run-ahead test they make possible on CPU: the host
runs ahead of a slow (emulated) device stream between log steps, and waits only there."""

import contextlib
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_cli
from ddp_fnn.config import ConfigError, FaultsConfig
from ddp_fnn.observe import Observer, stepfile
from ddp_fnn.train.faults import Faults, LateStart, SlowForward
from ddp_fnn.train.sync import MicroStep

CPU = torch.device("cpu")


def test_nothing_asked_nothing_installed():
    faults = Faults.read(FaultsConfig(), rank=0, environ={})
    clock = faults.clock(CPU)
    obs = faults.observer(clock)
    syncer = object()
    assert not clock.deferred and type(obs) is Observer and faults.sync(syncer, clock) is syncer


def test_each_fault_is_for_its_rank_only():
    env = {"DDP_FNN_RUN_AHEAD": "1:0.02", "DDP_FNN_SLOW_STREAM": "0:0.5", "DDP_FNN_CLOCK_SHIFT": "2:3.25"}
    cfg = FaultsConfig(slow_rank=1, slow_ms=20.0)
    assert Faults.read(cfg, 0, env) == Faults(slow_stream_s=0.5)
    assert Faults.read(cfg, 1, env) == Faults(slow_s=0.02, late_start_s=0.02)
    assert Faults.read(cfg, 2, env) == Faults(clock_shift_s=3.25)
    assert isinstance(Faults(late_start_s=0.02).observer(Faults().clock(CPU)), LateStart)
    assert Faults(slow_stream_s=0.5).clock(CPU).deferred      # CPU: an emulated stream's events


@pytest.mark.parametrize("spec", ["0.02", "x:0.02", "1:", "1:fast"])
def test_a_bad_spec_names_the_variable(spec):
    with pytest.raises(ConfigError, match=f"DDP_FNN_RUN_AHEAD={spec}: expected RANK:SECONDS"):
        Faults.read(FaultsConfig(), 0, {"DDP_FNN_RUN_AHEAD": spec})


def test_the_clock_reads_no_environment_when_imported():
    code = "import time; from ddp_fnn.observe import clock; print(clock.now() - time.perf_counter())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "DDP_FNN_CLOCK_SHIFT": "0:100", "RANK": "0"}).stdout
    assert abs(float(out)) < 1.0


class _Sync:
    """A stand-in sync object: one micro-step context and finish()."""
    def __init__(self, model):
        self.micro, self.finished, self.module = MicroStep(model), 0, model

    @contextlib.contextmanager
    def micro_step(self, step, last):
        yield self.micro

    def finish(self):
        self.finished += 1


def test_a_slow_rank_idles_after_each_forward_and_is_otherwise_the_same_sync():
    model = torch.nn.Linear(3, 1)
    inner = _Sync(model)
    slow = Faults(slow_s=0.02).sync(inner, Faults().clock(CPU))
    assert isinstance(slow, SlowForward) and slow.module is model     # the rest: the wrapped one's
    x = torch.ones(2, 3)
    with slow.micro_step(1, last=True) as micro:
        t0 = time.perf_counter()
        out = micro.model(x)
        assert time.perf_counter() - t0 >= 0.02
        micro.backward(out.sum())
    slow.finish()
    assert torch.equal(out, model(x)) and inner.finished == 1 and model.weight.grad is not None


def _steps_ahead(tmp_path, *extra):
    r = run_cli("train", "--layers", "8,32,1", "--samples", "1024", "--global-batch-size", "32",
                "--max-steps", "20", "--log-every", "10", "--metrics-port", "0", "--no-probe",
                "--progress", "none", "--output", str(tmp_path), *extra,
                env={"DDP_FNN_SLOW_STREAM": "0:0.05", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = stepfile.read(tmp_path / "steps-rank0.jsonl")
    assert [d["step"] for d in lines] == list(range(1, 21))
    return stepfile.steps_ahead(lines)


def test_the_host_runs_ahead_of_a_slow_device_stream_between_log_steps(tmp_path):
    """Every forward queues 50 ms more device work than host work (DDP_FNN_SLOW_STREAM, on
    CPU an emulated stream). Nothing between log steps waits for the device (step records
    and the --on-nan stop check are read at log steps), so within each interval of 10 the
    host gets further ahead with every step (up to 9 here, for a host step of a few ms),
    and it is caught up right after each log step, where it waited. A loop that read the
    previous step's records every step stays within 1 step; one that read the NaN flag one
    step late, within 2 (the device is then one step behind the step it works on)."""
    ahead = _steps_ahead(tmp_path)
    assert max(ahead[:10]) >= 4 and max(ahead[10:]) >= 4, ahead
    assert ahead[0] == ahead[10] == 0, ahead


def test_the_skip_policys_read_every_step_keeps_the_host_in_step(tmp_path):
    """--on-nan skip reads its flag before every optimizer step (one host wait a step, by
    design): the emulated stream sees the host wait, and it never gets ahead by more
    than the step it is in. The run-ahead measure tells the two loops apart."""
    ahead = _steps_ahead(tmp_path, "--on-nan", "skip")
    assert max(ahead) <= 1, ahead
