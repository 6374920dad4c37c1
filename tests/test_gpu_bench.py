"""benchmarks/gpu.py: its CPU smoke mode end to end (slow: it starts a dozen trainer
processes). The trace analysis it applies is ddp_fnn/observe/profile_trace.py
(tests/test_profile_trace.py)."""

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
    assert res["parts"]["profile"]["checks"]["no_host_sync_between_log_steps"]
    assert res["parts"]["runahead"]["checks"]["host_at_least_4_steps_ahead_of_a_slow_stream"]
    assert res["parts"]["a"]["checks"]["step_losses_average_to_the_logged_loss"]
    assert res["parts"]["nan"]["figures"]["on_nan_skip"]["skipped_steps"] >= 1
    assert "| part | item | value |" in p.stdout and (tmp_path / "artifacts" / "profile-rank0.json.gz").exists()
