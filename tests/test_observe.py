"""observe.py, the one home of measurement: hand-made marks in, StepRecords out; the step
file and the timeline built from them."""

from __future__ import annotations

import json

import pytest
import torch

from ddp_fnn import observe
from ddp_fnn.observe import stepfile
from ddp_fnn.observe import timeline
from ddp_fnn.core import intervals
from ddp_fnn.core.intervals import union_after, union_length
from ddp_fnn.observe import CollectiveRecord, Observer, make_record

# Binary fractions throughout, so every sum and difference is exact in floating point.


# ---------------------------------------------------------------------------------------
# interval arithmetic
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("intervals,union", [
    ([], 0.0),
    ([(0.25, 0.5)], 0.25),
    ([(0.125, 0.375), (0.25, 0.5), (0.625, 0.75)], 0.5),       # docs/metrics.md's example
    ([(0.625, 0.75), (0.25, 0.5), (0.125, 0.375)], 0.5),       # order does not matter
    ([(0.0, 1.0), (0.25, 0.5)], 1.0),                          # nested: counted once
    ([(0.0, 0.25), (0.25, 0.5)], 0.5),                         # touching
    ([(0.0, 0.25), (0.5, 0.75), (0.125, 0.625)], 0.75),        # a bridge joins two
])
def test_union_length(intervals, union):
    assert union_length(intervals) == union


def test_union_after_counts_only_what_lies_past_the_instant():
    spans = [(0.125, 0.375), (0.25, 0.5), (0.625, 0.75)]
    assert union_after(spans, 0.0) == 0.5
    assert union_after(spans, 0.3125) == 0.1875 + 0.125
    assert union_after(spans, 0.5) == 0.125
    assert union_after(spans, 1.0) == 0.0


# ---------------------------------------------------------------------------------------
# a DDP step: buckets launched during backward, backward returns after the last comes back
# ---------------------------------------------------------------------------------------

def ddp_step() -> observe.StepRecord:
    """data 0..1/16, forward ..1/4, backward ..3/4 (returns after the sync), optimizer ..7/8.
    Buckets: [3/8, 1/2], [7/16, 5/8], [1/2, 11/16]; the last hand-over (ready) is 1/2."""
    intervals = [("data", 0.0, 0.0625), ("forward", 0.0625, 0.25), ("backward", 0.25, 0.75),
                 ("sync", 0.75, 0.75), ("optimizer", 0.75, 0.875)]
    colls = [CollectiveRecord(2, 1024, 1, 0.375, 0.5), CollectiveRecord(1, 2048, 1, 0.4375, 0.625),
             CollectiveRecord(0, 4096, 1, 0.5, 0.6875)]
    return make_record(step=3, samples=32, time_unix_s=1e9, start_s=10.0, step_s=0.875, intervals=intervals,
                       collectives=colls)


def test_ddp_step_definitions():
    rec = ddp_step()
    assert rec.ready_s == 0.5                        # the last bucket's hand-over
    assert rec.comm_s == 0.6875 - 0.375              # one busy stretch: the union
    assert rec.comm_span_s == 0.6875 - 0.375
    assert rec.exposed_s == 0.6875 - 0.5             # comm after ready
    assert rec.exposed_s <= rec.comm_s
    # backward() returned at 3/4: from ready to then, 3/16 was comm, the rest DDP's finalize.
    assert rec.sync_start_s == 0.5 and rec.sync_end_s == 0.75
    assert rec.tail_s == 0.25 - 0.1875
    assert rec.phases == {"data": 0.0625, "forward": 0.1875, "backward": 0.25, "optimizer": 0.125}
    # Each collective's exposed part: what of it lies after ready.
    assert [c.exposed_s for c in rec.collectives] == [0.0, 0.125, 0.1875]
    assert rec.payload_bytes == 7168 and rec.calls == 3


def test_flat_allreduce_step_is_all_exposed_and_its_copies_are_the_tail():
    # backward ..1/2, then the sync phase: flatten ..9/16, all-reduce [9/16, 13/16], copy back ..7/8.
    intervals = [("data", 0.0, 0.0625), ("forward", 0.0625, 0.25), ("backward", 0.25, 0.5),
                 ("sync", 0.5, 0.875), ("optimizer", 0.875, 1.0)]
    rec = make_record(step=1, samples=8, time_unix_s=0.0, start_s=0.0, step_s=1.0, intervals=intervals,
                      collectives=[CollectiveRecord(0, 4096, 1, 0.5625, 0.8125)])
    assert rec.exposed_s == rec.comm_s == 0.25
    assert rec.tail_s == 0.0625 + 0.0625              # flatten and copy-back, not communication
    assert rec.phases["backward"] == 0.25             # nothing clipped: the sync came after it
    assert rec.sync_start_s == 0.5 and rec.sync_end_s == 0.875


def test_gradient_accumulation_clips_only_the_last_backward():
    intervals = [("data", 0.0, 0.0625), ("forward", 0.0625, 0.125), ("backward", 0.125, 0.25),
                 ("data", 0.25, 0.3125), ("forward", 0.3125, 0.375), ("backward", 0.375, 0.75),
                 ("sync", 0.75, 0.75), ("optimizer", 0.75, 0.875)]
    rec = make_record(step=1, samples=8, time_unix_s=0.0, start_s=0.0, step_s=0.875, intervals=intervals,
                      collectives=[CollectiveRecord(0, 64, 1, 0.5, 0.625)])
    assert rec.phases["backward"] == 0.125 + 0.125    # the first whole, the second up to ready (1/2)
    assert rec.exposed_s == 0.125 and rec.tail_s == 0.125


def test_a_step_without_collectives_has_no_sync():
    intervals = [("data", 0.0, 0.125), ("forward", 0.125, 0.25), ("backward", 0.25, 0.5),
                 ("optimizer", 0.5, 0.75)]
    rec = make_record(step=1, samples=8, time_unix_s=0.0, start_s=0.0, step_s=0.75, intervals=intervals,
                      collectives=[])
    assert rec.ready_s is None
    assert rec.comm_s == rec.comm_span_s == rec.exposed_s == rec.tail_s == 0.0
    assert rec.phases["backward"] == 0.25


def test_step_json_is_strict_and_complete():
    rec = ddp_step()
    rec.loss = float("nan")                           # a non-finite loss is written as null
    line = json.dumps(rec.to_json(), allow_nan=False)
    back = json.loads(line)
    assert back["loss"] is None
    assert back["exposed_s"] == rec.exposed_s and back["comm_span_s"] == rec.comm_span_s
    assert [c["bucket"] for c in back["collectives"]] == [2, 1, 0]
    assert back["phases"][2] == ["backward", 0.25, 0.5]


# ---------------------------------------------------------------------------------------
# the observer with a real clock
# ---------------------------------------------------------------------------------------

def test_observer_turns_real_marks_into_a_record_in_order():
    obs = Observer(observe.Clock(torch.device("cpu")))
    obs.begin_step(1)
    with obs.phase("data"):
        pass
    with obs.phase("backward"):
        c = obs.launch(bucket=0, payload_bytes=128)
        obs.complete(c)
    with obs.phase("optimizer"):
        pass
    obs.end_step(samples=4, loss=torch.tensor(0.5, dtype=torch.float64))
    (rec,) = obs.finished()
    assert obs.finished() == []                       # CPU: nothing held back
    assert rec.step == 1 and rec.samples == 4 and rec.loss == 0.5
    names = [n for n, _, _ in rec.intervals]
    assert names == ["data", "backward", "optimizer"]
    times = [t for _, a, b in rec.intervals for t in (a, b)]
    assert times == sorted(times) and times[-1] <= rec.step_s
    (col,) = rec.collectives
    assert 0 <= col.start_s <= col.end_s <= rec.step_s and rec.ready_s == col.start_s


def test_collectives_outside_a_step_are_not_counted():
    obs = Observer(observe.Clock(torch.device("cpu")))
    obs.complete(obs.launch(0, 64))                   # e.g. DDP's bucket settling on resume
    obs.discard_stray()
    obs.begin_step(1)
    obs.end_step(samples=1)
    (rec,) = obs.finished()
    assert rec.collectives == []


# ---------------------------------------------------------------------------------------
# waiting for peers vs transfer; clock offsets
# ---------------------------------------------------------------------------------------

def test_split_wait_on_the_fast_and_the_slow_rank():
    fast = ddp_step()                         # ready at 10.5 s, its last bucket back at 10.6875 s
    slow = ddp_step()
    slow.start_s = 10.125                     # the same step, 0.125 s later: ready at 10.625 s
    ready_all = [observe.ready_time(fast), observe.ready_time(slow)]
    observe.split_wait(fast, ready_all, offset_s=0.0)
    observe.split_wait(slow, ready_all, offset_s=0.0)
    assert (fast.wait_s, fast.last_ready_rank) == (0.125, 1)
    assert fast.transfer_s == 0.6875 - 0.625  # what the network needed once rank 1 was there
    assert (slow.wait_s, slow.transfer_s, slow.last_ready_rank) == (0.0, 0.1875, 1)


def test_split_wait_moves_this_ranks_times_by_its_offset():
    rec = ddp_step()
    rec.start_s += 3.5                        # this rank's clock is 3.5 s ahead of rank 0's
    observe.split_wait(rec, [10.5, 10.5 + 0.0625], offset_s=3.5)
    assert rec.wait_s == 0.0625 and rec.transfer_s == 0.125 and rec.last_ready_rank == 1


def test_a_rank_that_synced_nothing_is_left_out():
    rec = ddp_step()
    observe.split_wait(rec, [10.5, float("nan")], offset_s=0.0)
    assert rec.wait_s == 0.0 and rec.last_ready_rank == 0


def test_cristian_takes_the_smallest_round_trip():
    # (t1, server time, t2): the server's clock is 2 s behind; round trips 0.5, 0.125, 0.25 s
    samples = [(0.0, -1.75, 0.5), (1.0, -0.9375, 1.125), (2.0, 0.125, 2.25)]
    offset, bound, rtt = observe.cristian(samples)
    assert (offset, bound, rtt) == (1.0625 - (-0.9375), 0.0625, 0.125)


# ---------------------------------------------------------------------------------------
# the step file: strict lines, and a resumed run keeps what it does not redo
# ---------------------------------------------------------------------------------------

def test_step_file_buffers_until_flush_and_resume_keeps_earlier_steps(tmp_path):
    path = tmp_path / "steps-rank0.jsonl"
    f = stepfile.StepFile(path)
    for s in (1, 2, 3):
        rec = ddp_step()
        rec.step = s
        f.add(rec)
    assert path.read_text() == ""                     # nothing written inside the steps
    f.flush()
    assert [d["step"] for d in stepfile.read(path)] == [1, 2, 3]
    with open(path, "a") as out:
        out.write('{"step": 4, "cut sho')           # a worker killed mid-write
    stepfile.StepFile(path, start_step=2)             # resuming at step 2 redoes step 3
    assert [d["step"] for d in stepfile.read(path)] == [1, 2]
    stepfile.StepFile(path)                           # a fresh run starts a fresh file
    assert path.read_text() == ""


def test_step_file_reader_refuses_nan(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"step": 1, "loss": NaN}\n')
    with pytest.raises(ValueError, match="NaN"):
        stepfile.read(p)


# ---------------------------------------------------------------------------------------
# the timeline: Trace Event Format, and the same figures as the records
# ---------------------------------------------------------------------------------------

def check_trace(trace: dict) -> list[dict]:
    """Trace Event Format rules the timeline must keep; returns the complete events."""
    json.dumps(trace, allow_nan=False)
    events = trace["traceEvents"]
    for e in events:
        assert {"ph", "ts", "pid", "tid"} <= e.keys(), e
    complete = [e for e in events if e["ph"] == "X"]
    for e in complete:
        assert e["dur"] >= 0, e
    tracks: dict[tuple, list] = {}
    for e in complete:
        tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    eps = 1e-6                                        # microseconds: 1 ps of float rounding
    for evs in tracks.values():
        # Sorted by start (longest first at a tie), each slice must end within the
        # enclosing open slice or start after it ended: nest or follow, never straddle.
        stack: list[float] = []
        for e in sorted(evs, key=lambda e: (e["ts"], -e["dur"])):
            end = e["ts"] + e["dur"]
            while stack and e["ts"] >= stack[-1] - eps:
                stack.pop()
            assert not stack or end <= stack[-1] + eps, (e, stack)
            stack.append(end)
    return complete


def test_trace_of_hand_made_records_nests_and_carries_the_collectives():
    a, b = ddp_step(), ddp_step()
    b.step, b.start_s = 4, a.end_s
    trace = timeline.build_trace([{"rank": 0, "host": "h", "offset_s": 0.0, "bound_s": 0.0, "records": [a, b]},
                                  {"rank": 1, "host": "h", "offset_s": 0.0, "bound_s": 1e-5, "records": [a]}],
                                 (3, 4))
    complete = check_trace(trace)
    comm = [e for e in complete if e["cat"] == "comm"]
    assert len(comm) == 3 + 3 + 3
    first = sorted((e for e in comm if e["pid"] == 0 and e["args"]["step"] == 3), key=lambda e: e["ts"])
    # one time base: microseconds from the first step shown (rank 0's step 3 at 10.0 s)
    assert first[0]["ts"] == pytest.approx(0.375 * 1e6)
    assert [e["args"]["bucket"] for e in first] == [2, 1, 0]
    assert [e["args"]["payload_bytes"] for e in first] == [1024, 2048, 4096]
    # overlapping buckets go to separate comm lanes
    assert len({e["tid"] for e in first}) >= 2
    exposed = [e for e in complete if e["cat"] == "exposed" and e["pid"] == 0]
    assert sum(e["dur"] for e in exposed) == pytest.approx(2 * (0.125 + 0.1875) * 1e6)


def test_trace_moves_each_rank_by_its_clock_offset():
    a, b = ddp_step(), ddp_step()
    b.start_s = a.start_s + 1000.25          # rank 1's clock runs 1000 s ahead; it started 0.25 s later
    ranks = [{"rank": 0, "host": "n0", "offset_s": 0.0, "bound_s": 0.0, "records": [a]},
             {"rank": 1, "host": "n1", "offset_s": 1000.0, "bound_s": 5e-5, "records": [b]}]
    trace = timeline.build_trace(ranks, (3, 3))
    steps = {e["pid"]: e["ts"] for e in trace["traceEvents"] if e.get("cat") == "step"}
    assert steps[0] == 0.0 and steps[1] == pytest.approx(0.25e6)
    assert trace["otherData"]["clock_offsets"][1] == {"rank": 1, "host": "n1", "offset_s": 1000.0, "bound_s": 5e-5}


@pytest.mark.parametrize("text,why", [("5", "expected A:B"), ("a:b", "integers"), ("0:3", "1 <= A <= B"),
                                      ("4:3", "1 <= A <= B")])
def test_timeline_range_errors(text, why):
    with pytest.raises(ValueError, match=why):
        intervals.parse_range(text)
