"""Data parallelism is a mathematical claim: N workers on shards of the same global
batches compute the model one process computes. These tests launch real torchrun."""

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, torchrun, torchrun_nodes

pytestmark = pytest.mark.slow

# B = 48 divides by 1, 2, 3 ranks and by 2 micro-steps; 1638 training rows -> 34 steps an
# epoch, so 40 steps also cross an epoch boundary (a reshuffle).
COMMON = ("--layers", "16,64,64,1", "--samples", "2048", "--global-batch-size", "48", "--max-steps", "40",
          "--lr", "0.05", "--metrics-port", "0", "--progress", "none", "--seed", "7")


def params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    r = run_cli("train", *COMMON, "--output", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("nproc,sync,accum", [
    (2, "ddp", 1), (2, "allreduce", 1), (3, "ddp", 1), (3, "allreduce", 1), (2, "ddp", 2), (2, "allreduce", 2),
])
def test_n_workers_compute_the_single_process_model(single, tmp_path, nproc, sync, accum):
    r = torchrun(nproc, "train", *COMMON, "--sync", sync, "--grad-accum", str(accum), "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == nproc and summary["steps"] == 40
    assert max_diff(params(single), params(tmp_path)) < 1e-5
    # ... and it did train: the parameters moved away from the seed's init.
    init = run_cli("train", *COMMON, "--max-steps", "1", "--lr", "1e-12", "--output", str(tmp_path / "init"))
    assert init.returncode == 0
    assert max_diff(params(tmp_path / "init"), params(tmp_path)) > 1e-3


@pytest.mark.parametrize("nnodes,nproc", [(2, 2), (1, 3)])
def test_hierarchical_all_reduce_computes_the_single_process_model(single, tmp_path, nnodes, nproc):
    """--all-reduce hierarchical (reduce-scatter in the node, all-reduce across, all-gather
    in the node), on 2 "nodes" of 2 workers meeting through a c10d rendezvous, and on one
    node of 3 (buckets of 65 or 4,160 elements padded to a multiple of 3): the same model
    as one process, to float32 summation order; and the rank's wire bytes are the three
    phases' (wire.hierarchical_wire_bytes)."""
    args = ("train", *COMMON, "--all-reduce", "hierarchical", "--bucket-mb", "0.01", "--output", str(tmp_path))
    runs = torchrun_nodes(nnodes, nproc, *args) if nnodes > 1 else [torchrun(nproc, *args)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == nnodes * nproc and summary["config"]["all_reduce"] == "hierarchical"
    assert max_diff(params(single), params(tmp_path)) < 1e-5
    payload = summary["allreduce_payload_bytes_per_step"]
    g, n = nproc, nnodes
    assert summary["allreduce_wire_bytes_per_step"] == pytest.approx(
        2 * (g - 1) / g * payload + 2 * (n - 1) / n * payload / g)
    last = json.loads((tmp_path / "steps-rank0.jsonl").read_text().splitlines()[-1])
    assert len(last["collectives"]) > 1             # several buckets (and their padding)
    # Three collectives a bucket, two with one node (nothing to all-reduce across).
    assert {c["calls"] for c in last["collectives"]} == {3 if nnodes > 1 else 2}


def test_grad_accum_in_one_process_equals_the_full_batch(single, tmp_path):
    r = run_cli("train", *COMMON, "--grad-accum", "4", "--output", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert max_diff(params(single), params(tmp_path)) < 1e-5


def final_loss(out: Path) -> float:
    return json.loads((out / "summary.json").read_text())["final_train_loss"]


def test_fp16_compression_trains_to_the_uncompressed_loss(tmp_path):
    args = ("train", "--layers", "16,64,1", "--samples", "4096", "--global-batch-size", "64", "--epochs", "3",
            "--lr", "0.05", "--metrics-port", "0", "--progress", "none")
    plain = torchrun(2, *args, "--output", str(tmp_path / "none"))
    fp16 = torchrun(2, *args, "--compression", "fp16", "--output", str(tmp_path / "fp16"))
    assert plain.returncode == 0 and fp16.returncode == 0, fp16.stderr[-2000:]
    assert abs(final_loss(tmp_path / "fp16") - final_loss(tmp_path / "none")) < 1e-2


def test_powersgd_runs_and_converges(tmp_path):
    args = ("train", "--layers", "16,64,64,1", "--samples", "4096", "--global-batch-size", "64", "--epochs", "4",
            "--lr", "0.05", "--metrics-port", "0", "--progress", "json", "--log-every", "10",
            "--compression", "powersgd", "--powersgd-rank", "4", "--bucket-mb", "0.01", "--output", str(tmp_path))
    r = torchrun(2, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [json.loads(l)["train_loss"] for l in r.stdout.splitlines() if l.startswith("{")]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["compression"] == "powersgd"
    # On Gloo, PowerSGD runs in one bucket whatever --bucket-mb says (several can deadlock).
    assert s["bucket_mb"] * 2 ** 20 > s["gradient_bytes"]
    assert losses[-1] < 0.5 * losses[0]
    # PowerSGD sends less than the plain gradient once it starts compressing.
    assert s["allreduce_payload_bytes_per_step"] < s["gradient_bytes"]


def test_target_loss_stops_every_rank_on_the_same_step(tmp_path):
    args = ("train", "--layers", "16,64,1", "--samples", "4096", "--global-batch-size", "48", "--epochs", "20",
            "--lr", "0.05", "--metrics-port", "0", "--progress", "none", "--target-loss", "0.3",
            "--output", str(tmp_path))
    r = torchrun(3, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    steps = [rank["steps"] for rank in s["ranks"]]
    assert s["stop_reason"] == "target-loss" and s["final_train_loss"] <= 0.3
    assert len(set(steps)) == 1 and steps[0] < 20 * (3277 // 48)


def test_real_csv_classification_two_ranks_match_one(tmp_path):
    csv = REPO / "tests" / "data" / "breast_cancer.csv"
    args = ("train", "--data", str(csv), "--task", "classification", "--layers", "30,32,2", "--standardize",
            "--global-batch-size", "32", "--epochs", "10", "--lr", "0.05", "--metrics-port", "0",
            "--progress", "none")
    one = run_cli(*args, "--output", str(tmp_path / "one"))
    two = torchrun(2, *args, "--output", str(tmp_path / "two"))
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    acc1 = json.loads((tmp_path / "one" / "summary.json").read_text())["eval_accuracy"]
    acc2 = json.loads((tmp_path / "two" / "summary.json").read_text())["eval_accuracy"]
    assert acc1 > 0.9                                   # it learned something real
    assert abs(acc1 - acc2) <= 0.01
