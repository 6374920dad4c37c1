"""The clock: host marks (perf_counter), CUDA-event marks and stopwatches. ``PHASES``
names a step's compute phases. (Interval arithmetic is core/intervals.py.)"""

from __future__ import annotations

import time

import torch

PHASES = ("data", "forward", "backward", "optimizer")

# DDP_FNN_CLOCK_SHIFT (train/faults.py, set once at set-up, never read from the environment
# here): this process's clock moved by so many seconds, as another host's clock would be.
_shift_s = 0.0


def shift(seconds: float) -> None:
    """Move ``now`` by ``seconds`` from here on: fault injection for the clock-offset tests
    (train/faults.py), before any time is taken that the ranks compare."""
    global _shift_s
    _shift_s = seconds


def now() -> float:
    """This host's monotonic clock in seconds: the time base of marks, step records and
    timelines (shared by every process on one host)."""
    return time.perf_counter() + _shift_s


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
    """Marks on the device's timeline: floats on CPU, CUDA events on GPU (or the events of
    an emulated stream on CPU, ``stream``: observe/emulated.py).

    ``host_time`` puts a mark on the host's clock (``now``), the one clock ready times are
    compared on across ranks. On CPU a mark is that clock. On CUDA a mark's host time is
    an anchor's plus the GPU time between them: the anchor is an event the host waited
    for (``reanchor``: one host sync, once per log interval), so its host time is when it
    completed, to within the wake-up of ``synchronize`` (microseconds), and the GPU's
    clock drifts from the host's by parts per million over the interval. A host that
    queues work ahead of its GPU does so by a different amount on every rank; a step's
    host queue time is therefore never used as its start.

    ``deferred``: marks are events the device completes later (CUDA, or the emulation);
    reading one waits for it, so the Observer reads them only at log steps."""

    def __init__(self, device: torch.device, stream=None):
        self.cuda = device.type == "cuda"
        self.stream = stream
        self.deferred = self.cuda or stream is not None
        # ``mark`` is the function itself, chosen once: DDP's hook takes two marks per
        # bucket, and on CPU that is a bare perf_counter() call.
        self.mark = _cuda_mark if self.cuda else stream.record if stream is not None else now
        self.anchor = None
        self.reanchor()

    def reanchor(self) -> None:
        """A new anchor for marks taken from now on (CUDA: waits for the device)."""
        if self.deferred:
            ev = self.mark()
            ev.synchronize()
            self.anchor = (ev, now())

    def wait(self, mark) -> None:
        """Block until ``mark`` is complete, and with it everything queued before it."""
        if self.deferred:
            mark.synchronize()

    def to_host(self, tensor: torch.Tensor):
        """``tensor`` on its way to host memory without waiting: on CUDA an asynchronous
        copy into pinned memory, readable once a mark taken after this call is complete
        (``wait``); on CPU the tensor itself."""
        if self.cuda:
            return tensor.detach().to("cpu", non_blocking=True)
        if self.stream is not None:
            return self.stream.to_host(tensor)
        return tensor

    def host_time(self, mark, anchor) -> float:
        """``mark``'s instant on the host clock; ``anchor`` is ``self.anchor`` as it was
        when the mark was taken (so the mark is after it). Waits for ``mark`` on CUDA."""
        if not self.deferred:
            return mark
        ev, host = anchor
        mark.synchronize()
        return host + ev.elapsed_time(mark) / 1000.0

    def seconds(self, start, end) -> float:
        """Elapsed seconds between two marks (waits for ``end`` on CUDA, if needed)."""
        if self.deferred:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start
