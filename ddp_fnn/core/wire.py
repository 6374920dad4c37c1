"""The byte formulas of collectives: what each rank sends, and the bus-bandwidth factor
that makes a measured rate comparable with a link's (nccl-tests doc/PERFORMANCE.md).
Everything that reports or predicts wire bytes (the observer's records, Prometheus,
the cost models, the sweep) computes them here.
"""

from __future__ import annotations

ALGORITHMS = ("ring", "tree", "halving-doubling", "hierarchical")
"""Every all-reduce algorithm ddp-fnn names: the one vocabulary of --algorithm. ring,
tree and halving-doubling as the alpha-beta model prices them (perfmodel/netmodel.py);
hierarchical (reduce-scatter in the server, all-reduce across, all-gather) as the fabric
model maps it and train's --all-reduce hierarchical runs it. Each model takes its subset."""

DEFAULT_BUCKET_MB = 25.0
"""DDP's ``bucket_cap_mb`` when none is given (torch.nn.parallel.distributed._DEFAULT_BUCKET_CAP_MB):
train's --bucket-mb default, and estimate's and sweep's, which are train's option."""
DEFAULT_FIRST_BUCKET_BYTES = 1024 * 1024
"""torch.distributed._DEFAULT_FIRST_BUCKET_BYTES: DDP's first-bucket cap when bucket_cap_mb is not given."""


def check_world(world_size: int) -> int:
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world size must be a positive integer, got {world_size}")
    return int(world_size)


def busbw_factor(world_size: int) -> float:
    """2(N-1)/N: all-reduce's bus-bandwidth factor (nccl-tests doc/PERFORMANCE.md)."""
    n = check_world(world_size)
    return 2 * (n - 1) / n


def hierarchical_wire_bytes(payload_bytes: float, local_size: int, nodes: int) -> float:
    """Bytes each rank sends in a hierarchical all-reduce of ``payload_bytes`` over
    ``nodes`` nodes of ``local_size`` ranks (train/sync.py; topology.hierarchical): a
    reduce-scatter and an all-gather among the node's G ranks, (G-1)/G x S each as rings
    send them, and between them an all-reduce of one S/G chunk across the n nodes,
    2(n-1)/n x S/G, the only bytes that leave the node. (Padding to a multiple of G
    elements, at most G-1 elements a bucket, is left out.)"""
    g, n = local_size, nodes
    if g < 1 or n < 1:
        raise ValueError(f"local size and nodes must be >= 1, got {local_size}, {nodes}")
    return 2 * (g - 1) * payload_bytes / g + hierarchical_network_bytes(payload_bytes, local_size, nodes)


def hierarchical_network_bytes(payload_bytes: float, local_size: int, nodes: int) -> float:
    """The part of ``hierarchical_wire_bytes`` that leaves the node: 2(n-1)/n x S/G."""
    return 2 * (nodes - 1) * payload_bytes / (nodes * local_size)


def ring_wire_bytes(payload_bytes: float, world_size: int) -> float:
    """Bytes each rank sends in a ring all-reduce of ``payload_bytes``: 2(N-1)/N * S.

    Reduce-scatter then all-gather, each N-1 steps of one S/N chunk (Patarasuk and Yuan
    2009). Computed as 2(N-1)*S / N in one division, so it is the correctly rounded value;
    0 at N = 1.
    """
    n = check_world(world_size)
    if payload_bytes < 0:
        raise ValueError(f"payload bytes must be >= 0, got {payload_bytes}")
    return 2 * (n - 1) * payload_bytes / n


def algbw(size_bytes: float, time_s: float) -> float:
    """Algorithm bandwidth S / t in bytes/s (nccl-tests doc/PERFORMANCE.md)."""
    if not time_s > 0:
        raise ValueError(f"time must be > 0, got {time_s}")
    return size_bytes / time_s


def busbw(algbw_bytes_per_second: float, world_size: int) -> float:
    """Bus bandwidth of an all-reduce: algbw * 2(N-1)/N in bytes/s (nccl-tests
    doc/PERFORMANCE.md). Comparable with the link's rate whatever N is."""
    return algbw_bytes_per_second * busbw_factor(world_size)


def broadcast_peers(world_size: int, rank: int, root: int = 0) -> list[int]:
    """The ranks ``rank`` sends the whole buffer to in Gloo's broadcast from ``root``, in
    the order it sends (gloo/broadcast.cc, the algorithm ProcessGroupGloo's broadcast runs).

    A binomial tree over virtual ranks v = (rank - root) mod N: in round i (i = 0 ..
    ceil(log2 N) - 1) every v < 2^i sends to v + 2^i, if that is < N. So v sends to
    v + 2^i for every i from the bit length of v up while v + 2^i < N: the root
    ceil(log2 N) copies, every v >= N/2 none. At 8 ranks 0 -> 1; 0 -> 2, 1 -> 3; 0 -> 4,
    1 -> 5, 2 -> 6, 3 -> 7; at 5 ranks 0 -> 1, 2, 4 and 1 -> 3."""
    n = check_world(world_size)
    if not (0 <= rank < n and 0 <= root < n):
        raise ValueError(f"rank and root must be in 0..{n - 1}, got rank {rank}, root {root}")
    v = (rank - root) % n
    peers, step = [], 1 << v.bit_length()
    while v + step < n:
        peers.append((v + step + root) % n)
        step <<= 1
    return peers


def broadcast_wire_bytes(payload_bytes: float, world_size: int, rank: int) -> float:
    """Bytes ``rank`` sends in a Gloo broadcast of ``payload_bytes`` from rank 0: one copy
    to each of its ``broadcast_peers`` (rank 0: ceil(log2 N) copies; every rank's copies
    add up to (N-1) x the payload, one for each receiver). DDP's start-up broadcast of
    rank 0's parameters and buffers (``_sync_module_states``) is this, in buckets of at
    most 250 MiB each broadcast alike, so the buckets change nothing but the message count.
    0 at N = 1."""
    if payload_bytes < 0:
        raise ValueError(f"payload bytes must be >= 0, got {payload_bytes}")
    return len(broadcast_peers(world_size, rank)) * payload_bytes
