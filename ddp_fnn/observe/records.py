"""Records: one collective (``CollectiveRecord``) and one optimizer step (``StepRecord``)
as this rank saw it, ``make_record`` that turns marks into one, and the split of exposed
time into waiting for peers and transfer (``split_wait``, with Cristian's clock offsets)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddp_fnn.core.intervals import union_after, union_length
from ddp_fnn.observe.clock import PHASES

# ---------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CollectiveRecord:
    """One gradient all-reduce as this rank saw it (offsets from the step's start). On a
    step without bucket detail (StepRecord.detailed false) ``end_s`` and ``exposed_s``
    are NaN: DDP's C++ path says when each bucket was handed over, not when it came back."""
    bucket: int             # DDP's bucket index (0 for the flat all-reduce)
    payload_bytes: int      # bytes handed to the backend (after compression)
    calls: int              # all-reduce calls behind it (PowerSGD: 3 per bucket)
    start_s: float          # handed over
    end_s: float            # reduced result back (NaN: not observed)
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
    # False: synced on DDP's C++ path (--bucket-detail-every): hand-overs but no completions,
    # comm_s = comm_span_s = first hand-over to sync end, exposed_s = the whole sync wait
    detailed: bool = True
    # When the host began queueing the step, on start_s's clock: start_s less how far the
    # host ran ahead of its device (CUDA; about start_s on CPU). None: not known.
    queued_s: float | None = None

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
            "step": self.step, "time_unix_s": self.time_unix_s, "start_s": self.start_s, "queued_s": self.queued_s,
            "step_s": self.step_s, "samples": self.samples,
            **{f"{p}_s": self.phases[p] for p in PHASES},
            "comm_s": self.comm_s, "comm_span_s": self.comm_span_s, "exposed_s": self.exposed_s,
            "tail_s": self.tail_s, "ready_s": self.ready_s,
            "sync_start_s": self.sync_start_s, "sync_end_s": self.sync_end_s,
            "payload_bytes": self.payload_bytes, "calls": self.calls,
            "loss": _finite_or_none(self.loss),
            "wait_s": self.wait_s, "transfer_s": self.transfer_s, "last_ready_rank": self.last_ready_rank,
            "detailed": self.detailed,
            "phases": [[name, a, b] for name, a, b in self.intervals],
            "collectives": [{"bucket": c.bucket, "payload_bytes": c.payload_bytes, "calls": c.calls,
                             "start_s": c.start_s, "end_s": _finite_or_none(c.end_s),
                             "exposed_s": _finite_or_none(c.exposed_s)}
                            for c in self.collectives],
        }


def _finite_or_none(x):
    return x if x is None or (isinstance(x, float) and x == x and abs(x) != float("inf")) else None


def make_record(step: int, samples: int, time_unix_s: float, start_s: float, step_s: float,
                intervals: list[tuple[str, float, float]], collectives: list[CollectiveRecord],
                sync_end_s: float | None = None, loss: float | None = None, detailed: bool = True,
                queued_s: float | None = None) -> StepRecord:
    """A step's figures from its phase intervals and collectives (all offsets in seconds).

    ``sync_end_s`` is when the averaged gradients were usable: the end of the ``sync``
    phase if there is one (flat mode), else the end of the last ``backward`` (DDP). The
    backward phase is compute only: its part after ``ready`` is the sync wait (exposed
    comm + tail). ``detailed`` false (DDP's C++ path: hand-overs only, ``end_s`` NaN):
    comm and its span run from the first hand-over to the sync's end and the whole wait
    after ``ready`` counts as exposed (tail 0); on the detailed steps of the same run the
    tail this folds in is measured (docs/metrics.md, "Bucket detail")."""
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
    if not detailed:
        first = min((c.start_s for c in collectives), default=sync_end_s)
        exposed = max(0.0, sync_end_s - wait_from) if ready is not None else 0.0
        comm = max(0.0, sync_end_s - first)
        phases = dict.fromkeys(PHASES, 0.0)
        for name, a, b in clipped:
            if name in phases:
                phases[name] += b - a
        return StepRecord(step=step, samples=samples, time_unix_s=time_unix_s, start_s=start_s, step_s=step_s,
                          phases=phases, intervals=clipped, collectives=list(collectives), ready_s=ready,
                          sync_start_s=wait_from, sync_end_s=sync_end_s, comm_s=comm, comm_span_s=comm,
                          exposed_s=exposed, tail_s=0.0, loss=loss, detailed=False, queued_s=queued_s)
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
                      tail_s=tail, loss=loss, queued_s=queued_s)


# ---------------------------------------------------------------------------------------
# waiting for peers vs transfer, and clock offsets
# ---------------------------------------------------------------------------------------

def ready_time(rec: StepRecord) -> float:
    """The rank's ready instant on its own monotonic clock (NaN if nothing was synced)."""
    return rec.start_s + rec.ready_s if rec.ready_s is not None else math.nan


def done_time(rec: StepRecord) -> float:
    """When the rank's last all-reduce of the step completed, on its own clock (NaN: none).
    Without bucket detail: the end of the sync (DDP's finalize included)."""
    if not rec.collectives:
        return math.nan
    if not rec.detailed:
        return rec.start_s + rec.sync_end_s
    return rec.start_s + max(c.end_s for c in rec.collectives)


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


