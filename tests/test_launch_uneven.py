"""Any world size, the same math: a global batch of 256 over 3 ranks (86, 85 and 85 rows),
or 3 ranks x 2 micro-steps (43 or 42 rows each), computes
the model one process computes, and an elastic job that loses one of 4 ranks resumes at 3
on the same global batches. Real torchrun; the witness is the one-process run."""

import json
from pathlib import Path

import pytest

from conftest import run_cli, torchrun
from test_launch_train import max_diff, params

pytestmark = pytest.mark.slow

# 4096 samples -> 3277 training rows -> 12 steps an epoch at B = 256: 20 steps cross an
# epoch boundary (a reshuffle). 256 is divisible by 4 but not by 3 or by 3 x 2.
COMMON = ("--layers", "16,64,64,1", "--samples", "4096", "--global-batch-size", "256", "--max-steps", "20",
          "--lr", "0.05", "--metrics-port", "0", "--progress", "none", "--seed", "11", "--no-probe")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    r = run_cli("train", *COMMON, "--output", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("accum", [1, 2])
def test_three_ranks_on_uneven_shards_compute_the_single_process_model(single, tmp_path, accum):
    r = torchrun(3, "train", *COMMON, "--grad-accum", str(accum), "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 3 and summary["steps"] == 20
    # Rank r's samples are its shard: 86, 85, 85 rows a step.
    assert [rk["samples"] for rk in summary["ranks"]] == [20 * 86, 20 * 85, 20 * 85]
    assert max_diff(params(single), params(tmp_path)) < 1e-5
    # ... and it did train: the parameters moved well beyond the tolerance. (That plain 1/K
    # weights on these shards would miss the witness: tests/test_data.py.)
    init = run_cli("train", *COMMON, "--max-steps", "1", "--lr", "1e-12", "--output", str(tmp_path / "init"))
    assert init.returncode == 0, init.stderr
    assert max_diff(params(tmp_path / "init"), params(tmp_path)) > 1e-3


def test_elastic_resume_from_four_ranks_to_three_continues_the_same_global_batches(single, tmp_path):
    ck = tmp_path / "ck"
    first = torchrun(4, "train", *COMMON, "--max-steps", "10", "--checkpoint-dir", str(ck))
    assert first.returncode == 0, first.stderr[-3000:]
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000010.pt"]
    # The same command at 3 ranks (the job lost a pod): it resumes from step 10.
    second = torchrun(3, "train", *COMMON, "--checkpoint-dir", str(ck), "--output", str(tmp_path / "out"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "(step 10 of 20)" in second.stderr
    assert "written at world size 4, this run has 3" in second.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 20 and summary["world_size"] == 3
    # Steps 11..20 used the global batches one process uses for them: the same model.
    assert max_diff(params(single), params(tmp_path / "out")) < 1e-5
