"""What a ``--profile A:B`` trace says: device time per trainer phase, and host syncs.

``train --profile`` (observe/profile.py) writes torch.profiler's Chrome trace with each of
the Observer's phases as a ``ddp_fnn.<phase>`` range. These functions read that trace as
plain events (``json.load`` of the file's ``traceEvents``), with no torch, and answer the
two questions the step records cannot answer about themselves:

* ``attribute``: how many device seconds each phase launched. A CUDA kernel (or memcpy,
  memset) is credited to the phase range its launch call (matched by correlation id) fell
  in, on any thread; on CPU, top-level operators stand in for kernels. Backward is split at
  its last all-reduce call: what comes after it is DDP's copy-back into the gradients.
* ``host_syncs``: per step, how often the host waited for the device: cuda*Synchronize
  calls, and reads of a device tensor (``aten::_local_scalar_dense`` around a memcpy
  call), with the phase each was in. The trainer's claim is at most one per optimizer
  step and none in forward or backward (train/health.py's NaN check is read one step late).

A step runs from its first phase range to the next step's first (the last: to the end of
the trace). benchmarks/gpu.py applies both to its CUDA runs; tests/test_gpu_bench.py
checks them on a hand-made CUDA trace.
"""

from __future__ import annotations

import bisect

from ddp_fnn.core.intervals import union_length

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver", "runtime", "driver")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cuStreamSynchronize", "cuCtxSynchronize")


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
    """Per step ``use``: host waits for the device (cuda*Synchronize calls), reads of a device
    tensor (_local_scalar_dense around a memcpy call), where they were, and aten::item counts."""
    wins, segs = trace_steps(events)
    copies = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in LAUNCH_CATS and "Memcpy" in str(e.get("name", "")):
            copies.setdefault(e.get("tid"), []).append(float(e["ts"]))
    per = {k: {"syncs": 0, "device_reads": 0, "where": [], "aten::item": 0, "aten::_local_scalar_dense": 0}
           for k in sorted(use)}
    for e in events:
        name, t = str(e.get("name", "")), float(e.get("ts", 0))
        k = locate(segs, t) if e.get("ph") == "X" else None
        if k not in per:
            continue
        kind = "syncs" if e.get("cat") in LAUNCH_CATS and name in SYNC_CALLS else None
        if e.get("cat") == "cpu_op" and name in ("aten::item", "aten::_local_scalar_dense"):
            per[k][name] += 1
            end = t + float(e.get("dur", 0))
            if name == "aten::_local_scalar_dense" and any(t <= c <= end for c in copies.get(e.get("tid"), ())):
                kind = "device_reads"
        if kind:
            per[k][kind] += 1
            w = locate(wins, t)
            per[k]["where"].append(wins[w][2] if w is not None else "between phases")
    return list(per.values())
