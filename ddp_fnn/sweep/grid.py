"""The sweep's grid: its settings (``SweepConfig``, checked with messages naming the
option), its points, and each point's `ddp-fnn train` arguments."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ddp_fnn.core import units
from ddp_fnn.core.wire import DEFAULT_BUCKET_MB
from ddp_fnn.perfmodel import netmodel


LAUNCHERS = ("netns", "loopback")


@dataclass(frozen=True)
class Axis:
    """One dimension of the grid: its option (``--bucket-mb``), the SweepConfig field that
    holds its values (``bucket_mbs``), the Point field of one value (``bucket_mb``), how
    a value is parsed (``parse_list``'s kind) and spelled back (``show``), and train's
    option when the axis is one (its help and default then come from train's field,
    cli.train_option). A new axis is a row here and a field of Point and SweepConfig."""
    option: str
    values: str
    point: str
    kind: str
    train: str | None = None
    default: str = ""
    help: str = ""

    def show(self, v) -> str:
        if v is None:
            return "unshaped" if self.kind == "rate" else "none"
        return f"{v:g}" if isinstance(v, float) else str(v)


AXES = (
    Axis("--nodes", "nodes", "nodes", "int", default="2,4", help="World sizes (one worker a node)."),
    Axis("--link-rate", "link_rates", "link_rate", "rate", default="unshaped",
         help="Each node's egress rate (1gbit, 200mbit, 1Gbit/s), or 'unshaped'."),
    Axis("--bucket-mb", "bucket_mbs", "bucket_mb", "float", train="bucket_mb"),
    Axis("--compression", "compressions", "compression", "str", train="compression"),
    Axis("--loss", "losses", "loss_percent", "float", default="0",
         help="Random packet loss on --loss-node's egress, in % (netns-cluster.sh --loss)."),
    Axis("--queue-limit", "queue_limits", "queue_limit_bytes", "bytes", default="none",
         help="Every switch port's queue in bytes, a shallow buffer (netns-cluster.sh --queue-limit), or 'none'."),
    Axis("--all-reduce", "all_reduces", "all_reduce", "str", train="all_reduce"),
)
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
        return dataclasses.replace(self, nodes=nodes)


@dataclass
class SweepConfig:
    out: Path
    nodes: tuple[int, ...] = (2, 4)
    link_rates: tuple[str | None, ...] = (None,)
    bucket_mbs: tuple[float, ...] = (DEFAULT_BUCKET_MB,)
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
        return [Point(repeat=k, **{a.point: v for a, v in zip(AXES, combo)})
                for k in range(self.repeat) for combo in itertools.product(*(getattr(self, a.values) for a in AXES))]

    def train_argv(self, p: Point) -> list[str]:
        """`ddp-fnn train`'s arguments at point p (weak scaling: rows_per_rank a rank)."""
        # On loopback the workers share the host's ports: no /metrics endpoints unless asked
        # (a namespace node has its own).
        ports = ["--metrics-port", "0"] if self.launcher == "loopback" else []
        algo = ["--all-reduce", p.all_reduce] if p.all_reduce != "flat" else []
        ranks = p.nodes * self.gpus_per_node
        return ["--layers", ",".join(map(str, self.layers)), "--bucket-mb", f"{p.bucket_mb:g}",
                "--compression", p.compression, "--global-batch-size", str(ranks * self.rows_per_rank),
                "--max-steps", str(self.steps), "--progress", "none", "--probe", *ports, *algo, *self.train_args]

    def command_line(self) -> str:
        """The `ddp-fnn sweep` command that makes this sweep (written beside its results)."""
        import shlex

        join = lambda xs, f=str: ",".join(f(x) for x in xs)          # noqa: E731
        args = ["--out", str(self.out), "--launcher", self.launcher]
        for a in AXES:
            values = getattr(self, a.values)
            if a.values != "all_reduces" or values != ("flat",):     # as sweeps before --all-reduce wrote it
                args += [a.option, join(values, a.show)]
        args += ["--loss-node", str(self.loss_node), "--layers", join(self.layers),
                 "--rows-per-rank", str(self.rows_per_rank), "--steps", str(self.steps), "--repeat", str(self.repeat),
                 "--calibrate-on", str(self.calibrate_on), "--host-cores", str(self.host_cores)]
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
                    units.parse_rate(v)
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
