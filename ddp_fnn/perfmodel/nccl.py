"""NCCL's own cost model for one all-reduce: the model of the NCCL backend (Gloo on the
namespace cluster keeps the measured alpha-beta model of ``netmodel``/``predict``).

What NCCL does, read from its source (NVIDIA/nccl 2.30.7, commit 5067397c, the files
named beside each constant in ``NCCL``), and nothing fitted to a measurement:

1. **Graphs** (``src/graph/search.cc``): for each algorithm NCCL searches a per-channel
   speed from a fixed speed array (``sm90SpeedArrayIntra/Inter``) and as many channels
   as every link on the channel's path can carry at that speed; it keeps the best
   channels x speed and may duplicate the channels at half the speed
   (``ncclTopoDupChannels``). ``graphs`` does that search over the links a topology file
   describes: each GPU's NVLink (links x ``SM90_NVLINK_BW``), its PCIe path (lanes x
   the generation's rate / 80, ``src/graph/topo.cc``), the NICs on its PCIe switch
   (a GPU uses its local NICs; one with none relays through an NVLink peer's, PXN), and
   each NIC's line rate.
2. **Tuning** (``src/graph/tuning.cc``, ``ncclTopoTuneModel``): per algorithm x
   protocol a bus bandwidth (channels x speed, then the protocol's factor and
   per-channel cap) and a latency (``baseLat`` + intra- and inter-node steps x
   ``hwLat``); the time of S bytes is ``lat + S / algbw`` (``ncclTopoGetAlgoTime``,
   with the tree correction factors and the ring's plateau factor). ``--algorithm
   auto`` takes the cheapest pair per size, as NCCL does; a forced algorithm or
   protocol (NCCL_ALGO / NCCL_PROTO) restricts the choice.
3. **Channels per call** (``src/graph/connect.cc``, ``src/transport/nvls.cc``,
   ``src/enqueue.cc``): ring/tree graphs doubled at run time, NVLS on its own 16; small
   messages run on fewer ring/tree channels (``while nBytes < nc * nThreads *
   threadThreshold: nc--``), each at the per-channel speed.
4. **What the chosen call takes** (``predict``): the tuner picks, the pipeline times. Ring
   Simple's chunks (ALLREDUCE_CHUNKSTEPS x buffSize / NCCL_STEPS) in slices through 2(N-1)
   steps, the longest path at each hop's hwLat; NVLS/NVLSTree's calcCollChunking chunks
   through the kernel's warp-group stages; LL, LL128 and Tree as the tuner's lat + S/bw.

What it leaves out: CollNet/SHARP (not validated), PAT (one GPU per node only), the
network plugins' own tuners (AWS OFI, GCP TCPXO), congestion and adaptive routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("ring", "tree", "nvls", "nvlstree")
PROTOCOLS = ("LL", "LL128", "Simple")
NCCL_NAMES = {"ring": "Ring", "tree": "Tree", "nvls": "NVLS", "nvlstree": "NVLSTree"}

RELEASE = "NCCL 2.30.7 (NVIDIA/nccl commit 5067397c2676d5aed50042fc39e5c8ee96eb0027)"

# ---------------------------------------------------------------------------------------
# the constants: every number the model uses, named as NCCL names it, with its file
# ---------------------------------------------------------------------------------------

NCCL = {
    # src/graph/tuning.cc, ncclTunerConstantsDefaults.baseLatencies [algo][LL, LL128, Simple], us
    "baseLat": {"tree": (6.8, 14.0, 8.4), "ring": (6.6, 14.0, 8.4), "nvls": (0, 0, 0), "nvlstree": (0, 0, 0)},
    # src/graph/tuning.cc, hwLatencies [NCCL_HW_NVLINK | PCI | NET][algo][LL, LL128, Simple], us
    "hwLat": {
        "nvlink": {"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4), "nvls": (0, 0, 25), "nvlstree": (0, 0, 25)},
        "pci": {"tree": (1.0, 1.9, 4.0), "ring": (1.0, 2.5, 5.7), "nvls": (0, 0, 0), "nvlstree": (0, 0, 0)},
        "net": {"tree": (5.0, 8.5, 14.0), "ring": (2.7, 4.0, 14.0), "nvls": (0, 0, 18), "nvlstree": (0, 0, 20.9)},
    },
    # src/graph/tuning.cc, llMaxBws [Volta, Ampere, Hopper][N1 (by GPU), N2, N4 (Intel CPU row for N>1)], GB/s
    "llMaxBws": {"ampere": (87.7, 39.0, 20.4), "hopper": (141.0, 39.0, 20.4)},
    # src/graph/tuning.cc, perChMaxRingLL128Bws / perChMaxTreeLL128Bws / perChMaxTreeBws /
    # perChMaxNVLSTreeBws [arch][N1, N2, N4], GB/s per channel
    "perChMaxRingLL128Bws": {"ampere": (20.0, 20.0, 20.0), "hopper": (36.7, 36.7, 36.7)},
    "perChMaxTreeLL128Bws": {"ampere": (20.0, 20.0, 20.0), "hopper": (36.7, 36.7, 29.0)},
    "perChMaxTreeBws": {"ampere": (24.0, 23.6, 17.8), "hopper": (38.7, 41.4, 36.0)},
    "perChMaxNVLSTreeBws": {"ampere": (24.0, 23.6, 17.8), "hopper": (0.0, 57.7, 45.5)},
    # src/graph/tuning.cc, nvlsEfficiency [Volta, Ampere, Hopper, Blackwell]
    "nvlsEfficiency": {"ampere": 0.0, "hopper": 0.85},
    # src/graph/tuning.cc, ncclTopoTuneModel's refinements
    "ringLLFactor": 0.5, "ringLL128Factor": 0.92, "treeFactor": 0.92, "treeLLFactor": 1 / 3.8,
    "treeLL128Factor1Node": 7 / 9, "treeLL128Factor": 120 / 128,
    # src/graph/tuning.cc, getNetOverhead (x86 Intel: 1 us; x3 for Simple)
    "netOverhead_us": 1.0, "netOverheadSimpleFactor": 3,
    # src/graph/tuning.cc, ncclTopoGetAlgoTime: "Plateau effect of ring" (compCap >= 80)
    "ringPlateauFactor": 1.4,
    # src/graph/tuning.cc, treeCorrectionFactor [LL, LL128, Simple][log2(bytes / 64)], 64 B .. 256 MB
    "treeCorrectionFactor": (
        (1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0, 1.0, 1.0, 1.0, 1.0),
        (1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0, 1.0),
        (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9, .9),
    ),
    # src/graph/topo.h: NVLink payload bandwidth per link, GB/s (SM80_NVLINK_BW, SM90_NVLINK_BW)
    "NVLINK_BW": {"ampere": 20.0, "hopper": 20.6},
    # src/graph/topo.cc, kvDictPciGen: per-lane rate in 100 Mbit/s; bw = width * speed / 80 GB/s
    "pciGenSpeed": {3: 60, 4: 120, 5: 240, 6: 480},
    # src/graph/search.cc: the speeds a channel is searched at, GB/s
    "speedArrayIntra": (40.0, 30.0, 20.0, 18.0, 15.0, 12.0, 10.0, 9.0, 7.0, 6.0, 5.0, 4.0, 3.0),
    "speedArrayInter": (48.0, 30.0, 28.0, 24.0, 20.0, 18.0, 15.0, 12.0, 10.0, 9.0, 7.0, 6.0, 5.0, 4.0, 3.0,
                        2.4, 1.2, 0.24, 0.12),
    "sm90SpeedArrayIntra": (60.0, 50.0, 40.0, 30.0, 24.0, 20.0, 15.0, 12.0, 11.0, 6.0, 3.0),
    "sm90SpeedArrayInter": (48.0, 45.0, 42.0, 40.0, 30.0, 24.0, 22.0, 20.0, 17.5, 15.0, 12.0, 6.0, 3.0, 2.4,
                            1.2, 0.24, 0.12),
    # src/include/device.h: MAXCHANNELS (a ring/tree graph searches at most MAXCHANNELS / 2),
    # NCCL_MAX_NVLS_ARITY, thread counts
    "MAXCHANNELS": 64, "NCCL_MAX_NVLS_ARITY": 32,
    "maxThreads": {"LL": 512, "LL128": 640, "Simple": 512},
    # src/include/comm.h: NCCL_{LL,LL128,SIMPLE}_THREAD_THRESHOLD (ring LL's is x nRanks, tuning.cc)
    "threadThreshold": {"LL": 8, "LL128": 8, "Simple": 64},
    # src/include/device.h: NCCL_STEPS; src/init.cc: DEFAULT_LL_BUFFSIZE (NCCL_LL_LINES_PER_THREAD 8 x
    # NCCL_LL_MAX_NTHREADS 512 x NCCL_STEPS x 16 B), DEFAULT_LL128_BUFFSIZE (NCCL_LL128_ELEMS_PER_THREAD 120 x
    # NCCL_LL128_MAX_NTHREADS 640 x NCCL_STEPS x 8 B), DEFAULT_BUFFSIZE (Simple, 4 MiB: 512 KiB a step)
    "NCCL_STEPS": 8,
    "buffSizes": {"LL": 8 * 512 * 8 * 16, "LL128": 120 * 640 * 8 * 8, "Simple": 1 << 22},
    # src/include/collectives.h: ALLREDUCE_CHUNKSTEPS = NCCL_STEPS / 2, ALLREDUCE_SLICESTEPS = NCCL_STEPS / 4
    # (ring Simple moves a chunk of 4 steps = 2 MiB per channel per ring step, in 2 slices)
    "ALLREDUCE_CHUNKSTEPS": 4, "ALLREDUCE_SLICESTEPS": 2,
    # src/graph/connect.cc (ncclTopoPostset): the ring/tree channels are doubled once more at run time,
    # nChannels = min(MAXCHANNELS, 2 x nChannels), each carrying half of the graph channel's speed
    "postsetDup": 2,
    # src/transport/nvls.cc: NVLS_NCHANNELS_SM90, NCCL_NVLS_CHUNKSIZE's default, and nvlsTreeMaxChunkSize's
    # fallback (64 KiB from 4 nodes, else the NVLS chunk size)
    "NVLS_NCHANNELS_SM90": 16, "nvlsChunkSize": 128 * 1024, "nvlsTreeMaxChunkSize4Nodes": 64 * 1024,
    # src/enqueue.cc (calcCollChunking): NVLS shrinks its chunk while nBytes < factor x nChannels x nHeads x chunk
    # [(factor, smallest chunk it may go below)], NVLSTree likewise
    "nvlsChunkSteps": ((64, 65536), (8, 32768), (2, 16384)),
    "nvlsTreeChunkSteps": ((32, 262144), (16, 131072), (4, 65536), (1, 32768)),
    # src/device/all_reduce.h: one-node NVLS runs three warp groups in a pipeline (scatter into the heads'
    # buffers, multimem reduce + multicast store, gather to the output); NVLSTree a fourth (bcast: the
    # tree parent's result into the multicast buffer), the tree's hops inside the reduce and bcast groups
    "nvlsPipelineStages": 3,
}

ARCHS = ("ampere", "hopper")
NVLINK_LINE_GBPS = 25.0
"""NVLink3 and NVLink4 line rate per link per direction, GB/s: a file's NVLink rate / this
= its link count (A100: 300 GB/s = 12 links, H100: 450 GB/s = 18)."""


# ---------------------------------------------------------------------------------------
# the hardware, as NCCL's topology sees it
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """Per-GPU and per-NIC rates in GB/s (NCCL's unit), from a topology file."""

    nodes: int
    gpus_per_node: int
    arch: str
    nvlink_bw: float                 # links x NVLINK_BW, 0 without NVLink
    nvswitch: bool
    pcie_bw: float                   # the GPU's PCIe path
    nic_bw: float                    # one NIC's line rate
    nics: int
    local_nics: tuple[tuple[int, ...], ...]   # per GPU: the NICs on its PCIe switch

    @property
    def ranks(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_path_bw(self) -> tuple[float, ...]:
        """Per GPU: what its own path to the network carries (its PCIe and its local NICs);
        0 for a GPU with no local NIC."""
        return tuple(min(self.pcie_bw, len(n) * self.nic_bw) if n else 0.0 for n in self.local_nics)

    @property
    def pxn(self) -> bool:
        """Some GPU has no NIC of its own and relays through an NVLink peer's (NCCL's PXN)."""
        return self.nvlink_bw > 0 and any(self.local_nics) and any(not n for n in self.local_nics)


def hardware(topo) -> Hardware:
    """``Hardware`` from a ``topology.Topology`` (its line rates, PCIe and NIC placement)."""
    arch = topo.gpu_arch
    g, r = topo.gpus_per_server, topo.nics_per_server
    nvlink = 0.0
    if topo.intra_kind == "nvlink":
        links = round(topo.intra_line_bytes_per_second / 1e9 / NVLINK_LINE_GBPS)
        nvlink = links * NCCL["NVLINK_BW"][arch]
    pcie = topo.pcie_lanes * NCCL["pciGenSpeed"][topo.pcie_gen] / 80.0
    switches = topo.pcie_switches or max(g, r)
    local = tuple(tuple(n for n in range(r) if n * switches // r == gpu * switches // g) if topo.servers > 1 else ()
                  for gpu in range(g))
    if topo.nic_attach == "cpu":
        local = tuple(() for _ in range(g))
    return Hardware(nodes=topo.servers, gpus_per_node=g, arch=arch, nvlink_bw=nvlink,
                    nvswitch=topo.nvswitch, pcie_bw=pcie, nic_bw=topo.nic_line_bytes_per_second / 1e9,
                    nics=r, local_nics=local)


# ---------------------------------------------------------------------------------------
# graphs: channels and per-channel speed (src/graph/search.cc)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Graph:
    channels: int
    bw_intra: float
    bw_inter: float
    bound: str                        # the link that set the speed: nvlink, pcie, nic, gpu-path
    net_path: str = "pix"            # pix (local NIC), pxn (through an NVLink peer), phb (through the CPU)


def _speeds(hw: Hardware, inter: bool) -> tuple[float, ...]:
    kind = "SpeedArrayInter" if inter else "SpeedArrayIntra"
    return NCCL["sm90" + kind] if hw.arch == "hopper" else NCCL["s" + kind[1:]]


def _ring_capacity(hw: Hardware, s: float) -> tuple[int, str]:
    """Channels of speed s that every link on a ring's path can carry, and the link that binds."""
    caps = {}
    g = hw.gpus_per_node
    if hw.nodes > 1:
        paths = [b for b in hw.gpu_path_bw if b > 0]
        if not paths:                                    # NICs off every GPU's switch: through the CPU
            paths = [min(hw.pcie_bw, hw.nic_bw)] * hw.nics
        used = {n for loc in hw.local_nics for n in loc} or set(range(hw.nics))
        caps["nic"] = len(used) * math.floor(hw.nic_bw / s + 1e-9)
        caps["pcie"] = min(caps.get("pcie", 1 << 30), sum(math.floor(b / s + 1e-9) for b in paths))
    if g > 1:
        # one node: every GPU sends on every channel; several: a channel leaves the node at one
        # GPU, so each GPU's NVLink carries (G-1)/G of the channels on average
        share = (g - 1) / g if hw.nodes > 1 else 1.0
        link = "nvlink" if hw.nvlink_bw > 0 else "pcie"
        rate = hw.nvlink_bw if hw.nvlink_bw > 0 else hw.pcie_bw
        caps[link] = min(caps.get(link, 1 << 30), math.floor(rate / (s * share) + 1e-9))
    caps["max"] = NCCL["MAXCHANNELS"] // 2
    link = min(caps, key=lambda k: caps[k])
    return caps[link], link


def _search(hw: Hardware, capacity, max_bw: float, total_bw: float, inter: bool) -> Graph:
    """search.cc's pass 1: from the first speed <= maxBw, the most channels x speed, stopping at
    one that fills totalBw or when the next speed is under .49 of the best found."""
    speeds = _speeds(hw, inter)
    i = 0
    while i < len(speeds) - 1 and speeds[i] > max_bw:
        i += 1
    best = None
    while True:
        n, link = capacity(speeds[i])
        if n >= 1 and (best is None or n * speeds[i] > best[0] * best[1]):
            best = (n, speeds[i], link)
        if best and best[0] * best[1] >= total_bw:
            break
        if i >= len(speeds) - 1 or (best and speeds[i + 1] / best[1] <= .49):
            break
        i += 1
    if best is None:
        return Graph(0, 0.0, 0.0, "none")
    n, s, link = best
    # ncclTopoDupChannels: twice the channels at half the speed, unless the speed is low.
    if s >= 25.0 and not (n > 4 and s < 50.0):
        dup = min(2 * n, NCCL["MAXCHANNELS"] // 2)
        s = s / math.ceil(dup / n)
        n = dup
    path = "pix"
    if hw.nodes > 1:
        path = "phb" if not any(hw.local_nics) else ("pxn" if hw.pxn else "pix")
    return Graph(n, s, s, link, path)


def graphs(hw: Hardware) -> dict[str, Graph]:
    """The ring/tree, NVLS and NVLSTree graphs NCCL would build on this hardware."""
    inter = hw.nodes > 1
    if inter:
        paths = [b for b in hw.gpu_path_bw if b > 0] or [min(hw.pcie_bw, hw.nic_bw)]
        max_bw = min(max(paths), hw.nic_bw)
    else:
        max_bw = hw.nvlink_bw if hw.nvlink_bw > 0 else hw.pcie_bw
    total_bw = (hw.nvlink_bw if hw.nvlink_bw > 0 else hw.pcie_bw) + (hw.pcie_bw if inter and hw.nvlink_bw else 0)
    ring = _search(hw, lambda s: _ring_capacity(hw, s), max_bw, total_bw, inter)
    out = {"ring": ring, "tree": ring}      # NCCL tries to give trees the rings' channels (search.cc)
    if hw.nvswitch and hw.arch == "hopper" and hw.gpus_per_node > 1 and hw.nvlink_bw > 0:
        g = hw.gpus_per_node
        heads = min(g, NCCL["NCCL_MAX_NVLS_ARITY"]) if not inter else max(1, min(g, len({n for l in hw.local_nics for n in l}) or hw.nics))
        speeds = _speeds(hw, inter)
        # ncclTopoSearchTryNvls: each GPU's NVLink carries every head's share, its own twice: (heads + 1) x bw
        fit = [s for s in speeds if (heads + 1) * s <= hw.nvlink_bw + 1e-9]
        if fit and heads >= 2:
            bw_intra = fit[0]
            if inter:
                bw_inter = min(max_bw, bw_intra * 2)
                bw_inter = max([s for s in speeds if s <= bw_inter] or [speeds[-1]])
            else:     # pass 2 raises bwInter while it stays under 2 x bwIntra
                bw_inter = max([s for s in speeds if s < 2 * bw_intra] or [bw_intra])
            g_nvls = Graph(heads, bw_intra, bw_inter, "nvlink")
            out["nvlstree" if inter else "nvls"] = g_nvls
    return out


# ---------------------------------------------------------------------------------------
# the tuner (src/graph/tuning.cc)
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tuned:
    algorithm: str
    protocol: str
    bus_bw: float          # GB/s, NCCL's busBw before its conversion to algbw
    alg_bw: float          # GB/s
    latency_us: float
    channels: int          # the graph's channels (what the tuner's bandwidth counts)
    bound: str
    run_channels: int = 0  # the channels a call may use at run time (connect.cc's doubling; NVLS's own)
    proto_bound: bool = False   # the protocol's factor or per-channel cap, not a link, set bus_bw


def _index2(nodes: int) -> int:
    return nodes - 1 if nodes <= 2 else 2


def run_channels(hw: Hardware, algorithm: str, graph_channels: int) -> int:
    """The channels a call may spread over: ring/tree graphs doubled at run time (connect.cc);
    NVLS and NVLSTree run NVLS_NCHANNELS_SM90 (nvls.cc), whatever their graph's head count."""
    if algorithm in ("nvls", "nvlstree"):
        return NCCL["NVLS_NCHANNELS_SM90"]
    return min(NCCL["MAXCHANNELS"], NCCL["postsetDup"] * graph_channels)


def tune(hw: Hardware) -> list[Tuned]:
    """Every enabled algorithm x protocol of AllReduce with NCCL's bandwidth and latency."""
    n, nodes = hw.ranks, hw.nodes
    if n <= 1:
        return []
    arch, i2 = hw.arch, _index2(nodes)
    gr = graphs(hw)
    nsteps = 2 * (n - 1)
    ppn = n / nodes
    intra_hw = "nvlink" if hw.nvlink_bw > 0 else "pci"
    ll_max = NCCL["llMaxBws"][arch][0 if nodes == 1 else i2]
    out = []
    for a in ALGORITHMS:
        g = gr.get(a)
        if g is None or g.channels == 0:
            continue
        if a == "nvlstree" and nodes == 1:
            continue
        for pi, p in enumerate(PROTOCOLS):
            if a in ("nvls", "nvlstree") and p != "Simple":
                continue
            if p == "LL128" and (g.net_path == "phb"):
                continue          # LL128 only up to PXN on Hopper (tuning.cc)
            bw = g.bw_intra if nodes <= 2 else g.bw_inter
            if a in ("nvls", "nvlstree"):
                if g.channels < 2:
                    continue
                intra_bw = g.bw_intra * NCCL["nvlsEfficiency"][arch] * (g.channels - 1) / g.channels * 2.0
                inter_bw = g.bw_inter * (2 if nodes <= 2 and a == "nvlstree" else 1)
                cap = NCCL["perChMaxNVLSTreeBws"][arch][i2] if a == "nvlstree" else math.inf
                bw = min(intra_bw, inter_bw, cap)
            bus = raw = g.channels * bw
            link = g.bound
            if a in ("nvls", "nvlstree"):
                if bw == cap:
                    raw = math.inf                   # the per-channel cap, not a link, set it
                elif bw == inter_bw and nodes > 1:
                    link = "nic"
            if a == "ring" and p == "LL":
                bus = min(ll_max, bus * NCCL["ringLLFactor"])
            if a == "ring" and p == "LL128":
                bus = min(bus * NCCL["ringLL128Factor"], g.channels * NCCL["perChMaxRingLL128Bws"][arch][i2])
            if a == "tree":
                bus = min(bus * NCCL["treeFactor"], g.channels * NCCL["perChMaxTreeBws"][arch][i2])
            if a == "tree" and p == "LL":
                bus = min(bus * NCCL["treeLLFactor"], ll_max)
            if a == "tree" and p == "LL128":
                f = NCCL["treeLL128Factor1Node"] if nodes == 1 else NCCL["treeLL128Factor"]
                bus = min(bus * f, g.channels * NCCL["perChMaxTreeLL128Bws"][arch][i2])
            ratio = n / nsteps if a in ("ring", "nvls", "nvlstree") else 0.5
            alg = bus * ratio
            # latency
            lat = NCCL["baseLat"][a][pi]
            intra_lat = NCCL["hwLat"][intra_hw][a][pi]
            inter_lat = NCCL["hwLat"]["net"]["tree" if ppn == 1 else a][pi]
            if a == "ring":
                over = 0.0
                if nodes > 1:
                    over = NCCL["netOverhead_us"] * (NCCL["netOverheadSimpleFactor"] if p == "Simple" else 1)
                intra_lat = max(intra_lat, over)
                n_inter = 0 if nodes == 1 else 2 * (nodes - 1)
                lat += (nsteps - n_inter) * intra_lat + n_inter * inter_lat
            elif a == "tree":
                lat += 2 * ((n // nodes - 1) * intra_lat + _log2i(nodes) * inter_lat)
            elif a == "nvls":
                lat = intra_lat + (inter_lat if nodes > 1 else 0)
            elif a == "nvlstree":
                lat += intra_lat + 2 * _log2i(nodes) * inter_lat
            out.append(Tuned(a, p, bus, alg, lat, g.channels, link, run_channels(hw, a, g.channels),
                             bus < raw * (1 - 1e-9)))
    return out


def _log2i(x: int) -> int:
    return max(0, int(x).bit_length() - 1)


@dataclass(frozen=True)
class Call:
    """One all-reduce of ``size_bytes`` as NCCL would run it."""

    size_bytes: float
    algorithm: str
    protocol: str
    channels: int
    time_s: float
    alg_bw: float            # bytes/s
    bus_bw: float            # bytes/s, as all_reduce_perf prints it
    latency_s: float         # the part of time_s that is not bytes / bandwidth: latency and pipeline fill
    bound: str               # latency, bandwidth (the protocol's cap), or the link: nvlink / nic / pcie
    chunk_bytes: int = 0     # per channel (ring) or per channel and head (NVLS) and step of the pipeline
    tuner_time_s: float = 0.0   # what NCCL's tuner itself estimates (its choice's criterion)

    @property
    def nccl_name(self) -> str:
        return f"{NCCL_NAMES[self.algorithm]}/{self.protocol}"


def channels_for(t: Tuned, hw: Hardware, size: float) -> int:
    """src/enqueue.cc (topoGetAlgoInfo): ring and tree drop channels while
    nBytes < nc x nThreads x threadThreshold (ring LL's threshold x nRanks, tuning.cc); NVLS and
    NVLSTree run all of theirs."""
    nc = t.run_channels or t.channels
    if t.algorithm in ("nvls", "nvlstree"):
        return nc
    nt = NCCL["maxThreads"][t.protocol]
    thr = NCCL["threadThreshold"][t.protocol] * (hw.ranks if t.algorithm == "ring" and t.protocol == "LL" else 1)
    while size < nc * nt * thr and nc >= 2:
        nc -= 1
    return nc


def tuner_time(t: Tuned, hw: Hardware, size: float) -> float:
    """ncclTopoGetAlgoTime (numPipeOps = 1), in seconds: what NCCL's tuner compares to choose."""
    bw, lat = t.alg_bw, t.latency_us
    log = _log2i(int(size) >> 6) if size >= 64 else -1
    if t.algorithm == "tree" and 0 <= log < 23:
        bw *= NCCL["treeCorrectionFactor"][PROTOCOLS.index(t.protocol)][log]
    if (t.algorithm == "ring" and t.protocol == "Simple" and hw.nodes > 1
            and size / ((t.run_channels or t.channels) * hw.ranks) >= 64):
        lat *= NCCL["ringPlateauFactor"]
    return lat * 1e-6 + size / (1e9 * bw)


# ---------------------------------------------------------------------------------------
# what a call takes: the chunk/step pipeline (src/enqueue.cc, src/device/all_reduce.h)
# ---------------------------------------------------------------------------------------

def _ring_simple_fill_us(hw: Hardware, t: Tuned, chunk: float, bw_ch: float) -> float:
    """The longest path through one loop of ring Simple, beyond its bytes: 2(N-1) ring steps of
    ``chunk`` bytes a channel, each sent in ALLREDUCE_CHUNKSTEPS / ALLREDUCE_SLICESTEPS slices. A
    rank's step k waits for the previous rank's step k-1 (one hop: its hwLat plus one slice) or for
    its own step k-1 (its link: one chunk); the path that crosses the most network hops at
    hwLat[NET] and the rest at the intra-node hwLat is the one that sets the time (bytes/us)."""
    n, ppn, nodes = hw.ranks, hw.gpus_per_node, hw.nodes
    steps = 2 * (n - 1)
    m = NCCL["ALLREDUCE_CHUNKSTEPS"] // NCCL["ALLREDUCE_SLICESTEPS"]
    pi = PROTOCOLS.index("Simple")
    li = NCCL["hwLat"]["nvlink" if hw.nvlink_bw > 0 else "pci"]["ring"][pi]
    if nodes > 1:
        li = max(li, NCCL["netOverhead_us"] * NCCL["netOverheadSimpleFactor"])
    ln = NCCL["hwLat"]["net"]["tree" if ppn == 1 else "ring"][pi]
    c, s = chunk / bw_ch, chunk / m / bw_ch            # us a chunk, a slice
    def cost(adv: int, net: int) -> float:
        return net * (ln + s) + (adv - net) * (li + s) + (steps - adv) * c + (m - 1) * s
    if nodes == 1:
        best = max(cost(steps, 0), cost(0, 0))
    elif ppn == 1:
        best = max(cost(steps, steps), cost(0, 0))
    else:
        kmax = (steps - 1) // ppn + 1
        best = max(cost(0, 0), cost(min(steps, ppn - 1), 0))
        for k in range(1, kmax + 1):
            lo, hi = (k - 1) * ppn + 1, min(steps, k * ppn)
            best = max(best, cost(lo, k), cost(hi, k))
    return best - steps * c


def _nvls_chunk(hw: Hardware, t: Tuned, size: float, nc: int) -> int:
    """calcCollChunking's NVLS / NVLSTree chunk for this size."""
    ops = nc * t.channels                              # nChannels x nvls.nHeads
    if t.algorithm == "nvls":
        chunk, rules = NCCL["nvlsChunkSize"], NCCL["nvlsChunkSteps"]
    else:
        tree_max = NCCL["nvlsTreeMaxChunkSize4Nodes"] if hw.nodes >= 4 else NCCL["nvlsChunkSize"]
        chunk, rules = min(NCCL["nvlsChunkSize"], tree_max), NCCL["nvlsTreeChunkSteps"]
    for factor, floor in rules:
        if size < factor * ops * chunk and chunk > floor:
            chunk = floor
    return chunk


def predict(t: Tuned, hw: Hardware, size: float) -> tuple[float, int, float, int]:
    """(seconds, channels, seconds of latency and pipeline fill, chunk bytes) of one call of
    ``size`` bytes with this algorithm x protocol.

    Ring Simple and NVLS/NVLSTree move data in chunks through a pipeline, and mid-size
    messages pay its fill: ring Simple per channel 2(N-1) steps of chunks of up to
    ALLREDUCE_CHUNKSTEPS x (buffSize / NCCL_STEPS) = 2 MiB (``_ring_simple_fill_us``); NVLS per
    channel and head chunks of calcCollChunking's size through its warp groups' stages. LL and
    LL128 pipeline per 8- or 128-byte line, and Tree is NCCL's own tuner time (its correction
    factors); both are ``lat + S / (algbw x channels used / channels)``."""
    nc = channels_for(t, hw, size)
    full = t.run_channels or t.channels
    alg = t.alg_bw * 1e3 * nc / full                   # bytes/us over the channels this call uses
    if t.algorithm == "ring" and t.protocol == "Simple":
        n = hw.ranks
        bw_ch = t.bus_bw * 1e3 / full                  # bytes/us per channel
        chunk_max = NCCL["buffSizes"]["Simple"] // NCCL["NCCL_STEPS"] * NCCL["ALLREDUCE_CHUNKSTEPS"]
        per_loop = nc * n * chunk_max
        loops, rem = divmod(size, per_loop)
        last = rem / (nc * n) if rem else chunk_max
        biggest = chunk_max if loops else last
        # baseLat, then the pipeline's longest path (it holds the per-hop hwLat the tuner sums)
        fill = NCCL["baseLat"]["ring"][PROTOCOLS.index("Simple")] + max(0.0, _ring_simple_fill_us(hw, t, biggest, bw_ch))
        us = fill + size / alg
        return us * 1e-6, nc, fill * 1e-6, int(biggest)
    if t.algorithm in ("nvls", "nvlstree"):
        chunk = _nvls_chunk(hw, t, size, nc)
        ops = nc * t.channels
        c = min(chunk, size / ops)
        stages = NCCL["nvlsPipelineStages"] + (1 if t.algorithm == "nvlstree" else 0)
        fill = t.latency_us + (stages - 1) * c * ops / alg
        us = fill + size / alg
        return us * 1e-6, nc, fill * 1e-6, int(c)
    bw = t.alg_bw
    log = _log2i(int(size) >> 6) if size >= 64 else -1
    if t.algorithm == "tree" and 0 <= log < 23:
        bw *= NCCL["treeCorrectionFactor"][PROTOCOLS.index(t.protocol)][log]
    us = t.latency_us + size / (bw * 1e3 * nc / full)
    return us * 1e-6, nc, t.latency_us * 1e-6, 0


def call(hw: Hardware, size: float, algorithm: str = "auto", protocol: str = "auto") -> Call:
    """NCCL's choice for ``size`` bytes -- the cheapest enabled algorithm x protocol by its own
    tuner (``tuner_time``), or the cheapest among those forced (NCCL_ALGO / NCCL_PROTO) -- and
    what that choice takes (``predict``). ValueError when none is enabled."""
    if algorithm != "auto" and algorithm not in ALGORITHMS:
        raise ValueError(f"unknown NCCL algorithm {algorithm!r} (auto, {', '.join(ALGORITHMS)})")
    if protocol != "auto" and protocol not in PROTOCOLS:
        raise ValueError(f"unknown NCCL protocol {protocol!r} (auto, {', '.join(PROTOCOLS)})")
    best = None
    for t in tune(hw):
        if algorithm != "auto" and t.algorithm != algorithm:
            continue
        if protocol != "auto" and t.protocol != protocol:
            continue
        ts = tuner_time(t, hw, size)
        if best is None or ts < best[0]:
            best = (ts, t)
    if best is None:
        if hw.ranks <= 1:
            return Call(size, "ring", "Simple", 0, 0.0, 0.0, 0.0, 0.0, "none")
        raise ValueError(f"NCCL has no {algorithm}/{protocol} all-reduce on this hardware "
                         f"(NVLS needs an NVSwitch Hopper server; NVLSTree several of them)")
    tuned_s, t = best
    ts, nc, lat_s, chunk = predict(t, hw, size)
    n = hw.ranks
    alg = size / ts if ts > 0 else 0.0
    lat_share = min(1.0, max(0.0, lat_s / ts)) if ts > 0 else 0.0
    if lat_share >= 0.5:
        bound = "latency"
    elif t.proto_bound or t.bound not in ("nvlink", "nic", "pcie"):
        bound = "bandwidth"
    else:
        bound = t.bound
    return Call(size, t.algorithm, t.protocol, nc, ts, alg, alg * 2 * (n - 1) / n, lat_s, bound, chunk, tuned_s)
