"""`ddp-fnn sweep`: a grid of real jobs, each measured beside the model's prediction.

The settings checks run in-process (click's runner); the sweeps themselves are real
torchrun jobs on loopback and real namespace nodes (root), and every figure in sweep.csv
is checked against the job's own summary.json and step file, and the kernel's counters.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from conftest import run_cli
from ddp_fnn.perfmodel import netmodel
from ddp_fnn.perfmodel import predict
from ddp_fnn import sweep

TINY = ("--layers", "16,64,64,4", "--rows-per-rank", "8", "--steps", "6")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------
# settings: one line, exit status 2, nothing run
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (("--launcher", "loopback", "--link-rate", "1gbit"), "--link-rate needs --launcher netns"),
    (("--launcher", "loopback", "--loss", "0,1"), "--loss needs --launcher netns"),
    (("--nodes", "1,2"), "--nodes: every world size must be >= 2"),
    (("--nodes", "2,x"), "--nodes: bad value 'x'"),
    (("--nodes", "2,2"), "--nodes: a value is given twice"),
    (("--link-rate", "fast"), "--link-rate: bad value 'fast'"),
    (("--launcher", "netns", "--loss", "100"), "--loss must be a percentage in [0, 100), got 100"),
    (("--compression", "int8"), "--compression: bad value 'int8'"),
    (("--calibrate-on", "3"), "--calibrate-on 3 is not one of --nodes 2,4"),
    (("--launcher", "netns", "--queue-limit", "20000"), "--queue-limit needs a shaped --link-rate"),
    (("--steps", "2"), "--steps must be >= 3"),
    (("--bucket-mb", "0"), "--bucket-mb: every cap must be > 0"),
    (("--all-reduce", "tree"), "--all-reduce: bad value 'tree' (flat, hierarchical)"),
    (("--all-reduce", "hierarchical", "--compression", "fp16"), "--all-reduce hierarchical needs --compression none"),
    (("--topology", "deploy/topologies/netns-2x2.toml"), "--topology needs --launcher netns"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "sweep"
    res = run_cli("sweep", "--out", str(out), "--launcher", "loopback", *args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("ddp-fnn: error: "), res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists()                     # nothing ran, nothing written


def test_the_grid_is_every_combination_and_names_each_point():
    cfg = sweep.SweepConfig(out=None, nodes=(2, 3, 4), link_rates=(None, "1gbit", "200mbit"),
                            bucket_mbs=(100.0, 0.25), compressions=("none", "fp16"), repeat=2)
    points = cfg.points()
    assert len(points) == 2 * 3 * 3 * 2 * 2
    assert len({p.name for p in points}) == len(points)
    assert "n3-200mbit-b0.25-fp16-loss0-r1" in {p.name for p in points}
    assert cfg.train_argv(points[0])[cfg.train_argv(points[0]).index("--global-batch-size") + 1] == "64"


TOPOLOGIES = Path(__file__).resolve().parents[1] / "deploy" / "topologies"


def test_a_topology_sets_workers_a_node_leaves_and_uplinks_of_each_point():
    """netns-2leaf-4x2.toml: 2 workers a node, 2 nodes a leaf, uplinks at 50 Mbit/s. At 4
    nodes the cluster gets 2 leaves and the file's uplink rate; at 2 nodes one leaf (the
    point's nodes all fit on it). The global batch counts every worker."""
    cfg = sweep.SweepConfig(out=Path("/x"), nodes=(2, 4), link_rates=("100mbit",), launcher="netns",
                            all_reduces=("flat", "hierarchical"), topology=TOPOLOGIES / "netns-2leaf-4x2.toml",
                            rows_per_rank=8)
    points = {p.name: p for p in cfg.points()}
    assert set(points) == {"n2-100mbit-b25-none-loss0", "n2-100mbit-b25-none-loss0-hier",
                           "n4-100mbit-b25-none-loss0", "n4-100mbit-b25-none-loss0-hier"}
    four = points["n4-100mbit-b25-none-loss0-hier"]
    cmd = sweep.command(cfg, four, Path("/x/p"))
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--leaves") + 1] == "2" and cmd[cmd.index("--uplink-rate") + 1] == "50000000bit"
    argv = cfg.train_argv(four)
    assert argv[argv.index("--global-batch-size") + 1] == str(4 * 2 * 8)
    assert argv[argv.index("--all-reduce") + 1] == "hierarchical"
    assert "--leaves" not in sweep.command(cfg, points["n2-100mbit-b25-none-loss0"], Path("/x/p"))
    assert "--all-reduce" not in cfg.train_argv(points["n2-100mbit-b25-none-loss0"])
    assert cfg.compute_scale(4, 2) == 2.0                      # 8 workers on 2 cores against 4
    # With an oversubscription instead of a rate, the uplink follows the point's link rate.
    raw = sweep.SweepConfig(out=None, topology=TOPOLOGIES / "netns-2x2.toml", nodes=(4,), launcher="netns")
    assert raw.fabric(sweep.Point(4, "100mbit", 25.0, "none", 0.0, None)).uplink_bytes_per_second == 2 * 100e6 / 8


def test_the_compute_scale_is_the_share_of_the_hosts_cores():
    cfg = sweep.SweepConfig(out=None, host_cores=2)
    assert [cfg.compute_scale(n, 2) for n in (2, 3, 4)] == [1.0, 1.5, 2.0]
    assert sweep.SweepConfig(out=None, host_cores=8).compute_scale(4, 2) == 1.0


# ---------------------------------------------------------------------------------------
# a real sweep on loopback
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "out"
    args = ("sweep", "--out", str(out), "--launcher", "loopback", "--nodes", "2,3", "--bucket-mb", "25,0.001",
            *TINY)
    res = run_cli(*args, timeout=600)
    return out, args, res


@pytest.mark.slow
def test_a_loopback_sweep_writes_a_row_per_point_from_the_jobs_own_figures(loopback):
    out, _, res = loopback
    assert res.returncode == 0, res.stderr + res.stdout
    rows = read_csv(out / "sweep.csv")
    assert [r["point"] for r in rows] == ["n2-unshaped-b25-none-loss0", "n2-unshaped-b0.001-none-loss0",
                                          "n3-unshaped-b25-none-loss0", "n3-unshaped-b0.001-none-loss0"]
    assert list(rows[0]) == list(sweep.COLUMNS)
    for r in rows:
        assert r["status"] == "ok"
        summary = json.loads((out / "points" / r["point"] / "node0" / "summary.json").read_text())
        assert summary["world_size"] == int(r["nodes"]) and summary["steps"] == 6
        assert summary["global_batch_size"] == 8 * int(r["nodes"])
        # The measured columns are the job's own figures (6 significant digits in the CSV).
        for col, key in (("step_mean_s", "step_time_mean_s"), ("exposed_s", "exposed_comm_time_per_step_s"),
                         ("pred_step_s", "predicted_step_time_s"), ("busbw_bytes_per_second", "busbw_bytes_per_second")):
            assert float(r[col]) == pytest.approx(summary[key], rel=1e-5), col
        assert int(r["buckets"]) == len(summary["bucket_schedule"])
        assert summary["prediction"]["schedule"] == "measured"          # the run's own hand-overs replayed
        steps = [json.loads(line)["step_s"] for line in
                 (out / "points" / r["point"] / "node0" / "steps-rank0.jsonl").read_text().splitlines()][1:]
        assert float(r["step_p99_s"]) == pytest.approx(sweep.quantile(steps, 0.99), rel=1e-5)
        assert min(steps) <= float(r["step_p50_s"]) <= float(r["step_p99_s"]) <= max(steps)
        # step_error comes from the unrounded times, and it and both times are written to 6
        # significant digits (relative error <= 5e-6 each): the ratio of the written times is
        # off by <= 1e-5 of itself, the written error by <= 5e-6 of itself, whatever their size.
        ratio, err = float(r["pred_step_s"]) / float(r["step_mean_s"]), float(r["step_error"])
        assert abs(err - (ratio - 1)) <= 1.1e-5 * ratio + 5.5e-6 * abs(err), (err, ratio)
    # One bucket at 25 MiB; the tiny cap splits the gradient into several.
    assert rows[0]["buckets"] == "1" and int(rows[1]["buckets"]) == len(netmodel.bucket_layout([16, 64, 64, 4], 0.001)) == 3
    # 3 ranks are predicted from the 2-rank run of the same cap, computing 1.5 x slower
    # on 2 cores (3 workers, one thread each) -- or 1 x on a machine with more cores.
    for r, base in ((rows[2], rows[0]), (rows[3], rows[1])):
        assert r["cal_from"] == base["point"]
        scale = max(1.0, 3 / len(os.sched_getaffinity(0))) / max(1.0, 2 / len(os.sched_getaffinity(0)))
        assert float(r["compute_scale"]) == pytest.approx(scale)
        base_summary = json.loads((out / "points" / base["point"] / "node0" / "summary.json").read_text())
        est = predict.from_run(base_summary, world_size=3, compute_scale=scale)
        assert float(r["cal_step_s"]) == pytest.approx(est.step_time_s, rel=1e-5)
    assert rows[0]["cal_from"] == ""
    figures = json.loads((out / "sweep.json").read_text())
    errs = [abs(float(r["step_error"])) for r in rows]
    assert figures["validation"]["step_error"]["median_abs"] == pytest.approx(statistics.median(errs), rel=1e-4)
    assert figures["validation"]["step_error"]["max_abs"] == pytest.approx(max(errs), rel=1e-4)


@pytest.mark.slow
def test_the_sweep_writes_its_own_command_beside_the_table_and_the_plots(loopback):
    out, _, res = loopback
    assert res.returncode == 0, res.stderr
    md = (out / "validation.md").read_text()
    command = next(line for line in md.splitlines() if line.startswith("ddp-fnn sweep "))
    assert f"--out {out}" in command and "--nodes 2,3" in command and "--bucket-mb 25,0.001" in command
    assert md.count("\n| 2 | unshaped |") == 2 and md.count("\n| 3 | unshaped |") == 2
    for name in ("step_time.png", "comm_share.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    json.loads((out / "sweep.json").read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


@pytest.mark.slow
def test_a_rerun_reuses_complete_points_and_another_setting_is_refused(loopback):
    out, args, first = loopback
    assert first.returncode == 0, first.stderr
    summary = out / "points" / "n2-unshaped-b25-none-loss0" / "node0" / "summary.json"
    before, table = summary.stat().st_mtime_ns, (out / "sweep.csv").read_text()
    again = run_cli(*args, timeout=120)
    assert again.returncode == 0, again.stderr
    assert summary.stat().st_mtime_ns == before                 # not run again
    assert (out / "sweep.csv").read_text() == table
    other = run_cli(*[("8" if a == "6" else a) for a in args], timeout=60)     # --steps 8
    assert other.returncode == 2
    assert "point n2-unshaped-b25-none-loss0 was run with other settings" in other.stderr
    assert other.stderr.count("\n") == 1
    assert summary.stat().st_mtime_ns == before and (out / "sweep.csv").read_text() == table


# ---------------------------------------------------------------------------------------
# a real sweep on namespace nodes: the kernel's bytes are the reported bytes
# ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="namespace nodes need root and iproute2")
def test_a_namespace_sweep_reports_every_byte_the_kernel_sent(tmp_path):
    out = tmp_path / "out"
    res = run_cli("sweep", "--out", str(out), "--nodes", "2,3", "--link-rate", "200mbit", "--no-plot",
                  "--layers", "64,512,512,10", "--rows-per-rank", "8", "--steps", "10", timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    rows = read_csv(out / "sweep.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        # Every node's TCP payload (kernel TX less headers) is its rank's all-reduces + the
        # probe + the set-up broadcast, to within 2 % (the store, rendezvous, gathers).
        assert 0 <= float(r["tx_error"]) < 0.02, r
        assert r["probe_method"] == "least-squares"
        assert float(r["pred_step_s"]) > 0 and float(r["wait_s"]) >= 0
    assert not (out / "step_time.png").exists()                # --no-plot
    # Nothing of the clusters is left (netns-cluster.sh names its namespaces ddpfnn-PID-*).
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for r in rows:
        pid = json.loads((out / "points" / r["point"] / "point.json").read_text())["pid"]
        assert f"ddpfnn-{pid}-" not in left, left


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="namespace nodes need root and iproute2")
def test_a_topology_sweep_puts_each_nics_kernel_bytes_beside_the_fabric_models(tmp_path):
    """2 nodes x 2 workers at 100 Mbit/s, flat and hierarchical: every node's eth0 TX
    payload within 3 % of topology.job_link_bytes (steps by the point's algorithm, the
    probe's ring, the start-up broadcast), the node link the bottleneck, the points
    link-bound by the bottleneck's busy share, and hierarchical fewer bytes."""
    out = tmp_path / "out"
    res = run_cli("sweep", "--out", str(out), "--nodes", "2", "--link-rate", "100mbit", "--no-plot",
                  "--all-reduce", "flat,hierarchical", "--topology", str(TOPOLOGIES / "netns-2x2.toml"),
                  "--layers", "64,512,512,1", "--bucket-mb", "100", "--rows-per-rank", "8", "--steps", "10",
                  timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    rows = {r["all_reduce"]: r for r in read_csv(out / "sweep.csv")}
    assert set(rows) == {"flat", "hierarchical"}
    for r in rows.values():
        assert r["status"] == "ok" and r["gpus_per_node"] == "2"
        assert abs(float(r["nic_tx_error"])) < 0.03, r
        assert r["bottleneck_link"].startswith("server") and ".nic0." in r["bottleneck_link"]
        assert r["bound"] == "link", r
        assert r["tx_error"] == ""                 # per rank, not per node: not comparable here
        assert float(r["topo_step_s"]) > 0
        # Every node's eth0, kernel and model bytes side by side, each within 3 %.
        links = dict(item.split("=") for item in r["links"].split())
        assert set(links) == {"server0.nic0.tx", "server1.nic0.tx"}
        for kernel, model in (map(float, v.split("/")) for v in links.values()):
            assert kernel == pytest.approx(model, rel=0.03)
    # The steps' share (the probe, a flat ring either way, is most of these short runs' bytes).
    flat, hier = float(rows["flat"]["model_nic_tx_bytes"]), float(rows["hierarchical"]["model_nic_tx_bytes"])
    assert hier < flat
    text = (out / "validation.md").read_text()
    assert "| 2 x 2 | 100mbit | hierarchical |" in text


def test_a_point_is_link_bound_when_its_busbw_reaches_the_share_of_its_rate():
    rate = 100e6 / 8                                            # 100mbit in bytes/s
    assert sweep.bound("100mbit", 0.8 * rate, False) == (rate, pytest.approx(0.8), "link")
    assert sweep.bound("1gbit", 0.2 * 10 * rate, False)[2] == "host"      # the cores, not the link
    assert sweep.bound("100mbit", 0.3 * rate, True)[2] == "fault"         # loss or a shallow queue
    assert sweep.bound("unshaped", 5e6, False) == (None, None, "unshaped")
    # On a fabric: the bottleneck's busy time at line rate over the measured comm time.
    assert sweep.bound("100mbit", None, False, busy_s=0.09, comm_s=0.1)[1:] == (pytest.approx(0.9), "link")
    assert sweep.bound("100mbit", None, False, busy_s=0.03, comm_s=0.1)[2] == "host"


def test_validation_counts_link_bound_points_apart():
    def row(bound, err):
        return {"bound": bound, "step_error": err, "status": "ok", "probe_method": "least-squares"}
    rows = [row("link", 0.01), row("link", -0.03), row("host", 0.40), row("unshaped", 0.2)]
    v = sweep.validation(rows)
    assert v["bound"] == {"link": 2, "host": 1, "fault": 0, "unshaped": 1}
    assert v["step_error"]["max_abs"] == pytest.approx(0.40)
    assert v["link_bound"]["step_error"] == {"points": 2, "median_abs": pytest.approx(0.02), "max_abs": pytest.approx(0.03)}


def test_retable_rewrites_a_recorded_sweep_from_its_own_rows(tmp_path):
    src = Path(__file__).resolve().parents[1] / "docs" / "sweep" / "calibrate"
    shutil.copytree(src, tmp_path / "s")
    before = json.loads((tmp_path / "s" / "sweep.json").read_text())
    figures = sweep.retable(tmp_path / "s")
    after = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert [r["step_mean_s"] for r in after["rows"]] == [r["step_mean_s"] for r in before["rows"]]
    assert all(r["bound"] in ("link", "host") for r in after["rows"])
    assert figures["bound"]["link"] + figures["bound"]["host"] == len(after["rows"])
    assert "link-bound points" in (tmp_path / "s" / "validation.md").read_text()
