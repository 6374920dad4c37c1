"""The two-tier fabric model: hand-computed link loads on small fabrics, max-min sharing,
NCCL's tree shapes, the loader's one-line errors, the example files, and the step
estimate's agreement with netmodel. Pure arithmetic: no processes, no torch."""

import json
import math
from pathlib import Path

import pytest

from ddp_fnn.perfmodel import netmodel
from ddp_fnn.perfmodel import topology as T

REPO = Path(__file__).resolve().parents[1]
TOPOLOGIES = REPO / "deploy" / "topologies"
tomllib = T.tomllib                 # tomllib, or tomli on Python 3.10
EXAMPLES = sorted((REPO / "deploy" / "topologies").glob("*.toml"))
GBIT = 1e9 / 8


def fabric(servers, gpus, *, nics=1, per_leaf=None, oversub=1, rail=False, intra="100gbit", nic="10gbit",
           intra_us=1.0, nic_us=10.0, uplink=None):
    switch = {"servers_per_leaf": per_leaf or servers, "rail_optimized": rail}
    if uplink:
        switch["uplink_rate"] = uplink
    else:
        switch["oversubscription"] = oversub
    return T.from_dict({"name": "t", "servers": servers, "gpus_per_server": gpus,
                        "intra": {"kind": "loopback", "rate": intra, "latency_us": intra_us},
                        "nic": {"count": nics, "rate": nic, "latency_us": nic_us}, "switch": switch})


def loads(topo, algorithm, channels=None):
    return T.collective(topo, algorithm, channels).link_bytes_per_payload_byte()


# ---------------------------------------------------------------------------------------
# flat ring
# ---------------------------------------------------------------------------------------

def test_ring_2x2_crosses_servers_on_the_two_wrap_edges():
    topo = fabric(2, 2)
    coll = T.collective(topo, "ring", 1)
    # Edges in rank order: 0->1 and 2->3 stay inside; 1->2 and 3->0 cross.
    assert coll.phases[0].flows == (
        ("server0.gpu0.tx", "server0.gpu1.rx"),
        ("server0.nic0.tx", "server1.nic0.rx"),
        ("server1.gpu0.tx", "server1.gpu1.rx"),
        ("server1.nic0.tx", "server0.nic0.rx"),
    )
    per_edge = 2 * 3 / 4                                     # 2(N-1)/N, N = 4
    got = loads(topo, "ring", 1)
    for link in ("server0.nic0.tx", "server0.nic0.rx", "server1.nic0.tx", "server1.nic0.rx",
                 "server0.gpu0.tx", "server0.gpu1.rx", "server1.gpu0.tx", "server1.gpu1.rx"):
        assert got[link] == per_edge
    assert "server0.gpu1.tx" not in got                      # GPU 1's out-edge is the NIC's
    # One flow per link: each runs at its link's rate; the 10 Gbit/s NIC decides.
    # Latency: 2(N-1) = 6 hops at the mean of 2 x 1 us and 2 x 10 us.
    assert coll.time_s(1e6) == pytest.approx(6 * 5.5e-6 + 1.5e6 / (10 * GBIT))


def test_ring_2x4_bytes_per_nic_and_per_intra_link():
    topo = fabric(2, 4)
    got = loads(topo, "ring", 1)
    per_edge = 2 * 7 / 8
    for s in (0, 1):                                         # 3->4 leaves server 0, 7->0 server 1
        assert got[f"server{s}.nic0.tx"] == per_edge and got[f"server{s}.nic0.rx"] == per_edge
    intra_tx = [k for k in got if ".gpu" in k and k.endswith(".tx")]
    assert len(intra_tx) == 6 and all(got[k] == per_edge for k in intra_tx)


def test_ring_channels_spread_the_crossings_over_the_rails():
    topo = fabric(2, 4, nics=2)
    got = loads(topo, "ring", 2)
    per_edge = 2 * 7 / 8 / 2
    for s in (0, 1):
        for r in (0, 1):
            assert got[f"server{s}.nic{r}.tx"] == per_edge


# ---------------------------------------------------------------------------------------
# hierarchical and tree
# ---------------------------------------------------------------------------------------

def test_hierarchical_sends_fewer_bytes_between_servers_than_the_flat_ring():
    topo = fabric(2, 4)
    flat = loads(topo, "ring", 1)["server0.nic0.tx"]
    hier = loads(topo, "hierarchical")["server0.nic0.tx"]
    assert flat == 2 * 7 / 8                                 # 2(N-1)/N, N = 8
    # 4 rail rings of 2 servers, S/4 each, all through the one NIC: 4 * 2(2-1)/2 * S/4 = S.
    assert hier == pytest.approx(1.0)
    coll = T.collective(topo, "hierarchical")
    across = coll.phases[1]
    assert len(across.flows) == 8
    assert all(r == pytest.approx(10 * GBIT / 4) for r in across.rates_bytes_per_second)   # 4 share a NIC
    # reduce-scatter and all-gather: (G-1)/G per intra edge, at the intra rate.
    assert coll.phases[0].seconds_per_payload_byte == pytest.approx(3 / 4 / (100 * GBIT))
    assert across.seconds_per_payload_byte == pytest.approx(1 / (10 * GBIT))


def test_hierarchical_puts_rail_g_on_nic_g():
    topo = fabric(2, 4, nics=4)
    got = loads(topo, "hierarchical")
    for r in range(4):
        assert got[f"server0.nic{r}.tx"] == pytest.approx(2 * 1 / 2 / 4)


def test_nccl_binary_tree_shapes():
    # src/graph/trees.cc's pictures for 12 ranks: 0 -> 8 -> {4, 10}, 4 -> {2, 6}, ...
    first, second = T.double_binary_tree(12)
    assert first[8] == 0 and first[4] == 8 and first[10] == 8 and first[2] == 4 and first[6] == 4
    assert [first[r] for r in (1, 3, 5, 7, 9, 11)] == [2, 2, 6, 6, 10, 10]
    assert second[11] == -1 and second[3] == 11               # the mirror: 3 --- 11
    # 13 ranks (odd): the second tree is the first shifted by one, rooted at 1.
    first, second = T.double_binary_tree(13)
    assert first[12] == 8 and second[1] == -1 and second[9] == 1
    for parents in T.double_binary_tree(13):
        assert sum(p < 0 for p in parents) == 1               # one root, a tree


def test_tree_two_servers_sends_s_per_nic_each_way():
    topo = fabric(2, 1)
    got = loads(topo, "tree", 1)
    # Each tree carries S/2 up and S/2 down; over two trees each NIC sends S and receives S.
    assert got["server0.nic0.tx"] == 1.0 and got["server1.nic0.rx"] == 1.0


# ---------------------------------------------------------------------------------------
# leaves, uplinks and max-min sharing
# ---------------------------------------------------------------------------------------

def test_max_min_fair_shares_by_progressive_filling():
    cap = {"A": 10.0, "B": 4.0}
    # f0 only on A, f1 on A and B, f2 only on B: B splits 2/2, f0 takes what A has left.
    assert T.max_min_rates([("A",), ("A", "B"), ("B",)], cap) == pytest.approx([8.0, 2.0, 2.0])
    assert T.max_min_rates([], cap) == []


def test_an_oversubscribed_uplink_becomes_the_bottleneck():
    # 4 servers x 2 GPUs, 2 NICs each, 2 servers per leaf, uplinks 4:1:
    # leaf downlink 2 servers x 2 NICs x 10 Gbit/s = 40 Gbit/s, uplink 10 Gbit/s.
    topo = fabric(4, 2, nics=2, per_leaf=2, oversub=4)
    assert topo.uplink_bytes_per_second == pytest.approx(10 * GBIT)
    coll = T.collective(topo, "ring", 2)
    phase = coll.phases[0]
    # Server 1 -> server 2 crosses leaf0.up, once per channel (NIC 0 and NIC 1): 2 flows share it.
    on_up = [i for i, f in enumerate(phase.flows) if "leaf0.up" in f]
    assert len(on_up) == 2
    assert all(phase.rates_bytes_per_second[i] == pytest.approx(5 * GBIT) for i in on_up)
    same_leaf = [i for i, f in enumerate(phase.flows) if f == ("server0.nic0.tx", "server1.nic0.rx")]
    assert phase.rates_bytes_per_second[same_leaf[0]] == pytest.approx(10 * GBIT)
    per_edge = 2 * 7 / 8 / 2
    assert phase.seconds_per_payload_byte == pytest.approx(per_edge / (5 * GBIT))
    est = T.estimate(topo, [64, 64], compute_s=0.0, bucket_mb=100, algorithm="ring", channels=2)
    assert est.bottleneck_link in ("leaf0.up", "leaf0.down", "leaf1.up", "leaf1.down")


def test_the_same_fabric_one_to_one_is_nic_bound():
    topo = fabric(4, 2, nics=2, per_leaf=2, oversub=1)
    phase = T.collective(topo, "ring", 2).phases[0]
    assert min(phase.rates_bytes_per_second) == pytest.approx(10 * GBIT)


def test_rail_optimized_leaves_are_one_per_rail_per_group():
    topo = fabric(4, 2, nics=2, per_leaf=2, rail=True)
    assert topo.leaves == 4
    assert [topo.leaf_of(s, r) for s in range(4) for r in range(2)] == [0, 1, 0, 1, 2, 3, 2, 3]
    links, _ = T.path(topo, 1, 2, nic=1)                     # server 0 -> server 1, same group, rail 1
    assert links == ("server0.nic1.tx", "server1.nic1.rx")
    links, _ = T.path(topo, 3, 4, nic=1)                     # server 1 -> server 2: other group
    assert links == ("server1.nic1.tx", "leaf1.up", "leaf3.down", "server2.nic1.rx")


# ---------------------------------------------------------------------------------------
# busbw and the step estimate
# ---------------------------------------------------------------------------------------

def test_busbw_of_one_nvlink_server_approaches_the_links_payload_rate():
    """NVLink4 at NCCL's own 20.6 of 25 GB/s a link (efficiency 0.824): the ring's busbw
    at a large size is the GPU's payload rate, 0.824 x 450 GB/s."""
    topo = T.load(REPO / "deploy" / "topologies" / "dgx-h100.toml")
    assert topo.intra_bytes_per_second == pytest.approx(0.824 * 450e9)
    assert T.busbw(topo, 16 * 2 ** 30, "ring") == pytest.approx(0.824 * 450e9, rel=0.01)
    assert T.busbw(topo, 1024, "ring") < 1e9                  # latency-bound at small sizes


def test_busbw_of_one_h100_server_is_within_15_percent_of_published_ring_runs():
    """dgx-h100.toml as written against nccl-tests all_reduce_perf with NCCL_ALGO=RING on
    one 8 x H100 SXM server: 365-370 GB/s at 2-4 GB (NVIDIA/nccl issue 1455) and NVIDIA's
    "effective NVLink bandwidth of 370GB/s" with ring (NVIDIA/nccl-tests issue 212).
    Without NCCL's NVLink payload rate (the same links at their line rate) it is 21 % above them."""
    topo = T.load(TOPOLOGIES / "dgx-h100.toml")
    model = T.busbw(topo, 4 * 2 ** 30, "ring")
    for published in (365e9, 370e9):
        assert abs(model - published) / published < 0.15
    raw = tomllib.loads((TOPOLOGIES / "dgx-h100.toml").read_text())
    raw["intra"]["kind"] = "loopback"              # a kind whose links keep their line rate
    assert T.busbw(T.from_dict(raw), 4 * 2 ** 30, "ring") / 370e9 - 1 > 0.15


@pytest.mark.parametrize("value", [0, 1.5, -0.2, "0.8", True])
def test_an_efficiency_outside_0_to_1_is_refused_naming_it(value):
    raw = tomllib.loads((TOPOLOGIES / "netns-2x2.toml").read_text())
    raw["intra"]["efficiency"] = value
    with pytest.raises(ValueError, match=r"intra\.efficiency must be a number in \(0, 1\]"):
        T.from_dict(raw)


@pytest.mark.parametrize("key", T.TUNING_KEYS)
def test_a_gpu_fabric_file_with_a_tuning_constant_is_refused_naming_the_key(key):
    """GPU fabric files describe hardware only; latencies and payload efficiencies are the
    model's (NCCL's hwLat and SM90_NVLINK_BW, perfmodel/nccl.py): an old file that still
    carries one is refused with one line naming it."""
    raw = tomllib.loads((TOPOLOGIES / "h100-2x8-400g.toml").read_text())
    section, name = key.split(".")
    raw.setdefault(section, {})[name] = 1.0
    with pytest.raises(ValueError) as e:
        T.from_dict(raw)
    assert str(e.value).startswith(f"topology: {key} is a tuning constant, not hardware") and "\n" not in str(e.value)


def test_a_gpu_fabric_takes_nccls_latencies():
    """NVLink hop: hwLat[NVLINK][Ring][Simple] 3.4 us; network hop: hwLat[NET][Ring][Simple] 14 us."""
    topo = T.load(TOPOLOGIES / "h100-2x8-400g.toml")
    assert topo.intra_latency_s == pytest.approx(3.4e-6) and topo.nic_latency_s == pytest.approx(14.0e-6)
    assert topo.switch_latency_s == 0.0


def test_busbw_of_16_h100_servers_is_within_15_percent_of_a_published_16_node_run():
    """h100-16x8-400g.toml as written (line rates, NCCL's NVLink payload rate and latencies,
    nothing fitted)
    against a published 16-node nccl-tests all_reduce_perf run: 16 x p5.48xlarge (8 x H100,
    32 x 100 Gbit/s EFA = 3,200 Gbit/s per node, the same per-node rate as 8 x 400 Gbit/s),
    128 GPUs, busbw 356.27 GB/s out of place (353.92 in place) at 8192 MB (-e 8192M, 8 GiB),
    NCCL's algorithm not stated (aws-ofi-nccl tuner plugin): crazyguitar/aws-gpu-communication-
    benchmark, data/nccl_all_reduce.csv, commit 4fdb5a4fab8b2e173e2c7e87d9faddd9f54ddfea
    (https://github.com/crazyguitar/aws-gpu-communication-benchmark). The model gives 361.4
    GB/s, +1.4 % (NCCL's hop latencies, 3.4 us NVLink and 14 us network, since the files carry
    no latency); docs/topology.md has the table."""
    topo = T.load(TOPOLOGIES / "h100-16x8-400g.toml")
    assert topo.world_size == 128
    published = 356.27e9
    model = T.busbw(topo, 8 * 2 ** 30, "ring")
    assert abs(model - published) / published < 0.15
    assert model == pytest.approx(361.4e9, rel=0.001)           # the figure the docs quote


def test_busbw_is_netmodels_busbw_of_the_collective_time():
    topo = fabric(2, 4)
    s = 2 ** 28
    t = T.collective(topo, "ring", 1).time_s(s)
    assert T.busbw(topo, s, "ring", 1) == pytest.approx(s / t * 2 * 7 / 8)


def test_estimate_replays_netmodel_with_the_fabrics_time():
    topo = fabric(2, 2)
    widths = [1024, 1024, 10]
    est = T.estimate(topo, widths, compute_s=0.0, bucket_mb=1000, algorithm="ring", channels=1)
    payload = netmodel.parameter_bytes(widths)
    assert est.step.payload_bytes_per_step == payload
    assert est.comm_time_s == pytest.approx(T.collective(topo, "ring", 1).time_s(payload))
    assert est.exposed_s == pytest.approx(est.comm_time_s)   # one bucket, no compute to hide in
    tiers = est.tier_bytes_per_step
    assert tiers["nic"] == pytest.approx(2 * 1.5 * payload)  # two crossing edges, 2(N-1)/N each
    assert tiers["intra"] == pytest.approx(2 * 1.5 * payload)
    assert tiers["uplink"] == 0
    assert est.bottleneck_link.startswith("server") and ".nic0." in est.bottleneck_link
    assert est.bottleneck_bytes_per_step == pytest.approx(1.5 * payload)
    assert est.duty_cycle == pytest.approx(1.0)
    assert est.burst_bytes_per_second == pytest.approx(1.5 * payload / est.comm_time_s)
    assert 0 < est.bottleneck_utilisation <= 1


def test_compression_halves_every_links_bytes():
    topo = fabric(2, 2)
    a = T.estimate(topo, [256, 256], compute_s=0.01, algorithm="tree")
    b = T.estimate(topo, [256, 256], compute_s=0.01, algorithm="tree", compression="bf16")
    assert {k: v / 2 for k, v in a.link_bytes_per_step} == pytest.approx(dict(b.link_bytes_per_step))


def test_one_server_one_gpu_costs_nothing_and_is_strict_json():
    topo = T.from_dict({"servers": 1, "gpus_per_server": 1, "intra": {"rate": "450GB/s"}})
    est = T.estimate(topo, [8, 8], compute_s=0.001)
    assert est.comm_time_s == 0 and est.bottleneck_link == "" and est.step_time_s == 0.001
    json.dumps(est.to_dict(), allow_nan=False)
    assert any("none" in line for line in T.format_estimate(est))


@pytest.mark.parametrize("algorithm", T.ALGORITHMS)
def test_to_dict_is_strict_json_and_format_has_units(algorithm):
    topo = fabric(4, 2, nics=2, per_leaf=2, oversub=2)
    est = T.estimate(topo, [512, 512, 10], compute_s=0.02, bucket_mb=0.5, algorithm=algorithm)
    d = json.loads(json.dumps(est.to_dict(), allow_nan=False))
    assert d["algorithm"] == algorithm and d["bottleneck"]["link"] == est.bottleneck_link
    assert set(d["tier_bytes_per_step"]) == {"intra", "nic", "uplink"}
    text = "\n".join(T.format_estimate(est))
    for word in ("bottleneck", "duty cycle", "Gbit/s", "exposed", "uplink/spine"):
        assert word in text


# ---------------------------------------------------------------------------------------
# the loader
# ---------------------------------------------------------------------------------------

BASE = {"servers": 16, "gpus_per_server": 8, "intra": {"rate": "450GB/s"},
        "nic": {"count": 8, "rate": "400gbit"}, "switch": {"servers_per_leaf": 4}}


def _with(path, value):
    raw = json.loads(json.dumps(BASE))
    *head, last = path.split(".")
    t = raw
    for k in head:
        t = t.setdefault(k, {})
    t[last] = value
    return raw


@pytest.mark.parametrize("path, value, message", [
    ("switch.servers_per_leaf", 3, "topology: switch.servers_per_leaf must divide servers (16), got 3"),
    ("nic.rate", "fast", "topology: nic.rate must be a rate such as"),
    ("intra.rate", "450 furlongs", "got '450 furlongs'"),
    ("servers", 0, "topology: servers must be an integer >= 1, got 0"),
    ("gpus_per_server", 2.5, "topology: gpus_per_server must be an integer >= 1, got 2.5"),
    ("switch.oversubscription", 0.5, "topology: switch.oversubscription must be a number >= 1"),
    ("switch.rail_optimized", "yes", "topology: switch.rail_optimized must be true or false, got 'yes'"),
    ("intra.kind", "infiniband", "topology: intra.kind must be one of nvlink, pcie, loopback, got 'infiniband'"),
    ("nic.latency_us", 6.6, "topology: nic.latency_us is a tuning constant, not hardware"),
    ("nic.rat", "400gbit", "topology: unknown key nic.rat"),
])
def test_bad_input_is_one_line_naming_key_and_value(path, value, message):
    with pytest.raises(ValueError) as e:
        T.from_dict(_with(path, value))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_nic_on_several_servers_is_named():
    raw = {k: v for k, v in BASE.items() if k != "nic"}
    with pytest.raises(ValueError, match=r"^topology: \[nic\] is missing$"):
        T.from_dict(raw)


def test_rate_spellings():
    assert T.parse_rate("k", "450GB/s") == 450e9
    assert T.parse_rate("k", "400Gbit/s") == 400e9 / 8 == T.parse_rate("k", "400Gb/s") == T.parse_rate("k", "400gbit")
    assert T.parse_rate("k", "100mbit") == 12.5e6


def test_load_json_and_toml_agree(tmp_path):
    j = tmp_path / "f.json"
    j.write_text(json.dumps(BASE))
    t = tmp_path / "f.toml"
    t.write_text('servers = 16\ngpus_per_server = 8\n[intra]\nrate = "450GB/s"\n'
                 '[nic]\ncount = 8\nrate = "400gbit"\n[switch]\nservers_per_leaf = 4\n')
    a, b = T.load(j), T.load(t)
    assert a == b and a.name == "f" and a.world_size == 128 and a.leaves == 4


def test_load_bad_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("servers = = 2\n")
    with pytest.raises(ValueError, match=r"^topology: .*bad.toml is not valid TOML"):
        T.load(bad)
    with pytest.raises(ValueError, match=r"^topology: cannot read"):
        T.load(tmp_path / "nope.toml")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_example_files_load_and_estimate(path):
    topo = T.load(path)
    assert topo.name == path.stem
    est = T.estimate(topo, [1024, 1024, 10], compute_s=0.01, algorithm="ring")
    json.dumps(est.to_dict(), allow_nan=False)


def test_the_examples_are_the_ones_documented():
    names = {p.name for p in EXAMPLES}
    assert {"dgx-h100.toml", "h100-2x8-400g.toml", "h100-16x8-400g.toml", "h100-128x8-400g-2to1.toml",
            "netns-2x2.toml", "netns-2leaf-4x2.toml"} <= names
    big = T.load(REPO / "deploy" / "topologies" / "h100-128x8-400g-2to1.toml")
    assert big.world_size == 1024 and big.oversubscription == 2
    two_leaf = T.load(REPO / "deploy" / "topologies" / "netns-2leaf-4x2.toml")
    assert two_leaf.uplink_bytes_per_second == 50e6 / 8 and two_leaf.leaves == 2
    assert math.isclose(two_leaf.oversubscription, 4.0)


# ---------------------------------------------------------------------------------------
# ddp-fnn estimate --topology
# ---------------------------------------------------------------------------------------

def _estimate(*args):
    from click.testing import CliRunner

    from ddp_fnn.cli import cli

    return CliRunner().invoke(cli, ["estimate", *args])


def test_cli_estimate_topology_json_is_the_model():
    """The CLI reports exactly what topology.estimate computes for the same file and inputs."""
    import json

    path = TOPOLOGIES / "h100-2x8-400g.toml"
    res = _estimate("--topology", str(path), "--layers", "1024,1024,10", "--compute-ms", "3",
                    "--algorithm", "hierarchical", "--json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    want = T.estimate(T.load(path), [1024, 1024, 10], compute_s=3e-3,
                             algorithm="hierarchical", bucket_mb=25.0).to_dict()
    assert got["bottleneck"]["link"] == want["bottleneck"]["link"]
    assert got["link_bytes_per_step"] == pytest.approx(want["link_bytes_per_step"])
    assert got["tier_bytes_per_step"] == pytest.approx(want["tier_bytes_per_step"])
    assert got["step_time_s"] == pytest.approx(want["step_time_s"])


def test_cli_estimate_topology_text_names_the_bottleneck():
    res = _estimate("--topology", str(TOPOLOGIES / "netns-2leaf-4x2.toml"), "--layers", "256,256,1",
                    "--compute-ms", "5")
    assert res.exit_code == 0, res.output
    assert "bottleneck   leaf" in res.output, res.output


@pytest.mark.parametrize("args, message", [
    (["--world-size", "4"], "--world-size 4: not with --topology"),
    (["--link-rate", "1gbit"], "--link-rate 1gbit: not with --topology"),
    (["--algorithm", "halving-doubling"], "--algorithm halving-doubling: with --topology, one of"),
    (["--channels", "0"], "--channels must be >= 1, got 0"),
])
def test_cli_estimate_topology_bad_input_is_one_line(args, message):
    res = _estimate("--topology", str(TOPOLOGIES / "netns-2x2.toml"), "--layers", "8,8", "--compute-ms", "1", *args)
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_cli_hierarchical_needs_a_topology():
    res = _estimate("--layers", "8,8", "--compute-ms", "1", "--world-size", "4", "--link-rate", "1gbit",
                    "--algorithm", "hierarchical")
    assert res.exit_code == 2 and "needs --topology" in res.output


def test_a_jobs_link_bytes_by_hand_on_2_x_2():
    """netns-2x2: payload P all-reduced in all, a probe of Q, a start-up broadcast of B.
    Ring of 4 in rank order: one edge a server crosses, 2(N-1)/N = 1.5 a payload byte;
    hierarchical: each of the 2 rail rings of 2 sends 2(n-1)/n x 1/G = 1/2, two of them a
    server; the probe always as the ring; Gloo's broadcast 0->1, 0->2, 1->3 sends 2
    copies from server 0 to server 1."""
    topo = T.load(TOPOLOGIES / "netns-2x2.toml")
    p, q, b = 1000.0, 100.0, 10
    ring = T.job_link_bytes(topo, p, "ring", q, b)
    assert ring["server0.nic0.tx"] == pytest.approx(1.5 * (p + q) + 2 * b)
    assert ring["server1.nic0.tx"] == pytest.approx(1.5 * (p + q))
    assert ring["server1.nic0.rx"] == pytest.approx(1.5 * (p + q) + 2 * b)
    hier = T.job_link_bytes(topo, p, "hierarchical", q, b)
    assert hier["server0.nic0.tx"] == pytest.approx(2 * 0.5 * p + 1.5 * q + 2 * b)
    assert not any(k.startswith("server0.gpu") for k in hier)      # NICs and uplinks only
    # Two leaves of 2 x 2 (netns-2leaf-4x2): the broadcast's 0->4, 1->5, 2->6, 3->7 cross up.
    leaves = T.job_link_bytes(T.load(TOPOLOGIES / "netns-2leaf-4x2.toml"), 0.0, "ring", 0.0, b)
    assert leaves["leaf0.up"] == 4 * b and leaves["leaf1.down"] == 4 * b
