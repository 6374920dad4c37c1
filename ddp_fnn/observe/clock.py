"""The clock: host marks (perf_counter), CUDA-event marks and stopwatches. ``PHASES``
names a step's compute phases. (Interval arithmetic is core/intervals.py.)"""

from __future__ import annotations

import os
import time

import torch

PHASES = ("data", "forward", "backward", "optimizer")


def _rank_seconds(name: str) -> float:
    """Fault injection from ``NAME=R:SECONDS``: SECONDS on rank R, 0 elsewhere or unset."""
    spec = os.environ.get(name)
    if not spec:
        return 0.0
    rank, _, seconds = spec.partition(":")
    return float(seconds) if rank.strip() == os.environ.get("RANK", "0") else 0.0


# Tests of clock alignment: DDP_FNN_CLOCK_SHIFT=R:SECONDS moves rank R's clock by SECONDS,
# as another host's clock would be (docs/metrics.md).
_SHIFT_S = _rank_seconds("DDP_FNN_CLOCK_SHIFT")
# Tests of the one-clock rule: DDP_FNN_RUN_AHEAD=R:SECONDS makes rank R's host take a
# step's queue time SECONDS before its work starts, as a CUDA host that runs ahead of its
# GPU does (docs/metrics.md). Nothing may time a step from that queue time.
RUN_AHEAD_S = _rank_seconds("DDP_FNN_RUN_AHEAD")


def now() -> float:
    """This host's monotonic clock in seconds: the time base of marks, step records and
    timelines (shared by every process on one host)."""
    return time.perf_counter() + _SHIFT_S


def wall() -> float:
    """Unix time in seconds (for humans and for ``time() - x`` in Prometheus; never for
    durations: it can jump)."""
    return time.time()


class Stopwatch:
    """Host-side elapsed seconds since construction (or the last ``restart``)."""

    def __init__(self):
        self.t0 = now()

    def restart(self) -> None:
        self.t0 = now()

    def seconds(self) -> float:
        return now() - self.t0


def _cuda_mark():
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


class Clock:
    """Marks on the device's timeline: floats on CPU, CUDA events on GPU.

    ``host_time`` puts a mark on the host's clock (``now``), the one clock ready times are
    compared on across ranks. On CPU a mark is that clock. On CUDA a mark's host time is
    an anchor's plus the GPU time between them: the anchor is an event the host waited
    for (``reanchor``: one host sync, once per log interval), so its host time is when it
    completed, to within the wake-up of ``synchronize`` (microseconds), and the GPU's
    clock drifts from the host's by parts per million over the interval. A host that
    queues work ahead of its GPU does so by a different amount on every rank; a step's
    host queue time is therefore never used as its start."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        # ``mark`` is the function itself, chosen once: DDP's hook takes two marks per
        # bucket, and on CPU that is a bare perf_counter() call.
        self.mark = _cuda_mark if self.cuda else now
        self.anchor = None
        self.reanchor()

    def reanchor(self) -> None:
        """A new anchor for marks taken from now on (CUDA: waits for the device)."""
        if self.cuda:
            ev = _cuda_mark()
            ev.synchronize()
            self.anchor = (ev, now())

    def host_time(self, mark, anchor) -> float:
        """``mark``'s instant on the host clock; ``anchor`` is ``self.anchor`` as it was
        when the mark was taken (so the mark is after it). Waits for ``mark`` on CUDA."""
        if not self.cuda:
            return mark
        ev, host = anchor
        mark.synchronize()
        return host + ev.elapsed_time(mark) / 1000.0

    def seconds(self, start, end) -> float:
        """Elapsed seconds between two marks (waits for ``end`` on CUDA, if needed)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start
