"""An emulated device stream on CPU: what a CUDA host may and may not wait for, made visible.

A CUDA host queues work and goes on. It learns that the work is done only from an event
recorded after it (``synchronize`` waits for it, ``query`` asks), and a tensor copied to
host memory with ``non_blocking=True`` may be read only once such an event is known
complete. On CPU every operation is done when its call returns, so code that breaks
either rule, or that waits for the device every step, looks the same as code that does
not. ``Clock(device, stream=EmulatedStream())`` (observe/clock.py) puts the marks on this
stream instead, and the rules become checkable:

* An event completes ``lag_s`` after it was recorded. ``delay(s)`` is a slow kernel (CUDA:
  ``torch.cuda._sleep``): the lag grows by ``s``. While the host sleeps in ``synchronize``
  the device works off its queue, so the lag shrinks by the time slept. The host's own
  compute between marks stands for the device's (the lag stays as it is).
* ``to_host(tensor)`` is the non-blocking copy: an ``InFlight`` value that refuses to be
  read until the host has seen complete an event recorded after the copy (stream order:
  a later event's completion implies the earlier work's).
* ``elapsed_time`` refuses events not complete yet (CUDA's cudaErrorNotReady).
* ``syncs`` counts ``synchronize`` calls; ``waits`` those that blocked.

train/faults.py installs it on CPU with DDP_FNN_SLOW_STREAM, for the run-ahead test.
Collectives still run at host time, so a run's wait and transfer figures mean nothing
under it; only one rank's own steps do.
"""

from __future__ import annotations

import time

from ddp_fnn.observe.clock import now


class EmulatedStream:
    def __init__(self):
        self.lag_s = 0.0        # how far the device's queue reaches past the host's present
        self.seen = 0           # the newest event (in queue order) the host knows complete
        self.syncs = 0
        self.waits = 0
        self._queued = 0

    def _next(self) -> int:
        self._queued += 1
        return self._queued

    def record(self) -> EmulatedEvent:
        """An event after everything queued so far (CUDA: ``Event.record()``)."""
        return EmulatedEvent(self, self._next(), now() + self.lag_s)

    def delay(self, seconds: float) -> None:
        """``seconds`` more work on the device, none on the host (a spin kernel)."""
        self.lag_s += seconds

    def to_host(self, tensor) -> InFlight:
        """``tensor.to("cpu", non_blocking=True)``: queued, not landed."""
        return InFlight(tensor.detach().clone(), self, self._next())

    def _wait_until(self, t: float) -> None:
        left = t - now()
        if left > 0:
            self.waits += 1
            t0 = now()
            time.sleep(left)
            self.lag_s = max(0.0, self.lag_s - (now() - t0))

    def _saw(self, seq: int) -> None:
        self.seen = max(self.seen, seq)


class EmulatedEvent:
    """A recorded event: ``synchronize``, ``query`` and ``elapsed_time`` as torch.cuda.Event's."""
    __slots__ = ("stream", "seq", "t")

    def __init__(self, stream: EmulatedStream, seq: int, t: float):
        self.stream, self.seq, self.t = stream, seq, t

    def synchronize(self) -> None:
        self.stream.syncs += 1
        self.stream._wait_until(self.t)
        self.stream._saw(self.seq)

    def query(self) -> bool:
        if now() < self.t:
            return False
        self.stream._saw(self.seq)
        return True

    def elapsed_time(self, end: EmulatedEvent) -> float:
        """Milliseconds from this event to ``end``; both must be complete."""
        if not (self.query() and end.query()):
            raise RuntimeError("elapsed_time of an event that has not completed (CUDA: cudaErrorNotReady)")
        return (end.t - self.t) * 1000.0


class InFlight:
    """A value on its way to host memory: readable once an event recorded after its copy
    is known complete. On CUDA reading it earlier returns whatever the pinned buffer held."""
    __slots__ = ("value", "stream", "seq")

    def __init__(self, value, stream: EmulatedStream, seq: int):
        self.value, self.stream, self.seq = value, stream, seq

    def landed(self):
        if self.stream.seen < self.seq:
            raise RuntimeError("a non-blocking copy read before any event behind it was seen complete "
                               "(on CUDA: a read of a pinned buffer the copy may not have reached)")
        return self.value

    def item(self):
        return self.landed().item()

    def __float__(self) -> float:
        return float(self.landed())
