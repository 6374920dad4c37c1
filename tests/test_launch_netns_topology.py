"""The namespace cluster as a two-tier fabric, measured against topology.py's model.

Several workers per node (ranks of one node talk over the namespace's loopback, nodes over
their eth0), and with --leaves 2 the nodes on two leaf bridges joined through a spine, the
uplinks shaped on their own rate. Each node's eth0 and each uplink's kernel TX counters
are compared with the bytes topology.estimate puts on server{k}.nic0.tx and leaf{j}.up /
leaf{j}.down, and the measured step time with its step_time_s (issue 28, "Must show" 1
and 2); and 2 x 2 with --all-reduce hierarchical against the flat ring ("Must show" 3). Needs root and iproute2, like tests/test_launch_netns.py, whose helpers these
reuse. The figures printed here are the ones docs/topology.md records.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

try:
    import tomllib
except ModuleNotFoundError:                     # Python 3.10
    import tomli as tomllib

from conftest import REPO
from ddp_fnn.perfmodel import topology
from test_launch_netns import (SCRIPT, header_bytes_per_packet, netns_names, pytestmark,  # noqa: F401 (marks)
                               processes_mentioning, root_links, run_cluster, etc_netns, stop,
                               tx_payload_estimate, wait_for)

TOPOLOGIES = REPO / "deploy" / "topologies"
LAYERS = (64, 512, 512, 1)          # 296,449 parameters: 1.19 MB of gradient, one DDP bucket
# The gradients dominate: at 100 Mbit/s a ring edge carries 1.5-1.75 x 1.19 MB a step
# (0.14-0.66 s on the links) against about 2-10 ms of compute. No probe: its all-reduces
# would be bytes to account for and time before the first step, and it predicts nothing
# used here. Few steps, so that each run (mostly the 8 workers' start-up on 2 cores) stays
# well under a minute.
TRAIN = ("--layers", ",".join(map(str, LAYERS)), "--no-probe", "--metrics-port", "0", "--progress", "none")
FLAT_STEPS = 30
LEAF_STEPS = 20
GPUS = 2                            # --nproc-per-node


# ---------------------------------------------------------------------------------------
# what crosses which link besides the steps
# ---------------------------------------------------------------------------------------

def setup_bytes_leaving(group_of, world: int, param_bytes: int) -> dict[int, int]:
    """Start-up broadcast bytes each group (a node, or a leaf) sends to ranks outside it
    (topology.broadcast_bytes_leaving: Gloo's binomial tree)."""
    return topology.broadcast_bytes_leaving(group_of, world, param_bytes)


def netns_topology(file: str, **overrides) -> dict:
    raw = tomllib.loads((TOPOLOGIES / file).read_text())
    for key, value in overrides.items():          # "switch.uplink_rate" -> raw["switch"]["uplink_rate"]
        *path, last = key.split(".")
        d = raw
        for p in path:
            d = d.setdefault(p, {})
        d[last] = value
    return raw


def payload_rates(raw: dict, mtu: int, header: int) -> dict:
    """The same fabric with every network rate as TCP payload bytes per second: a tc rate
    counts whole frames (MTU + the 14-byte Ethernet header) and each carries MTU - 20
    (IPv4) - 20 (TCP) - 12 (timestamps) bytes of payload; the model's bytes are payload,
    so its rates must be too (1448 / 1514 = 95.6 % at MTU 1500)."""
    share = (mtu + 14 - header) / (mtu + 14)
    raw = json.loads(json.dumps(raw))
    for section, key in (("nic", "rate"), ("switch", "uplink_rate")):
        if key in raw.get(section, {}):
            rate = topology.parse_rate(f"{section}.{key}", raw[section][key]) * share
            raw[section][key] = f"{rate:.3f}bps"          # tc's bps: bytes per second
    return raw


def compute_s(summary: dict) -> float:
    """One step's compute, as `ddp-fnn estimate --summary` takes it (cli._compute_time_s):
    the mean step less its mean exposed communication."""
    return max(0.0, summary["step_time_mean_s"] - summary["exposed_comm_time_per_step_s"])


def estimate(raw: dict, summary: dict) -> topology.TopologyEstimate:
    return topology.estimate(topology.from_dict(raw), LAYERS, compute_s=compute_s(summary),
                             bucket_mb=summary["bucket_mb"])


def pct(a: float, b: float) -> str:
    return f"{(a - b) / b:+.2%}"


def assert_nothing_left(run) -> None:
    tag = f"ddpfnn-{run.pid}-"
    assert not {ns for ns in netns_names() if ns.startswith(tag)}
    assert not {e for e in etc_netns() if e.startswith(tag)}
    assert not processes_mentioning(str(run.out)), processes_mentioning(str(run.out))


def summary_of(run) -> dict:
    assert run.returncode == 0, f"{run.stderr}\n{run.logs()}"
    return json.loads((run.out / "node0" / "summary.json").read_text())


# ---------------------------------------------------------------------------------------
# (a) one leaf, 2 and 4 nodes of 2 workers: the flat ring in rank order
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}x{GPUS}")
def flat(request, tmp_path_factory):
    n = request.param
    before = root_links()
    # The 2-node run also samples its links (the time series' own checks below).
    sample = ("--sample-ms", "10") if n == 2 else ()
    run = run_cluster(n, tmp_path_factory.mktemp(f"flat{n}"), *TRAIN, "--max-steps", str(FLAT_STEPS),
                      extra=("--nproc-per-node", str(GPUS), "--link-rate", "100mbit", *sample))
    run.root_links_added = root_links() - before
    print(f"\n{n} nodes x {GPUS}: {run.seconds:.1f} s\n{run.stdout}")
    return run


def test_flat_ring_node_bytes_match_the_model(flat):
    """Each node's eth0 TX payload against the model's server{k}.nic0.tx: one ring edge
    per server (local rank G-1 to the next server's local rank 0), the other G-1 edges on
    loopback inside the namespace, which the model puts on the GPU links; plus the
    start-up broadcast's messages that leave the node."""
    summary = summary_of(flat)
    n, world = flat.nodes, flat.nodes * GPUS
    assert summary["world_size"] == world and summary["steps"] == FLAT_STEPS
    stats = flat.netstats
    header = header_bytes_per_packet(stats)
    raw = netns_topology("netns-2x2.toml", servers=n, **{"switch.servers_per_leaf": n})
    est = estimate(raw, summary)
    links = dict(est.link_bytes_per_step)
    # The model: a NIC carries one rank's ring share a step, not the G ranks' sum; the
    # rest of the ring runs on the GPU (here: loopback) links.
    edge = summary["allreduce_wire_bytes_per_step"]       # 2(N-1)/N x payload, one rank's share
    assert edge == pytest.approx(2 * (world - 1) / world * summary["allreduce_payload_bytes_per_step"])
    for k in range(n):
        assert links[f"server{k}.nic0.tx"] == pytest.approx(edge)
        assert links[f"server{k}.gpu0.tx"] == pytest.approx(edge)        # local rank 0 -> 1: loopback
        assert f"server{k}.gpu1.tx" not in links                         # local rank 1 -> next server: the NIC
    setup = setup_bytes_leaving(lambda r: r // GPUS, world, summary["gradient_bytes"])
    rows = []
    for k, node in enumerate(stats["nodes"]):
        sent = tx_payload_estimate(node, header)
        model = links[f"server{k}.nic0.tx"] * FLAT_STEPS + setup.get(k, 0)
        rows.append((k, sent, model))
    report = "; ".join(f"node{k} eth0 {s:,} B vs model {m:,.0f} B ({pct(s, m)})" for k, s, m in rows)
    print(f"\n{n}x{GPUS} flat ring, {FLAT_STEPS} steps (header {header} B/frame): {report}")
    print(f"{n}x{GPUS} step time: measured p50 {summary['step_time_p50_s'] * 1e3:.1f} ms, model "
          f"{est.step_time_s * 1e3:.1f} ms at line rate, "
          f"{estimate(payload_rates(raw, stats['mtu'], header), summary).step_time_s * 1e3:.1f} ms at payload rate")
    for k, s, m in rows:
        assert s == pytest.approx(m, rel=0.03), report
        # Two edges' worth would be the node's ranks' sum: what crosses eth0 is one.
        assert s < 1.5 * edge * FLAT_STEPS + setup.get(k, 0), report


def test_flat_run_leaves_nothing_behind(flat):
    assert flat.returncode == 0
    assert flat.netstats["leaves"] == 1 and flat.netstats["uplinks"] == []
    assert_nothing_left(flat)
    assert flat.root_links_added == set()


def test_sampled_series_adds_up_to_the_counters(flat):
    """--sample-ms 10: a line per sample, every node's eth0, counters that only grow, at
    about the period asked for, and the last sample less the first equal to what
    netstats.json counted over the run (the sampler runs inside that window)."""
    if flat.nodes != 2:
        pytest.skip("the 2-node run samples its links")
    samples = [json.loads(line) for line in (flat.out / "linkstats.jsonl").read_text().splitlines()]
    assert len(samples) > 100
    names = [f"node{k}" for k in range(flat.nodes)]
    assert all(list(s["tx_bytes"]) == names for s in samples)
    ts = [s["t"] for s in samples]
    assert ts == sorted(ts)
    gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
    assert 0.008 < gaps[len(gaps) // 2] < 0.015, gaps[len(gaps) // 2]
    for k, name in enumerate(names):
        series = [s["tx_bytes"][name] for s in samples]
        assert series == sorted(series)
        node = flat.netstats["nodes"][k]
        assert series[-1] - series[0] == pytest.approx(node["tx_bytes"], rel=0.005)
        assert series[-1] - series[0] <= node["tx_bytes"]


# ---------------------------------------------------------------------------------------
# (b) two leaves of 2 nodes x 2 workers, uplinks at 2:1 and 4:1 against one node link
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["50mbit", "25mbit"])
def leafy(request, tmp_path_factory):
    rate = request.param
    before = root_links()
    run = run_cluster(4, tmp_path_factory.mktemp(f"leaves-{rate}"), *TRAIN, "--max-steps", str(LEAF_STEPS),
                      extra=("--nproc-per-node", str(GPUS), "--leaves", "2", "--link-rate", "100mbit",
                             "--uplink-rate", rate))
    run.rate = rate
    run.root_links_added = root_links() - before
    print(f"\n4 nodes x {GPUS} on 2 leaves, uplinks {rate}: {run.seconds:.1f} s\n{run.stdout}")
    return run


def leaf_topology(run) -> dict:
    return netns_topology("netns-2leaf-4x2.toml", **{"switch.uplink_rate": run.rate})


def step_figures(run):
    summary = summary_of(run)
    stats = run.netstats
    header = header_bytes_per_packet(stats)
    line = estimate(leaf_topology(run), summary)
    est = estimate(payload_rates(leaf_topology(run), stats["mtu"], header), summary)
    measured = summary["step_time_p50_s"]
    print(f"\nuplinks {run.rate}: bottleneck {est.bottleneck_link} (busy {est.bottleneck_busy_s * 1e3:.1f} ms); "
          f"step p50 measured {measured * 1e3:.1f} ms (compute {compute_s(summary) * 1e3:.1f} ms, exposed "
          f"{summary['exposed_comm_time_per_step_s'] * 1e3:.1f} ms); model {est.step_time_s * 1e3:.1f} ms at "
          f"payload rate ({pct(est.step_time_s, measured)}), {line.step_time_s * 1e3:.1f} ms at line rate "
          f"({pct(line.step_time_s, measured)})")
    return line, est, measured


def test_uplink_is_the_bottleneck_and_the_step_time_is_within_10_percent(leafy):
    """The model names an uplink as the bottleneck, and its step time (compute from the
    run's own summary, the links at the rate their payload gets) is within 10 % of the
    measured p50 (issue 28, "Must show" 2).

    It comes out short (6-7 % in the recorded runs, docs/topology.md "Measured on
    namespaces"): Gloo's ring keeps two segments in flight per rank and a sender waits for
    its receiver's ready message, which crosses the same shaped uplink the opposite ring
    edge fills, behind that edge's queue (the shaper on a switch port holds a queue; the
    one on a node's own eth0 is kept short by TCP small queues, which is why the flat runs
    match closely), so the uplink idles between segments; and the ACKs of the opposite
    edge share it (about 2 %). At line rate, not payload rate, it is 10-11 % short."""
    line, est, measured = step_figures(leafy)
    for e in (line, est):
        assert e.bottleneck_link.startswith("leaf"), e.bottleneck_link
    assert est.step_time_s == pytest.approx(measured, rel=0.10)
    assert est.step_time_s <= 1.03 * measured          # a lower bound: nothing the model leaves out is free


def test_uplink_bytes_match_the_model(leafy):
    """Each uplink's kernel TX payload, both ends (the leaf end sends up, the spine end
    down), against the model's leaf{j}.up / leaf{j}.down bytes for the steps plus the
    start-up broadcast's messages between the leaves; each node's eth0 as in (a)."""
    summary = summary_of(leafy)
    stats = leafy.netstats
    header = header_bytes_per_packet(stats)
    assert stats["leaves"] == 2 and [n["leaf"] for n in stats["nodes"]] == [0, 0, 1, 1]
    world, per_leaf = 4 * GPUS, 2 * GPUS
    links = dict(estimate(leaf_topology(leafy), summary).link_bytes_per_step)
    p = summary["gradient_bytes"]
    up_setup = setup_bytes_leaving(lambda r: r // per_leaf, world, p)
    rows = []
    for j, u in enumerate(stats["uplinks"]):
        assert u["leaf"] == j
        # What one end sends the other receives (a veth pair loses nothing), to the frame:
        # the script reads the two ends' counters one after the other, and a late frame
        # (a TCP ACK or FIN of the job's last connections, 54-66 B) can land between.
        frame = stats["mtu"] + 14
        assert abs(u["tx_bytes"] - u["spine_rx_bytes"]) <= frame, u
        assert abs(u["spine_tx_bytes"] - u["rx_bytes"]) <= frame, u
        assert u["qdisc"]["kind"] == "tbf" and u["spine_qdisc"]["kind"] == "tbf"
        # Frames stay frames across the bridges: never more than MTU + Ethernet header.
        assert u["tx_bytes"] / u["tx_packets"] <= stats["mtu"] + 14
        up = u["tx_bytes"] - u["tx_packets"] * header
        down = u["spine_tx_bytes"] - u["spine_tx_packets"] * header
        # Down into leaf j: what the other leaf sends up.
        rows.append((f"leaf{j}.up", up, links[f"leaf{j}.up"] * LEAF_STEPS + up_setup.get(j, 0)))
        rows.append((f"leaf{j}.down", down, links[f"leaf{j}.down"] * LEAF_STEPS + up_setup.get(1 - j, 0)))
    node_setup = setup_bytes_leaving(lambda r: r // GPUS, world, p)
    for k, node in enumerate(stats["nodes"]):
        rows.append((f"node{k}.eth0", tx_payload_estimate(node, header),
                     links[f"server{k}.nic0.tx"] * LEAF_STEPS + node_setup.get(k, 0)))
    report = "; ".join(f"{name} {s:,} B vs model {m:,.0f} B ({pct(s, m)})" for name, s, m in rows)
    print(f"\nuplinks {leafy.rate}, {LEAF_STEPS} steps: {report}")
    for name, s, m in rows:
        assert s == pytest.approx(m, rel=0.03), report


def test_two_tier_run_leaves_nothing_behind(leafy):
    assert leafy.returncode == 0
    assert_nothing_left(leafy)
    assert leafy.root_links_added == set()


# ---------------------------------------------------------------------------------------
# (c) 2 nodes x 2 workers, hierarchical against flat: what crosses eth0, and the step time
# ---------------------------------------------------------------------------------------

HIER_STEPS = 30
# 25 Mbit/s, not the 100 of the other checks: the in-node phases lose 8-15 ms a step to
# this host (4 workers on 2 cores finish backward apart; docs/topology.md), a straggler
# the model does not have. At 100 Mbit/s that is 6 points of a 27-point change; here the
# node links' share of the step is 4x and the change is measured, not the host's skew.
HIER_RATE = "25mbit"


@pytest.fixture(scope="module")
def hier_pair(tmp_path_factory):
    """The same 2 x 2 job at HIER_RATE twice, flat and --all-reduce hierarchical."""
    runs = {}
    for algo in ("flat", "hierarchical"):
        before = root_links()
        run = run_cluster(2, tmp_path_factory.mktemp(f"algo-{algo}"), *TRAIN, "--max-steps", str(HIER_STEPS),
                          "--all-reduce", algo, extra=("--nproc-per-node", str(GPUS), "--link-rate", HIER_RATE))
        run.root_links_added = root_links() - before
        print(f"\n2 nodes x {GPUS}, --all-reduce {algo}: {run.seconds:.1f} s\n{run.stdout}")
        runs[algo] = run
    return runs


def test_hierarchical_sends_what_the_model_says_across_servers(hier_pair):
    """Hierarchical: each node's eth0 carries its G ranks' all-reduces of one 1/G chunk
    across the servers, 2(n-1)/n x S/G each, so the node sends S a step here against the
    flat ring's 1.5 S (one ring edge per server, 2(N-1)/N x S). Each node's eth0 TX
    payload within 3 % of topology.hierarchical's server{k}.nic0.tx plus the start-up
    broadcast's messages that leave the node (issue 28, "Must show" 3)."""
    h, f = summary_of(hier_pair["hierarchical"]), summary_of(hier_pair["flat"])
    assert h["config"]["all_reduce"] == "hierarchical" and f["config"]["all_reduce"] == "flat"
    world, payload = 2 * GPUS, h["allreduce_payload_bytes_per_step"]
    assert payload == f["allreduce_payload_bytes_per_step"]
    # The rank's own wire bytes: the two in-node phases and its share across.
    assert h["allreduce_wire_bytes_per_step"] == pytest.approx(2 * (GPUS - 1) / GPUS * payload + payload / GPUS)
    setup = setup_bytes_leaving(lambda r: r // GPUS, world, h["gradient_bytes"])
    rows = []
    for algo, run, summary in (("hierarchical", hier_pair["hierarchical"], h), ("flat", hier_pair["flat"], f)):
        stats = run.netstats
        header = header_bytes_per_packet(stats)
        est = topology.estimate(topology.from_dict(netns_topology("netns-2x2.toml", **{"nic.rate": HIER_RATE})), LAYERS,
                                compute_s=compute_s(summary), bucket_mb=summary["bucket_mb"],
                                algorithm="hierarchical" if algo == "hierarchical" else "ring")
        links = dict(est.link_bytes_per_step)
        for k, node in enumerate(stats["nodes"]):
            rows.append((algo, k, tx_payload_estimate(node, header),
                         links[f"server{k}.nic0.tx"] * HIER_STEPS + setup.get(k, 0), links[f"server{k}.nic0.tx"]))
    report = "; ".join(f"{a} node{k} eth0 {s:,} B vs model {m:,.0f} B ({pct(s, m)})" for a, k, s, m, _ in rows)
    print(f"\n2x{GPUS}, {HIER_STEPS} steps: {report}")
    for algo, k, sent, model, per_step in rows:
        assert sent == pytest.approx(model, rel=0.03), report
        assert per_step == pytest.approx(payload if algo == "hierarchical" else 1.5 * payload)


def test_hierarchical_step_time_change_is_predicted_within_10_percent(hier_pair):
    """With the node links setting the pace, hierarchical moves 2/3 of the flat ring's
    bytes across them. The model predicts the step time of each run (compute from its own
    summary, the links at the rate their TCP payload gets) within 10 %, the ratio of the
    two within 10 % (issue 28, "Must show" 3). The change itself (hierarchical / flat - 1)
    is printed beside the model's: at 25 Mbit/s it came within 4.6-14 % of its size in
    four runs (docs/topology.md); one run's TCP share between the two rails moves the
    hierarchical step 2-6 %, which the change, a difference, magnifies 3x, so that is
    reported, not asserted."""
    figures = {}
    for algo in ("flat", "hierarchical"):
        run = hier_pair[algo]
        summary = summary_of(run)
        header = header_bytes_per_packet(run.netstats)
        raw = payload_rates(netns_topology("netns-2x2.toml", **{"nic.rate": HIER_RATE}), run.netstats["mtu"], header)
        est = topology.estimate(topology.from_dict(raw), LAYERS, compute_s=compute_s(summary),
                                bucket_mb=summary["bucket_mb"], algorithm="ring" if algo == "flat" else algo)
        figures[algo] = (summary["step_time_p50_s"], est.step_time_s, est.bottleneck_link)
    (mf, pf, bf), (mh, ph, bh) = figures["flat"], figures["hierarchical"]
    change_m, change_p = mh / mf - 1, ph / pf - 1
    print(f"\n2x{GPUS} at {HIER_RATE}: flat p50 {mf * 1e3:.1f} ms vs model {pf * 1e3:.1f} ms ({pct(pf, mf)}), "
          f"bottleneck {bf}; hierarchical p50 {mh * 1e3:.1f} ms vs model {ph * 1e3:.1f} ms ({pct(ph, mh)}), "
          f"bottleneck {bh}; ratio hierarchical/flat measured {mh / mf:.3f}, model {ph / pf:.3f} "
          f"({pct(ph / pf, mh / mf)}); change measured {change_m:+.1%}, model {change_p:+.1%} "
          f"({pct(change_p, change_m)} of the change)")
    assert ".nic" in bf and ".nic" in bh
    assert pf == pytest.approx(mf, rel=0.10) and ph == pytest.approx(mh, rel=0.10)
    assert ph / pf == pytest.approx(mh / mf, rel=0.10)
    assert mh < 0.85 * mf                        # what the model says it buys: a third of the bytes


def test_hierarchical_runs_leave_nothing_behind(hier_pair):
    for run in hier_pair.values():
        assert run.returncode == 0
        assert_nothing_left(run)
        assert run.root_links_added == set()


# ---------------------------------------------------------------------------------------
# a two-tier run stopped mid-way, and usage errors
# ---------------------------------------------------------------------------------------

def test_sigterm_removes_leaves_spine_and_sampler(tmp_path):
    """Leaves, spine, uplink qdiscs and the sampler all go when the script is stopped
    while the nodes run."""
    before_ns, before_links, before_etc = netns_names(), root_links(), etc_netns()
    out = tmp_path / "run"
    log = open(tmp_path / "script.log", "w")
    cmd = [str(SCRIPT), "--nodes", "4", "--leaves", "2", "--link-rate", "100mbit", "--uplink-rate", "50mbit",
           "--sample-ms", "10", "--out", str(out), "--", "--max-steps", "100000", "--metrics-port", "0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tag = f"ddpfnn-{proc.pid}-"
    try:
        ours = lambda: {ns for ns in netns_names() if ns.startswith(tag)}   # noqa: E731
        wait_for(lambda: ours() == {f"{tag}{x}" for x in ("0", "1", "2", "3", "leaf0", "leaf1", "spine")}, 60,
                 "the 4 node, 2 leaf and spine namespaces", proc)
        # The sampler is running once it has written a few samples.
        jsonl = out / "linkstats.jsonl"
        wait_for(lambda: jsonl.exists() and jsonl.read_text().count("\n") >= 5, 60, "samples", proc)
        qdisc = subprocess.run(["ip", "netns", "exec", f"{tag}spine", "tc", "qdisc", "show", "dev", "l1"],
                               capture_output=True, text=True).stdout
        assert "tbf" in qdisc and "50Mbit" in qdisc, qdisc
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
    finally:
        stop(proc)
        log.close()
    assert code == 128 + signal.SIGTERM.value, (tmp_path / "script.log").read_text()
    sample = json.loads(jsonl.read_text().splitlines()[0])
    assert list(sample["tx_bytes"]) == ["node0", "node1", "node2", "node3",
                                        "leaf0.up", "leaf0.down", "leaf1.up", "leaf1.down"]
    assert not processes_mentioning(str(out)), processes_mentioning(str(out))
    assert not processes_mentioning("linkstats.py sample")
    assert netns_names() - before_ns == set()
    assert root_links() - before_links == set()
    assert etc_netns() - before_etc == set()


@pytest.mark.parametrize("args, message", [
    (["--nodes", "4", "--leaves", "3"], "--leaves 3 must divide --nodes 4"),
    (["--nodes", "4", "--leaves", "0"], "--leaves must be a positive integer, got '0'"),
    (["--nodes", "4", "--uplink-rate", "50mbit"], "--uplink-rate shapes the leaves' uplinks to the spine: it needs --leaves 2"),
    (["--nodes", "4", "--leaves", "2", "--uplink-rate", "fast"], "--uplink-rate must be a tc rate like 1gbit or 50mbit, got 'fast'"),
    (["--nodes", "2", "--sample-ms", "0"], "--sample-ms must be a positive integer (milliseconds), got '0'"),
    (["--nodes", "2", "--sample-ms", "1.5"], "--sample-ms must be a positive integer"),
])
def test_usage_errors_are_one_line(args, message):
    r = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"netns-cluster.sh: error: {message}"), r.stderr


def test_plot_draws_a_sampled_series(tmp_path):
    """linkstats plot on a small hand-written series (the drawing only: no cluster)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "linkstats.jsonl"
    t0 = time.time()
    lines = [{"t": t0 + i * 0.01, "tx_bytes": {"node0": 1000 * i, "leaf0.up": 500 * i}} for i in range(50)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    from ddp_fnn.cluster import linkstats
    png = tmp_path / "out.png"
    assert linkstats.main(["plot", str(path), str(png), "--from", "0.1"]) == 0
    assert png.stat().st_size > 1000
    path.write_text(json.dumps(lines[0]) + "\n")
    assert linkstats.main(["plot", str(path), str(png)]) == 2


def test_gloo_broadcast_tree():
    # gloo/broadcast.cc at 8 ranks, root 0 (hand-traced): 0->1; 0->2, 1->3; 0->4, 1->5, 2->6, 3->7.
    gloo_broadcast_sends = topology.gloo_broadcast_sends
    assert gloo_broadcast_sends(8) == [(0, 1), (0, 2), (1, 3), (0, 4), (1, 5), (2, 6), (3, 7)]
    assert gloo_broadcast_sends(3) == [(0, 1), (0, 2)]
    # 2 nodes x 2: node0 (ranks 0, 1) sends 0->2, 1->3 off the node.
    assert setup_bytes_leaving(lambda r: r // 2, 4, 10) == {0: 20}
