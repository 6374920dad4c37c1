"""`ddp-fnn sweep`: a grid of real training jobs, each one's measurement beside the cost
model's prediction.

The grid is world sizes x link rates x bucket caps x compression x packet loss x queue
limits. Each point is one `ddp-fnn train` job, on network-namespace nodes
(launch/netns-cluster.sh: one worker a node, each node's egress shaped by tc, root) or
on loopback (torchrun --standalone; no shaping or faults there). What it writes in
``--out``:

    points/NAME/          the job's own outputs (summary.json, step files, logs,
                          netstats.json); NAME says the point's settings
    points/NAME/point.json  written last: the point is complete (a rerun of the same
                          sweep reuses it rather than running it again)
    sweep.csv             one row per point (COLUMNS): settings, measured, predicted, errors
    sweep.json            the same rows and the validation figures, strict JSON
    validation.md         the rows as a Markdown table and the error statistics
    *.png                 plots (plots.py; needs matplotlib, the `plot` extra)

Two predictions per point:

- ``pred_*``, the run's own (summary.json ``predicted_*``, recomputed by the model as
  it is now): its probe's alpha and beta, its measured compute, wait and bucket
  schedule, the backend's queue of all-reduces (predict.py).
- ``cal_*``, calibrated elsewhere: from the point of ``--calibrate-on`` nodes with the
  same link, buckets, compression and faults (predict.from_run), its compute scaled by
  the CPU share of this machine's cores (``compute_scale``): the nodes of a
  one-machine cluster share its cores, so N workers with one thread each on C cores
  compute max(1, N / C) times slower than one. On separate machines the scale is 1. The
  bus bandwidth is the calibration run's: the same cores also move every node's frames
  through veth and the bridge, which no smaller run shows (docs/netmodel.md says what
  that costs the prediction here).

Measured figures are rank 0's (summary.json's top level) unless said otherwise; p99 of
the step time comes from its step file (steps after the first, as the summary's).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddp_fnn.perfmodel import netmodel
from ddp_fnn.perfmodel import predict
from ddp_fnn.observe import stepfile
from ddp_fnn import cluster, fileio

CLUSTER = cluster.script("netns-cluster.sh")
# The directory holding the ddp_fnn package: a point's workers import this same package,
# from a checkout or an installed wheel alike.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ("netns", "loopback")
TCP_MSS_BYTES = 1448          # MTU 1500 less IPv4 (20), TCP (20) and timestamps (12): netns-cluster.sh's links
HEADER_BYTES = 14 + 20 + 20 + 12   # per frame on a node's eth0 (tests/test_launch_netns.py says why)


@dataclass(frozen=True)
class Point:
    nodes: int
    link_rate: str | None           # None: unshaped
    bucket_mb: float
    compression: str
    loss_percent: float
    queue_limit_bytes: int | None
    repeat: int = 0
    all_reduce: str = "flat"        # train's --all-reduce

    @property
    def name(self) -> str:
        q = f"-q{self.queue_limit_bytes}" if self.queue_limit_bytes else ""
        r = f"-r{self.repeat}" if self.repeat else ""
        h = "-hier" if self.all_reduce == "hierarchical" else ""
        return (f"n{self.nodes}-{self.link_rate or 'unshaped'}-b{self.bucket_mb:g}-{self.compression}"
                f"-loss{self.loss_percent:g}{q}{h}{r}")

    def sibling(self, nodes: int) -> Point:
        """The same settings at another world size (the calibration point)."""
        return Point(nodes, self.link_rate, self.bucket_mb, self.compression, self.loss_percent,
                     self.queue_limit_bytes, self.repeat, self.all_reduce)


@dataclass
class SweepConfig:
    out: Path
    nodes: tuple[int, ...] = (2, 4)
    link_rates: tuple[str | None, ...] = (None,)
    bucket_mbs: tuple[float, ...] = (25.0,)
    compressions: tuple[str, ...] = ("none",)
    losses: tuple[float, ...] = (0.0,)
    queue_limits: tuple[int | None, ...] = (None,)
    launcher: str = "netns"
    layers: tuple[int, ...] = (256, 512, 512, 512, 512, 10)
    rows_per_rank: int = 32
    steps: int = 30
    repeat: int = 1
    calibrate_on: int | None = None
    loss_node: int = 1
    host_cores: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))
    train_args: tuple[str, ...] = ()
    plot: bool = True
    all_reduces: tuple[str, ...] = ("flat",)
    # --topology FILE: the fabric (servers x GPUs, leaves, uplinks) each point runs on and
    # is modelled on, link by link (topology.py); None: one worker a node on one bridge.
    topology: Path | None = None

    @property
    def gpus_per_node(self) -> int:
        return self._fabric().gpus_per_server if self.topology is not None else 1

    def _fabric(self, nodes: int | None = None, link_rate: str | None = None, payload_share: float = 1.0):
        """The --topology file's fabric with ``nodes`` servers, their NICs at ``link_rate``
        (the point's; unshaped: the file's) and every network rate times
        ``payload_share`` (what of a tc rate TCP payload gets)."""
        from ddp_fnn.perfmodel import topology

        raw = json.loads(json.dumps(topology.load_raw(self.topology)))
        if nodes is not None:
            raw["servers"] = nodes
            sw = raw.setdefault("switch", {})
            sw["servers_per_leaf"] = min(sw.get("servers_per_leaf", nodes), nodes)
        if link_rate:
            raw.setdefault("nic", {})["rate"] = link_rate
        topo = topology.from_dict(raw, default_name=self.topology.stem)
        if payload_share != 1.0:
            topo = dataclasses.replace(topo, nic_bytes_per_second=topo.nic_bytes_per_second * payload_share,
                                       uplink_bytes_per_second=topo.uplink_bytes_per_second * payload_share)
        return topo

    def fabric(self, p: Point, payload_share: float = 1.0):
        """Point p's fabric (``_fabric``)."""
        return self._fabric(p.nodes, p.link_rate, payload_share)

    def check(self) -> None:
        """ValueError naming the option and the value."""
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if any(n < 2 for n in self.nodes):
            raise ValueError(f"--nodes: every world size must be >= 2 (nothing crosses a network at 1), "
                             f"got {','.join(map(str, self.nodes))}")
        if any(q is not None for q in self.queue_limits) and None in self.link_rates:
            raise ValueError("--queue-limit needs a shaped --link-rate at every point (it is the shaper's "
                             "queue); drop 'unshaped' from --link-rate")
        for p in self.losses:
            if not 0 <= p < 100:
                raise ValueError(f"--loss must be a percentage in [0, 100), got {p:g}")
        if self.launcher == "loopback":
            for option, values, none in (("--link-rate", self.link_rates, None), ("--loss", self.losses, 0.0),
                                         ("--queue-limit", self.queue_limits, None)):
                if any(v != none for v in values):
                    shown = ",".join("unshaped" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                                     for v in values)
                    raise ValueError(f"{option} needs --launcher netns (loopback has no link to shape or "
                                     f"fault), got {shown}")
        if any(p > 0 for p in self.losses) and not 0 <= self.loss_node < min(self.nodes):
            raise ValueError(f"--loss-node {self.loss_node} is not a node of the smallest world size "
                             f"{min(self.nodes)}")
        for option, v in (("--rows-per-rank", self.rows_per_rank), ("--repeat", self.repeat),
                          ("--host-cores", self.host_cores)):
            if v < 1:
                raise ValueError(f"{option} must be >= 1, got {v}")
        for c in self.compressions:
            if c not in netmodel.COMPRESSION_BYTES:
                raise ValueError(f"--compression: bad value {c!r} ({', '.join(netmodel.COMPRESSION_BYTES)})")
        if any(not b > 0 for b in self.bucket_mbs):
            raise ValueError(f"--bucket-mb: every cap must be > 0, got {','.join(f'{b:g}' for b in self.bucket_mbs)}")
        if self.steps < 3:
            raise ValueError(f"--steps must be >= 3 (the first step is DDP's bucket rebuild), got {self.steps}")
        if self.calibrate_on is not None and self.calibrate_on not in self.nodes:
            raise ValueError(f"--calibrate-on {self.calibrate_on} is not one of --nodes "
                             f"{','.join(map(str, self.nodes))}")
        netmodel.bucket_layout(self.layers, self.bucket_mbs[0])      # the layer widths' own check
        for a in self.all_reduces:
            if a not in ("flat", "hierarchical"):
                raise ValueError(f"--all-reduce: bad value {a!r} (flat, hierarchical)")
            if a == "hierarchical" and any(c != "none" for c in self.compressions):
                raise ValueError("--all-reduce hierarchical needs --compression none at every point")
        if self.topology is not None:
            if self.launcher != "netns":
                raise ValueError("--topology needs --launcher netns (its links are namespace links)")
            base = self._fabric()                    # the file's own check (one line, naming the key)
            for n in self.nodes:
                per_leaf = min(base.servers_per_leaf, n)
                if n % per_leaf:
                    raise ValueError(f"--nodes {n}: the topology's switch.servers_per_leaf {per_leaf} must divide it")
        if self.launcher == "netns":
            if os.geteuid() != 0:
                raise ValueError("--launcher netns needs root (it creates network namespaces); "
                                 "run as root or use --launcher loopback")

    def points(self) -> list[Point]:
        return [Point(n, r, b, c, p, q, k, a) for k, n, r, b, c, p, q, a in itertools.product(
            range(self.repeat), self.nodes, self.link_rates, self.bucket_mbs, self.compressions,
            self.losses, self.queue_limits, self.all_reduces)]

    def train_argv(self, p: Point) -> list[str]:
        """`ddp-fnn train`'s arguments at point p (weak scaling: rows_per_rank a rank)."""
        # On loopback the workers share the host's ports: no /metrics endpoints unless asked
        # (a namespace node has its own).
        ports = ["--metrics-port", "0"] if self.launcher == "loopback" else []
        algo = ["--all-reduce", p.all_reduce] if p.all_reduce != "flat" else []
        ranks = p.nodes * self.gpus_per_node
        return ["--layers", ",".join(map(str, self.layers)), "--bucket-mb", f"{p.bucket_mb:g}",
                "--compression", p.compression, "--global-batch-size", str(ranks * self.rows_per_rank),
                "--max-steps", str(self.steps), "--progress", "none", *ports, *algo, *self.train_args]

    def command_line(self) -> str:
        """The `ddp-fnn sweep` command that makes this sweep (written beside its results)."""
        import shlex

        join = lambda xs, f=str: ",".join(f(x) for x in xs)          # noqa: E731
        args = ["--out", str(self.out), "--launcher", self.launcher, "--nodes", join(self.nodes),
                "--link-rate", join(self.link_rates, lambda r: r or "unshaped"),
                "--bucket-mb", join(self.bucket_mbs, lambda b: f"{b:g}"), "--compression", join(self.compressions),
                "--loss", join(self.losses, lambda p: f"{p:g}"), "--loss-node", str(self.loss_node),
                "--queue-limit", join(self.queue_limits, lambda q: str(q or "none")),
                "--layers", join(self.layers), "--rows-per-rank", str(self.rows_per_rank),
                "--steps", str(self.steps), "--repeat", str(self.repeat),
                "--calibrate-on", str(self.calibrate_on), "--host-cores", str(self.host_cores)]
        if self.all_reduces != ("flat",):
            args += ["--all-reduce", join(self.all_reduces)]
        if self.topology is not None:
            args += ["--topology", str(self.topology)]
        if not self.plot:
            args.append("--no-plot")
        if self.train_args:
            args += ["--", *self.train_args]
        return "ddp-fnn sweep " + shlex.join(args)

    def compute_scale(self, nodes: int, calibrated_on: int) -> float:
        """How much slower a worker computes at ``nodes`` than at ``calibrated_on`` when they
        all share this machine's cores, one thread each (the sweep runs them so)."""
        share = lambda n: max(1.0, n * self.gpus_per_node / self.host_cores)        # noqa: E731
        return share(nodes) / share(calibrated_on)


# ---------------------------------------------------------------------------------------
# running one point
# ---------------------------------------------------------------------------------------

def point_dir(cfg: SweepConfig, p: Point) -> Path:
    return cfg.out / "points" / p.name


def _identity(cfg: SweepConfig, p: Point) -> dict:
    """What a complete point must have been run with to be reused."""
    ident = {"point": {**asdict(p), "name": p.name}, "launcher": cfg.launcher, "train_args": cfg.train_argv(p),
             "loss_node": cfg.loss_node}
    if p.all_reduce == "flat":
        ident["point"].pop("all_reduce")      # points run before --all-reduce existed are still these
    if cfg.topology is not None:
        ident["cluster"] = command(cfg, p, Path("."))[2:]   # workers a node, leaves, uplinks
    return ident


def command(cfg: SweepConfig, p: Point, pdir: Path) -> list[str]:
    train = cfg.train_argv(p)
    if cfg.launcher == "loopback":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(p.nodes),
                "-m", "ddp_fnn", "train", *train, "--output", str(pdir / "node0")]
    cmd = ["bash", str(CLUSTER), "--nodes", str(p.nodes), "--out", str(pdir)]
    if p.link_rate:
        cmd += ["--link-rate", p.link_rate]
    if p.loss_percent > 0:
        cmd += ["--loss", f"{cfg.loss_node}:{p.loss_percent:g}"]
    if p.queue_limit_bytes:
        for k in range(p.nodes):
            cmd += ["--queue-limit", f"{k}:{p.queue_limit_bytes}"]
    if cfg.topology is not None:
        topo = cfg.fabric(p)
        if topo.gpus_per_server > 1:
            cmd += ["--nproc-per-node", str(topo.gpus_per_server)]
        if topo.leaf_groups > 1:
            # The leaves' uplinks at the file's rate (or its oversubscription of this point's
            # node links), in tc's bits per second.
            cmd += ["--leaves", str(topo.leaf_groups),
                    "--uplink-rate", f"{round(topo.uplink_bytes_per_second * 8)}bit"]
    return [*cmd, "--", *train]


def run_point(cfg: SweepConfig, p: Point) -> tuple[bool, Path]:
    """Run point p unless a complete run of the same settings is there. Returns (ok, dir).
    A directory left by an interrupted or failed run is replaced (main has already refused
    an --out holding a complete point of other settings)."""
    pdir = point_dir(cfg, p)
    done = pdir / "point.json"
    ident = _identity(cfg, p)
    if done.is_file():
        old = json.loads(done.read_text())
        if {k: old.get(k) for k in ident} == ident and old.get("ok"):
            return True, pdir
    if pdir.exists():
        shutil.rmtree(pdir)                  # a failed or interrupted run of this point: tried again
    pdir.mkdir(parents=True)
    # One thread a worker: compute_scale's premise. PYTHON: node.sh runs this interpreter.
    path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "PYTHONPATH": path}
    with open(pdir / "run.log", "wb") as log:
        proc = subprocess.Popen(command(cfg, p, pdir), stdout=log, stderr=subprocess.STDOUT, env=env)
        rc = proc.wait()
    ok = rc == 0 and (pdir / "node0" / "summary.json").is_file()
    # pid: netns-cluster.sh names its namespaces ddpfnn-PID-*, so a check can find them.
    fileio.write_json(done, {**ident, "ok": ok, "exit_status": rc, "pid": proc.pid}, indent=2)
    return ok, pdir


# ---------------------------------------------------------------------------------------
# reading one point
# ---------------------------------------------------------------------------------------

def quantile(xs: list[float], q: float) -> float:
    """The q-quantile by statistics' inclusive method (linear between order statistics),
    as metrics.Summary computes step_time_p95_s."""
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[round(q * 100) - 1]


def measure(cfg: SweepConfig, p: Point, pdir: Path) -> dict:
    """The measured columns of a complete point."""
    summary = fileio.loads((pdir / "node0" / "summary.json").read_text())
    steps = stepfile.read(pdir / "node0" / "steps-rank0.jsonl")
    step_s = [s["step_s"] for s in steps[1:]] or [s["step_s"] for s in steps]
    ranks = summary.get("ranks") or [summary]
    tcp = [r.get("tcp") or {} for r in ranks]
    # Each namespace node has its own TCP counters; on loopback every rank reads the host's.
    tcp = tcp if cfg.launcher == "netns" else tcp[:1]
    retrans = sum(t.get("retransmitted_segments") or 0 for t in tcp)
    # Retransmission timeouts (each a stall of >= 200 ms); None for runs that predate them.
    timeouts = [t["timeouts"] for t in tcp if t.get("timeouts") is not None]
    probe = (summary.get("probe") or {}).get("wire_bytes") or 0
    # What each rank reports sending: its all-reduces, the probe, the replicas' set-up.
    reported = [(r.get("allreduce_wire_bytes_total") or 0) + probe + (r.get("setup_wire_bytes") or 0) for r in ranks]
    row = {
        "step_mean_s": summary["step_time_mean_s"], "step_p50_s": summary["step_time_p50_s"],
        "step_p99_s": quantile(step_s, 0.99),
        "comm_s": summary["comm_time_per_step_s"], "exposed_s": summary["exposed_comm_time_per_step_s"],
        "transfer_s": summary.get("transfer_per_step_s"), "wait_s": summary.get("wait_for_peers_per_step_s"),
        "compute_s": predict.compute_time(summary),
        "busbw_bytes_per_second": summary["busbw_bytes_per_second"],
        "payload_bytes_per_step": summary["allreduce_payload_bytes_per_step"],
        "wire_bytes_per_step": summary["allreduce_wire_bytes_per_step"],
        "buckets": len(summary.get("bucket_schedule") or []),
        "retransmits_per_step": retrans / max(1, summary["steps"]),
        "timeouts_per_step": sum(timeouts) / max(1, summary["steps"]) if timeouts else None,
        "reported_tx_bytes": max(reported),
    }
    net = summary.get("prediction") or {}
    row |= {"probe_method": net.get("method"), "alpha_s": net.get("alpha_s"),
            "beta_bytes_per_second": net.get("beta_bytes_per_second")}
    # The run's own prediction, by the model as it is now (the same as summary.json's
    # predicted_* when the job ran this code): a model change re-reads old points.
    if net.get("alpha_s") is not None:
        est = predict.from_run(summary, world_size=p.nodes)
        row |= {"pred_step_s": est.step_time_s, "pred_comm_s": est.comm_time_per_step_s,
                "pred_exposed_s": (row["wait_s"] or 0.0) + est.exposed_comm_time_per_step_s}
    # The best round trip of the clock-offset ping-pongs: an idle RTT for Mathis' formula.
    bounds = [o.get("bound_start_s") for o in summary.get("clock_offsets") or [] if o.get("bound_start_s")]
    row["rtt_s"] = 2 * max(bounds) if bounds else None
    netstats = pdir / "netstats.json"
    if netstats.is_file():
        ns = fileio.loads(netstats.read_text())
        # Node k runs rank k (c10d ranks the nodes by host name, node0, node1, ...).
        payload_tx = [n["tx_bytes"] - n["tx_packets"] * HEADER_BYTES for n in ns["nodes"]]
        row["kernel_tx_payload_bytes"] = max(payload_tx)
        # One worker a node: its eth0 carries what the rank reports. With several, a node's
        # eth0 carries part of each rank's bytes (the rest stays inside): nic_tx_error.
        row["tx_error"] = (max((t / w - 1 for t, w in zip(payload_tx, reported) if w), key=abs, default=None)
                           if cfg.gpus_per_node == 1 else None)
        row["tc_dropped_packets"] = sum((n.get("qdisc") or {}).get("dropped", 0)
                                        + (n.get("port_qdisc") or {}).get("dropped", 0) for n in ns["nodes"])
        row["loss_dropped_packets"] = sum(n.get("loss_dropped_packets") or 0 for n in ns["nodes"])
    if cfg.topology is not None and netstats.is_file():
        row |= fabric_columns(cfg, p, summary, ns)
    if p.loss_percent > 0 and row["rtt_s"]:
        link = netmodel.parse_rate(p.link_rate) if p.link_rate else None
        row["mathis_busbw_bytes_per_second"] = netmodel.mathis_rate(TCP_MSS_BYTES, row["rtt_s"],
                                                                    p.loss_percent / 100, link)
    return row | {"_summary": summary}


PAYLOAD_SHARE = (1500 + 14 - HEADER_BYTES) / (1500 + 14)   # TCP payload of a tc (frame) rate at MTU 1500


def fabric_columns(cfg: SweepConfig, p: Point, summary: dict, ns: dict) -> dict:
    """--topology: each node's eth0 and each uplink's kernel TX payload against the
    fabric model's bytes on that link over the whole job (topology.job_link_bytes: the
    gradients by the point's algorithm, the probe's flat ring, DDP's start-up broadcast),
    the worst of each as an error; the step time by topology.estimate with every network
    rate at what its TCP payload gets (PAYLOAD_SHARE) and the rank's compute as the
    namespace checks take it (the mean step less the exposed communication: with several
    workers a node sharing the cores, a peer's lateness is theirs, not a straggler's);
    and how long the bottleneck link must be busy a step at its line rate
    (``bottleneck_busy_s``), which ``bound`` holds against the measured comm time."""
    from ddp_fnn.perfmodel import topology

    algorithm = "hierarchical" if p.all_reduce == "hierarchical" else "ring"
    topo = cfg.fabric(p)
    probe = summary.get("probe") or {}
    model = topology.job_link_bytes(topo, summary["allreduce_payload_bytes_total"], algorithm,
                                    probe.get("payload_bytes") or 0, summary["gradient_bytes"])
    # (link, kernel TX payload, model bytes) for every node's eth0 and both ends of every uplink
    seen = [(topology.nic_link(k, 0, "tx"), n["tx_bytes"] - n["tx_packets"] * HEADER_BYTES)
            for k, n in enumerate(ns["nodes"])]
    for u in ns.get("uplinks") or []:
        j = u["leaf"]
        seen += [(f"leaf{j}.up", u["tx_bytes"] - u["tx_packets"] * HEADER_BYTES),
                 (f"leaf{j}.down", u["spine_tx_bytes"] - u["spine_tx_packets"] * HEADER_BYTES)]
    links = [(name, sent, model.get(name, 0.0)) for name, sent in seen]
    node_err = [sent / m - 1 for name, sent, m in links if m and ".nic" in name]
    up_err = [sent / m - 1 for name, sent, m in links if m and name.startswith("leaf")]
    compute_s = max(0.0, summary["step_time_mean_s"] - summary["exposed_comm_time_per_step_s"])
    est = topology.estimate(cfg.fabric(p, PAYLOAD_SHARE), cfg.layers, compute_s=compute_s, bucket_mb=p.bucket_mb,
                            compression=p.compression, algorithm=algorithm)
    line = topology.estimate(topo, cfg.layers, compute_s=compute_s, bucket_mb=p.bucket_mb,
                             compression=p.compression, algorithm=algorithm)
    return {"model_nic_tx_bytes": max((v for k, v in model.items() if k.endswith(".tx") and ".nic" in k), default=None),
            "nic_tx_error": max(node_err, key=abs, default=None),
            "model_uplink_bytes": max((v for k, v in model.items() if k.startswith("leaf")), default=None),
            "uplink_tx_error": max(up_err, key=abs, default=None),
            "topo_step_s": est.step_time_s, "topo_step_error": _err(est.step_time_s, summary["step_time_mean_s"]),
            "bottleneck_link": line.bottleneck_link, "bottleneck_busy_s": line.bottleneck_busy_s,
            "links": " ".join(f"{name}={sent}/{m:.0f}" for name, sent, m in links)}


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------

COLUMNS = (
    "point", "status", "nodes", "link_rate", "bucket_mb", "buckets", "compression", "loss_percent",
    "queue_limit_bytes", "steps",
    "step_mean_s", "step_p50_s", "step_p99_s", "comm_s", "exposed_s", "transfer_s", "wait_s", "compute_s",
    "busbw_bytes_per_second", "payload_bytes_per_step", "wire_bytes_per_step",
    "probe_method", "alpha_s", "beta_bytes_per_second",
    "pred_step_s", "pred_comm_s", "pred_exposed_s", "step_error", "exposed_error",
    "cal_from", "compute_scale", "cal_step_s", "cal_exposed_s", "cal_step_error", "cal_exposed_error",
    "retransmits_per_step", "timeouts_per_step", "tc_dropped_packets", "loss_dropped_packets",
    "rtt_s", "mathis_busbw_bytes_per_second",
    "reported_tx_bytes", "kernel_tx_payload_bytes", "tx_error",
    "line_rate_bytes_per_second", "wire_share", "bound",
    "all_reduce", "gpus_per_node", "model_nic_tx_bytes", "nic_tx_error", "model_uplink_bytes", "uplink_tx_error",
    "topo_step_s", "topo_step_error", "bottleneck_link", "bottleneck_busy_s",
    "links",        # --topology: LINK=KERNEL/MODEL bytes over the job, every NIC (eth0) and uplink direction
)

# What sets a point's pace. A link-bound point's all-reduces run its shaped link near the
# configured rate; on one machine's veth pairs and bridge, a fast link instead measures the
# cores forwarding the frames (2 shared cores here reach ~100-200 Mbit/s of busbw with
# several nodes), and the model, which knows the link and not the cores, is then asked the
# wrong question. The line between them: busbw (payload / comm time x 2(N-1)/N, what the
# ring asks of every link) at LINK_BOUND_SHARE of the rate or more. A point whose busbw
# falls below it with packet loss or a shallow queue configured is "fault": TCP backing
# off is the network's doing, but it cannot be told apart from the host here.
LINK_BOUND_SHARE = 0.7


def bound(link_rate: str | None, busbw: float | None, faulted: bool, busy_s: float | None = None,
          comm_s: float | None = None) -> tuple[float | None, float | None, str]:
    """(line rate in bytes/s, share, "link" | "host" | "fault" | "unshaped"). The share is
    busbw / line rate -- with one worker a node and one tier, the ring's every link busy
    over the comm time -- or, on a --topology fabric, the bottleneck link's busy time at
    line rate (``busy_s``) over the measured comm time: the same question, asked of the
    link that should set the pace."""
    if not link_rate or link_rate == "unshaped":
        return None, None, "unshaped"
    rate = netmodel.parse_rate(link_rate)
    if busy_s is not None:
        share = busy_s / comm_s if comm_s else None
    else:
        share = busbw / rate if busbw is not None else None
    if share is not None and share >= LINK_BOUND_SHARE:
        return rate, share, "link"
    return rate, share, "fault" if faulted else "host"


def _err(pred, meas):
    return (pred - meas) / meas if pred is not None and meas else None


def build_rows(cfg: SweepConfig, results: dict[Point, tuple[bool, Path]]) -> list[dict]:
    measured = {p: measure(cfg, p, d) for p, (ok, d) in results.items() if ok}
    rows = []
    for p, (ok, _d) in results.items():
        row = {"point": p.name, "status": "ok" if ok else "failed", "nodes": p.nodes, "link_rate": p.link_rate or "unshaped",
               "bucket_mb": p.bucket_mb, "compression": p.compression, "loss_percent": p.loss_percent,
               "queue_limit_bytes": p.queue_limit_bytes, "steps": cfg.steps, "all_reduce": p.all_reduce,
               "gpus_per_node": cfg.gpus_per_node}
        m = measured.get(p)
        if m is not None:
            row |= {k: v for k, v in m.items() if not k.startswith("_")}
            row["line_rate_bytes_per_second"], row["wire_share"], row["bound"] = bound(
                p.link_rate, row.get("busbw_bytes_per_second"), bool(p.loss_percent or p.queue_limit_bytes),
                row.get("bottleneck_busy_s"), row.get("comm_s"))
            row["step_error"] = _err(row["pred_step_s"], row["step_mean_s"])
            row["exposed_error"] = _err(row["pred_exposed_s"], row["exposed_s"])
            base = p.sibling(cfg.calibrate_on) if cfg.calibrate_on is not None else None
            if base is not None and base != p and base in measured:
                scale = cfg.compute_scale(p.nodes, base.nodes)
                try:
                    est = predict.from_run(measured[base]["_summary"], world_size=p.nodes, compute_scale=scale)
                except ValueError:
                    est = None
                if est is not None:
                    row |= {"cal_from": base.name, "compute_scale": scale, "cal_step_s": est.step_time_s,
                            "cal_exposed_s": est.exposed_comm_time_per_step_s,
                            "cal_step_error": _err(est.step_time_s, row["step_mean_s"]),
                            "cal_exposed_error": _err(est.exposed_comm_time_per_step_s, row["exposed_s"])}
        rows.append({c: row.get(c) for c in COLUMNS})
    return rows


ERROR_KEYS = ("step_error", "exposed_error", "cal_step_error", "cal_exposed_error", "tx_error",
              "topo_step_error", "nic_tx_error", "uplink_tx_error")


def _error_stats(rows: list[dict]) -> dict:
    out = {}
    for key in ERROR_KEYS:
        errs = [abs(r[key]) for r in rows if r.get(key) is not None]
        out[key] = {"points": len(errs), "median_abs": statistics.median(errs) if errs else None,
                    "max_abs": max(errs) if errs else None}
    return out


def validation(rows: list[dict]) -> dict:
    """Median and largest absolute errors of each prediction over the complete points, and
    again over the link-bound ones alone (``link_bound``; ``bound``: points of each kind)."""
    out = _error_stats(rows)
    out["link_bound"] = _error_stats([r for r in rows if r.get("bound") == "link"])
    out["bound"] = {k: sum(r.get("bound") == k for r in rows) for k in ("link", "host", "fault", "unshaped")}
    out["points"] = len(rows)
    out["failed"] = sum(r["status"] != "ok" for r in rows)
    out["probe_methods"] = dict(sorted(
        {m: sum(r["probe_method"] == m for r in rows) for r in rows if (m := r["probe_method"])}.items()))
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    fileio.atomic_write(path, buf.getvalue())


def _pct(x) -> str:
    return "" if x is None else f"{x:+.1%}"


def _bound_cell(r: dict) -> str:
    return r["bound"] if r["wire_share"] is None else f"{r['bound']} ({r['wire_share']:.0%})"


def _ms(x) -> str:
    return "" if x is None else f"{x * 1e3:.1f}"


def markdown(rows: list[dict], figures: dict, command_line: str) -> str:
    """validation.md: the command, the error statistics, every point."""
    lines = ["# `ddp-fnn sweep`: measured vs predicted", "", "```", command_line, "```", ""]
    names = {"step_error": "step time, the run's own prediction", "exposed_error": "exposed communication, the run's own prediction",
             "cal_step_error": "step time, calibrated on another world size", "cal_exposed_error": "exposed communication, calibrated",
             "tx_error": "kernel TX payload vs reported bytes (steps + probe), worst node",
             "topo_step_error": "step time, the --topology fabric model (no probe)",
             "nic_tx_error": "each node's eth0 TX payload vs the fabric model's NIC bytes, worst node",
             "uplink_tx_error": "each uplink's TX payload vs the fabric model's, worst direction"}
    lines += ["| prediction | points | median abs error | largest abs error | link-bound points | median | largest |",
              "|---|---|---|---|---|---|---|"]
    for key, label in names.items():
        f, g = figures[key], figures["link_bound"][key]
        if f["points"]:
            link = (f"{g['points']} | {g['median_abs']:.1%} | {g['max_abs']:.1%}" if g["points"] else "0 | | ")
            lines.append(f"| {label} | {f['points']} | {f['median_abs']:.1%} | {f['max_abs']:.1%} | {link} |")
    b = figures["bound"]
    lines += ["", f"Points: {figures['points']}, failed: {figures['failed']}; probe fits: "
              + ", ".join(f"{k} {v}" for k, v in figures["probe_methods"].items()), "",
              f"What set the pace (bound): link {b['link']}, host {b['host']}, fault {b['fault']}, unshaped "
              f"{b['unshaped']}. A shaped point is link-bound when its busbw reached {LINK_BOUND_SHARE:.0%} of the "
              f"configured rate (with --topology: when the bottleneck link, at its line rate, was busy that "
              f"share of the measured comm time); below that the host's cores forwarding the frames set the pace (host), or, with "
              f"loss or a shallow queue configured, the fault or the host (fault). Unshaped points run as fast "
              f"as the host can.", ""]
    head = ("| nodes | link | bound (busbw/rate) | bucket MiB (n) | wire | loss % | step ms | p99 ms | exposed ms | wait ms | "
            "predicted step | err | predicted exposed | err | calibrated step | err | retrans/step |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['nodes']} | {r['link_rate']} | | {r['bucket_mb']:g} | {r['compression']} | "
                         f"{r['loss_percent']:g} | failed |" + " |" * 11)
            continue
        lines.append(
            f"| {r['nodes']} | {r['link_rate']} | {_bound_cell(r)} | {r['bucket_mb']:g} ({r['buckets']}) | "
            f"{'fp32' if r['compression'] == 'none' else r['compression']} | {r['loss_percent']:g} | "
            f"{_ms(r['step_mean_s'])} | {_ms(r['step_p99_s'])} | {_ms(r['exposed_s'])} | {_ms(r['wait_s'])} | "
            f"{_ms(r['pred_step_s'])} | {_pct(r['step_error'])} | {_ms(r['pred_exposed_s'])} | "
            f"{_pct(r['exposed_error'])} | {_ms(r['cal_step_s'])} | {_pct(r['cal_step_error'])} | "
            f"{r['retransmits_per_step']:.1f} |")
    if any(r.get("topo_step_s") is not None for r in rows):
        lines += ["", "The fabric (--topology): each point on its servers, NICs, leaves and uplinks, modelled link "
                  "by link (topology.py) with no probe: the step time at the links' TCP payload rates, the "
                  "bottleneck, and each link's kernel TX payload against the model's bytes over the whole job "
                  "(steps, probe, start-up broadcast), the worst node and the worst uplink direction.", "",
                  "| nodes x GPUs | link | all-reduce | bucket MiB (n) | bound | step ms | fabric model step ms | err | "
                  "bottleneck | NIC TX model MB | worst node err | uplink model MB | worst uplink err |",
                  "|" + "---|" * 13]
        for r in rows:
            if r["status"] != "ok" or r.get("topo_step_s") is None:
                continue
            up = r.get("model_uplink_bytes")
            lines.append(
                f"| {r['nodes']} x {r['gpus_per_node']} | {r['link_rate']} | {r['all_reduce']} | "
                f"{r['bucket_mb']:g} ({r['buckets']}) | {_bound_cell(r)} | {_ms(r['step_mean_s'])} | "
                f"{_ms(r['topo_step_s'])} | {_pct(r['topo_step_error'])} | {r['bottleneck_link']} | "
                f"{r['model_nic_tx_bytes'] / 1e6:.2f} | {_pct(r['nic_tx_error'])} | "
                f"{'' if up is None else f'{up / 1e6:.2f}'} | {_pct(r.get('uplink_tx_error'))} |")
    if any(r["loss_percent"] or r["queue_limit_bytes"] for r in rows):
        lines += ["", "Faults: what TCP saw (retransmitted segments per step and retransmission timeouts "
                  "per 100 steps, all nodes; frames the switch dropped over the run), the bus bandwidth "
                  "beside Mathis et al.'s estimate for the configured loss and the clock ping-pong's RTT, "
                  "capped by the link.", "",
                  "| nodes | link | buckets | loss % | queue B | step ms | p99 ms | transfer ms | busbw MB/s | "
                  "Mathis MB/s | retrans/step | timeouts/100 steps | dropped |", "|" + "---|" * 13]
        for r in rows:
            if r["status"] != "ok":
                continue
            mathis, timeouts = r["mathis_busbw_bytes_per_second"], r["timeouts_per_step"]
            lines.append(
                f"| {r['nodes']} | {r['link_rate']} | {r['buckets']} | {r['loss_percent']:g} | "
                f"{r['queue_limit_bytes'] or ''} | {_ms(r['step_mean_s'])} | {_ms(r['step_p99_s'])} | "
                f"{_ms(r['transfer_s'])} | {r['busbw_bytes_per_second'] / 1e6:.1f} | "
                f"{'' if mathis is None else f'{mathis / 1e6:.1f}'} | {r['retransmits_per_step']:.1f} | "
                f"{'' if timeouts is None else f'{100 * timeouts:.1f}'} | "
                f"{(r['loss_dropped_packets'] or 0) + (r['tc_dropped_packets'] or 0)} |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list[dict], command_line: str, host_cores, calibrate_on) -> dict:
    figures = validation(rows)
    write_csv(out / "sweep.csv", rows)
    fileio.write_json(out / "sweep.json", {"command": command_line, "validation": figures, "rows": rows,
                                           "host_cores": host_cores, "calibrate_on": calibrate_on}, indent=2)
    fileio.atomic_write(out / "validation.md", markdown(rows, figures, command_line))
    return figures


def retable(out: Path) -> dict:
    """Rewrite a finished sweep's sweep.csv, sweep.json and validation.md from its
    sweep.json rows, with the columns and figures this version derives (``bound``):
    the measurements are the rows' own, nothing is run again. Returns the figures."""
    doc = fileio.loads((out / "sweep.json").read_text())
    rows = []
    for r in doc["rows"]:
        if r.get("status") == "ok":
            r["line_rate_bytes_per_second"], r["wire_share"], r["bound"] = bound(
                r["link_rate"], r.get("busbw_bytes_per_second"), bool(r["loss_percent"] or r["queue_limit_bytes"]),
                r.get("bottleneck_busy_s"), r.get("comm_s"))
        rows.append({c: r.get(c) for c in COLUMNS})
    return write_tables(out, rows, doc["command"], doc.get("host_cores"), doc.get("calibrate_on"))


def write_outputs(cfg: SweepConfig, rows: list[dict], command_line: str) -> tuple[dict, list[Path]]:
    figures = write_tables(cfg.out, rows, command_line, cfg.host_cores, cfg.calibrate_on)
    plots = []
    if cfg.plot:
        from ddp_fnn.perfmodel import plots as sweepplot

        plots = sweepplot.draw(cfg, rows, cfg.out)
    return figures, plots


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------

def parse_list(option: str, text: str, kind: str) -> tuple:
    """A comma list of --OPTION's values; ValueError naming the option and the value."""
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise ValueError(f"{option}: no values in {text!r}")
    out = []
    for v in items:
        try:
            if kind == "int":
                out.append(int(v))
            elif kind == "float":
                x = float(v.rstrip("%"))
                if not math.isfinite(x):
                    raise ValueError
                out.append(x)
            elif kind == "rate":               # kept as written (tc's syntax), checked here
                if v not in ("unshaped", "none"):
                    netmodel.parse_rate(v)
                out.append(None if v in ("unshaped", "none") else v)
            elif kind == "bytes":
                out.append(None if v in ("none", "0") else int(v))
                if out[-1] is not None and out[-1] < 1:
                    raise ValueError
            else:
                out.append(v)
        except ValueError:
            raise ValueError(f"{option}: bad value {v!r}") from None
    if len(set(out)) != len(out):
        raise ValueError(f"{option}: a value is given twice in {text!r}")
    return tuple(out)


def main(cfg: SweepConfig) -> int:
    """Run every point (reusing complete ones), then write the table, the validation
    figures and the plots. Exit status 0, or 1 when a point failed."""
    import click

    cfg.check()
    points = cfg.points()
    for p in points:                         # before anything runs: no complete point of other settings
        done = point_dir(cfg, p) / "point.json"
        if done.is_file():
            ident, old = _identity(cfg, p), json.loads(done.read_text())
            if {k: old.get(k) for k in ident} != ident:
                raise ValueError(f"--out {cfg.out}: point {p.name} was run with other settings ({done}); "
                                 f"use another --out")
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict[Point, tuple[bool, Path]] = {}
    click.echo(f"ddp-fnn sweep: {len(points)} point(s), launcher {cfg.launcher}, {cfg.steps} steps each; "
               f"results in {cfg.out}", err=True)
    with click.progressbar(points, label="sweep", file=sys.stderr, show_pos=True, show_eta=True,
                           item_show_func=lambda p: p.name if p else "") as bar:
        for p in bar:
            results[p] = run_point(cfg, p)
    rows = build_rows(cfg, results)
    figures, plots = write_outputs(cfg, rows, cfg.command_line())
    for key, label in (("step_error", "step time"), ("exposed_error", "exposed comm"),
                       ("cal_step_error", f"step time calibrated on {cfg.calibrate_on} nodes"),
                       ("tx_error", "kernel TX vs reported bytes")):
        f = figures[key]
        if f["points"]:
            click.echo(f"{label}: median abs error {f['median_abs']:.1%}, largest {f['max_abs']:.1%} "
                       f"over {f['points']} point(s)")
    for path in [cfg.out / "sweep.csv", cfg.out / "sweep.json", cfg.out / "validation.md", *plots]:
        click.echo(f"wrote {path}")
    failed = [r["point"] for r in rows if r["status"] != "ok"]
    if failed:
        click.echo(f"ddp-fnn sweep: {len(failed)} point(s) failed: {', '.join(failed)} (logs in "
                   f"{cfg.out / 'points'}/NAME/run.log; a rerun of the same command retries them)", err=True)
        return 1
    return 0

