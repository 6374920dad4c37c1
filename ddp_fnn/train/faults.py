"""Injected faults, for tests and benchmarks: set up only where asked, so that the loop,
the Synchroniser and the Observer carry none of them.

* ``--slow-rank R --slow-ms X`` (config.FaultsConfig): rank R's host idles X ms after each
  forward, inside the forward phase, as a slower device would (stragglers).
* ``DDP_FNN_CLOCK_SHIFT=R:SECONDS``: rank R's monotonic clock reads SECONDS more, as
  another host's clock would (the clock-offset tests, docs/metrics.md).
* ``DDP_FNN_RUN_AHEAD=R:SECONDS``: rank R's host takes each step's queue time SECONDS
  before the step's work starts, as a CUDA host that runs ahead of its GPU does (the
  one-clock rule: nothing may time a step from its queue time).
* ``DDP_FNN_SLOW_STREAM=R:SECONDS``: rank R's device gets SECONDS more work in each
  forward, none of it on the host: on CUDA a spin kernel (``torch.cuda._sleep``) on the
  current stream; on CPU the marks go on an emulated stream (observe/emulated.py) that
  falls that much further behind. The host then runs ahead of its device, as DDP
  training on a GPU does, wherever nothing waits for the device between log steps (the
  run-ahead test: the step file's ``queued_s``, observe.stepfile.steps_ahead).

The environment is read here, once, at set-up (``Faults.read``), with this rank's number.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch

from ddp_fnn.config import ConfigError, FaultsConfig
from ddp_fnn.observe import Clock, Observer, now, wall
from ddp_fnn.observe.clock import shift as shift_clock
from ddp_fnn.observe.emulated import EmulatedStream

ENV = ("DDP_FNN_CLOCK_SHIFT", "DDP_FNN_RUN_AHEAD", "DDP_FNN_SLOW_STREAM")


def rank_seconds(name: str, rank: int, environ=os.environ) -> float:
    """``NAME=R:SECONDS``: SECONDS on rank R, 0 on the others or when unset."""
    spec = environ.get(name)
    if not spec:
        return 0.0
    r, _, seconds = spec.partition(":")
    try:
        at, value = int(r), float(seconds)
    except ValueError:
        raise ConfigError(f"{name}={spec}: expected RANK:SECONDS, e.g. 1:0.02") from None
    return value if at == rank else 0.0


@dataclass(frozen=True)
class Faults:
    """What this rank injects (all 0: nothing is installed)."""
    slow_s: float = 0.0             # --slow-rank: host idle after each forward
    clock_shift_s: float = 0.0      # DDP_FNN_CLOCK_SHIFT
    late_start_s: float = 0.0       # DDP_FNN_RUN_AHEAD
    slow_stream_s: float = 0.0      # DDP_FNN_SLOW_STREAM

    @classmethod
    def read(cls, cfg: FaultsConfig, rank: int, environ=os.environ) -> Faults:
        slow = cfg.slow_ms / 1000 if cfg.slow_rank == rank else 0.0
        shift, late, stream = (rank_seconds(name, rank, environ) for name in ENV)
        return cls(slow, shift, late, stream)

    def clock(self, device: torch.device) -> Clock:
        """The run's clock, after moving it (DDP_FNN_CLOCK_SHIFT): before any time is
        taken that the ranks compare. On CPU with a slow stream, its marks are an
        emulated stream's events."""
        if self.clock_shift_s:
            shift_clock(self.clock_shift_s)
        emulate = self.slow_stream_s and device.type != "cuda"
        return Clock(device, stream=EmulatedStream() if emulate else None)

    def observer(self, clock: Clock) -> Observer:
        return LateStart(clock, self.late_start_s) if self.late_start_s else Observer(clock)

    def sync(self, syncer, clock: Clock):
        """The sync object the loop talks to: ``syncer`` itself, or wrapped in a slower
        forward."""
        if not (self.slow_s or self.slow_stream_s):
            return syncer
        device_work = None
        if self.slow_stream_s:
            device_work = (_spin(self.slow_stream_s) if clock.cuda
                           else lambda: clock.stream.delay(self.slow_stream_s))
        return SlowForward(syncer, self.slow_s, device_work)


class LateStart(Observer):
    """DDP_FNN_RUN_AHEAD: each step's queue time is taken ``late_s`` before its work (and
    its first mark) starts."""

    def __init__(self, clock: Clock, late_s: float):
        super().__init__(clock)
        self.late_s = late_s

    def begin_step(self, step: int, queued=None) -> None:
        queued = queued if queued is not None else (wall(), now())
        time.sleep(self.late_s)
        super().begin_step(step, queued)


class SlowForward:
    """The Synchroniser with a slower forward on this rank: after each micro-step's model
    call the host idles ``host_s`` (--slow-rank) and ``device_work()`` queues more device
    work (DDP_FNN_SLOW_STREAM). Everything else is the wrapped Synchroniser's."""

    def __init__(self, inner, host_s: float, device_work=None):
        self.inner, self.host_s, self.device_work = inner, host_s, device_work

    @contextlib.contextmanager
    def micro_step(self, step: int, last: bool):
        with self.inner.micro_step(step, last) as micro:
            yield _SlowMicroStep(micro, self)

    def finish(self) -> None:
        self.inner.finish()

    def __getattr__(self, name):
        # module, model, state_dict, ...: a test-only wrapper forwards the rest unchanged.
        return getattr(self.inner, name)


class _SlowMicroStep:
    def __init__(self, micro, slow: SlowForward):
        self.micro, self.slow = micro, slow
        self.backward = micro.backward

    def model(self, x):
        out = self.micro.model(x)
        if self.slow.device_work is not None:
            self.slow.device_work()
        if self.slow.host_s:
            time.sleep(self.slow.host_s)
        return out


def _spin(seconds: float):
    """A function that queues about ``seconds`` of spinning on the current CUDA stream:
    ``torch.cuda._sleep`` counts GPU cycles, measured here once against CUDA events."""
    probe = 10_000_000
    torch.cuda._sleep(probe // 100)                  # warm up (module load)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    torch.cuda._sleep(probe)
    b.record()
    b.synchronize()
    cycles = max(1, int(seconds * probe / (a.elapsed_time(b) / 1000.0)))
    return lambda: torch.cuda._sleep(cycles)
