"""A finished run's command, run again, leaves everything as it was; and everything ddp-fnn
writes as JSON is strict JSON (no NaN/Infinity: null), read here with a parser as strict
as JavaScript's JSON.parse."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from ddp_fnn.core import fileio
from test_train import QUICK


def snapshot(*dirs: Path) -> dict:
    """Every file under ``dirs``: its bytes and its modification time (ns)."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


def test_rerunning_a_finished_run_says_so_in_one_line_and_touches_nothing(tmp_path):
    args = ("train", *QUICK, "--max-steps", "6", "--checkpoint-every", "3",
            "--checkpoint-dir", str(tmp_path / "ck"), "--output", str(tmp_path / "out"))
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    before = snapshot(tmp_path / "ck", tmp_path / "out")
    assert {p.name for p in before} == {"step-00000003.pt", "step-00000006.pt", "model.pt", "summary.json",
                                        "steps-rank0.jsonl"}
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""
    (line,) = again.stderr.splitlines()
    assert line.startswith("ddp-fnn: note: this run already finished (") and "step-00000006.pt is at step 6 of 6" in line
    assert snapshot(tmp_path / "ck", tmp_path / "out") == before
    # More steps is more work: the same command with --max-steps 8 resumes and trains 2.
    more = run_cli(*args[:-6], "--max-steps", "8", *args[-6:])
    assert more.returncode == 0, more.stderr
    summary = fileio.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 6 and summary["steps"] == 8
    # ... and the step file keeps steps 1..6 and adds 7 and 8.
    lines = (tmp_path / "out" / "steps-rank0.jsonl").read_text().splitlines()
    assert [fileio.loads(x)["step"] for x in lines] == list(range(1, 9))


def test_a_run_that_met_its_target_loss_is_finished_too(tmp_path):
    args = ("train", *QUICK, "--max-steps", "400", "--target-loss", "0.5", "--lr", "0.05",
            "--checkpoint-dir", str(tmp_path / "ck"), "--output", str(tmp_path / "out"))
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    summary = fileio.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stop_reason"] == "target-loss" and summary["steps"] < 400
    before = snapshot(tmp_path / "ck", tmp_path / "out")
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    (line,) = again.stderr.splitlines()
    assert "already finished" in line and "<= --target-loss 0.5" in line
    assert snapshot(tmp_path / "ck", tmp_path / "out") == before


def test_summary_without_an_eval_split_is_strict_json_with_null(tmp_path):
    r = run_cli("train", *QUICK, "--max-steps", "3", "--eval-fraction", "0", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = fileio.loads(text)
    assert summary["eval_loss"] is None and summary["eval_accuracy"] is None
    assert math.isfinite(summary["final_train_loss"])


def test_progress_lines_and_dry_run_are_strict_json(tmp_path):
    r = run_cli("train", *QUICK[:-2], "--progress", "json", "--max-steps", "4", "--log-every", "2",
                "--eval-fraction", "0")
    assert r.returncode == 0, r.stderr
    lines = [fileio.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [d["step"] for d in lines] == [2, 4]
    dry = run_cli("train", *QUICK, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert fileio.loads(dry.stdout)["micro_batch_per_rank"] == [32, 32]


def test_estimate_and_example_json_are_strict():
    for args in (("estimate", "--layers", "32,256,1", "--world-size", "8", "--link-rate", "10gbit",
                  "--compute-ms", "5", "--json"), ("example", "--json")):
        r = run_cli(*args)
        assert r.returncode == 0, r.stderr
        fileio.loads(r.stdout)


@pytest.mark.parametrize("value, expected", [
    (float("nan"), None), (float("inf"), None), (-float("inf"), None), (1.5, 1.5), (0, 0), ("NaN", "NaN"),
    ({"a": [1.0, float("nan"), (2, float("-inf"))]}, {"a": [1.0, None, [2, None]]}),
    (np.float32("nan"), None), (np.float64(2.5), 2.5), (np.array([1.0, np.inf]), [1.0, None]),
    (torch.tensor([float("nan"), 3.0]), [None, 3.0]), (None, None), (True, True),
])
def test_dumps_writes_null_for_every_non_finite_number(value, expected):
    text = fileio.dumps(value)
    assert fileio.loads(text) == expected


def test_strict_loads_rejects_what_json_dumps_writes_by_default():
    import json
    with pytest.raises(ValueError, match="NaN"):
        fileio.loads(json.dumps({"x": float("nan")}))
    with pytest.raises(ValueError, match="Infinity"):
        fileio.loads(json.dumps([float("inf")]))
