"""What a ``--profile A:B`` trace says: device time per trainer phase, and host syncs.

``train --profile`` (observe/profile.py) writes torch.profiler's Chrome trace with each of
the Observer's phases as a ``ddp_fnn.<phase>`` range. These functions read that trace as
plain events (``json.load`` of the file's ``traceEvents``), with no torch, and answer the
two questions the step records cannot answer about themselves:

* ``attribute``: how many device seconds each phase launched. A CUDA kernel (or memcpy,
  memset) is credited to the phase range its launch call (matched by correlation id) fell
  in, on any thread; on CPU, top-level operators stand in for kernels. Backward is split at
  its last all-reduce call: what comes after it is DDP's copy-back into the gradients.
* ``host_syncs``: per step, every time the host waited for the device: synchronise calls
  (events, streams, the device), synchronous copies and copies to pageable host memory,
  and reads of a device tensor (``aten::_local_scalar_dense`` around such a call), with
  the phase each was in. The trainer's claim: none between log steps (step records and
  the NaN check are read at log steps, so the host can run ahead of its device), and
  none in forward or backward.

A step runs from its first phase range to the next step's first (the last: to the end of
the trace). benchmarks/gpu.py applies both to its CUDA runs; tests/test_gpu_bench.py
checks them on a hand-made CUDA trace.
"""

from __future__ import annotations

import bisect

from ddp_fnn.core.intervals import union_length

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver", "runtime", "driver")
# Host calls that wait for the device: the synchronise calls (cudaFree and cudaFreeHost
# synchronise the device implicitly), and the copies that return only once done.
SYNC_CALLS = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cuEventSynchronize",
              "cuStreamSynchronize", "cuCtxSynchronize", "cudaFree", "cudaFreeHost", "cuMemFree", "cuMemFreeHost",
              "cuMemFree_v2", "cuMemFreeHost_v2")
SYNC_COPIES = ("cudaMemcpy", "cudaMemcpy2D", "cudaMemcpy3D", "cuMemcpy", "cuMemcpyDtoH", "cuMemcpyDtoH_v2")


def trace_steps(events: list[dict]):
    """The trainer's phase ranges (ts, end, phase), and its steps: a step runs from its first
    phase range to the next step's first (the last one: to the end of the trace)."""
    wins = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"][len("ddp_fnn."):])
                  for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
                  and str(e.get("name", "")).startswith("ddp_fnn."))
    starts, new = [], True
    for a, _, name in wins:
        if new:
            starts.append(a)
        new = name == "optimizer"
    return wins, list(zip(starts, starts[1:] + [float("inf")]))


def locate(spans: list[tuple], t: float) -> int | None:
    i = bisect.bisect_right([s[0] for s in spans], t) - 1
    return i if i >= 0 and t <= spans[i][1] else None


def device_events(events: list[dict], cpu: bool) -> list[tuple[dict, float | None]]:
    """(event, launch time): CUDA kernels, memcpys and memsets with their launch call's start
    (by correlation id); on CPU, ops not inside another op of their thread, at their start."""
    if not cpu:
        launch = {(e.get("args") or {}).get("correlation"): float(e["ts"]) for e in events
                  if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS}
        return [(e, launch.get((e.get("args") or {}).get("correlation"))) for e in events
                if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]
    out, by_tid = [], {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            by_tid.setdefault(e.get("tid"), []).append(e)
    for evs in by_tid.values():
        end = -1.0
        for e in sorted(evs, key=lambda e: (float(e["ts"]), -float(e.get("dur", 0)))):
            if float(e["ts"]) >= end:
                out.append((e, float(e["ts"])))
                end = float(e["ts"]) + float(e.get("dur", 0))
    return out


def attribute(events: list[dict], use: set[int], cpu: bool) -> dict:
    """Device seconds per phase over the trace's steps ``use``; backward split at its last
    all-reduce call (after it: DDP's copy-back into the gradients)."""
    wins, segs = trace_steps(events)
    reduces = sorted(float(e["ts"]) for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"
                     and "allreduce" in str(e.get("name", "")).lower().replace("_", ""))
    per, busy, unmatched, outside = {}, [], 0.0, 0.0
    for e, t in device_events(events, cpu):
        dur = float(e.get("dur", 0)) / 1e6
        if t is None or locate(segs, t) not in use:
            unmatched += dur if t is None else 0.0
            continue
        busy.append((float(e["ts"]) / 1e6, float(e["ts"]) / 1e6 + dur))
        w = locate(wins, t)
        if w is None:
            outside += dur
            continue
        a, b, phase = wins[w]
        d = per.setdefault(phase, {"s": 0.0, "events": 0, "before_last_allreduce_s": 0.0})
        d["s"] += dur
        d["events"] += 1
        j = bisect.bisect_right(reduces, b) - 1
        d["before_last_allreduce_s"] += dur if not (j >= 0 and a <= reduces[j] <= t) else 0.0
    return {"per_phase": per, "device_busy_s": union_length(busy), "outside_phases_s": outside,
            "unmatched_s": unmatched}


def host_syncs(events: list[dict], use: set[int]) -> list[dict]:
    """Per step ``use``: every time the host waited for the device (``blocking``), and where.

    What waits: the synchronise calls (``SYNC_CALLS``: cudaEventSynchronize,
    cudaStreamSynchronize, cudaDeviceSynchronize and the driver's, cudaFree), the
    synchronous copies (``SYNC_COPIES``: cudaMemcpy), and a cudaMemcpyAsync whose copy
    (matched by correlation id) goes to pageable host memory ("DtoH (Device -> Pageable)"),
    which returns only once it is done. The calls inside one ``aten::_local_scalar_dense``
    of the same thread (``.item()``, ``float()``, ``bool()`` of a device tensor: a copy and
    a synchronise) are one wait, a ``device_read`` (one also where the trace shows only its
    copy). ``syncs``: the synchronise calls alone; ``calls``: the waiting calls by name;
    ``aten::item`` and ``aten::_local_scalar_dense``: every such op, host tensors' too."""
    wins, segs = trace_steps(events)
    to_pageable = {(e.get("args") or {}).get("correlation") for e in events
                   if e.get("ph") == "X" and e.get("cat") == "gpu_memcpy" and _pageable_dtoh(str(e.get("name", "")))}
    waits, copies, reads = [], {}, {}       # waiting calls (ts, tid, name); copy calls and reads by thread
    for e in events:
        if e.get("ph") != "X":
            continue
        name, cat, t = str(e.get("name", "")), e.get("cat"), float(e.get("ts", 0))
        if cat in LAUNCH_CATS:
            copy = "memcpy" in name.lower()
            if copy:
                copies.setdefault(e.get("tid"), []).append(t)
            if name in SYNC_CALLS or name in SYNC_COPIES or (copy and (e.get("args") or {}).get("correlation")
                                                               in to_pageable):
                waits.append((t, e.get("tid"), name))
        elif cat == "cpu_op" and name == "aten::_local_scalar_dense":
            reads.setdefault(e.get("tid"), []).append((t, t + float(e.get("dur", 0))))
    per = {k: {"blocking": 0, "device_reads": 0, "syncs": 0, "where": [], "calls": {},
               "aten::item": 0, "aten::_local_scalar_dense": 0} for k in sorted(use)}

    def wait_at(t: float, device_read: bool = False) -> None:
        k = locate(segs, t)
        if k in per:
            w = locate(wins, t)
            per[k]["blocking"] += 1
            per[k]["device_reads"] += device_read
            per[k]["where"].append(wins[w][2] if w is not None else "between phases")

    def inside(spans: list[tuple[float, float]], t: float) -> bool:
        return any(a <= t <= b for a, b in spans)

    for t, tid, name in waits:
        k = locate(segs, t)
        if k in per:
            per[k]["calls"][name] = per[k]["calls"].get(name, 0) + 1
            per[k]["syncs"] += name in SYNC_CALLS
        if not inside(reads.get(tid, []), t):
            wait_at(t)
    for tid, spans in reads.items():
        calls = sorted([t for t, wt, _ in waits if wt == tid] + copies.get(tid, []))
        for a, b in spans:
            i = bisect.bisect_left(calls, a)
            if i < len(calls) and calls[i] <= b:
                wait_at(a, device_read=True)
    for e in events:
        name = str(e.get("name", ""))
        if e.get("ph") == "X" and e.get("cat") == "cpu_op" and name in ("aten::item", "aten::_local_scalar_dense"):
            k = locate(segs, float(e.get("ts", 0)))
            if k in per:
                per[k][name] += 1
    return list(per.values())


def _pageable_dtoh(name: str) -> bool:
    n = name.lower()
    return "dtoh" in n and "pageable" in n
