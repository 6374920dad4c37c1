"""A two-tier fabric model: what one DDP all-reduce puts on each link of a real cluster
(GPUs in servers, servers on leaf switches, leaves on a spine), and how long it takes.
Pure arithmetic, no torch: the one-tier alpha-beta model in ``netmodel`` treats the
network as one bus of bandwidth beta; this module says which physical link that beta is.

The fabric (``Topology``, loaded by ``load`` from TOML or JSON; docs/topology.md has the
format): ``servers`` servers of ``gpus_per_server`` GPUs each; inside a server every GPU
has its own link to the server's switch (NVSwitch, a PCIe switch, or the loopback of a
network namespace), ``intra`` rate per GPU per direction; each server has
``nic.count`` NICs (rails), ``nic.rate`` each per direction (each rate times its
section's ``efficiency``, default 1: the share of the line rate left to payload, e.g.
NCCL's own 20.6 of NVLink4's 25 GB/s per link); ``switch.servers_per_leaf``
servers hang off one leaf switch (or, ``rail_optimized``, NIC r of those servers hangs off
rail leaf r, as in NVIDIA's DGX SuperPOD reference design); each leaf's uplink to the
spine carries at most its downlink capacity / ``oversubscription`` per direction (or
``uplink_rate``). The spine itself is taken as non-blocking (a Clos network's spine is
sized so: Al-Fares, Loukissas and Vahdat, "A scalable, commodity data center network
architecture", SIGCOMM 2008).

Links, each one direction (a full-duplex cable is two links), named stably::

    server{k}.gpu{g}.tx / .rx       GPU g's intra-server link, out of / into the GPU
    server{k}.nic{r}.tx / .rx       NIC r's port, out of / into the server
    leaf{j}.up / leaf{j}.down       leaf j's uplinks to the spine, all of them together

Ranks are placed as torchrun places them: server k holds ranks k*G .. k*G+G-1.

The collectives, for one all-reduce of S bytes per rank (N = servers * G ranks):

- ``ring``: NCCL's ring (Patarasuk and Yuan 2009). The ring runs in rank order; the data
  is split over C channels (default: one per NIC, as NCCL opens at least one channel per
  NIC: NCCL's ``src/graph/search.cc``), channel c a ring of its own whose server-crossing
  edges (local rank G-1 of server k to local rank 0 of server k+1) leave and enter
  through NIC c mod R. Every ring edge carries 2(N-1)/N * S/C bytes.
- ``tree``: NCCL's double binary tree across servers and a chain inside each
  (Sanders, Speck and Traeff 2009; NCCL 2.4's ``src/graph/trees.cc``, whose tree
  shapes ``_btree_parent`` reproduces). Each of the two trees carries half of each
  channel's data up (reduce) and down (broadcast), pipelined, so every tree edge carries
  S/(2C) bytes each way and both directions run at once.
- ``hierarchical``: reduce-scatter inside each server (a ring of G, (G-1)/G * S per
  edge), then G all-reduces across servers at once, one per local rank g, each a ring of
  the servers' rank-g GPUs through NIC g*R/G carrying 2(n-1)/n * S/G per edge (n =
  servers), then an all-gather inside (as the reduce-scatter). The phases run one after
  the other (Jia et al., "Highly scalable deep learning training system with
  mixed-precision", arXiv:1807.11205, 2018, section 3.3; Horovod's hierarchical
  all-reduce).

Every transfer is a flow over a path of links. Flows that run at the same time share
each link max-min fairly (``max_min_rates``: progressive filling, Bertsekas and
Gallager, "Data Networks", 2nd ed., 1992, section 6.5.2 -- what long-lived TCP or
credit-based IB flows converge to, to first order). A phase lasts::

    t_phase(S) = max over its flows f of (latency_f + bytes_f(S) / rate_f)

with bytes_f proportional to S and one latency for all flows of a phase: the time a
chunk takes to pass the pipeline once -- the ring's 2(N-1) hops at its hops' mean
latency (Hockney's alpha per step as in ``netmodel``, but each hop its own), the tree's
2 * depth hops, a hierarchical phase its own ring's steps. A hop's latency is the intra link's inside a server, the NIC's plus
each switch crossed (1 on the same leaf, 3 through the spine) between servers. So every
collective's time is affine in S -- t(S) = latency_s + S * seconds_per_byte -- which is
what lets ``estimate`` hand it to ``netmodel.estimate_step`` as an equivalent alpha and
beta instead of copying its bucket-overlap time line.

What it leaves out: NVLink SHARP / in-network reduction (NCCL's NVLS and CollNet
algorithms), protocol overhead beyond a link's ``efficiency`` (one number a link, from
the file: NCCL's Simple and LL protocols differ), the PCIe path from GPU to NIC,
congestion control and adaptive routing, and the reduction's arithmetic.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ddp_fnn.core import fileio, units, wire
from ddp_fnn.perfmodel import nccl, netmodel

if sys.version_info >= (3, 11):
    import tomllib
else:                               # Python 3.10: the same parser, from PyPI (as cli.py does)
    import tomli as tomllib

ALGORITHMS = tuple(a for a in wire.ALGORITHMS if a != "halving-doubling")
"""The all-reduces the fabric model maps link by link (halving-doubling has no mapping here)."""
INTRA_KINDS = ("nvlink", "pcie", "loopback")


# ---------------------------------------------------------------------------------------
# the fabric
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Topology:
    """A cluster of ``servers`` x ``gpus_per_server`` ranks on a leaf-spine fabric.
    Rates are bytes/s per direction, latencies seconds (see the module docstring)."""

    name: str
    servers: int
    gpus_per_server: int
    intra_kind: str
    intra_bytes_per_second: float
    intra_latency_s: float
    nics_per_server: int
    nic_bytes_per_second: float
    nic_latency_s: float
    servers_per_leaf: int
    uplink_bytes_per_second: float
    """All of one leaf's uplinks together, per direction."""
    rail_optimized: bool = False
    switch_latency_s: float = 0.0
    # Hardware NCCL's cost model reads (perfmodel/nccl.py); none of it is a tuning constant.
    gpu_arch: str = "hopper"
    """ampere (A100) or hopper (H100): which of NCCL's per-architecture tables apply."""
    nvswitch: bool = True
    """The GPUs of a server meet in an NVSwitch (NVLS needs one)."""
    pcie_gen: int = 5
    pcie_lanes: int = 16
    pcie_switches: int = 0
    """PCIe switches per server (0: one per GPU or per NIC, whichever is more); GPU g sits on
    switch g*S/G, NIC r on r*S/R, and a GPU's local NICs are those on its switch."""
    nic_attach: str = "switch"
    """switch: NICs sit on the GPUs' PCIe switches; cpu: on the CPU, off every GPU's switch."""
    intra_line_bytes_per_second: float = 0.0
    nic_line_bytes_per_second: float = 0.0

    @property
    def world_size(self) -> int:
        return self.servers * self.gpus_per_server

    @property
    def leaf_groups(self) -> int:
        """Groups of ``servers_per_leaf`` servers (a rail-optimized group has R leaves)."""
        return self.servers // self.servers_per_leaf

    @property
    def leaves(self) -> int:
        return self.leaf_groups * (self.nics_per_server if self.rail_optimized else 1)

    @property
    def leaf_downlink_bytes_per_second(self) -> float:
        """What the NICs on one leaf can push into it: the leaf's downlink capacity."""
        ports = self.servers_per_leaf * (1 if self.rail_optimized else self.nics_per_server)
        return ports * self.nic_bytes_per_second

    @property
    def oversubscription(self) -> float:
        """downlink : uplink capacity of a leaf (1 = non-blocking)."""
        return self.leaf_downlink_bytes_per_second / self.uplink_bytes_per_second

    def nic_of(self, local_rank: int) -> int:
        """The NIC closest to a GPU: GPUs spread evenly over the NICs (GPU g -> NIC g*R/G),
        as on an HGX board where GPU g and NIC g share a PCIe switch."""
        return local_rank * self.nics_per_server // self.gpus_per_server

    def leaf_of(self, server: int, nic: int) -> int:
        group = server // self.servers_per_leaf
        return group * self.nics_per_server + nic if self.rail_optimized else group


def _fail(key: str, message: str, value) -> ValueError:
    return ValueError(f"topology: {key} {message}, got {value!r}")


def parse_rate(key: str, text) -> float:
    """A rate in bytes/s (core.units.parse_rate), its error naming the file's key."""
    try:
        return units.parse_rate(text)
    except ValueError:
        raise _fail(key, f"must be a rate such as {units.RATE_EXAMPLES}", text) from None


_SCHEMA = {
    "": {"name", "servers", "gpus_per_server", "intra", "nic", "switch", "gpu", "pcie"},
    "intra": {"kind", "rate", "efficiency", "latency_us", "nvswitch"},
    "nic": {"count", "rate", "efficiency", "latency_us", "attach"},
    "gpu": {"arch"},
    "pcie": {"gen", "lanes", "switches"},
    "switch": {"servers_per_leaf", "oversubscription", "uplink_rate", "rail_optimized", "latency_us"},
}


def _check_keys(table: Mapping, section: str) -> None:
    for key in table:
        if key not in _SCHEMA[section]:
            where = f"{section}.{key}" if section else key
            raise ValueError(f"topology: unknown key {where} (known: {', '.join(sorted(_SCHEMA[section]))})")


def _int(table: Mapping, key: str, where: str, *, minimum: int, default=None) -> int:
    v = table.get(key, default)
    if v is None:
        raise ValueError(f"topology: {where} is missing")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _fail(where, f"must be an integer >= {minimum}", v)
    return v


def _latency_s(table: Mapping, where: str, default_us: float) -> float:
    v = table.get("latency_us", default_us)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
        raise _fail(f"{where}.latency_us", "must be a number of microseconds >= 0", v)
    return float(v) * 1e-6


def _efficiency(table: Mapping, where: str) -> float:
    """The share of a link's line rate that a collective's payload gets (link-layer and
    protocol overhead); 1.0 unless the file says otherwise, and then it says where from."""
    v = table.get("efficiency", 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1):
        raise _fail(f"{where}.efficiency", "must be a number in (0, 1] (payload rate / line rate)", v)
    return float(v)


def _section(raw: Mapping, name: str, required: bool = True) -> Mapping:
    table = raw.get(name)
    if table is None:
        if required:
            raise ValueError(f"topology: [{name}] is missing")
        return {}
    if not isinstance(table, Mapping):
        raise _fail(name, "must be a table", table)
    _check_keys(table, name)
    return table


TUNING_KEYS = ("intra.latency_us", "intra.efficiency", "nic.latency_us", "nic.efficiency", "switch.latency_us")
"""Keys a GPU fabric's file may not carry: they are the model's constants (NCCL's own, in
perfmodel/nccl.py), not hardware. A namespace cluster (intra.kind = loopback) keeps them: its
links are emulated (tc) and its model is Gloo's alpha-beta."""


def _nccl_defaults(kind: str, arch: str) -> dict:
    """A GPU fabric's per-link constants from NCCL's table (perfmodel/nccl.py), not from the file:
    NVLink's payload share SM8x/SM90_NVLINK_BW / the line rate per link (src/graph/topo.h), the
    ring Simple hwLat of an intra-node hop (NVLink or PCI) and of a network hop (tuning.cc)."""
    simple = nccl.PROTOCOLS.index("Simple")
    intra_hw = "nvlink" if kind == "nvlink" else "pci"
    return {"intra.efficiency": nccl.NCCL["NVLINK_BW"][arch] / nccl.NVLINK_LINE_GBPS if kind == "nvlink" else 1.0,
            "intra.latency_us": nccl.NCCL["hwLat"][intra_hw]["ring"][simple],
            "nic.efficiency": 1.0,
            "nic.latency_us": nccl.NCCL["hwLat"]["net"]["ring"][simple],
            "switch.latency_us": 0.0}


def _refuse_tuning_keys(raw: Mapping, kind: str) -> None:
    for where in TUNING_KEYS:
        section, key = where.split(".")
        table = raw.get(section)
        if isinstance(table, Mapping) and key in table:
            raise ValueError(f"topology: {where} is a tuning constant, not hardware: with intra.kind = {kind} the "
                             f"model takes NCCL's own (perfmodel/nccl.py, docs/nccl.md); remove the key")


def from_dict(raw: Mapping, default_name: str = "topology") -> Topology:
    """A ``Topology`` from a parsed TOML/JSON table; raises ValueError, one line naming the
    key and the value, on anything wrong (so a typo is not silently a default)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"topology: expected a table at the top, got {type(raw).__name__}")
    _check_keys(raw, "")
    name = str(raw.get("name", default_name))
    servers = _int(raw, "servers", "servers", minimum=1)
    gpus = _int(raw, "gpus_per_server", "gpus_per_server", minimum=1)

    intra = _section(raw, "intra")
    kind = intra.get("kind", "nvlink")
    if kind not in INTRA_KINDS:
        raise _fail("intra.kind", f"must be one of {', '.join(INTRA_KINDS)}", kind)
    if "rate" not in intra:
        raise ValueError("topology: intra.rate is missing")
    gpu = _section(raw, "gpu", required=False)
    arch = gpu.get("arch", "hopper")
    if arch not in ("ampere", "hopper"):
        raise _fail("gpu.arch", "must be ampere (A100) or hopper (H100)", arch)
    if kind == "loopback":
        defaults = {"intra.efficiency": None, "intra.latency_us": 1.0, "nic.efficiency": None,
                    "nic.latency_us": 2.0, "switch.latency_us": 0.0}
    else:
        _refuse_tuning_keys(raw, kind)
        defaults = _nccl_defaults(kind, arch)
    intra_eff = _efficiency(intra, "intra") if defaults["intra.efficiency"] is None else defaults["intra.efficiency"]
    intra_rate = parse_rate("intra.rate", intra["rate"]) * intra_eff
    intra_lat = _latency_s(intra, "intra", defaults["intra.latency_us"])

    # One server needs no NIC; several do, or nothing could leave a server.
    nic = _section(raw, "nic", required=servers > 1)
    nics = _int(nic, "count", "nic.count", minimum=1, default=1)
    if "rate" in nic:
        nic_eff = _efficiency(nic, "nic") if defaults["nic.efficiency"] is None else defaults["nic.efficiency"]
        nic_rate = parse_rate("nic.rate", nic["rate"]) * nic_eff
    elif servers > 1:
        raise ValueError("topology: nic.rate is missing")
    else:
        nic_rate = intra_rate               # unused: nothing leaves a lone server
    nic_lat = _latency_s(nic, "nic", defaults["nic.latency_us"])
    pcie = _section(raw, "pcie", required=False)
    gen = pcie.get("gen", 5 if arch == "hopper" else 4)
    if gen not in (3, 4, 5, 6):
        raise _fail("pcie.gen", "must be 3, 4, 5 or 6", gen)
    lanes = _int(pcie, "lanes", "pcie.lanes", minimum=1, default=16)
    switches = _int(pcie, "switches", "pcie.switches", minimum=0, default=0)
    nvswitch = intra.get("nvswitch", kind == "nvlink" and gpus > 2)
    if not isinstance(nvswitch, bool):
        raise _fail("intra.nvswitch", "must be true or false", nvswitch)
    attach = nic.get("attach", "switch")
    if attach not in ("switch", "cpu"):
        raise _fail("nic.attach", "must be switch (on the GPUs' PCIe switches) or cpu", attach)

    switch = _section(raw, "switch", required=False)
    per_leaf = _int(switch, "servers_per_leaf", "switch.servers_per_leaf", minimum=1, default=servers)
    if servers % per_leaf:
        raise _fail("switch.servers_per_leaf", f"must divide servers ({servers})", per_leaf)
    rail = switch.get("rail_optimized", False)
    if not isinstance(rail, bool):
        raise _fail("switch.rail_optimized", "must be true or false", rail)
    if "oversubscription" in switch and "uplink_rate" in switch:
        raise ValueError("topology: switch.oversubscription and switch.uplink_rate both given: "
                         "give one (the uplink as a ratio or as a rate)")
    downlink = per_leaf * (1 if rail else nics) * nic_rate
    if "uplink_rate" in switch:
        uplink = parse_rate("switch.uplink_rate", switch["uplink_rate"])
    else:
        ratio = switch.get("oversubscription", 1)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (ratio >= 1 and math.isfinite(ratio)):
            raise _fail("switch.oversubscription", "must be a number >= 1 (downlink:uplink, e.g. 1, 2, 4)", ratio)
        uplink = downlink / ratio
    return Topology(name=name, servers=servers, gpus_per_server=gpus, intra_kind=kind,
                    intra_bytes_per_second=intra_rate, intra_latency_s=intra_lat,
                    nics_per_server=nics, nic_bytes_per_second=nic_rate, nic_latency_s=nic_lat,
                    servers_per_leaf=per_leaf, uplink_bytes_per_second=uplink, rail_optimized=rail,
                    switch_latency_s=_latency_s(switch, "switch", defaults["switch.latency_us"]), gpu_arch=arch,
                    nvswitch=nvswitch,
                    pcie_gen=gen, pcie_lanes=lanes, pcie_switches=switches, nic_attach=attach,
                    intra_line_bytes_per_second=parse_rate("intra.rate", intra["rate"]),
                    nic_line_bytes_per_second=(parse_rate("nic.rate", nic["rate"]) if "rate" in nic
                                               else parse_rate("intra.rate", intra["rate"])))


def load(path: str | Path) -> Topology:
    """A ``Topology`` from a ``.toml`` or ``.json`` file (by its suffix; anything else is
    read as TOML). Errors are one line: ``topology: KEY ..., got VALUE``."""
    return from_dict(load_raw(path), default_name=Path(path).stem)


def load_raw(path: str | Path) -> dict:
    """The file's table as parsed, unchecked (``load`` checks it)."""
    p = Path(path)
    try:
        if p.suffix.lower() == ".json":
            raw = json.loads(p.read_text())
        else:
            with p.open("rb") as f:
                raw = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"topology: cannot read {p}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"topology: {p} is not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'}: "
                         f"{str(e).splitlines()[0]}") from None
    return raw


# ---------------------------------------------------------------------------------------
# links, paths and max-min fair sharing
# ---------------------------------------------------------------------------------------

def gpu_link(server: int, gpu: int, direction: str) -> str:
    return f"server{server}.gpu{gpu}.{direction}"


def nic_link(server: int, nic: int, direction: str) -> str:
    return f"server{server}.nic{nic}.{direction}"


def link_rate(topo: Topology, name: str) -> float:
    """The capacity of a link, from its name's kind."""
    if name.startswith("leaf"):
        return topo.uplink_bytes_per_second
    return topo.nic_bytes_per_second if ".nic" in name else topo.intra_bytes_per_second


def link_tier(name: str) -> str:
    """intra, nic or uplink: the three tiers a per-tier total sums over."""
    if name.startswith("leaf"):
        return "uplink"
    return "nic" if ".nic" in name else "intra"


def path(topo: Topology, src_rank: int, dst_rank: int, nic: int = 0) -> tuple[tuple[str, ...], float]:
    """Links a message from one rank to another crosses, and one hop's latency. Inside a
    server: the sender's and the receiver's intra links. Between servers: out of the
    sender's NIC ``nic``, through its leaf (and, when the receiver's NIC sits on another
    leaf, up that leaf's uplinks, across the spine and down the other's), into the
    receiver's NIC ``nic`` -- the same rail on both ends, as NCCL pairs them."""
    g = topo.gpus_per_server
    (sa, ga), (sb, gb) = divmod(src_rank, g), divmod(dst_rank, g)
    if sa == sb:
        return (gpu_link(sa, ga, "tx"), gpu_link(sb, gb, "rx")), topo.intra_latency_s
    la, lb = topo.leaf_of(sa, nic), topo.leaf_of(sb, nic)
    if la == lb:
        return (nic_link(sa, nic, "tx"), nic_link(sb, nic, "rx")), topo.nic_latency_s + topo.switch_latency_s
    links = (nic_link(sa, nic, "tx"), f"leaf{la}.up", f"leaf{lb}.down", nic_link(sb, nic, "rx"))
    return links, topo.nic_latency_s + 3 * topo.switch_latency_s


def max_min_rates(flows: Sequence[Sequence[str]], capacity: Mapping[str, float]) -> list[float]:
    """Max-min fair rate of each flow (a sequence of link names) on links of the given
    capacity, by progressive filling (Bertsekas and Gallager 1992, 6.5.2): raise every
    unfrozen flow's rate together until some link is full, freeze the flows through it,
    repeat. No flow can then gain without taking from one that has no more.

    Links that saturate at the same level freeze together, so a symmetric fabric takes a
    handful of rounds whatever its size."""
    users: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(flows):
        for link in dict.fromkeys(f):           # a flow counts once per link
            users[link].append(i)
    left = {link: float(capacity[link]) for link in users}
    active = {link: len(u) for link, u in users.items()}
    rates = [0.0] * len(flows)
    frozen = [False] * len(flows)
    unfrozen = len(flows)
    while unfrozen:
        level = min(left[link] / n for link, n in active.items() if n)
        for link, n in active.items():
            left[link] -= level * n
        for i in range(len(flows)):
            if not frozen[i]:
                rates[i] += level
        full = [link for link, n in active.items() if n and left[link] <= 1e-9 * capacity[link]]
        for link in full:
            for i in users[link]:
                if not frozen[i]:
                    frozen[i] = True
                    unfrozen -= 1
                    for other in dict.fromkeys(flows[i]):
                        active[other] -= 1
    return rates


# ---------------------------------------------------------------------------------------
# collectives mapped onto the fabric
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """Flows that run at the same time. ``bytes_per_payload_byte[i]``: what flow i moves
    per byte all-reduced (times S for the bytes); ``rates`` their max-min fair shares."""

    name: str
    flows: tuple[tuple[str, ...], ...]
    bytes_per_payload_byte: tuple[float, ...]
    rates_bytes_per_second: tuple[float, ...]
    latency_s: float

    @property
    def seconds_per_payload_byte(self) -> float:
        return max((b / r for b, r in zip(self.bytes_per_payload_byte, self.rates_bytes_per_second)), default=0.0)

    def time_s(self, size_bytes: float) -> float:
        """max over flows of (latency + bytes / share); one latency for all flows."""
        return self.latency_s + size_bytes * self.seconds_per_payload_byte if self.flows else 0.0


@dataclass(frozen=True)
class Collective:
    """One all-reduce on a fabric: phases run one after the other."""

    algorithm: str
    channels: int
    world_size: int
    phases: tuple[Phase, ...]

    @property
    def latency_s(self) -> float:
        return sum(p.latency_s for p in self.phases if p.flows)

    @property
    def seconds_per_payload_byte(self) -> float:
        return sum(p.seconds_per_payload_byte for p in self.phases)

    def time_s(self, size_bytes: float) -> float:
        return sum(p.time_s(size_bytes) for p in self.phases)

    def link_bytes_per_payload_byte(self) -> dict[str, float]:
        """Each link's bytes per byte all-reduced, summed over flows and phases."""
        out: dict[str, float] = defaultdict(float)
        for p in self.phases:
            for f, b in zip(p.flows, p.bytes_per_payload_byte):
                for link in f:
                    out[link] += b
        return dict(out)


def _phase(topo: Topology, name: str, hops: Sequence[tuple[int, int, int]], bytes_each: float,
           steps: int, latency_s: float | None = None) -> Phase:
    """A phase of transfers ``(src_rank, dst_rank, nic)``, each moving ``bytes_each`` per
    payload byte. Its latency, unless given: ``steps`` hops at the mean hop latency of
    its transfers -- a ring's first chunk travels 2(N-1) hops in ring order before the
    pipeline is full, paying each hop's own latency (NCCL's tuning model sums its
    NVLink and network hops the same way: src/graph/tuning.cc)."""
    flows, lats = [], []
    for src, dst, nic in hops:
        links, lat = path(topo, src, dst, nic)
        flows.append(links)
        lats.append(lat)
    if latency_s is None:
        latency_s = steps * sum(lats) / len(lats) if lats else 0.0
    capacity = {link: link_rate(topo, link) for f in flows for link in f}
    rates = max_min_rates(flows, capacity)
    return Phase(name, tuple(flows), (bytes_each,) * len(flows), tuple(rates), latency_s)


def _ring_hops(ranks: Sequence[int], nic: int) -> list[tuple[int, int, int]]:
    return [(a, ranks[(i + 1) % len(ranks)], nic) for i, a in enumerate(ranks)] if len(ranks) > 1 else []


def ring(topo: Topology, channels: int) -> Collective:
    """C rings in rank order, channel c crossing servers through NIC c mod R; each edge
    carries 2(N-1)/N * S/C (module docstring)."""
    n = topo.world_size
    hops = [h for c in range(channels) for h in _ring_hops(range(n), c % topo.nics_per_server)]
    per_edge = 2 * (n - 1) / n / channels
    return Collective("ring", channels, n, (_phase(topo, "ring", hops, per_edge, 2 * (n - 1)),))


def _btree_parent(nranks: int, rank: int) -> int:
    """NCCL's binary tree (src/graph/trees.cc, ncclGetBtree): rank 0 is the root; a rank's
    parent flips its lowest set bit up one place, or clears it when that falls off the end."""
    if rank == 0:
        return -1
    bit = rank & -rank
    up = (rank ^ bit) | (bit << 1)
    return rank ^ bit if up >= nranks else up


def double_binary_tree(nranks: int) -> tuple[list[int], list[int]]:
    """Parents (-1 at the root) in NCCL's two trees: the second is the first mirrored
    (r -> n-1-r) when n is even, shifted by one when n is odd, so that the first tree's
    leaves are the second's inner nodes (ncclGetDtree)."""
    first = [_btree_parent(nranks, r) for r in range(nranks)]
    second = []
    for r in range(nranks):
        if nranks % 2:
            p = _btree_parent(nranks, (r - 1) % nranks)
            second.append(-1 if p < 0 else (p + 1) % nranks)
        else:
            p = _btree_parent(nranks, nranks - 1 - r)
            second.append(-1 if p < 0 else nranks - 1 - p)
    return first, second


def _depth(parents: Sequence[int]) -> int:
    def d(r):
        k = 0
        while parents[r] >= 0:
            r, k = parents[r], k + 1
        return k
    return max((d(r) for r in range(len(parents))), default=0)


def tree(topo: Topology, channels: int) -> Collective:
    """Double binary tree across servers (their local rank 0 GPUs, through NIC c mod R)
    and a chain inside each server; every edge carries S/(2C) up and S/(2C) down."""
    n, g = topo.servers, topo.gpus_per_server
    hops = []
    for c in range(channels):
        nic = c % topo.nics_per_server
        for parents in double_binary_tree(n):
            for k, p in enumerate(parents):
                if p >= 0:
                    hops += [(k * g, p * g, nic), (p * g, k * g, nic)]     # reduce up, broadcast down
            for k in range(n):
                for i in range(1, g):
                    a, b = k * g + i, k * g + i - 1
                    hops += [(a, b, nic), (b, a, nic)]
    # A chunk goes up the chain and the deeper tree, then back down: 2 * depth hops.
    inter_hop = path(topo, 0, (n - 1) * g, 0)[1] if n > 1 else 0.0      # first to last server: the longest path
    latency = 2 * (max(_depth(t) for t in double_binary_tree(n)) * inter_hop + (g - 1) * topo.intra_latency_s)
    return Collective("tree", channels, topo.world_size,
                      (_phase(topo, "tree", hops, 1 / (2 * channels), 0, latency),))


def hierarchical(topo: Topology) -> Collective:
    """Reduce-scatter inside, G rail all-reduces across, all-gather inside (module docstring)."""
    n, g = topo.servers, topo.gpus_per_server
    intra = [h for k in range(n) for h in _ring_hops(range(k * g, k * g + g), 0)]
    across = [h for i in range(g) for h in _ring_hops([k * g + i for k in range(n)], topo.nic_of(i))]
    phases = (
        _phase(topo, "reduce-scatter", intra, (g - 1) / g, g - 1),
        _phase(topo, "all-reduce across servers", across, 2 * (n - 1) / n / g, 2 * (n - 1)),
        _phase(topo, "all-gather", intra, (g - 1) / g, g - 1),
    )
    return Collective("hierarchical", 1, topo.world_size, phases)


def collective(topo: Topology, algorithm: str = "ring", channels: int | None = None) -> Collective:
    """The all-reduce ``algorithm`` on ``topo``; ``channels`` (ring and tree) defaults to
    one per NIC (hierarchical already runs G rings at once and takes none)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    if channels is None:
        channels = topo.nics_per_server
    if int(channels) != channels or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels}")
    if algorithm == "ring":
        return ring(topo, int(channels))
    if algorithm == "tree":
        return tree(topo, int(channels))
    return hierarchical(topo)


def busbw(topo: Topology, size_bytes: float, algorithm: str = "ring", channels: int | None = None) -> float:
    """The bus bandwidth nccl-tests' all_reduce_perf would print for this size, bytes/s:
    algbw * 2(N-1)/N with algbw = S / t(S) (nccl-tests doc/PERFORMANCE.md; wire.busbw).
    0 at N = 1, as nccl-tests prints it."""
    coll = collective(topo, algorithm, channels)
    if topo.world_size == 1:
        return 0.0
    return wire.busbw(wire.algbw(size_bytes, coll.time_s(size_bytes)), topo.world_size)


def gloo_broadcast_sends(world: int, root: int = 0) -> list[tuple[int, int]]:
    """(sender, receiver) of every message of Gloo's broadcast, round by round: each rank's
    ``wire.broadcast_peers`` (the binomial tree of gloo/broadcast.cc, whose per-rank
    bytes are ``wire.broadcast_wire_bytes``). At 8 ranks: 0->1; 0->2, 1->3; 0->4,
    1->5, 2->6, 3->7 -- rank 0 sends 3 copies, not N-1. DDP's start-up broadcast of rank
    0's parameters (``_sync_module_states``) is one such broadcast."""
    sends = [(a, b) for a in range(world) for b in wire.broadcast_peers(world, a, root)]
    # round i sends across a virtual distance of 2^i; within a round, by virtual sender
    return sorted(sends, key=lambda ab: ((ab[1] - ab[0]) % world, (ab[0] - root) % world))


def broadcast_bytes_leaving(group_of, world: int, nbytes: int) -> dict:
    """Bytes of one Gloo broadcast of ``nbytes`` that each group (a server, a leaf: named
    by ``group_of(rank)``) sends to ranks outside it."""
    out: dict = {}
    for a, b in gloo_broadcast_sends(world):
        if group_of(a) != group_of(b):
            out[group_of(a)] = out.get(group_of(a), 0) + nbytes
    return out


def job_link_bytes(topo: Topology, payload_bytes: float, algorithm: str = "ring", probe_payload_bytes: float = 0.0,
                   setup_bytes: int = 0) -> dict[str, float]:
    """Every NIC and uplink's bytes over a whole job, one direction each: its gradient
    all-reduces (``payload_bytes`` per rank in all, by ``algorithm``), the probe's
    (always the backend's flat ring), and DDP's start-up broadcast of ``setup_bytes``
    (Gloo's binomial tree) -- what a kernel counter on that link saw, less the store's and
    the small collectives' few kB."""
    out: dict[str, float] = defaultdict(float)
    for coll, nbytes in ((collective(topo, algorithm), payload_bytes), (collective(topo, "ring"), probe_payload_bytes)):
        if nbytes:
            for link, b in coll.link_bytes_per_payload_byte().items():
                out[link] += b * nbytes
    g, per_leaf = topo.gpus_per_server, topo.gpus_per_server * topo.servers_per_leaf
    for a, b in gloo_broadcast_sends(topo.world_size) if setup_bytes else ():
        if a // g != b // g:
            out[nic_link(a // g, topo.nic_of(a % g), "tx")] += setup_bytes
            out[nic_link(b // g, topo.nic_of(b % g), "rx")] += setup_bytes
        if topo.leaf_groups > 1 and not topo.rail_optimized and a // per_leaf != b // per_leaf:
            out[f"leaf{a // per_leaf}.up"] += setup_bytes
            out[f"leaf{b // per_leaf}.down"] += setup_bytes
    return {k: v for k, v in out.items() if ".nic" in k or k.startswith("leaf")}


# ---------------------------------------------------------------------------------------
# one training step
# ---------------------------------------------------------------------------------------

TIERS = ("intra", "nic", "uplink")


@dataclass(frozen=True)
class TopologyEstimate:
    """One DDP step on a fabric: per-link load, its bottleneck, and the step's time line
    (``step``, netmodel's estimate with the fabric's equivalent alpha and beta)."""

    topology: Topology
    algorithm: str
    channels: int
    step: netmodel.StepEstimate
    allreduce_latency_s: float
    """The latency term of one all-reduce on this fabric (any size)."""
    allreduce_seconds_per_byte: float
    """Transfer seconds per byte all-reduced per rank: t(S) = latency + S * this."""
    link_bytes_per_step: tuple[tuple[str, float], ...]
    """Every link a step uses, with its bytes per step (one direction), by name."""
    bottleneck_link: str
    bottleneck_busy_s: float
    """The bottleneck's bytes / rate: how long it is busy per step."""

    @property
    def step_time_s(self) -> float:
        return self.step.step_time_s

    @property
    def comm_time_s(self) -> float:
        """The union of the step's all-reduce intervals: the comm window."""
        return self.step.comm_time_per_step_s

    @property
    def exposed_s(self) -> float:
        return self.step.exposed_comm_time_per_step_s

    @property
    def tier_bytes_per_step(self) -> dict[str, float]:
        """Bytes per step sent over each tier: GPU intra links (tx), NIC ports (tx), leaf
        uplinks (up: what crosses the spine). Each byte counted once, at its sender."""
        out = {t: 0.0 for t in TIERS}
        for link, b in self.link_bytes_per_step:
            if link.endswith(".tx") or link.endswith(".up"):
                out[link_tier(link)] += b
        return out

    @property
    def bottleneck_bytes_per_step(self) -> float:
        return dict(self.link_bytes_per_step).get(self.bottleneck_link, 0.0)

    @property
    def bottleneck_utilisation(self) -> float:
        """Busy time / step time: the link's mean load over the whole step."""
        return self.bottleneck_busy_s / self.step_time_s if self.step_time_s > 0 else 0.0

    @property
    def burst_bytes_per_second(self) -> float:
        """The bottleneck's bytes / comm window: the rate it runs at while DDP talks."""
        return self.bottleneck_bytes_per_step / self.comm_time_s if self.comm_time_s > 0 else 0.0

    @property
    def duty_cycle(self) -> float:
        """Comm window / step: the fraction of the step the network is in use."""
        return self.comm_time_s / self.step_time_s if self.step_time_s > 0 else 0.0

    def utilisation(self) -> dict[str, float]:
        """Every link's busy time / step time."""
        t = self.step_time_s
        return {link: (b / link_rate(self.topology, link)) / t if t > 0 else 0.0
                for link, b in self.link_bytes_per_step}

    def to_dict(self) -> dict:
        """Strict JSON (no NaN or infinity: those become null)."""
        topo = self.topology
        out = {
            "topology": {"name": topo.name, "servers": topo.servers, "gpus_per_server": topo.gpus_per_server,
                         "world_size": topo.world_size, "intra_kind": topo.intra_kind,
                         "intra_bytes_per_second": topo.intra_bytes_per_second,
                         "intra_latency_s": topo.intra_latency_s, "nics_per_server": topo.nics_per_server,
                         "nic_bytes_per_second": topo.nic_bytes_per_second, "nic_latency_s": topo.nic_latency_s,
                         "servers_per_leaf": topo.servers_per_leaf, "leaves": topo.leaves,
                         "uplink_bytes_per_second": topo.uplink_bytes_per_second,
                         "oversubscription": topo.oversubscription, "rail_optimized": topo.rail_optimized,
                         "switch_latency_s": topo.switch_latency_s},
            "algorithm": self.algorithm,
            "channels": self.channels,
            "allreduce_latency_s": self.allreduce_latency_s,
            "allreduce_seconds_per_byte": self.allreduce_seconds_per_byte,
            "step_time_s": self.step_time_s,
            "comm_time_s": self.comm_time_s,
            "exposed_s": self.exposed_s,
            "tier_bytes_per_step": self.tier_bytes_per_step,
            "bottleneck": {"link": self.bottleneck_link, "bytes_per_step": self.bottleneck_bytes_per_step,
                           "rate_bytes_per_second": link_rate(topo, self.bottleneck_link) if self.bottleneck_link else None,
                           "busy_s": self.bottleneck_busy_s, "utilisation": self.bottleneck_utilisation,
                           "burst_bytes_per_second": self.burst_bytes_per_second, "duty_cycle": self.duty_cycle},
            "link_bytes_per_step": dict(self.link_bytes_per_step),
            "step": self.step.to_dict(),
        }
        return fileio.clean(out)


def estimate(topo: Topology, widths: Sequence[int], *, compute_s: float, bucket_mb: float | None = None,
             compression: str = "none", algorithm: str = "ring", channels: int | None = None,
             backward_fraction: float = 2 / 3, first_bucket_mb: float | None = None,
             concurrency: int = 1) -> TopologyEstimate:
    """One DDP step of an FNN of these widths on ``topo`` (module docstring).

    The all-reduce's time on the fabric is t(S) = L + S * c (``collective``). That is
    netmodel's ring time 2(N-1) alpha + 2(N-1)/N * S / beta for alpha = L / 2(N-1) and
    beta = 2(N-1)/N / c, so ``netmodel.estimate_step`` with those replays DDP's buckets
    and their overlap with backward exactly as it does for the one-tier model. Per-link
    bytes are each link's share of one all-reduce times the step's payload (every bucket
    is all-reduced the same way, so a link's load is linear in the payload)."""
    if not (compute_s >= 0 and math.isfinite(compute_s)):
        raise ValueError(f"compute time must be >= 0 s, got {compute_s}")
    coll = collective(topo, algorithm, channels)
    n = topo.world_size
    if n > 1:
        alpha = coll.latency_s / (2 * (n - 1))
        beta = 2 * (n - 1) / n / coll.seconds_per_payload_byte
    else:
        alpha, beta = 0.0, 1.0                  # nothing to send; estimate_step returns 0 comm
    step = netmodel.estimate_step(widths, world_size=n, alpha_s=alpha, beta_bytes_per_second=beta,
                                  compute_time_s=compute_s, bucket_mb=bucket_mb, compression=compression,
                                  algorithm="ring", backward_fraction=backward_fraction,
                                  first_bucket_mb=first_bucket_mb, concurrency=concurrency)
    payload = step.payload_bytes_per_step
    loads = sorted((link, b * payload) for link, b in coll.link_bytes_per_payload_byte().items())
    busy = [(b / link_rate(topo, link), link) for link, b in loads]
    worst_s = max((t for t, _ in busy), default=0.0)
    # Symmetric fabrics tie: name the first of the tied links (by name), not an arbitrary one.
    worst = next((link for t, link in busy if t >= worst_s * (1 - 1e-9) and t > 0), "")
    return TopologyEstimate(topology=topo, algorithm=algorithm, channels=coll.channels, step=step,
                            allreduce_latency_s=coll.latency_s,
                            allreduce_seconds_per_byte=coll.seconds_per_payload_byte,
                            link_bytes_per_step=tuple(loads), bottleneck_link=worst,
                            bottleneck_busy_s=worst_s)


def format_estimate(est: TopologyEstimate) -> list[str]:
    """The human-readable report, a line per item, units on every figure."""
    topo, step = est.topology, est.step
    fb, fs, fr = units.format_bytes, units.format_seconds, units.format_rate
    leaf = (f"{topo.leaves} leaf switch(es) ({'rail-optimized, ' if topo.rail_optimized else ''}"
            f"{topo.servers_per_leaf} server(s) each, uplinks {fr(topo.uplink_bytes_per_second)} "
            f"= {topo.oversubscription:.3g}:1)") if topo.servers > 1 else "no switch traffic (one server)"
    tiers = est.tier_bytes_per_step
    lines = [
        f"fabric       {topo.name}: {topo.servers} server(s) x {topo.gpus_per_server} GPU(s) = {topo.world_size} "
        f"ranks; {topo.intra_kind} {fr(topo.intra_bytes_per_second)} per GPU; {topo.nics_per_server} NIC(s) x "
        f"{fr(topo.nic_bytes_per_second)} per server; {leaf}",
        f"all-reduce   {est.algorithm}" + (f", {est.channels} channel(s)" if est.algorithm != "hierarchical" else "")
        + f": t(S) = {fs(est.allreduce_latency_s)} + S / {fr(1 / est.allreduce_seconds_per_byte) if est.allreduce_seconds_per_byte else 'inf'}",
        f"model        layers {','.join(str(w) for w in step.widths)}: {step.parameters:,} parameters, "
        f"{len(step.buckets)} DDP bucket(s); payload {fb(step.payload_bytes_per_step)} per rank per step "
        f"({step.compression})",
        f"per step     intra {fb(tiers['intra'])}, NIC {fb(tiers['nic'])}, uplink/spine {fb(tiers['uplink'])} "
        f"(bytes sent over each tier, all links together)",
    ]
    if est.bottleneck_link:
        lines.append(
            f"bottleneck   {est.bottleneck_link} ({fr(link_rate(topo, est.bottleneck_link))}): "
            f"{fb(est.bottleneck_bytes_per_step)} per step, busy {fs(est.bottleneck_busy_s)} = "
            f"{est.bottleneck_utilisation:.1%} of the step; burst {fr(est.burst_bytes_per_second)} over the "
            f"comm window, duty cycle {est.duty_cycle:.1%}")
    else:
        lines.append("bottleneck   none: one rank sends nothing")
    lines.append(
        f"time         comm {fs(est.comm_time_s)}, exposed {fs(est.exposed_s)} after backward; step "
        f"{fs(est.step_time_s)} (compute {fs(step.compute_time_per_step_s)}); scaling efficiency "
        f"{step.scaling_efficiency:.1%}")
    return lines
