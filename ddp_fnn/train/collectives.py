"""Every collective a training run makes outside the gradient sync, named in one place.

Every rank makes the same calls in the same order (a rank that skips one hangs the
others until --timeout-s). In the order a run makes them, with what each rank sends
under Gloo (N ranks; observe/control.py counts them into ddp_fnn_control_wire_bytes and
summary.json's control_wire_bytes; "control" = the Gloo control group, dist.py):

at start (train/setup.py)
    resume agreement  ``resume_steps_of_ranks``, control: every rank's readable checkpoint
                      steps, all_gather_object of a few ints (setup.agree_resume; world
                      size >= 2 and a run that may resume: not --resume never, and
                      --checkpoint-dir or --resume PATH given)
    probe             perfmodel/probe.py: a ladder of all-reduces timing alpha and beta
                      (world size >= 2, without --bench-json); counted apart
                      (ddp_fnn_probe_wire_bytes)
    node groups       --all-reduce hierarchical only: every rank's (node, G, local rank),
                      all_gather_object (ddp_fnn/dist.py node_groups), then one new_group a
                      node and one a local rank, on every rank in the same order
    DDP's wrap        broadcast of rank 0's parameters and buffers along Gloo's binomial
                      tree: ceil(log2 N) copies from rank 0, the copies it forwards from
                      each other rank, (N-1) in all (wire.broadcast_wire_bytes;
                      ddp_fnn_setup_wire_bytes); before it DDP's shape check, an
                      all_gather of one int64 and a broadcast of 16 B per parameter
                      dimension (not counted: some hundred bytes)
    clock offset      observe/peers.py estimate_offset, control: 16 ping-pongs of 8 B with
                      rank 0 per rank (rank 0: 16 x 8 B to each)
each step (train/loop.py)
    gradients         DDP's bucket all-reduces inside backward, or the flat all-reduce
                      (sync.py; observed per bucket, counted as the step's comm and
                      ddp_fnn_allreduce_wire_bytes: 2(N-1)/N x payload; --all-reduce
                      hierarchical: a reduce-scatter and an all-gather on the node's group
                      and an all-reduce on the local rank's group per bucket)
    whose NaN         ``ranks_with``, with --on-nan skip and only on a step whose synced
                      gradients are non-finite (every rank finds that alike: health.py):
                      N int32s all-reduced
at log steps (every --log-every and the last)
    loss              ``global_mean``: 2 float64s all-reduced (--target-loss is decided on it)
    ready times       observe/accounting.py flush -> peers.PeerExchange, control: K
                      (step, ready) float64 pairs all-gathered, (N-1) x 16 K bytes
every --eval-every / --check-replicas-every / --checkpoint-every steps
    evaluation        ``sum_over_ranks`` of loss/correct/count: 3 float64s all-reduced
    replica check     checkpoint.check_replicas: a 16-byte digest all-gathered
    checkpoint        checkpoint.Checkpointer.save: each rank's RNG and hook state
                      gather_object to rank 0 (PowerSGD: its memories, about the
                      gradients' size)
at the end (train/loop.py finish)
    ready times       the last flush
    clock offset      again, for the drift over the run
    evaluation        the held-out split
    timeline          observe/timeline.py gather_object, with --timeline
    figures           ``gather_ranks``: every rank's own summary figures, all_gather_object
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ddp_fnn.observe.control import TRAFFIC


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The element-wise sum of ``values`` over every rank, in float64 (one all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    TRAFFIC.all_reduce(t.numel() * t.element_size(), dist.get_world_size())
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
        TRAFFIC.all_reduce(t.numel() * t.element_size(), world)
    return [r for r, v in enumerate(t.tolist()) if v]


def gather_ranks(mine: dict, world_size: int) -> list[dict]:
    """Every rank's own figures, on every rank (a few hundred bytes each)."""
    ranks = [None] * world_size
    dist.all_gather_object(ranks, mine)
    TRAFFIC.all_gather_object(mine, world_size)
    return ranks


def resume_steps_of_ranks(mine: list[int], world_size: int, group=None) -> list[list[int]]:
    """Every rank's list of the checkpoint steps it can read, on every rank (one
    all_gather_object of a few ints each). ``group``: the control group (DistContext.control;
    None: the default group, Gloo already), as for the other host-side messages."""
    steps_of = [None] * world_size
    dist.all_gather_object(steps_of, mine, group=group)
    TRAFFIC.all_gather_object(mine, world_size)
    return steps_of
