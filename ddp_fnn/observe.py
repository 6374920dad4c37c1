"""Measurement, in one place: the clock, phase marks, collective records, and the turning
of one step's marks into a ``StepRecord``.

Everything that reports a time (Prometheus metrics, summary.json, the progress line, the
step file, the timeline) consumes ``StepRecord``s and computes no duration of its own.

The loop marks phases; the gradient hooks mark collectives::

    obs.begin_step(step)
    with obs.phase("data"): ...
    with obs.phase("forward"): ...
    with obs.phase("backward"): ...          # DDP's buckets are launched and completed in here
    with obs.phase("sync"): ...              # --sync allreduce: the flat all-reduce
    with obs.phase("optimizer"): ...
    obs.end_step(samples, loss)
    for rec in obs.finished(): ...           # CPU: this step; CUDA: the previous one

Clocks. On CPU a mark is ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, one clock for
every process of a host, network namespaces included), taken after the work before it
really finished (CPU ops are synchronous, and DDP's backward returns only after every
bucket's all-reduce completed). On CUDA a mark is a recorded CUDA event: recording is
asynchronous, so phases are never synchronised one by one (that would destroy the
compute/communication overlap being measured); a step's events are read one step later,
when they have long completed.

Definitions (docs/metrics.md has them with a worked example), per step and per rank,
as offsets in seconds from the step's start:

* ``ready``: when this rank's own gradients were all handed over to the backend, i.e.
  the launch of the step's last collective (DDP: the last bucket's hook call, which
  happens when autograd produced the last gradient; flat mode: the one all-reduce).
* comm time: the length of the union of the collectives' [launch, completion] intervals.
* comm span: first launch to last completion (gaps between buckets included).
* exposed communication: the part of the comm time after ``ready``; never more than
  comm time.
* sync tail: the rest of the wait between the end of gradient compute and the
  gradients being usable, that is not communication: DDP's finalize (copying reduced
  buckets back, the autograd engine's last callbacks) or the flat mode's flatten and
  copy-back.
* backward: gradient compute only (DDP: up to ``ready``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch

PHASES = ("data", "forward", "backward", "optimizer")


def _clock_shift() -> float:
    """Fault injection for tests of clock alignment: ``DDP_FNN_CLOCK_SHIFT=R:SECONDS``
    moves rank R's clock by SECONDS, as another host's clock would be (docs/metrics.md)."""
    spec = os.environ.get("DDP_FNN_CLOCK_SHIFT")
    if not spec:
        return 0.0
    rank, _, seconds = spec.partition(":")
    return float(seconds) if rank.strip() == os.environ.get("RANK", "0") else 0.0


_SHIFT_S = _clock_shift()


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
    """Marks on the device's timeline: floats on CPU, CUDA events on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        # ``mark`` is the function itself, chosen once: DDP's hook takes two marks per
        # bucket, and on CPU that is a bare perf_counter() call.
        self.mark = _cuda_mark if self.cuda else now

    def seconds(self, start, end) -> float:
        """Elapsed seconds between two marks (waits for ``end`` on CUDA, if needed)."""
        if self.cuda:
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start


# ---------------------------------------------------------------------------------------
# interval arithmetic
# ---------------------------------------------------------------------------------------

def union_length(intervals) -> float:
    """Length of the union of [start, end] intervals. Example (docs/metrics.md): [0.125,
    0.375], [0.25, 0.5] and [0.625, 0.75] give 0.5, not the 0.625 their durations sum to."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def union_after(intervals, t: float) -> float:
    """Length of the part of the intervals' union that lies after ``t``."""
    return union_length([(max(a, t), b) for a, b in intervals if b > t])


# ---------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CollectiveRecord:
    """One gradient all-reduce as this rank saw it (offsets from the step's start)."""
    bucket: int             # DDP's bucket index (0 for the flat all-reduce)
    payload_bytes: int      # bytes handed to the backend (after compression)
    calls: int              # all-reduce calls behind it (PowerSGD: 3 per bucket)
    start_s: float          # handed over
    end_s: float            # reduced result back
    exposed_s: float = 0.0  # the part of it after the step's ``ready`` (set by make_record)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class StepRecord:
    """What one optimizer step took on this rank: seconds, bytes, and when.

    Offsets (``*_s`` inside the step, ``intervals``, ``collectives``) are seconds from
    the step's start; ``start_s`` is that start on this host's monotonic clock."""
    step: int                                   # 1-based optimizer step
    samples: int                                # this rank's samples in the step
    time_unix_s: float                          # wall-clock time the step started
    start_s: float                              # monotonic time the step started
    step_s: float                               # the whole step
    phases: dict[str, float]                    # PHASES -> seconds (backward: compute only)
    intervals: list[tuple[str, float, float]]   # (phase, start, end) in order (backward clipped at ready)
    collectives: list[CollectiveRecord]
    ready_s: float | None                       # last hand-over (None: nothing was synced)
    sync_start_s: float                         # end of gradient compute: the sync wait starts
    sync_end_s: float                           # gradients averaged and usable
    comm_s: float                               # union of the collectives' intervals
    comm_span_s: float                          # first launch to last completion
    exposed_s: float                            # comm after ready
    tail_s: float                               # sync wait that is not communication
    loss: float | None = None                   # this rank's mean loss over its rows (None: not read)
    # Filled in when the ranks exchange their ready times (peers.py), every --log-every steps:
    wait_s: float | None = None                 # waiting for peers: last ready - this rank's ready
    transfer_s: float | None = None             # the network's part: last completion - last ready
    last_ready_rank: int | None = None          # the rank whose gradients came last

    @property
    def payload_bytes(self) -> int:
        return sum(c.payload_bytes for c in self.collectives)

    @property
    def calls(self) -> int:
        return sum(c.calls for c in self.collectives)

    @property
    def end_s(self) -> float:
        return self.start_s + self.step_s

    def to_json(self) -> dict:
        """One line of the step file (strict JSON: finite numbers or null)."""
        return {
            "step": self.step, "time_unix_s": self.time_unix_s, "start_s": self.start_s,
            "step_s": self.step_s, "samples": self.samples,
            **{f"{p}_s": self.phases[p] for p in PHASES},
            "comm_s": self.comm_s, "comm_span_s": self.comm_span_s, "exposed_s": self.exposed_s,
            "tail_s": self.tail_s, "ready_s": self.ready_s,
            "sync_start_s": self.sync_start_s, "sync_end_s": self.sync_end_s,
            "payload_bytes": self.payload_bytes, "calls": self.calls,
            "loss": _finite_or_none(self.loss),
            "wait_s": self.wait_s, "transfer_s": self.transfer_s, "last_ready_rank": self.last_ready_rank,
            "phases": [[name, a, b] for name, a, b in self.intervals],
            "collectives": [{"bucket": c.bucket, "payload_bytes": c.payload_bytes, "calls": c.calls,
                             "start_s": c.start_s, "end_s": c.end_s, "exposed_s": c.exposed_s}
                            for c in self.collectives],
        }


def _finite_or_none(x):
    return x if x is None or (isinstance(x, float) and x == x and abs(x) != float("inf")) else None


def make_record(step: int, samples: int, time_unix_s: float, start_s: float, step_s: float,
                intervals: list[tuple[str, float, float]], collectives: list[CollectiveRecord],
                sync_end_s: float | None = None, loss: float | None = None) -> StepRecord:
    """A step's figures from its phase intervals and collectives (all offsets in seconds).

    ``sync_end_s`` is when the averaged gradients were usable: the end of the ``sync``
    phase if there is one (flat mode), else the end of the last ``backward`` (DDP). The
    backward phase is compute only: its part after ``ready`` is the sync wait (exposed
    comm + tail)."""
    ready = max((c.start_s for c in collectives), default=None)
    backward_ends = [b for name, _, b in intervals if name == "backward"]
    compute_end = backward_ends[-1] if backward_ends else 0.0
    sync_phase = [(a, b) for name, a, b in intervals if name == "sync"]
    if sync_end_s is None:
        sync_end_s = sync_phase[-1][1] if sync_phase else compute_end
    wait_from = compute_end
    clipped = []
    for name, a, b in intervals:
        if name == "backward" and ready is not None and b > ready and b == compute_end:
            # DDP: backward() returns only after every bucket came back; past the last
            # hand-over this rank computes nothing and waits.
            clipped.append((name, a, max(a, ready)))
            wait_from = max(a, ready)
        elif name != "sync":
            clipped.append((name, a, b))
    if ready is not None:
        # Built directly: dataclasses.replace is several times slower, and this runs for
        # every bucket of every step, in the training loop.
        collectives = [CollectiveRecord(c.bucket, c.payload_bytes, c.calls, c.start_s, c.end_s,
                                        max(0.0, c.end_s - max(c.start_s, ready)))
                       for c in collectives]
    spans = [(c.start_s, c.end_s) for c in collectives]
    comm = union_length(spans)
    exposed = union_after(spans, ready) if ready is not None else 0.0
    phases = dict.fromkeys(PHASES, 0.0)
    for name, a, b in clipped:
        if name in phases:
            phases[name] += b - a
    tail = max(0.0, (sync_end_s - wait_from) - exposed)
    span = (max(c.end_s for c in collectives) - min(c.start_s for c in collectives)) if collectives else 0.0
    return StepRecord(step=step, samples=samples, time_unix_s=time_unix_s, start_s=start_s, step_s=step_s,
                      phases=phases, intervals=clipped, collectives=list(collectives), ready_s=ready,
                      sync_start_s=wait_from, sync_end_s=sync_end_s, comm_s=comm, comm_span_s=span, exposed_s=min(exposed, comm),
                      tail_s=tail, loss=loss)


# ---------------------------------------------------------------------------------------
# waiting for peers vs transfer, and clock offsets
# ---------------------------------------------------------------------------------------

def ready_time(rec: StepRecord) -> float:
    """The rank's ready instant on its own monotonic clock (NaN if nothing was synced)."""
    return rec.start_s + rec.ready_s if rec.ready_s is not None else math.nan


def done_time(rec: StepRecord) -> float:
    """When the rank's last all-reduce of the step completed, on its own clock (NaN: none)."""
    return rec.start_s + max(c.end_s for c in rec.collectives) if rec.collectives else math.nan


def split_wait(rec: StepRecord, ready_all: list[float], offset_s: float) -> None:
    """Fill ``rec``'s wait_s, transfer_s and last_ready_rank from every rank's ready time
    (``ready_all[r]``, on rank 0's clock; NaN where a rank synced nothing). ``offset_s``
    is this rank's clock minus rank 0's.

    An all-reduce cannot finish before the last rank hands its gradients over, so the
    time from this rank's ready to the last rank's is spent waiting for a peer, and only
    what follows the last ready is the network's: wait = last_ready - ready (>= 0),
    transfer = done - last_ready."""
    known = [(t, r) for r, t in enumerate(ready_all) if not math.isnan(t)]
    if rec.ready_s is None or not known:
        return
    last, last_rank = max(known)
    mine = ready_time(rec) - offset_s
    rec.wait_s = max(0.0, last - mine)
    rec.transfer_s = max(0.0, done_time(rec) - offset_s - max(last, mine))
    rec.last_ready_rank = last_rank


def cristian(samples: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """Clock offset from ping-pong samples (t1 sent, ts the server's time, t2 received; t1
    and t2 on this rank's clock, ts on the server's): the sample with the smallest round
    trip, offset = (t1 + t2) / 2 - ts, error bound half its round trip (Cristian 1989;
    NTP's minimum-delay filter). Returns (offset, bound, round trip)."""
    t1, ts, t2 = min(samples, key=lambda s: s[2] - s[0])
    return (t1 + t2) / 2 - ts, (t2 - t1) / 2, t2 - t1


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
    host_start_s: float
    start: object
    marks: list = field(default_factory=list)          # (phase, start mark, end mark)
    collectives: list = field(default_factory=list)    # _Collective
    end: object = None
    samples: int = 0
    loss: object = None                                 # a tensor, read when the record is made


class Observer:
    """Collects one step at a time and turns it into a ``StepRecord``.

    ``launch``/``complete`` are called from DDP's communication hook (the autograd thread)
    and from the backend's completion callbacks (its own thread); list.append is atomic in
    CPython, and a step's record is made only after backward returned, when every
    callback has run."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._cur: _Step | None = None
        self._stray: list[_Collective] = []     # collectives outside a step (bucket settling)
        self._pending: list[_Step] = []

    # ---- the loop's side ------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self._cur = _Step(step=step, time_unix_s=wall(), host_start_s=now(), start=self.clock.mark())

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = self.clock.mark()
        try:
            yield
        finally:
            self._cur.marks.append((name, t0, self.clock.mark()))

    def end_step(self, samples: int, loss: torch.Tensor | None = None) -> None:
        """Close the current step. ``loss``: this rank's mean loss over its rows, as a
        tensor (read without a host sync: on CUDA, one step later)."""
        cur = self._cur
        if loss is not None and self.clock.cuda:
            loss = loss.detach().to("cpu", non_blocking=True)    # ready once ``end`` is
        cur.loss, cur.samples, cur.end = loss, samples, self.clock.mark()
        self._pending.append(cur)
        self._cur = None

    def finished(self) -> list[StepRecord]:
        """Records of the closed steps whose marks can be read now: on CPU every one; on
        CUDA all but the newest (read one step late: no synchronisation in the loop)."""
        keep = 1 if self.clock.cuda else 0
        out = []
        while len(self._pending) > keep:
            out.append(self._record(self._pending.pop(0)))
        return out

    def flush(self) -> list[StepRecord]:
        """Every remaining record (the end of the run)."""
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

    def discard_stray(self) -> None:
        """Forget collectives made outside a step (e.g. DDP's bucket settling on resume)."""
        self._stray = []

    # ---- marks to seconds -----------------------------------------------------------
    def _record(self, s: _Step) -> StepRecord:
        sec = self.clock.seconds
        intervals = [(name, sec(s.start, a), sec(s.start, b)) for name, a, b in s.marks]
        colls = [CollectiveRecord(c.bucket, c.payload_bytes, c.calls, sec(s.start, c.launched),
                                  sec(s.start, c.done if c.done is not None else s.end))
                 for c in s.collectives]
        loss = None
        if s.loss is not None:
            loss = float(s.loss)
        return make_record(step=s.step, samples=s.samples, time_unix_s=s.time_unix_s, start_s=s.host_start_s,
                           step_s=sec(s.start, s.end), intervals=intervals, collectives=colls, loss=loss)


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
