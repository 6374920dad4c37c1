"""The observer: phase and collective marks in, ``StepRecord``s out; and DDP's own C++
logger read as an independent witness."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ddp_fnn.observe.clock import Clock, now, wall
from ddp_fnn.observe.records import CollectiveRecord, StepRecord, make_record

# ---------------------------------------------------------------------------------------
# the observer: marks in, StepRecords out
# ---------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Collective:
    bucket: int
    payload_bytes: int
    calls: int
    launched: object
    done: object = None


@dataclass
class _Step:
    step: int
    time_unix_s: float
    queued_s: float                                     # the host began queueing it (monotonic)
    start: object
    anchor: object                                      # the clock's anchor when the step began
    marks: list = field(default_factory=list)          # (phase, start mark, end mark)
    collectives: list = field(default_factory=list)    # _Collective
    end: object = None
    samples: int = 0
    loss: object = None                                 # on its way to the host; read with the record
    detailed: bool = True                               # False: synced on DDP's C++ path


class Observer:
    """Collects one step at a time and turns it into a ``StepRecord``.

    ``launch``/``complete`` are called from DDP's communication hook (the autograd thread)
    and from the backend's completion callbacks (its own thread); list.append is atomic in
    CPython, and a step's record is made only after backward returned, when every
    callback has run.

    Records are made by ``finished``, which the loop calls at log steps: on CUDA reading a
    mark waits for it, so the closed steps' marks wait there, queued, and between log
    steps the host runs ahead of its device as it does under plain DDP."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._cur: _Step | None = None
        self._stray: list[_Collective] = []     # collectives outside a step (bucket settling)
        self._pending: list[_Step] = []
        self.annotate = False                   # phases as profiler ranges (profile.StepProfiler sets it)
        self._reanchor = False

    # ---- the loop's side ------------------------------------------------------------
    def begin_step(self, step: int, queued: tuple[float, float] | None = None) -> None:
        """Open step ``step``. ``queued``: (Unix, monotonic) time the host began queueing it,
        if not now (train/faults.py's late start)."""
        if self._reanchor:
            self.clock.reanchor()
            self._reanchor = False
        unix_s, queued_s = queued if queued is not None else (wall(), now())
        self._cur = _Step(step=step, time_unix_s=unix_s, queued_s=queued_s, start=self.clock.mark(),
                          anchor=self.clock.anchor)

    def reanchor(self) -> None:
        """Anchor the clock afresh at the next step's start (once per log interval: on
        CUDA it waits for the device once)."""
        self._reanchor = True

    @contextlib.contextmanager
    def phase(self, name: str):
        # Inside a --profile window each phase is also a ``ddp_fnn.<phase>`` range in the
        # profiler's trace, so its operators and kernels can be attributed to our phases.
        ranged = (torch.profiler.record_function(f"ddp_fnn.{name}") if self.annotate
                  else contextlib.nullcontext())
        t0 = self.clock.mark()
        try:
            with ranged:
                yield
        finally:
            self._cur.marks.append((name, t0, self.clock.mark()))

    def end_step(self, samples: int, loss: torch.Tensor | None = None) -> None:
        """Close the current step. ``loss``: this rank's mean loss over its rows, as a
        tensor, read with the record (no host sync here)."""
        cur = self._cur
        if loss is not None:
            cur.loss = self.clock.to_host(loss)     # CUDA: a copy queued, not landed
        # The step's last mark, queued after the loss's copy: once it is complete, so is
        # the copy (``_record`` waits for it before it reads the loss).
        cur.samples, cur.end = samples, self.clock.mark()
        self._pending.append(cur)
        self._cur = None

    def finished(self) -> list[StepRecord]:
        """The records of every closed step. On CUDA this waits for their marks: the loop
        calls it at log steps and at the end, never in between."""
        out = [self._record(s) for s in self._pending]
        self._pending = []
        return out

    # ---- the hooks' side ------------------------------------------------------------
    def launch(self, bucket: int, payload_bytes: int, calls: int = 1) -> _Collective:
        rec = _Collective(bucket, payload_bytes, calls, self.clock.mark())
        (self._cur.collectives if self._cur is not None else self._stray).append(rec)
        return rec

    def complete(self, rec: _Collective) -> None:
        rec.done = self.clock.mark()

    def handed_over(self, base, launches: list[tuple[int, int, float]]) -> None:
        """The current step synced on DDP's C++ path (sync.py, --bucket-detail-every):
        each bucket's (index, payload bytes, hand-over in seconds after the mark ``base``).
        No completions: its record has step totals only (records.make_record). CPU marks."""
        self._cur.detailed = False
        self._cur.collectives = [_Collective(b, nbytes, 1, base + s) for b, nbytes, s in launches]

    def discard_stray(self) -> None:
        """Forget collectives made outside a step (e.g. DDP's bucket settling on resume)."""
        self._stray = []

    # ---- marks to seconds -----------------------------------------------------------
    def _record(self, s: _Step) -> StepRecord:
        self.clock.wait(s.end)          # first: the only mark queued after the loss's copy
        loss = float(s.loss) if s.loss is not None else None
        sec = self.clock.seconds
        intervals = [(name, sec(s.start, a), sec(s.start, b)) for name, a, b in s.marks]
        if s.detailed:
            colls = [CollectiveRecord(c.bucket, c.payload_bytes, c.calls, sec(s.start, c.launched),
                                      sec(s.start, c.done if c.done is not None else s.end))
                     for c in s.collectives]
        else:
            colls = [CollectiveRecord(c.bucket, c.payload_bytes, c.calls, sec(s.start, c.launched), math.nan,
                                      math.nan) for c in s.collectives]
        return make_record(step=s.step, samples=s.samples, time_unix_s=s.time_unix_s,
                           start_s=self.clock.host_time(s.start, s.anchor), step_s=sec(s.start, s.end),
                           intervals=intervals, collectives=colls, loss=loss, detailed=s.detailed,
                           queued_s=s.queued_s)


# ---------------------------------------------------------------------------------------
# an independent witness: PyTorch DDP's own C++ logger
# ---------------------------------------------------------------------------------------

class DdpLoggerWitness:
    """Reads DDP's C++ logger (``--ddp-logger``) once a step, for comparison with ddp-fnn's
    own figures.

    ``_set_ddp_runtime_logging_sample_rate(1)`` makes the Reducer time every iteration;
    ``_get_ddp_logging_data()`` then holds the *previous* iteration's figures (they are
    published at the next forward), in nanoseconds of the system clock:
    ``backward_comm_time_start``/``_end`` run from the first bucket's all-reduce launch to
    the end of DDP's finalize, so their difference is a comm *span*;
    ``backward_compute_time_end`` is when autograd produced the last gradient, so
    comm end - compute end is DDP's own exposed communication. DDP counts every forward as
    an iteration: with ``--grad-accum K`` only one in K has communication."""

    def __init__(self, ddp_model):
        self.model = ddp_model
        ddp_model._set_ddp_runtime_logging_sample_rate(1)

    def read(self, step: int) -> dict | None:
        """After step ``step``'s forward: DDP's figures of step ``step - 1`` (None if it
        has none yet)."""
        d = self.model._get_ddp_logging_data()
        if step < 2 or "backward_comm_time_start" not in d:
            return None
        ns = 1e-9
        return {
            "step": step - 1,
            "forward_compute_s": d["forward_compute_time"] * ns,
            "backward_compute_s": d["backward_compute_time"] * ns,
            "backward_comm_span_s": (d["backward_comm_time_end"] - d["backward_comm_time_start"]) * ns,
            "backward_comm_s": d["backward_comm_time"] * ns,
            "backward_compute_comm_overlap_s": d["backward_compute_comm_overlap_time"] * ns,
            "exposed_s": max(0, d["backward_comm_time_end"] - d["backward_compute_time_end"]) * ns,
        }
