"""Network or straggler, on namespace nodes (launch/netns-cluster.sh, root):

* 2 nodes on 100 Mbit/s links, no straggler: what the split calls transfer is the time
  the link needs for the bytes each rank sends, and hardly anyone waits for a peer.
* 2 nodes, node1's CPU throttled by a cgroup quota (a real straggler, nothing injected):
  the metrics name node1's rank as the last one ready.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from ddp_fnn.observe import stepfile
from test_launch_netns import pytestmark as netns_marks
from test_launch_netns import run_cluster

pytestmark = netns_marks

# One bucket of 2.2 MB (557,578 parameters): the whole all-reduce comes after every rank
# is ready, and at 100 Mbit/s it takes ~0.18 s, far more than the compute.
TRAIN = ("--layers", "64,512,512,512,10", "--samples", "4096", "--global-batch-size", "32",
         "--max-steps", "25", "--metrics-port", "9400", "--progress", "none", "--no-probe", "--log-every", "5")
WARMUP = 3


def rank_steps(out: Path, node: int) -> tuple[int, list[dict]]:
    """The rank that ran on ``node`` (one worker per node) and its step file."""
    (path,) = (out / f"node{node}").glob("steps-rank*.jsonl")
    return int(path.stem.removeprefix("steps-rank")), stepfile.read(path)


def test_transfer_is_the_bytes_over_the_link_rate_and_nobody_waits(tmp_path):
    run = run_cluster(2, tmp_path / "run", *TRAIN, timeout=300, extra=("--link-rate", "100mbit"))
    assert run.returncode == 0, f"{run.stderr}\n{run.logs()}"
    summary = json.loads((run.out / "node0" / "summary.json").read_text())
    rate = 100e6 / 8
    for node in (0, 1):
        rank, lines = rank_steps(run.out, node)
        lines = lines[WARMUP:]
        wire = summary["ranks"][rank]["allreduce_wire_bytes_per_step"]
        transfer = statistics.fmean(d["transfer_s"] for d in lines)
        wait = statistics.fmean(d["wait_s"] for d in lines)
        step = statistics.fmean(d["step_s"] for d in lines)
        print(f"node{node} (rank {rank}): transfer {transfer * 1e3:.1f} ms vs {wire:,.0f} B / 12.5 MB/s = "
              f"{wire / rate * 1e3:.1f} ms; wait {wait * 1e3:.2f} ms of a {step * 1e3:.1f} ms step")
        assert transfer == pytest.approx(wire / rate, rel=0.15)
        assert wait < 0.05 * step


# Compute-heavy and communication-light (a large batch, 70 K parameters): the throttled
# node spends its CPU quota mostly computing. (Where the quota runs out inside the
# all-reduce instead, the peer's lateness shows as a slow transfer: a CPU-starved host
# is slow at moving bytes too.) The batch must make a rank's forward and backward take
# more CPU than one quota period allows (10 ms of every 100 ms): with 512 rows a rank
# (3 ms of compute) node1 sometimes began a step with its quota unspent, computed as fast
# as node0 and was last ready only by chance (2 of 12 steps in one run); with 4,096 rows
# (~25 ms) it is throttled inside every step's compute.
SLOW_NODE_TRAIN = ("--layers", "64,256,256,10", "--samples", "16384", "--global-batch-size", "8192",
                   "--max-steps", "15", "--metrics-port", "9400", "--progress", "none", "--no-probe",
                   "--log-every", "5")


def test_a_throttled_node_is_named_the_last_one_ready(tmp_path):
    run = run_cluster(2, tmp_path / "run", *SLOW_NODE_TRAIN, timeout=300, extra=("--cpu-quota", "1:10"))
    assert run.returncode == 0, f"{run.stderr}\n{run.logs()}"
    assert run.netstats["cpu_quota_percent"] == {"node1": 10}
    slow_rank, slow = rank_steps(run.out, 1)
    fast_rank, fast = rank_steps(run.out, 0)
    last = [d["last_ready_rank"] for d in fast[WARMUP:]]
    share = last.count(slow_rank) / len(last)
    summary = json.loads((run.out / "node0" / "summary.json").read_text())
    print(f"node1 (rank {slow_rank}, 10% of a CPU): last ready in {share:.0%} of steps; the other rank waits "
          f"{statistics.fmean(d['wait_s'] for d in fast[WARMUP:]) * 1e3:.1f} ms a step, it "
          f"{statistics.fmean(d['wait_s'] for d in slow[WARMUP:]) * 1e3:.1f} ms")
    assert share >= 0.9
    # summary.json counts every step, the first ones too (the rendezvous and DDP's first
    # bucket rebuild can make the fast rank last there): it must agree with the step file.
    every = [d["last_ready_rank"] for d in fast if d["wait_s"] is not None]
    assert summary["ranks"][slow_rank]["last_ready_steps"] == every.count(slow_rank)
    assert summary["ranks"][slow_rank]["last_ready_share"] == pytest.approx(every.count(slow_rank) / len(every))
    assert summary["ranks"][fast_rank]["wait_for_peers_per_step_s"] > 5 * summary["ranks"][slow_rank][
        "wait_for_peers_per_step_s"]
