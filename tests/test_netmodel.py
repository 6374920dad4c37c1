"""The cost model: wire bytes, the alpha-beta fit, DDP's bucket layout (against torch's own
assignment and against the buckets a real DDP hands its comm hook), and `ddp-fnn estimate`."""

import json
import os
import random
import subprocess
import sys
import textwrap
from fractions import Fraction

import pytest
import torch.distributed as dist
from click.testing import CliRunner

from ddp_fnn.core import units, wire
from ddp_fnn.perfmodel import netmodel
from ddp_fnn.cli import cli
from ddp_fnn.model import build_fnn
from tests.conftest import REPO, free_port, run_cli

# ---------------------------------------------------------------------------------------
# wire bytes and bandwidths
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 64, 512, 1000])
@pytest.mark.parametrize("s", [0, 1, 4096, 25 * 2 ** 20 + 12, 201_539_624])
def test_ring_wire_bytes_is_two_n_minus_one_over_n_times_payload_exactly(n, s):
    exact = Fraction(2 * (n - 1) * s, n)
    assert wire.ring_wire_bytes(s, n) == float(exact)   # the correctly rounded value
    if exact.denominator == 1:
        assert wire.ring_wire_bytes(s, n) == exact.numerator


def test_hierarchical_wire_bytes_by_hand():
    """2 nodes x 2: reduce-scatter S/2, all-reduce of S/2 across 2 nodes S/2, all-gather
    S/2: 1.5 S, as a ring of 4 sends, but only S/2 of it leaves the node (the ring: one rank
    a node sends its 1.5 S across). 4 x 8: 7/8 S twice in the node, 2 x 3/4 x S/8 across."""
    s = 8 * 2 ** 20
    assert wire.hierarchical_wire_bytes(s, 2, 2) == 1.5 * s == wire.ring_wire_bytes(s, 4)
    assert wire.hierarchical_network_bytes(s, 2, 2) == s / 2
    assert wire.hierarchical_wire_bytes(s, 8, 4) == 2 * 7 / 8 * s + 2 * 3 / 4 * s / 8
    assert wire.hierarchical_network_bytes(s, 8, 1) == 0        # one node: nothing leaves it
    assert wire.hierarchical_wire_bytes(s, 1, 5) == wire.ring_wire_bytes(s, 5)   # G = 1: a ring
    with pytest.raises(ValueError, match="local size and nodes must be >= 1"):
        wire.hierarchical_wire_bytes(s, 0, 2)


def test_ring_wire_bytes_per_rank_is_what_the_ring_steps_send():
    # Reduce-scatter and all-gather: N-1 steps each, one S/N chunk per step.
    s, n = 8 * 2 ** 20, 8
    chunk = s // n
    assert wire.ring_wire_bytes(s, n) == 2 * (n - 1) * chunk


def _gloo_broadcast_simulated(n: int, root: int = 0) -> tuple[list[int], list[int]]:
    """Gloo's broadcast (gloo/broadcast.cc) run round by round as its code reads: a mask of
    dim = ceil(log2 n) ones loses bit i in round i; a rank whose virtual rank has no bit
    left under the mask sends to its peer with bit i flipped when its own bit i is 0 (and
    the peer exists), else receives. Returns the copies each rank sent and, as a check
    that the tree is one, the round in which each rank first held the data."""
    dim = (n - 1).bit_length()
    mask = (1 << dim) - 1
    sent, has = [0] * n, [0 if r == root else None for r in range(n)]
    for i in range(dim):
        mask ^= 1 << i
        for rank in range(n):
            v = (rank - root) % n
            peer = v ^ (1 << i)
            if v & mask or peer >= n or v & (1 << i):
                continue
            assert has[rank] is not None and has[rank] <= i       # forwards only what it holds
            dst = (peer + root) % n
            assert has[dst] is None                                # each rank receives once
            has[dst] = i + 1
            sent[rank] += 1
    assert None not in has
    return sent, has


@pytest.mark.parametrize("n, copies", [
    (1, [0]), (2, [1, 0]), (3, [2, 0, 0]), (4, [2, 1, 0, 0]), (5, [3, 1, 0, 0, 0]),
    (6, [3, 2, 0, 0, 0, 0]), (8, [3, 2, 1, 1, 0, 0, 0, 0]),
])
def test_broadcast_wire_bytes_per_rank_is_gloos_binomial_tree(n, copies):
    """Rank 0 sends ceil(log2 N) copies, the ranks it reached first forward them; the
    copies add up to N-1 (each other rank receives one). At 4 ranks 2, 1, 0, 0: not the
    (N-1) x P from rank 0 alone of a root that sends to every rank."""
    p = 297_988
    per_rank = [wire.broadcast_wire_bytes(p, n, r) for r in range(n)]
    assert per_rank == [c * p for c in copies]
    assert sum(per_rank) == (n - 1) * p
    assert _gloo_broadcast_simulated(n)[0] == copies
    assert per_rank[0] == (n - 1).bit_length() * p            # ceil(log2 N) copies from the root


@pytest.mark.parametrize("n", range(1, 34))
def test_broadcast_peers_are_gloos_sends_for_every_root(n):
    for root in sorted({0, 1 % n, n // 2, n - 1}):
        sent, _ = _gloo_broadcast_simulated(n, root)
        assert [len(wire.broadcast_peers(n, r, root)) for r in range(n)] == sent
        receivers = sorted(d for r in range(n) for d in wire.broadcast_peers(n, r, root))
        assert receivers == sorted(set(range(n)) - {root})
    assert [wire.broadcast_wire_bytes(10, n, r) for r in range(n)] == \
        [10 * c for c in _gloo_broadcast_simulated(n)[0]]


def test_broadcast_wire_bytes_refuses_what_is_not_a_rank():
    with pytest.raises(ValueError, match="rank and root must be in 0..3"):
        wire.broadcast_wire_bytes(1, 4, 4)
    with pytest.raises(ValueError, match="payload bytes must be >= 0"):
        wire.broadcast_wire_bytes(-1, 4, 0)
    with pytest.raises(ValueError, match="world size must be a positive integer"):
        wire.broadcast_wire_bytes(1, 0, 0)


def test_module_state_broadcast_bytes_is_the_tree_over_parameters_and_buffers():
    from torch import nn

    from ddp_fnn.train.sync import module_state_broadcast_bytes
    model = build_fnn([32, 256, 256, 1], seed=0)
    p = sum(t.numel() * 4 for t in model.parameters())
    assert [module_state_broadcast_bytes(model, 4, r) for r in range(4)] == [2 * p, p, 0, 0]
    assert [module_state_broadcast_bytes(model, 5, r) for r in range(5)] == [3 * p, p, 0, 0, 0]
    norm = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))      # buffers are broadcast too
    state = sum(t.numel() * t.element_size() for t in [*norm.parameters(), *norm.buffers()])
    assert module_state_broadcast_bytes(norm, 2, 0) == state and module_state_broadcast_bytes(norm, 2, 1) == 0


def test_busbw_is_algbw_times_two_n_minus_one_over_n():
    a = wire.algbw(8e6, 2e-3)
    assert a == 4e9
    assert wire.busbw(a, 8) == pytest.approx(4e9 * 14 / 8, rel=1e-15)
    assert wire.busbw(a, 1) == 0.0
    with pytest.raises(ValueError, match="world size"):
        wire.busbw(a, 0)
    with pytest.raises(ValueError, match="time"):
        wire.algbw(1, 0)


@pytest.mark.parametrize("text, expected", [
    ("400gbit", 50e9), ("100mbit", 12.5e6), ("1gbit", 125e6), ("1Gbit", 125e6), ("10 kbit", 1250.0),
    ("8", 1.0), ("8bit", 1.0), ("2tbit", 250e9), ("125mbps", 125e6), ("1gibit", 2 ** 30 / 8),
    ("1.5gbit", 187.5e6),
])
def test_parse_rate_tc_units(text, expected):
    assert units.parse_rate(text) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", ["fast", "400gbt", "", "-1gbit", "0gbit", "gbit", "1e999gbit"])
def test_parse_rate_bad_value_names_it(bad):
    with pytest.raises(ValueError, match="bad link rate " + repr(bad).replace("\\", "\\\\")):
        units.parse_rate(bad)


def test_latency_steps_per_algorithm():
    assert [netmodel.latency_steps(n, "ring") for n in (1, 2, 3, 8)] == [0, 2, 4, 14]
    assert [netmodel.latency_steps(n, "tree") for n in (1, 2, 3, 8, 9)] == [0, 2, 4, 6, 8]
    # halving-doubling: 2 log2 p, plus 2 when N is not a power of two (p = 4 for N = 6).
    assert [netmodel.latency_steps(n, "halving-doubling") for n in (2, 4, 6, 8)] == [2, 4, 6, 6]
    with pytest.raises(ValueError, match="unknown algorithm"):
        netmodel.latency_steps(4, "butterfly")


def test_allreduce_time_formulas():
    a, b, s = 5e-6, 50e9, 64 * 2 ** 20
    assert netmodel.allreduce_time(s, 512, a, b, "ring") == pytest.approx(1022 * a + 2 * 511 / 512 * s / b)
    assert netmodel.allreduce_time(s, 512, a, b, "tree") == pytest.approx(18 * a + 2 * 511 / 512 * s / b)
    assert netmodel.allreduce_time(s, 512, a, b, "halving-doubling") == pytest.approx(18 * a + 2 * 511 / 512 * s / b)
    # N = 6: the power-of-two core is 4, plus one full exchange before and after.
    assert netmodel.allreduce_time(s, 6, a, b, "halving-doubling") == pytest.approx(
        6 * a + 2 * 3 / 4 * s / b + 2 * s / b)
    assert netmodel.allreduce_time(s, 1, a, b) == 0.0


def _halving_doubling_sent_bytes(s, n):
    """Bytes each rank sends in Rabenseifner's all-reduce with MPICH's fold for N not a
    power of two: ranks p..N-1 hand their S to partner r - p and take the result back;
    the p core ranks reduce-scatter by recursive halving and all-gather by doubling."""
    p = 1 << (n.bit_length() - 1)
    sent = [0.0] * n
    for r in range(p):
        chunk = s
        for _ in range(p.bit_length() - 1):          # halving: send half of what is left
            chunk /= 2
            sent[r] += chunk
        sent[r] *= 2                                  # doubling sends the same amounts back
    for extra in range(p, n):
        sent[extra] += s                              # its data to the partner
        sent[extra - p] += s                          # the result back
    return sent


@pytest.mark.parametrize("n", [2, 3, 5, 6, 7, 8, 12, 100])
def test_halving_doubling_bytes_agree_with_its_time_model(n):
    s = 3 * 2 ** 20
    sent = _halving_doubling_sent_bytes(s, n)
    # Mean per rank: what estimate_step reports -- the extra hand-overs do not change it.
    est = netmodel.estimate_step([1024, 768], world_size=n, alpha_s=0.0, beta_bytes_per_second=1e9,
                                 compute_time_s=0.0, bucket_mb=100, algorithm="halving-doubling")
    payload = est.payload_bytes_per_step
    mean = sum(_halving_doubling_sent_bytes(payload, n)) / n
    assert est.wire_bytes_per_rank_per_step == pytest.approx(mean, rel=1e-12)
    assert sum(sent) / n == pytest.approx(2 * (n - 1) / n * s, rel=1e-12)
    # The time's bandwidth term is the busiest rank's path: a partner receives S, runs the
    # core, sends S back, in series.
    p = 1 << (n.bit_length() - 1)
    busiest = max(sent)
    assert busiest == pytest.approx(2 * (p - 1) / p * s + (s if p != n else 0.0))
    t = netmodel.allreduce_time(s, n, 0.0, 1.0, "halving-doubling")
    assert t == pytest.approx(busiest + (s if p != n else 0.0))   # + the S it received first


# ---------------------------------------------------------------------------------------
# the alpha-beta fit
# ---------------------------------------------------------------------------------------

SIZES = [4096 * 2 ** k for k in range(14)]          # 4 KiB .. 32 MiB


def _synthetic(alpha, beta, n, noise=0.0, seed=0):
    rng = random.Random(seed)
    f = 2 * (n - 1) / n
    return [(alpha + s * f / beta) * (1 + rng.gauss(0, noise)) for s in SIZES]


@pytest.mark.parametrize("n", [2, 8, 64])
def test_fit_recovers_alpha_and_beta_from_exact_timings(n):
    fit = netmodel.fit_alpha_beta(SIZES, _synthetic(40e-6, 3e9, n), n)
    assert fit.alpha_s == pytest.approx(40e-6, rel=1e-9)
    assert fit.beta_bytes_per_second == pytest.approx(3e9, rel=1e-9)
    assert fit.rms_error_s < 1e-15 and fit.r2 == pytest.approx(1.0)
    assert fit.points == len(SIZES)


def test_fit_recovers_alpha_and_beta_under_two_percent_noise():
    times = _synthetic(40e-6, 3e9, 4, noise=0.02, seed=7)
    fit = netmodel.fit_alpha_beta(SIZES, times, 4)
    assert fit.beta_bytes_per_second == pytest.approx(3e9, rel=0.03)
    assert fit.alpha_s == pytest.approx(40e-6, rel=0.05)
    assert 0.005 < fit.rms_relative_error < 0.05 and fit.r2 > 0.99
    # Unweighted, the 32 MiB points' noise decides alpha: beta survives, alpha does not,
    # which is why the fit weighs relative error by default.
    plain = netmodel.fit_alpha_beta(SIZES, times, 4, relative=False)
    assert plain.beta_bytes_per_second == pytest.approx(3e9, rel=0.03)
    assert abs(plain.alpha_s / 40e-6 - 1) > 0.2
    assert plain.rms_relative_error > 3 * fit.rms_relative_error


def test_fit_through_origin_when_the_intercept_would_be_negative():
    # No latency, and the smallest size came in 10% fast: the free line's intercept is < 0.
    sizes, times = [1e6, 2e6, 4e6], [0.9e-3, 2e-3, 4e-3]          # N = 2: factor 1, beta 1e9
    fit = netmodel.fit_alpha_beta(sizes, times, 2, relative=False)
    assert fit.alpha_s == 0.0
    assert fit.beta_bytes_per_second == pytest.approx(21e12 / 20900, rel=1e-12)   # sum(x^2) / sum(x t)


def test_fit_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="world size >= 2"):
        netmodel.fit_alpha_beta(SIZES, _synthetic(1e-5, 1e9, 2), 1)
    with pytest.raises(ValueError, match="two distinct sizes"):
        netmodel.fit_alpha_beta([4096, 4096], [1e-3, 1e-3], 2)
    with pytest.raises(ValueError, match="do not grow"):
        netmodel.fit_alpha_beta([4096, 8192, 16384], [3e-3, 2e-3, 1e-3], 2)


# ---------------------------------------------------------------------------------------
# DDP's buckets
# ---------------------------------------------------------------------------------------

LAYOUTS = [
    # (widths, bucket_mb as passed to DDP, None = not passed)
    ([4096, 4096, 4096, 10], 25.0),
    ([1000, 1000, 1000, 1000, 10], 25.0),
    ([1000, 1000, 1000, 1000, 10], 2.0),
    ([1000, 1000, 1000, 1000, 10], None),
    ([512] * 8 + [10], 2.0),
    ([512] * 8 + [10], 0.5),
    ([512] * 8 + [10], None),
    ([32, 256, 256, 1], 25.0),
]


def _torch_assignment(widths, bucket_mb):
    """torch.distributed._compute_bucket_assignment_by_size on the real FNN's parameters,
    given them in the order DDP's bucket rebuild does (gradient-ready order) with the caps
    DDP passes it."""
    params = list(build_fnn(widths).parameters())
    cap = int((25 if bucket_mb is None else bucket_mb) * 2 ** 20)
    first = dist._DEFAULT_FIRST_BUCKET_BYTES if bucket_mb is None else cap
    order = list(reversed(range(len(params))))
    buckets, _ = dist._compute_bucket_assignment_by_size([params[i] for i in order], [first, cap],
                                                          [False] * len(params), order)
    numels = [sum(params[i].numel() for i in b) for b in buckets]
    names = [n for n, _ in build_fnn(widths).named_parameters()]
    return numels, [tuple(names[i] for i in b) for b in buckets]


@pytest.mark.parametrize("widths, bucket_mb", LAYOUTS)
def test_bucket_layout_equals_torchs_assignment(widths, bucket_mb):
    numels, names = _torch_assignment(widths, bucket_mb)
    layout = netmodel.bucket_layout(widths, bucket_mb)
    assert [b.numel for b in layout] == numels
    assert [b.param_names for b in layout] == names
    assert [b.nbytes for b in layout] == [4 * n for n in numels]
    assert sum(b.numel for b in layout) == netmodel.parameter_count(widths) == build_fnn(widths).num_parameters()


def test_bucket_layout_keeps_the_tensor_that_crosses_the_cap():
    # 4096 x 4096 fp32 weights are 64 MiB each: a 25 MiB cap cannot split them.
    layout = netmodel.bucket_layout([4096, 4096, 4096, 10], 25.0)
    assert [b.param_names for b in layout] == [
        ("layers.2.bias", "layers.2.weight", "layers.1.bias", "layers.1.weight"),
        ("layers.0.bias", "layers.0.weight")]
    # Not passing bucket_cap_mb: the first bucket is capped at 1 MiB (it still holds a
    # 4 MB weight) and the rest at 25 MiB.
    assert [b.numel for b in netmodel.bucket_layout([1000, 1000, 1000, 1000, 10], None)] == [
        10 + 10_000 + 1000 + 1_000_000, 2 * 1_001_000]
    with pytest.raises(ValueError, match="bucket_mb must be > 0"):
        netmodel.bucket_layout([4, 4], 0)


# A world-size-1 Gloo group in a subprocess: wrap real FNNs in DDP, register a comm hook
# that records each bucket it is handed, and report what the second step saw (the first
# step runs with one bucket holding everything; DDP rebuilds its buckets after it).
# It leaves the group as the workers do (ddp_fnn.dist imported before the group exists,
# teardown(), os._exit after flushing: docs/shutdown.md), so that it cannot abort at exit.
_DDP_PROBE = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from ddp_fnn import dist as ddist
    from ddp_fnn.model import build_fnn

    dist.init_process_group("gloo", rank=0, world_size=1)
    out = []
    for widths, bucket_mb in json.loads(sys.argv[1]):
        model = build_fnn(widths)
        ddp = DDP(model) if bucket_mb is None else DDP(model, bucket_cap_mb=bucket_mb)
        seen = []
        def hook(state, bucket):
            seen.append((bucket.index(), bucket.buffer().numel()))
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut
        ddp.register_comm_hook(None, hook)
        steps = []
        for _ in range(2):
            seen.clear()
            ddp(torch.randn(3, widths[0])).sum().backward()
            steps.append(list(seen))
        out.append(steps)
    del model, ddp, hook
    ddist.teardown()
    print(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)
""")


def test_bucket_layout_equals_what_a_real_ddp_hands_its_comm_hook():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _DDP_PROBE, json.dumps(LAYOUTS)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    observed = json.loads(proc.stdout.strip().splitlines()[-1])
    for (widths, bucket_mb), (first, second) in zip(LAYOUTS, observed):
        # Step 1: one bucket with every gradient; step 2: the rebuilt buckets, in order.
        assert [n for _, n in first] == [netmodel.parameter_count(widths)]
        layout = netmodel.bucket_layout(widths, bucket_mb)
        assert second == [[b.index, b.numel] for b in layout], (widths, bucket_mb)


# ---------------------------------------------------------------------------------------
# one step: overlap and exposure
# ---------------------------------------------------------------------------------------

def test_one_bucket_is_fully_exposed_and_efficiency_follows():
    # 32,256,256,1 is one bucket: its all-reduce starts when backward ends.
    est = netmodel.estimate_step([32, 256, 256, 1], world_size=4, alpha_s=10e-6, beta_bytes_per_second=1e9,
                                 compute_time_s=0.01, bucket_mb=25)
    payload = netmodel.parameter_count([32, 256, 256, 1]) * 4
    t = 6 * 10e-6 + 1.5 * payload / 1e9
    assert est.payload_bytes_per_step == payload
    assert est.wire_bytes_per_rank_per_step == 1.5 * payload
    assert est.comm_time_per_step_s == pytest.approx(t)
    assert est.exposed_comm_time_per_step_s == pytest.approx(t)
    assert est.scaling_efficiency == pytest.approx(0.01 / (0.01 + t))


def test_overlap_hides_all_but_the_last_bucket_when_the_network_keeps_up():
    widths = [1000, 1000, 1000, 1000, 10]
    layout = netmodel.bucket_layout(widths, 2.0)
    est = netmodel.estimate_step(widths, world_size=2, alpha_s=0.0, beta_bytes_per_second=1e12,
                                 compute_time_s=1.0, bucket_mb=2.0)
    last = layout[-1].numel * 4 / 1e12
    assert len(est.buckets) == 3
    assert est.exposed_comm_time_per_step_s == pytest.approx(last)
    # Each bucket starts the moment its gradients are ready: the network never backs up.
    assert all(b.start_s == b.ready_s for b in est.buckets)


def test_a_slow_network_backs_the_buckets_up():
    widths = [1000, 1000, 1000, 1000, 10]
    est = netmodel.estimate_step(widths, world_size=2, alpha_s=0.0, beta_bytes_per_second=1e8,
                                 compute_time_s=0.03, bucket_mb=2.0, backward_fraction=0.5)
    b = est.buckets
    assert b[1].start_s == b[0].finish_s > b[1].ready_s
    assert est.exposed_comm_time_per_step_s == pytest.approx(b[-1].finish_s - 0.015)
    assert est.comm_time_per_step_s == pytest.approx(est.payload_bytes_per_step / 1e8)


def test_a_measured_schedule_replaces_the_linear_one():
    # Three buckets handed over 30 ms, 10 ms and 0 ms before backward ends, at 1 GB/s bus
    # bandwidth and no latency: bucket k's all-reduce takes its bytes / 1e9 (N = 2).
    widths = [1000, 1000, 1000, 1000, 10]
    layout = netmodel.bucket_layout(widths, 2.0)
    t = [b.numel * 4 / 1e9 for b in layout]                     # 4.04, 4.0, 8.0 ms
    est = netmodel.estimate_step(widths, world_size=2, alpha_s=0.0, beta_bytes_per_second=1e9,
                                 compute_time_s=0.06, bucket_mb=2.0, bucket_leads_s=[0.030, 0.010, 0.0])
    backward = 0.04                                             # 2/3 of the compute
    ready = [backward - 0.030, backward - 0.010, backward]
    assert [b.ready_s for b in est.buckets] == pytest.approx(ready)
    # Bucket 0 is done before bucket 1 is ready; bucket 2 starts when backward ends.
    assert [b.start_s for b in est.buckets] == pytest.approx(ready)
    assert est.exposed_comm_time_per_step_s == pytest.approx(t[2])
    # Handed over together at the end: all three queue up after backward.
    late = netmodel.estimate_step(widths, world_size=2, alpha_s=0.0, beta_bytes_per_second=1e9,
                                  compute_time_s=0.06, bucket_mb=2.0, bucket_leads_s=[0.0, 0.0, 0.0])
    assert late.exposed_comm_time_per_step_s == pytest.approx(sum(t))
    # A lead longer than the modelled backward stretches backward, not time before zero.
    long = netmodel.estimate_step(widths, world_size=2, alpha_s=0.0, beta_bytes_per_second=1e9,
                                  compute_time_s=0.06, bucket_mb=2.0, bucket_leads_s=[0.1, 0.0, 0.0])
    assert long.buckets[0].ready_s == 0.0


@pytest.mark.parametrize("leads", [[0.0, 0.0], [0.0, -1.0, 0.0], [0.0, float("nan"), 0.0]])
def test_a_schedule_that_does_not_fit_the_layout_is_refused(leads):
    with pytest.raises(ValueError, match="schedule|leads"):
        netmodel.estimate_step([1000, 1000, 1000, 1000, 10], world_size=2, alpha_s=0.0, beta_bytes_per_second=1e9,
                               compute_time_s=0.06, bucket_mb=2.0, bucket_leads_s=leads)


def test_one_at_a_time_is_the_plain_queue():
    spans = netmodel.queue_allreduces([0.0, 0.0, 5.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], concurrency=1)
    assert spans == [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0)]


def test_two_at_a_time_overlap_their_latency_and_share_the_bandwidth():
    # Two ready together: both pay latency 1 at once, then move 2 s of bytes each at half
    # the bandwidth; the third waits for a free worker (the first to finish).
    spans = netmodel.queue_allreduces([0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0], concurrency=2)
    assert spans[0] == pytest.approx((0.0, 5.0)) and spans[1] == pytest.approx((0.0, 5.0))
    # The third starts at 5, alone: 1 + 2.
    assert spans[2] == pytest.approx((5.0, 8.0))
    # A short one beside a long one: it gets half the bandwidth while both move.
    spans = netmodel.queue_allreduces([0.0, 0.0], [0.0, 0.0], [4.0, 1.0], concurrency=2)
    assert spans[1] == pytest.approx((0.0, 2.0)) and spans[0] == pytest.approx((0.0, 5.0))
    # Bytes are conserved: the last finish is the total transfer when the link never idles.
    assert max(f for _, f in spans) == pytest.approx(5.0)


def test_gloos_concurrency_is_torchs_default_worker_threads():
    import torch.distributed as dist

    assert netmodel.BACKEND_CONCURRENCY["gloo"] == dist.ProcessGroupGloo._Options()._threads


def test_estimate_step_with_gloos_two_workers_hides_one_latency_in_two():
    widths = [1000, 1000, 1000, 1000, 10]
    kw = dict(world_size=2, alpha_s=0.005, beta_bytes_per_second=1e8, compute_time_s=0.0, bucket_mb=2.0,
              bucket_leads_s=[0.0, 0.0, 0.0])
    one = netmodel.estimate_step(widths, concurrency=1, **kw)
    two = netmodel.estimate_step(widths, concurrency=netmodel.BACKEND_CONCURRENCY["gloo"], **kw)
    # Three buckets handed over together: one at a time pays 3 latencies of 2 steps each;
    # two at a time pay buckets 0 and 1's together, and bucket 2's partly under bucket 0's
    # last bytes; the bytes take as long either way.
    transfer, latency = one.payload_bytes_per_step / 1e8, 2 * 0.005
    assert one.exposed_comm_time_per_step_s == pytest.approx(transfer + 3 * latency)
    assert transfer + latency < two.exposed_comm_time_per_step_s < transfer + 2 * latency
    b = two.buckets
    assert b[0].start_s == b[1].start_s == 0.0 and b[2].start_s == pytest.approx(min(b[0].finish_s, b[1].finish_s))
    assert two.comm_time_per_step_s == pytest.approx(two.exposed_comm_time_per_step_s)   # a union, not a sum


def test_compression_halves_the_payload_but_not_the_buckets():
    kw = dict(world_size=8, alpha_s=5e-6, beta_bytes_per_second=12.5e9, compute_time_s=0.01, bucket_mb=25)
    full = netmodel.estimate_step([4096, 4096, 4096, 10], **kw)
    half = netmodel.estimate_step([4096, 4096, 4096, 10], compression="bf16", **kw)
    assert half.payload_bytes_per_step * 2 == full.payload_bytes_per_step
    assert [b.numel for b in half.buckets] == [b.numel for b in full.buckets]
    assert half.exposed_comm_time_per_step_s < full.exposed_comm_time_per_step_s


def test_world_size_one_costs_nothing():
    est = netmodel.estimate_step([8, 8, 1], world_size=1, alpha_s=1e-3, beta_bytes_per_second=1.0,
                                 compute_time_s=0.01)
    assert est.wire_bytes_per_rank_per_step == 0 and est.exposed_comm_time_per_step_s == 0
    assert est.scaling_efficiency == 1.0


# ---------------------------------------------------------------------------------------
# ddp-fnn estimate
# ---------------------------------------------------------------------------------------

BIG = ["--layers", "4096,4096,4096,4096,10", "--world-size", "512", "--link-rate", "400gbit",
       "--latency-us", "5", "--compute-ms", "12"]


def test_estimate_text_names_the_figures_with_units():
    res = CliRunner().invoke(cli, ["estimate", *BIG])
    assert res.exit_code == 0, res.output
    assert "50,384,906 parameters" in res.output
    assert "3 DDP bucket(s)" in res.output
    assert "payload 192.20 MiB per rank" in res.output
    assert "on the wire 383.66 MiB sent per rank" in res.output
    assert "400 Gbit/s (50 GB/s)" in res.output
    assert "scaling efficiency" in res.output and "%" in res.output


def test_estimate_json_matches_the_model():
    res = CliRunner().invoke(cli, ["estimate", *BIG, "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    want = netmodel.estimate_step([4096, 4096, 4096, 4096, 10], world_size=512, alpha_s=5e-6,
                                  beta_bytes_per_second=50e9, compute_time_s=0.012, bucket_mb=25.0)
    for key in ("payload_bytes_per_step", "wire_bytes_per_rank_per_step", "comm_time_per_step_s",
                "exposed_comm_time_per_step_s", "scaling_efficiency"):
        assert got[key] == pytest.approx(getattr(want, key), rel=1e-12), key
    assert got["payload_bytes_per_step"] == 4 * 50_384_906
    assert got["wire_bytes_per_rank_per_step"] == 2 * 511 * 4 * 50_384_906 / 512
    assert 0 < got["scaling_efficiency"] < 1


def test_estimate_sweep_prints_one_row_per_value_and_efficiency_falls_with_n():
    args = ["estimate", *BIG, "--sweep", "world-size=2,8,64,512", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["estimates"]
    assert [r["world_size"] for r in rows] == [2, 8, 64, 512]
    eff = [r["scaling_efficiency"] for r in rows]
    assert eff == sorted(eff, reverse=True) and eff[0] > eff[-1]
    text = CliRunner().invoke(cli, args[:-1]).output
    lines = text.strip().splitlines()
    assert lines[0].split()[0] == "world-size" and len(lines) == 5
    assert lines[-1].split()[0] == "512"


def test_estimate_width_sweep_sets_every_hidden_layer():
    res = CliRunner().invoke(cli, ["estimate", *BIG, "--sweep", "width=256,1024", "--json"])
    rows = json.loads(res.output)["estimates"]
    assert [r["layers"] for r in rows] == [[4096, 256, 256, 256, 10], [4096, 1024, 1024, 1024, 10]]


def test_estimate_reads_alpha_and_beta_from_a_bench_json(tmp_path):
    bench = tmp_path / "bench.json"
    # At N = 2 a ring all-reduce pays alpha twice: the fitted 100 us is 50 us per step.
    bench.write_text(json.dumps({"world_size": 2, "backend": "gloo", "results": [],
                                 "alpha_s": 100e-6, "beta_bytes_per_second": 1e9}))
    res = CliRunner().invoke(cli, ["estimate", "--layers", "32,256,256,1", "--world-size", "8",
                                   "--compute-ms", "1", "--bench-json", str(bench), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["alpha_s"] == pytest.approx(50e-6)
    assert got["beta_bytes_per_second"] == 1e9
    # An explicit link rate overrides the bench's beta.
    res = CliRunner().invoke(cli, ["estimate", "--layers", "32,256,256,1", "--world-size", "8",
                                   "--compute-ms", "1", "--bench-json", str(bench), "--link-rate", "8gbit",
                                   "--json"])
    assert json.loads(res.output)["beta_bytes_per_second"] == 1e9 and "alpha_s" in res.output


def test_estimate_takes_compute_time_from_a_summary(tmp_path):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"step_time_p50_s": 0.03, "step_time_mean_s": 0.02, "exposed_comm_time_per_step_s": 0.005}))
    res = CliRunner().invoke(cli, ["estimate", "--layers", "32,256,256,1", "--world-size", "2",
                                   "--link-rate", "10gbit", "--summary", str(summary), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["compute_time_per_step_s"] == pytest.approx(0.015)


@pytest.mark.parametrize("args, message", [
    (["--link-rate", "400gbt"], "--link-rate: bad link rate '400gbt'"),
    (["--world-size", "0"], "--world-size must be >= 1, got 0"),
    (["--sweep", "depth=3"], "--sweep: bad sweep 'depth=3'"),
    (["--sweep", "world-size=2,x"], "--sweep: bad sweep value 'x' for world-size"),
    (["--layers", "8"], "--layers needs at least two positive widths"),
    (["--compute-ms", "-1"], "--compute-ms: compute time must be >= 0 s, got -0.001"),
    (["--backward-fraction", "2"], "--backward-fraction: backward fraction must be in [0, 1], got 2.0"),
    (["--bench-json", "/nonexistent/bench.json"], "--bench-json /nonexistent/bench.json: cannot read"),
    (["--plot", "x.png"], "--plot needs --sweep"),
])
def test_estimate_bad_input_is_one_line_exit_2(args, message):
    base = {"--layers": "32,256,256,1", "--world-size": "8", "--link-rate": "10gbit", "--compute-ms": "5"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["estimate"] + [x for kv in base.items() for x in kv]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2
    assert message in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_estimate_missing_inputs_say_what_to_give():
    res = CliRunner().invoke(cli, ["estimate", "--world-size", "8", "--compute-ms", "5"])
    assert res.exit_code == 2 and "give --link-rate" in res.output
    res = CliRunner().invoke(cli, ["estimate", "--world-size", "8", "--link-rate", "1gbit"])
    assert res.exit_code == 2 and "--compute-ms" in res.output


def test_estimate_error_line_from_the_real_entry_point():
    proc = run_cli("estimate", "--world-size", "8", "--link-rate", "fast", "--compute-ms", "5", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ddp-fnn: error: --link-rate: bad link rate 'fast': expected a number and a unit such as "
        "400gbit, 400Gbit/s, 50GB/s, 100mbit or 125mbps"]


@pytest.mark.parametrize("text, bytes_per_second", [("400Gbit/s", 5e10), ("400Gb/s", 5e10), ("50GB/s", 5e10),
                                                     ("400gbit", 5e10), ("100mbit", 1.25e7)])
def test_every_rate_option_takes_the_same_spellings(text, bytes_per_second):
    """One parser: --link-rate reads the data-sheet spellings a fabric file takes."""
    from ddp_fnn.core.units import parse_rate, tc_rate
    assert parse_rate(text) == pytest.approx(bytes_per_second)
    assert parse_rate(tc_rate(text)) == pytest.approx(bytes_per_second)
    res = CliRunner().invoke(cli, ["estimate", "--world-size", "8", "--link-rate", text, "--compute-ms", "5",
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["beta_bytes_per_second"] == pytest.approx(bytes_per_second)


def test_estimate_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.png"
    res = CliRunner().invoke(cli, ["estimate", *BIG, "--sweep", "link-rate=10gbit,100gbit,400gbit",
                                   "--plot", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_plot_without_matplotlib_says_how_to_install(tmp_path):
    # A child interpreter where `import matplotlib` fails, whether or not it is installed here.
    code = textwrap.dedent("""
        import sys
        sys.modules["matplotlib"] = None
        from ddp_fnn.cli import main
        main(sys.argv[1:])
    """)
    proc = subprocess.run([sys.executable, "-c", code, "estimate", *BIG, "--sweep", "world-size=2,8",
                           "--plot", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ddp-fnn: error: --plot needs matplotlib: pip install 'ddp-fnn[plot]'"


# ---------------------------------------------------------------------------------------
# Mathis et al. 1997: TCP throughput under random loss
# ---------------------------------------------------------------------------------------

def test_mathis_rate_is_mss_over_rtt_sqrt_p_times_c():
    # 1448-byte segments, 1 ms RTT, 1 % loss: 1448 / (0.001 * 0.1) * 1.2247 = 17.73 MB/s.
    assert netmodel.mathis_rate(1448, 1e-3, 0.01) == pytest.approx(1448 / 1e-4 * 1.224744871, rel=1e-9)
    assert netmodel.MATHIS_C == pytest.approx(1.2247, abs=1e-4)


def test_mathis_rate_falls_as_one_over_the_root_of_loss_and_rtt():
    r1 = netmodel.mathis_rate(1448, 1e-3, 0.01)
    assert netmodel.mathis_rate(1448, 1e-3, 0.04) == pytest.approx(r1 / 2)    # 4x the loss: half the rate
    assert netmodel.mathis_rate(1448, 2e-3, 0.01) == pytest.approx(r1 / 2)    # 2x the RTT: half too


def test_mathis_rate_never_exceeds_the_link():
    link = 125e6                                                               # 1 Gbit/s
    assert netmodel.mathis_rate(1448, 1e-4, 1e-6, link) == link                # rare loss: link-bound
    assert netmodel.mathis_rate(1448, 1e-3, 0.02, link) < link                 # 2 %: loss-bound
    assert netmodel.mathis_rate(1448, 1e-3, 0.0, link) == link
    assert netmodel.mathis_rate(1448, 1e-3, 0.0) == float("inf")


@pytest.mark.parametrize("args", [(0, 1e-3, 0.01), (1448, 0, 0.01), (1448, 1e-3, 1.5), (1448, 1e-3, -0.1)])
def test_mathis_rate_rejects_nonsense(args):
    with pytest.raises(ValueError, match="mathis_rate"):
        netmodel.mathis_rate(*args)
