"""Every collective a training run makes outside the gradient sync, named in one place.

Every rank makes the same calls in the same order (a rank that skips one hangs the
others until --timeout-s). In the order a run makes them:

at start (train/setup.py)
    probe             perfmodel/probe.py: a ladder of all-reduces timing alpha and beta
                      (world size >= 2, without --bench-json); its bytes counted apart
    DDP's wrap        broadcast of rank 0's parameters and buffers (sync.py counts them,
                      setup_wire_bytes)
    clock offset      observe/peers.py estimate_offset: ping-pongs with rank 0
each step (train/loop.py)
    gradients         DDP's bucket all-reduces inside backward, or the flat all-reduce
                      (sync.py; observed per bucket, counted as the step's comm)
    NaN vote          ``ranks_with``, every step with --on-nan skip
    loss              ``global_mean``, every step with --target-loss, else at log steps
    ready times       observe/accounting.py flush -> peers.PeerExchange, at log steps
    evaluation        ``sum_over_ranks`` of loss/correct/count, every --eval-every steps
    replica check     checkpoint.check_replicas, every --check-replicas-every steps
at the end (train/loop.py finish)
    ready times       the last flush
    clock offset      again, for the drift over the run
    evaluation        the held-out split
    timeline          observe/timeline.py gather, with --timeline
    figures           ``gather_ranks``: every rank's own summary figures
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over every rank, in float64 (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def global_mean(value_sum: float, count: float, device: torch.device) -> float:
    """Sum a (value, count) pair over ranks; returns the global mean. Same on every rank."""
    total, n = sum_over_ranks([value_sum, count], device)
    return total / n if n > 0 else float("nan")


def ranks_with(flag: bool, rank: int, world: int, device: torch.device) -> list[int]:
    """The ranks whose ``flag`` is set, the same list on every rank (one all-reduce of
    ``world`` int32s)."""
    t = torch.zeros(world, dtype=torch.int32, device=device)
    t[rank] = int(flag)
    if world > 1:
        dist.all_reduce(t)
    return [r for r, v in enumerate(t.tolist()) if v]


def gather_ranks(mine: dict, world_size: int) -> list[dict]:
    """Every rank's own figures, on every rank (a few hundred bytes each)."""
    ranks = [None] * world_size
    dist.all_gather_object(ranks, mine)
    return ranks
