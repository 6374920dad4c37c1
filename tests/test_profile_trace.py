"""observe/profile_trace.py: what a --profile trace says, on a hand-made CUDA trace (no
GPU here) and on a real CPU trace the trainer writes."""

import json

import pytest

from conftest import run_cli
from ddp_fnn.core import fileio
from ddp_fnn.observe.profile_trace import attribute, host_syncs, trace_steps


def X(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def step_events(t0, corr0):
    """One step's phase ranges from t0 (us); backward's kernels launched from thread 2."""
    ev = [X("user_annotation", f"ddp_fnn.{p}", t0 + a, b - a) for p, a, b in (
        ("data", 0, 10), ("forward", 10, 100), ("backward", 100, 300), ("sync", 300, 301), ("optimizer", 301, 350))]
    for i, (tid, launch, start, dur, kname) in enumerate((
            (1, 20, 30, 40, "gemm"), (2, 150, 160, 90, "gemm_bwd"), (2, 210, 250, 10, "ncclDevKernel_AllReduce"),
            (2, 260, 270, 5, "copy_back"), (1, 320, 330, 5, "sgd"))):
        c = corr0 + i
        ev += [X("cuda_runtime", "cudaLaunchKernel", t0 + launch, 2, tid, correlation=c),
               X("kernel", kname, t0 + start, dur, 0, correlation=c)]
    return ev + [X("cpu_op", "c10d::allreduce_", t0 + 200, 5, 2)]


def made_up_trace():
    ev = step_events(0, 1) + step_events(400, 100)
    ev += [X("cuda_runtime", "cudaStreamSynchronize", 340, 3),                  # step 1: optimizer
           X("cpu_op", "aten::item", 719, 12), X("cpu_op", "aten::_local_scalar_dense", 720, 10),
           X("cuda_runtime", "cudaMemcpyAsync", 722, 1), X("cuda_runtime", "cudaStreamSynchronize", 725, 3),
           X("cpu_op", "aten::item", 360, 2), X("cpu_op", "aten::_local_scalar_dense", 360, 1),  # a host tensor
           X("cuda_runtime", "cudaStreamSynchronize", 450, 3)]                  # step 2: inside forward
    return ev


def test_attribute_credits_kernels_to_the_launching_phase():
    ev = made_up_trace()
    wins, segs = trace_steps(ev)
    assert len(segs) == 2 and segs[1][0] == 400
    r = attribute(ev, {1}, cpu=False)
    p = r["per_phase"]
    assert p["forward"]["s"] == pytest.approx(40e-6)
    assert p["backward"]["s"] == pytest.approx(105e-6)
    assert p["backward"]["before_last_allreduce_s"] == pytest.approx(90e-6)
    assert p["optimizer"]["s"] == pytest.approx(5e-6)
    assert "data" not in p and r["unmatched_s"] == 0
    assert r["device_busy_s"] == pytest.approx(150e-6)


def test_host_syncs_counts_waits_and_device_reads_per_step():
    """A read of a device tensor (_local_scalar_dense around a copy and a synchronise) is
    one wait; a read of a host tensor is none."""
    per = host_syncs(made_up_trace(), {0, 1})
    assert per[0]["syncs"] == 1 and per[0]["device_reads"] == 0 and per[0]["where"] == ["optimizer"]
    assert per[0]["blocking"] == 1
    assert per[0]["aten::item"] == 1 and per[0]["aten::_local_scalar_dense"] == 1
    assert per[1]["syncs"] == 2 and per[1]["device_reads"] == 1 and per[1]["blocking"] == 2
    assert sorted(per[1]["where"]) == ["forward", "optimizer"]


def test_every_host_wait_is_counted_event_synchronise_and_pageable_copies_too():
    """The waits of a loop that reads its step records and its NaN flag every step, hand-
    made: step 1 synchronises the NaN flag's event in the optimizer and the previous step's
    record events after it (cudaEventSynchronize, which a host that runs ahead never
    calls between log steps); step 2 copies to pageable host memory (cudaMemcpyAsync,
    "Device -> Pageable": the host waits for it) and once synchronously (cudaMemcpy).
    Copies into pinned memory (the loss, the flag) and cudaEventQuery do not wait."""
    ev = step_events(0, 1) + step_events(400, 100)
    ev += [X("cuda_runtime", "cudaMemcpyAsync", 340, 2, correlation=900),     # into pinned memory
           X("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 341, 1, 0, correlation=900),
           X("cuda_runtime", "cudaEventSynchronize", 345, 3),                  # the NaN flag's event
           X("cuda_runtime", "cudaEventQuery", 348, 1),                        # asks; does not wait
           X("cuda_runtime", "cudaEventSynchronize", 355, 3),                  # the records' events
           X("cuda_runtime", "cudaMemcpyAsync", 760, 2, correlation=901),     # into pageable memory
           X("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 761, 1, 0, correlation=901),
           X("cuda_runtime", "cudaMemcpy", 770, 2)]
    per = host_syncs(ev, {0, 1})
    assert per[0]["blocking"] == per[0]["syncs"] == 2
    assert per[0]["calls"] == {"cudaEventSynchronize": 2}
    assert sorted(per[0]["where"]) == ["between phases", "optimizer"]
    assert per[1]["blocking"] == 2 and per[1]["syncs"] == 0 and per[1]["device_reads"] == 0
    assert per[1]["calls"] == {"cudaMemcpyAsync": 1, "cudaMemcpy": 1}


def test_a_real_cpu_trace_has_its_steps_phases_and_no_host_syncs(tmp_path):
    """The trainer's own --profile 2:4 trace, read as benchmarks/gpu.py reads a CUDA one:
    three steps, operators credited to forward, backward and optimizer, and no host
    waits for a device (there is none) in any of them."""
    r = run_cli("train", "--layers", "8,64,64,1", "--samples", "512", "--global-batch-size", "32",
                "--metrics-port", "0", "--max-steps", "6", "--profile", "2:4", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    events = fileio.loads((tmp_path / "profile-rank0.json").read_text())["traceEvents"]
    wins, segs = trace_steps(events)
    assert len(segs) == 3
    assert [w[2] for w in wins[:5]] == ["data", "forward", "backward", "sync", "optimizer"]
    att = attribute(events, {0, 1, 2}, cpu=True)
    per = att["per_phase"]
    for phase in ("forward", "backward", "optimizer"):
        assert per[phase]["s"] > 0 and per[phase]["events"] >= 3, (phase, per)
    span_s = (wins[-1][1] - wins[0][0]) / 1e6
    assert 0 < att["device_busy_s"] <= span_s + 1e-3        # the union of the ops lies inside the steps
    steps = host_syncs(events, {0, 1, 2})
    assert [s["blocking"] for s in steps] == [0, 0, 0] and [s["device_reads"] for s in steps] == [0, 0, 0]
    json.dumps(att, allow_nan=False)                        # what gpu.json stores is strict
