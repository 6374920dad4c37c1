"""Shaped links: what the job reports against the link it runs on, on namespace nodes.

Each node's eth0 egress is capped at 1 Gbit/s (launch/netns-cluster.sh --link-rate 1gbit,
a tc token bucket), and the job trains benchmarks/netns_links.py's communication-bound
FNN (2.36 M parameters, 9.45 MB of gradient a step in one DDP bucket). Two checks:

* No rank reports a bus bandwidth above the link's rate (125e6 bytes/s): busbw is the
  rate each rank's link ran at, and a figure above the link would be a measurement error.
* The cost model's communication time per step, from train's probe of the same fabric
  (alpha and beta, --probe-rounds 15: benchmarks/netns_links.py says why) before the
  first step, is within 15 % of the measured one (comm_time_per_step_s: the union of
  each step's all-reduce intervals, rank 0).

Needs root, ip, tc and unshare, like tests/test_launch_netns.py. The runs go through the
benchmark's own runner, so the test checks the figures the README's table shows.
"""

from __future__ import annotations

import importlib.util
import shutil

import pytest

from conftest import REPO
from test_launch_netns import pytestmark as netns_marks

# What the namespace cluster needs (test_launch_netns), and tc for the shaping.
pytestmark = [*netns_marks, pytest.mark.skipif(shutil.which("tc") is None, reason="needs 'tc' (iproute2)")]

RATE = "1gbit"
LINK_BYTES_PER_SECOND = 125e6          # 1 Gbit/s
STEPS = 20                             # 2 nodes: about 25 s here, 4 nodes: about 45 s
PREDICTION_TOLERANCE = 0.15


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("netns_links", REPO / "benchmarks" / "netns_links.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


links = _load_benchmark()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}nodes")
def run(request, tmp_path_factory) -> dict:
    n = request.param
    args = links.train_args(links.LAYERS, STEPS, 32)
    # No retry: a run that fails, at exit included, fails the test (docs/shutdown.md).
    row = links.run(n, RATE, tmp_path_factory.mktemp(f"links{n}") / "run", args, threads=1, timeout_s=300,
                    retries=0)
    print(f"\n{n} nodes at {RATE}: {row['wall_time_s']:.1f} s")
    assert "error" not in row, row["error"]
    assert row["world_size"] == n and row["steps"] == STEPS
    assert row["allreduce_calls_per_step"] > 0
    return row


def test_link_rate_parses_as_the_bound():
    assert links.link_bytes_per_second(RATE) == LINK_BYTES_PER_SECOND


def test_busbw_does_not_exceed_the_link(run):
    """Rank 0's busbw and every rank's own (summary.json's `ranks`) are at most 1 Gbit/s."""
    per_rank = [r["busbw_bytes_per_second"] for r in run["ranks"]]
    print(f"busbw: rank 0 {run['busbw_bytes_per_second'] / 1e6:.1f} MB/s, ranks "
          + ", ".join(f"{b / 1e6:.1f}" for b in per_rank) + f" MB/s; link {LINK_BYTES_PER_SECOND / 1e6:.0f} MB/s")
    assert len(per_rank) == run["nodes"]
    assert all(b > 0 for b in per_rank), per_rank
    assert run["busbw_bytes_per_second"] <= LINK_BYTES_PER_SECOND
    assert max(per_rank) <= LINK_BYTES_PER_SECOND, per_rank


def test_predicted_comm_time_is_within_15_percent(run):
    """The probe's alpha-beta and the bucket layout predict the measured comm time per step."""
    assert run["probe"]["source"] == "probe" and run["probe"]["rounds"] == links.PROBE_ROUNDS
    measured, predicted = run["comm_time_per_step_s"], run["predicted_comm_time_per_step_s"]
    print(f"comm time per step: measured {measured * 1e3:.0f} ms, predicted {predicted * 1e3:.0f} ms "
          f"({run['comm_prediction_error']:+.1%}); probe alpha {run['probe']['alpha_s'] * 1e3:.2f} ms, "
          f"beta {run['probe']['beta_bytes_per_second'] / 1e6:.1f} MB/s")
    assert predicted == pytest.approx(measured, rel=PREDICTION_TOLERANCE)
