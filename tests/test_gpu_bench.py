"""benchmarks/gpu.py: its trace analysis on a made-up CUDA trace (no GPU needed), and its CPU
smoke mode end to end (slow: it starts a dozen trainer processes)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu.py")
gpu = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu)


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
    wins, segs = gpu.trace_steps(ev)
    assert len(segs) == 2 and segs[1][0] == 400
    r = gpu.attribute(ev, {1}, cpu=False)
    p = r["per_phase"]
    assert p["forward"]["s"] == pytest.approx(40e-6)
    assert p["backward"]["s"] == pytest.approx(105e-6)
    assert p["backward"]["before_last_allreduce_s"] == pytest.approx(90e-6)
    assert p["optimizer"]["s"] == pytest.approx(5e-6)
    assert "data" not in p and r["unmatched_s"] == 0
    assert r["device_busy_s"] == pytest.approx(150e-6)


def test_host_syncs_counts_waits_and_device_reads_per_step():
    per = gpu.host_syncs(made_up_trace(), {0, 1})
    assert per[0]["syncs"] == 1 and per[0]["device_reads"] == 0 and per[0]["where"] == ["optimizer"]
    assert per[0]["aten::item"] == 1 and per[0]["aten::_local_scalar_dense"] == 1
    assert per[1]["syncs"] == 2 and per[1]["device_reads"] == 1
    assert sorted(per[1]["where"]) == ["forward", "optimizer", "optimizer"]


@pytest.mark.slow
def test_cpu_smoke_mode_passes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--out", str(tmp_path), "--device", "cpu",
                        "--quick", "--budget-s", "300"], capture_output=True, text=True, timeout=400, env=env, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"gpu.json is not strict JSON: {c}"))
    assert set(res["parts"]) == set(gpu.TIMEOUTS)
    for name, part in res["parts"].items():
        assert part["ran"], (name, part.get("error"))
        assert part["passed"] in (True, None), (name, part["checks"])
    assert res["parts"]["profile"]["checks"]["at_most_one_host_sync_per_step"]
    assert res["parts"]["nan"]["figures"]["on_nan_skip"]["skipped_steps"] >= 1
    assert "| part | item | value |" in p.stdout and (tmp_path / "artifacts" / "profile-rank0.json.gz").exists()
