"""The cost model: what one data-parallel training step of an FNN puts on the network,
and how much of it the step waits for. Pure arithmetic: no torch, no processes.

Inputs: the layer widths, DDP's bucket cap, the gradient's wire dtype (compression),
the world size N, the all-reduce algorithm, the network's latency alpha and bus
bandwidth beta (from a link rate, or fitted to `ddp-fnn bench`), and the compute time
of one step. Outputs per step: payload bytes, wire bytes per rank, all-reduce time,
the part of it not hidden behind backward (exposed), and scaling efficiency.

The formulas, with their sources:

Bandwidths (nccl-tests, doc/PERFORMANCE.md, NVIDIA, github.com/NVIDIA/nccl-tests)::

    algbw = S / t                       S = bytes all-reduced per rank, t = time of the op
    busbw = algbw * 2(N-1)/N            all-reduce's factor; the rate the busiest link runs at

Wire bytes: every all-reduce algorithm below moves, summed over ranks, 2(N-1) * S bytes
(each rank's contribution is reduced into the others once and the result spread back
once), so the mean per rank is 2(N-1)/N * S; for the ring it is exactly what each rank
sends (Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms for clusters of
workstations", J. Parallel Distrib. Comput. 69(2), 2009, who also prove it the minimum).
A broadcast of S bytes (DDP's start-up copy of rank 0's parameters) sends (N-1) * S in
all, but not evenly: Gloo's is a binomial tree, rank 0 sending ceil(log2 N) copies and
every other rank the copies it forwards (``broadcast_wire_bytes``; at 4 ranks 2, 1, 0, 0).

Time of one all-reduce of S bytes, alpha = latency of one message step between two
ranks (s), beta = bus bandwidth (bytes/s), Hockney's alpha-beta model (Parallel
Computing 20(3), 1994)::

    ring              2(N-1) alpha             + 2(N-1)/N * S / beta    (Patarasuk and Yuan 2009)
    halving-doubling  2 log2(p) alpha          + 2(p-1)/p * S / beta    p = N a power of two
                      + 2 (alpha + S / beta)   when N is not: p = largest power of two <= N,
                                               the N - p extra ranks hand their data to a partner
                                               before and take the result back after
                                               (Rabenseifner's algorithm; Thakur, Rabenseifner and
                                               Gropp, "Optimization of Collective Communication
                                               Operations in MPICH", IJHPCA 19(1), 2005)
    tree              2 ceil(log2 N) alpha     + 2(N-1)/N * S / beta    pipelined double binary tree,
                                               reduce up then broadcast down, each tree carrying
                                               half the data: bandwidth-optimal up to lower-order
                                               terms (Sanders, Speck and Traeff, "Two-tree
                                               algorithms for full bandwidth broadcast, reduction
                                               and scan", Parallel Computing 35(12), 2009; NCCL's
                                               tree since 2.4)

So the algorithms differ in the latency term: the ring's grows with N, the others' with
log N. Compute (the reduction's additions) is not modelled: on a network-bound job it
hides under the transfer.

A measured ``t(S)`` at world size N fits ``t = a + S * 2(N-1)/N / beta`` (``fit_alpha_beta``);
``a`` is the latency of the whole operation, which is ``latency_steps(N, algorithm) * alpha``.

Buckets and overlap (Li et al., "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training", PVLDB 13(12), 2020): DDP packs gradients into buckets of about
``bucket_cap_mb`` in reverse registration order (the order backward produces them) and
launches a bucket's all-reduce as soon as its last gradient is ready, so the
all-reduces overlap with the rest of backward. ``bucket_layout`` replicates DDP's packing;
``estimate_step`` replays the overlap on a time line:

    backward lasts B = backward_fraction * compute (default 2/3: backward costs about
    twice forward, for a Linear layer two matmuls against one);
    bucket k's gradients are ready at B * (parameters in buckets 0..k) / (all parameters)
    (backward's work is spread over the parameters in proportion to their count, which
    holds for matmul-dominated layers) -- or, given a run's measured schedule
    (``bucket_leads_s``), at B - lead_k, when that run really handed bucket k over;
    start_k = max(ready_k, finish_{k-1}) (one all-reduce at a time, in bucket order);
    finish_k = start_k + t(S_k);
    exposed = max(0, finish_last - B);  step time = compute + exposed;
    scaling efficiency = compute / (compute + exposed).

The compute time is per rank and held fixed when N changes (weak scaling: a fixed
per-rank batch); for strong scaling divide it by N yourself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ddp_fnn.core.intervals import union_length
from ddp_fnn.core.units import MIB, format_bytes, format_rate, format_seconds, parse_rate
from ddp_fnn.core import wire
from ddp_fnn.core.wire import DEFAULT_BUCKET_MB, DEFAULT_FIRST_BUCKET_BYTES, busbw_factor, check_world, ring_wire_bytes


ALGORITHMS = tuple(a for a in wire.ALGORITHMS if a != "hierarchical")
"""The all-reduces the alpha-beta model prices (hierarchical is defined by servers: topology.py)."""
COMPRESSION_BYTES = {"none": 4, "fp16": 2, "bf16": 2}
"""Bytes per gradient element on the wire: fp32 as is, or cast by DDP's fp16/bf16 compress hooks."""


# ---------------------------------------------------------------------------------------
# the model's parameters and DDP's buckets
# ---------------------------------------------------------------------------------------

def _check_widths(widths: Sequence[int]) -> list[int]:
    ws = [int(w) for w in widths]
    if len(ws) < 2 or any(w < 1 for w in ws):
        raise ValueError(f"layers needs at least two positive widths (input,...,output), got {list(widths)}")
    return ws


def parameter_shapes(widths: Sequence[int]) -> list[tuple[str, int]]:
    """``(name, numel)`` of each parameter in registration order, as ``model.FNN`` registers
    them: ``layers.0.weight`` (out x in), ``layers.0.bias``, ``layers.1.weight``, ..."""
    ws = _check_widths(widths)
    shapes = []
    for i, (a, b) in enumerate(zip(ws[:-1], ws[1:])):
        shapes.append((f"layers.{i}.weight", a * b))
        shapes.append((f"layers.{i}.bias", b))
    return shapes


def parameter_count(widths: Sequence[int]) -> int:
    """sum over layers of in*out + out."""
    return sum(n for _, n in parameter_shapes(widths))


def parameter_bytes(widths: Sequence[int], param_bytes: int = 4) -> int:
    """Bytes of the parameters (and so of one full gradient) at ``param_bytes`` per element."""
    return parameter_count(widths) * param_bytes


@dataclass(frozen=True)
class Bucket:
    """One DDP gradient bucket. Index 0 holds the last layers' gradients: it is ready
    first in backward and its all-reduce is launched first."""

    index: int
    param_names: tuple[str, ...]
    numel: int
    nbytes: int
    """Bytes of the bucket's buffer in the parameters' dtype (what the bucket cap counts)."""


def bucket_layout(widths: Sequence[int], bucket_mb: float | None = None, *, param_bytes: int = 4,
                  first_bucket_mb: float | None = None) -> list[Bucket]:
    """DDP's gradient buckets for an FNN of these widths, in the order DDP all-reduces them.

    ``bucket_mb`` is what is passed to ``DistributedDataParallel(bucket_cap_mb=...)``;
    None means not passed. The caps, as torch 2.13's DDP sets them:

    - bucket_cap_mb not passed: the first bucket is capped at 1 MiB
      (``torch.distributed._DEFAULT_FIRST_BUCKET_BYTES``), the others at 25 MiB;
    - bucket_cap_mb passed: every bucket, the first included, is capped at it
      (``_BucketCapacityConfig.create`` sets ``first_bucket_bytes_cap = bucket_bytes_cap``
      when the cap is the user's);
    - ``first_bucket_mb`` overrides the first cap (older torch releases used 1 MiB always).

    The packing is ``torch.distributed._compute_bucket_assignment_by_size``'s, which DDP's
    Reducer runs when it rebuilds its buckets after the first step (the first step uses
    one bucket holding everything): parameters in the order their gradients become ready
    -- for an FNN the reverse of registration, ``layers.{L-1}.bias``, ``layers.{L-1}.weight``,
    ``layers.{L-2}.bias``, ... -- are appended to the open bucket, and the bucket closes
    as soon as its size reaches the cap, so the tensor that crosses the cap stays in it
    (a bucket can be far larger than the cap when one weight is). After the first bucket
    closes the second cap applies to all the rest. Caps are ``int(mb * 2**20)`` bytes, as
    DDP computes them. Checked against real DDP in tests/test_netmodel.py.
    """
    if bucket_mb is not None and not bucket_mb > 0:
        raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
    if first_bucket_mb is not None and not first_bucket_mb > 0:
        raise ValueError(f"first_bucket_mb must be > 0, got {first_bucket_mb}")
    cap = int((DEFAULT_BUCKET_MB if bucket_mb is None else bucket_mb) * MIB)
    if first_bucket_mb is not None:
        first = int(first_bucket_mb * MIB)
    else:
        first = DEFAULT_FIRST_BUCKET_BYTES if bucket_mb is None else cap
    limits = [first, cap]

    buckets: list[Bucket] = []
    names: list[str] = []
    numel = 0
    for name, n in reversed(parameter_shapes(widths)):
        names.append(name)
        numel += n
        if numel * param_bytes >= limits[min(len(buckets), 1)]:
            buckets.append(Bucket(len(buckets), tuple(names), numel, numel * param_bytes))
            names, numel = [], 0
    if names:
        buckets.append(Bucket(len(buckets), tuple(names), numel, numel * param_bytes))
    return buckets


# ---------------------------------------------------------------------------------------
# all-reduce time
# ---------------------------------------------------------------------------------------

def latency_steps(world_size: int, algorithm: str = "ring") -> int:
    """How many message steps (each costing alpha) one all-reduce takes; see the module
    docstring. 0 at N = 1 (nothing to send). 2 at N = 2 for every algorithm."""
    n = check_world(world_size)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    if n == 1:
        return 0
    if algorithm == "ring":
        return 2 * (n - 1)
    if algorithm == "tree":
        return 2 * math.ceil(math.log2(n))
    p = 1 << (n.bit_length() - 1)
    return 2 * (p.bit_length() - 1) + (2 if p != n else 0)


def allreduce_time(payload_bytes: float, world_size: int, alpha_s: float, beta_bytes_per_second: float,
                   algorithm: str = "ring") -> float:
    """Seconds for one all-reduce of ``payload_bytes`` (see the module docstring's table).

    Halving-doubling at N not a power of two adds 2S / beta of *time*: the N - p partners
    receive an extra rank's S before their halving-doubling and send the result back
    after it, in series. It adds no bytes to the mean per rank: the N - p extra ranks
    each send S and receive S and do nothing else, so summed over ranks the bytes are
    p * 2(p-1)/p * S + 2(N-p) * S = 2(N-1) * S, the ring's, and the mean per rank
    (``StepEstimate.wire_bytes_per_rank_per_step``) stays 2(N-1)/N * S; the busiest rank
    (a partner) sends 2(p-1)/p * S + S (tests/test_netmodel.py counts both)."""
    n = check_world(world_size)
    steps = latency_steps(n, algorithm)
    if n == 1:
        return 0.0
    if algorithm == "halving-doubling":
        p = 1 << (n.bit_length() - 1)
        bw = 2 * (p - 1) / p * payload_bytes + (2 * payload_bytes if p != n else 0.0)
    else:
        bw = ring_wire_bytes(payload_bytes, n)
    return steps * alpha_s + bw / beta_bytes_per_second


# ---------------------------------------------------------------------------------------
# TCP under random loss
# ---------------------------------------------------------------------------------------

MATHIS_C = math.sqrt(3 / 2)
"""Mathis et al.'s constant for periodic loss with delayed ACKs off (about 1.22)."""


def mathis_rate(mss_bytes: float, rtt_s: float, loss: float, link_bytes_per_second: float | None = None,
                c: float = MATHIS_C) -> float:
    """Steady-state throughput of one TCP flow under random loss, in bytes/s.

    Mathis, Semke, Mahdavi and Ott, "The macroscopic behavior of the TCP congestion
    avoidance algorithm", ACM SIGCOMM CCR 27(3), 1997::

        rate = MSS / (RTT * sqrt(p)) * C,      C = sqrt(3/2)

    for a flow in congestion avoidance (AIMD: the window saws between W/2 and W, one loss
    per 1/p packets), capped by the link (``link_bytes_per_second``), which it cannot
    exceed however rare the loss. ``loss`` is the packet loss probability p (0..1); p = 0
    gives the link rate (or infinity without one).

    What it leaves out, and so where it breaks (docs/fabric.md): slow start (a transfer of
    a few windows never reaches the steady state the formula assumes), timeouts (a
    retransmission timeout costs at least 200 ms on Linux, TCP_RTO_MIN, far more than an
    RTT), CUBIC's window growth (not Reno's), and the queueing that makes RTT depend on
    the rate itself.
    """
    if not (mss_bytes > 0 and rtt_s > 0):
        raise ValueError(f"mathis_rate: MSS and RTT must be positive, got {mss_bytes!r} B and {rtt_s!r} s")
    if not 0 <= loss <= 1:
        raise ValueError(f"mathis_rate: loss must be a probability in 0..1, got {loss!r}")
    rate = math.inf if loss == 0 else mss_bytes / (rtt_s * math.sqrt(loss)) * c
    return min(rate, link_bytes_per_second) if link_bytes_per_second is not None else rate


# ---------------------------------------------------------------------------------------
# one training step
# ---------------------------------------------------------------------------------------

BACKEND_CONCURRENCY = {"gloo": 2, "nccl": 1}
"""All-reduces a backend runs at once. Gloo: ProcessGroupGloo serves its queue of async
work with ``threads`` worker threads, 2 by default (``ProcessGroupGloo._Options()._threads``
is 2 in torch 2.13), so DDP's buckets go two at a time -- seen in the step files as
pairs of buckets that start apart and finish together. NCCL: one stream per process
group, so one at a time."""


def queue_allreduces(ready_s: Sequence[float], latency_s: Sequence[float], transfer_s: Sequence[float],
                     concurrency: int = 1) -> list[tuple[float, float]]:
    """(start, finish) of each all-reduce, in order, on a backend that runs up to
    ``concurrency`` at once, first come first served: all-reduce k starts when it is ready
    and a worker is free (never before k-1 started). It then spends ``latency_s[k]`` in
    message latency (which overlaps with anything) and ``transfer_s[k]`` moving its bytes
    at the full bus bandwidth -- or longer, since the all-reduces moving bytes at the same
    time share that bandwidth equally (processor sharing: the link's rate is split, not
    multiplied). At concurrency 1 this is start_k = max(ready_k, finish_{k-1}),
    finish_k = start_k + latency_k + transfer_k."""
    n = len(ready_s)
    start, finish = [0.0] * n, [0.0] * n
    left = [float(x) for x in transfer_s]          # seconds of transfer at the full bandwidth
    lat_end: dict[int, float] = {}                 # started, in latency
    moving: set[int] = set()                       # started, moving bytes
    t, nxt = 0.0, 0
    while nxt < n or lat_end or moving:
        while nxt < n and len(lat_end) + len(moving) < concurrency and ready_s[nxt] <= t:
            start[nxt] = t = max(t, ready_s[nxt])
            lat_end[nxt] = t + latency_s[nxt]
            nxt += 1
        events = list(lat_end.values())
        if moving:
            events.append(t + min(left[k] for k in moving) * len(moving))
        if nxt < n and len(lat_end) + len(moving) < concurrency:
            events.append(ready_s[nxt])
        t_next = min(events)
        if moving:
            share = (t_next - t) / len(moving)
            for k in list(moving):
                left[k] -= share
                if left[k] <= 1e-15:
                    moving.discard(k)
                    finish[k] = t_next
        t = t_next
        for k, e in list(lat_end.items()):
            if e <= t:
                del lat_end[k]
                if left[k] <= 0:
                    finish[k] = t
                else:
                    moving.add(k)
    return list(zip(start, finish))


@dataclass(frozen=True)
class BucketTiming:
    index: int
    numel: int
    payload_bytes: int
    ready_s: float
    """When the bucket's last gradient is ready, seconds after backward starts."""
    start_s: float
    finish_s: float


@dataclass(frozen=True)
class StepEstimate:
    widths: tuple[int, ...]
    world_size: int
    algorithm: str
    compression: str
    bucket_mb: float | None
    alpha_s: float
    beta_bytes_per_second: float
    compute_time_per_step_s: float
    backward_fraction: float
    parameters: int
    payload_bytes_per_step: int
    wire_bytes_per_rank_per_step: float
    comm_time_per_step_s: float
    exposed_comm_time_per_step_s: float
    step_time_s: float
    scaling_efficiency: float
    buckets: tuple[BucketTiming, ...] = field(default=())

    def to_dict(self) -> dict:
        return {
            "layers": list(self.widths),
            "parameters": self.parameters,
            "world_size": self.world_size,
            "algorithm": self.algorithm,
            "compression": self.compression,
            "bucket_mb": self.bucket_mb,
            "alpha_s": self.alpha_s,
            "beta_bytes_per_second": self.beta_bytes_per_second,
            "compute_time_per_step_s": self.compute_time_per_step_s,
            "backward_fraction": self.backward_fraction,
            "payload_bytes_per_step": self.payload_bytes_per_step,
            "wire_bytes_per_rank_per_step": self.wire_bytes_per_rank_per_step,
            "comm_time_per_step_s": self.comm_time_per_step_s,
            "exposed_comm_time_per_step_s": self.exposed_comm_time_per_step_s,
            "step_time_s": self.step_time_s,
            "scaling_efficiency": self.scaling_efficiency,
            "buckets": [{"index": b.index, "numel": b.numel, "payload_bytes": b.payload_bytes,
                         "ready_s": b.ready_s, "start_s": b.start_s, "finish_s": b.finish_s}
                        for b in self.buckets],
        }


def estimate_step(widths: Sequence[int], *, world_size: int, alpha_s: float, beta_bytes_per_second: float,
                  compute_time_s: float, bucket_mb: float | None = None, compression: str = "none",
                  algorithm: str = "ring", backward_fraction: float = 2 / 3,
                  first_bucket_mb: float | None = None,
                  bucket_leads_s: Sequence[float] | None = None, concurrency: int = 1) -> StepEstimate:
    """Network load and exposed communication of one DDP step (model in the module docstring).

    ``alpha_s`` is the per-step latency (see ``latency_steps``), ``beta_bytes_per_second``
    the bus bandwidth, ``compute_time_s`` one rank's forward + backward + optimizer time
    without communication.

    ``bucket_leads_s``, one per bucket in all-reduce order, is a measured schedule: how
    long before the end of backward (the last bucket's hand-over) each bucket was handed
    to the backend, from a run's step records (summary.json ``bucket_schedule``). Given,
    it replaces the model's assumption that backward's work is spread over the parameters
    in proportion to their count: bucket k is ready at B - lead_k, where B is backward's
    length (at least the largest lead). The queue after that is the same.

    ``concurrency`` is how many all-reduces the backend runs at once (``queue_allreduces``;
    ``BACKEND_CONCURRENCY``): 1 is the one-at-a-time queue. The comm time is the union of
    the all-reduces' intervals, as a run measures it.
    """
    n = check_world(world_size)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r} (choose from {', '.join(ALGORITHMS)})")
    if compression not in COMPRESSION_BYTES:
        raise ValueError(f"unknown compression {compression!r} (choose from {', '.join(COMPRESSION_BYTES)})")
    if not (alpha_s >= 0 and math.isfinite(alpha_s)):
        raise ValueError(f"latency must be >= 0 s, got {alpha_s}")
    if not (beta_bytes_per_second > 0 and math.isfinite(beta_bytes_per_second)):
        raise ValueError(f"bandwidth must be > 0 bytes/s, got {beta_bytes_per_second}")
    if not (compute_time_s >= 0 and math.isfinite(compute_time_s)):
        raise ValueError(f"compute time must be >= 0 s, got {compute_time_s}")
    if not 0 <= backward_fraction <= 1:
        raise ValueError(f"backward fraction must be in [0, 1], got {backward_fraction}")

    layout = bucket_layout(widths, bucket_mb, first_bucket_mb=first_bucket_mb)
    elt = COMPRESSION_BYTES[compression]
    total = sum(b.numel for b in layout)
    backward = backward_fraction * compute_time_s
    if bucket_leads_s is not None:
        leads = [float(x) for x in bucket_leads_s]
        if len(leads) != len(layout):
            raise ValueError(f"a measured schedule of {len(leads)} bucket(s) does not fit this layout's "
                             f"{len(layout)} bucket(s)")
        if any(not (x >= 0 and math.isfinite(x)) for x in leads):
            raise ValueError(f"bucket leads must be finite and >= 0 s, got {leads}")
        backward = max([backward, *leads])
    if int(concurrency) != concurrency or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency}")
    readies, payloads, done = [], [], 0
    for k, b in enumerate(layout):
        done += b.numel
        readies.append(backward * done / total if bucket_leads_s is None else backward - leads[k])
        payloads.append(b.numel * elt)
    latency = latency_steps(n, algorithm) * alpha_s
    spans = queue_allreduces(readies, [latency] * len(layout),
                             [allreduce_time(s, n, alpha_s, beta_bytes_per_second, algorithm) - latency
                              for s in payloads], int(concurrency))
    timings = [BucketTiming(b.index, b.numel, s, r, a, f)
               for b, s, r, (a, f) in zip(layout, payloads, readies, spans)]
    payload_total = total * elt
    comm = union_length([(t.start_s, t.finish_s) for t in timings])
    finish = max((t.finish_s for t in timings), default=0.0)
    exposed = max(0.0, finish - backward) if n > 1 else 0.0
    step = compute_time_s + exposed
    return StepEstimate(
        widths=tuple(int(w) for w in widths), world_size=n, algorithm=algorithm, compression=compression,
        bucket_mb=bucket_mb, alpha_s=alpha_s, beta_bytes_per_second=beta_bytes_per_second,
        compute_time_per_step_s=compute_time_s, backward_fraction=backward_fraction, parameters=total,
        payload_bytes_per_step=payload_total,
        wire_bytes_per_rank_per_step=ring_wire_bytes(payload_total, n),
        comm_time_per_step_s=comm, exposed_comm_time_per_step_s=exposed, step_time_s=step,
        scaling_efficiency=compute_time_s / step if step > 0 else 1.0, buckets=tuple(timings))


# ---------------------------------------------------------------------------------------
# fitting alpha and beta to measured all-reduce times
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AlphaBetaFit:
    """``t(S) = alpha_s + S * 2(N-1)/N / beta_bytes_per_second`` fitted to measurements.

    ``alpha_s`` is the latency of the whole all-reduce at this N (``latency_steps`` times
    the per-step alpha); ``beta_bytes_per_second`` is a bus bandwidth.
    """

    alpha_s: float
    beta_bytes_per_second: float
    rms_error_s: float
    rms_relative_error: float
    max_relative_error: float
    r2: float
    points: int

    def to_dict(self) -> dict:
        return {"alpha_s": self.alpha_s, "beta_bytes_per_second": self.beta_bytes_per_second,
                "rms_error_s": self.rms_error_s, "rms_relative_error": self.rms_relative_error,
                "max_relative_error": self.max_relative_error, "r2": self.r2, "points": self.points}


def fit_alpha_beta(sizes_bytes: Sequence[float], times_s: Sequence[float], world_size: int, *,
                   relative: bool = True) -> AlphaBetaFit:
    """Least squares for ``t(S) = alpha + S * (2(N-1)/N) / beta`` with alpha >= 0.

    ``relative=True`` (default) minimises the squared *relative* residuals (weights 1/t^2):
    a sweep from KiB to hundreds of MiB spans five decades of time, and unweighted least
    squares would let the largest sizes' noise decide alpha alone. If the unconstrained
    intercept comes out negative, the line is refitted through the origin (alpha = 0).
    Needs N >= 2 (at N = 1 nothing crosses the network) and at least two distinct sizes;
    raises ValueError otherwise or when the times do not grow with the size.
    """
    n = check_world(world_size)
    if n < 2:
        raise ValueError("fit_alpha_beta needs world size >= 2: at 1 nothing crosses the network")
    if len(sizes_bytes) != len(times_s):
        raise ValueError(f"{len(sizes_bytes)} sizes but {len(times_s)} times")
    if len(set(sizes_bytes)) < 2:
        raise ValueError("fit_alpha_beta needs at least two distinct sizes")
    if any(not t > 0 for t in times_s):
        raise ValueError("times must be > 0")
    f = busbw_factor(n)
    xs = [s * f for s in sizes_bytes]
    ts = [float(t) for t in times_s]
    ws = [1 / t ** 2 if relative else 1.0 for t in ts]

    # Weighted normal equations for t = a + b x.
    sw = sum(ws)
    sx = sum(w * x for w, x in zip(ws, xs))
    st = sum(w * t for w, t in zip(ws, ts))
    sxx = sum(w * x * x for w, x in zip(ws, xs))
    sxt = sum(w * x * t for w, x, t in zip(ws, xs, ts))
    det = sw * sxx - sx * sx
    a = (sxx * st - sx * sxt) / det
    b = (sw * sxt - sx * st) / det
    if a < 0:
        a, b = 0.0, sxt / sxx
    if not b > 0:
        raise ValueError("the times do not grow with the size: cannot fit a bandwidth")

    pred = [a + b * x for x in xs]
    res = [t - p for t, p in zip(ts, pred)]
    rel = [r / t for r, t in zip(res, ts)]
    mean_t = sum(ts) / len(ts)
    ss_tot = sum((t - mean_t) ** 2 for t in ts)
    ss_res = sum(r * r for r in res)
    return AlphaBetaFit(
        alpha_s=a, beta_bytes_per_second=1 / b,
        rms_error_s=math.sqrt(ss_res / len(ts)),
        rms_relative_error=math.sqrt(sum(r * r for r in rel) / len(rel)),
        max_relative_error=max(abs(r) for r in rel),
        r2=1 - ss_res / ss_tot if ss_tot > 0 else 1.0,
        points=len(ts))


# ---------------------------------------------------------------------------------------
# sweeps and reports (what `ddp-fnn estimate` prints)
# ---------------------------------------------------------------------------------------

SWEEP_PARAMETERS = ("world-size", "link-rate", "width", "bucket-mb", "compute-ms")


def parse_sweep(text: str) -> tuple[str, list]:
    """``world-size=2,8,64`` -> ("world-size", [2, 8, 64]). Values: integers for
    world-size and width (every hidden layer's width), tc rates for link-rate (kept as
    text), numbers for bucket-mb and compute-ms. Raises ValueError naming the bad part."""
    name, sep, values = str(text).partition("=")
    name = name.strip()
    if not sep or name not in SWEEP_PARAMETERS:
        raise ValueError(f"bad sweep {text!r}: expected PARAMETER=V1,V2,... with PARAMETER one of "
                         f"{', '.join(SWEEP_PARAMETERS)}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise ValueError(f"bad sweep {text!r}: no values after '='")
    out: list = []
    for v in items:
        try:
            if name in ("world-size", "width"):
                out.append(int(v))
                if out[-1] < 1:
                    raise ValueError
            elif name == "link-rate":
                parse_rate(v)
                out.append(v)
            else:
                out.append(float(v))
                if not (out[-1] > 0 and math.isfinite(out[-1])):
                    raise ValueError
        except ValueError:
            raise ValueError(f"bad sweep value {v!r} for {name}") from None
    return name, out


def sweep(parameter: str, values: Sequence, widths: Sequence[int], **kwargs) -> list[StepEstimate]:
    """``estimate_step`` once per value of ``parameter``, the other inputs from ``kwargs``
    (``estimate_step``'s keywords). ``width`` sets every hidden layer's width."""
    rows = []
    for v in values:
        kw = dict(kwargs)
        ws = list(widths)
        if parameter == "world-size":
            kw["world_size"] = int(v)
        elif parameter == "link-rate":
            kw["beta_bytes_per_second"] = parse_rate(v)
        elif parameter == "width":
            if len(ws) < 3:
                raise ValueError(f"a width sweep needs at least one hidden layer, got layers {ws}")
            ws = [ws[0]] + [int(v)] * (len(ws) - 2) + [ws[-1]]
        elif parameter == "bucket-mb":
            kw["bucket_mb"] = float(v)
        elif parameter == "compute-ms":
            kw["compute_time_s"] = float(v) / 1e3
        else:
            raise ValueError(f"unknown sweep parameter {parameter!r}")
        rows.append(estimate_step(ws, **kw))
    return rows


def format_estimate(est: StepEstimate, alpha_source: str = "", beta_source: str = "") -> list[str]:
    """The human-readable report of one estimate, a line per item, units on every figure."""
    widths = ",".join(str(w) for w in est.widths)
    cap = f"{est.bucket_mb:g} MiB" if est.bucket_mb is not None else "25 MiB, first 1 MiB"
    sizes = ", ".join(format_bytes(b.numel * 4) for b in est.buckets[:6])
    if len(est.buckets) > 6:
        sizes += ", ..."
    elt = COMPRESSION_BYTES[est.compression]
    steps = latency_steps(est.world_size, est.algorithm)
    latency = len(est.buckets) * steps * est.alpha_s
    wire_name = "fp32" if est.compression == "none" else est.compression
    backward = est.backward_fraction * est.compute_time_per_step_s
    return [
        f"model        layers {widths}: {est.parameters:,} parameters, {len(est.buckets)} DDP bucket(s) "
        f"(cap {cap}): {sizes}",
        f"network      {est.world_size} ranks, {est.algorithm} all-reduce; alpha {format_seconds(est.alpha_s)} "
        f"per message step x {steps} steps{alpha_source}; beta {format_rate(est.beta_bytes_per_second)} "
        f"bus bandwidth{beta_source}",
        f"per step     payload {format_bytes(est.payload_bytes_per_step)} per rank ({wire_name}, {elt} B/element); "
        f"on the wire {format_bytes(est.wire_bytes_per_rank_per_step)} sent per rank (2(N-1)/N x payload)",
        f"             all-reduce time {format_seconds(est.comm_time_per_step_s)} "
        f"(latency {format_seconds(latency)}, transfer {format_seconds(est.comm_time_per_step_s - latency)})",
        f"             exposed {format_seconds(est.exposed_comm_time_per_step_s)} after backward "
        f"(compute {format_seconds(est.compute_time_per_step_s)}, backward {est.backward_fraction:.3g} of it = "
        f"{format_seconds(backward)}); step {format_seconds(est.step_time_s)}",
        f"scaling efficiency {est.scaling_efficiency:.1%} (compute / (compute + exposed))",
    ]


def format_sweep(parameter: str, values: Sequence, rows: Sequence[StepEstimate]) -> list[str]:
    """A table, one row per swept value."""
    head = (f"{parameter:>12} {'payload/rank':>13} {'wire/rank':>13} {'buckets':>7} {'all-reduce':>11} "
            f"{'exposed':>10} {'step':>10} {'efficiency':>10}")
    lines = [head]
    for v, e in zip(values, rows):
        lines.append(f"{v!s:>12} {format_bytes(e.payload_bytes_per_step):>13} "
                     f"{format_bytes(e.wire_bytes_per_rank_per_step):>13} {len(e.buckets):>7} "
                     f"{format_seconds(e.comm_time_per_step_s):>11} {format_seconds(e.exposed_comm_time_per_step_s):>10} "
                     f"{format_seconds(e.step_time_s):>10} {e.scaling_efficiency:>10.1%}")
    return lines
