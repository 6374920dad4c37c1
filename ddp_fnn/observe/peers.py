"""The ranks compare notes: clock offsets to rank 0, and every step's ready times, so that
each rank's exposed communication splits into waiting for a slower peer and transfer.

Both exchanges are host-side messages: CPU tensors over Gloo on every backend (the
control group, ``dist.DistContext.control``; on a Gloo job the default group). NCCL's
send/recv would return before the data has moved, so a round trip over NCCL would time
Python's queueing and give a falsely tight error bound.

Clock offsets (``estimate_offset``, at the start and at the end of a run): rank 0 answers
``rounds`` ping-pongs from every other rank in turn (Gloo's point-to-point send/recv of
one float64, synchronous on the host); each rank keeps the exchange with the smallest
round trip (Cristian's method, ``observe.cristian``). The offset is this rank's
monotonic clock minus rank 0's; its error bound is half that round trip. On one host
(loopback, network namespaces) the true offset is 0. The start offset puts ready times
in rank 0's time base during the run; start vs end gives the drift.

Ready times (``PeerExchange``): each rank buffers its records' ready instants and, every
``--log-every`` steps and at the end, all-gathers them in one collective: a float64 pair
(step, ready) per buffered step, i.e. 16 x K bytes per rank for K steps, and with Gloo's
ring all-gather (N-1) x 16 x K bytes sent per rank (16 KiB for 64 ranks and 16 steps).
Nothing is added to a step's critical path.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from ddp_fnn import observe
from ddp_fnn.observe import StepRecord
from ddp_fnn.observe.control import TRAFFIC


@dataclass
class ClockOffset:
    offset_s: float        # this rank's clock - rank 0's
    bound_s: float         # error bound: half the best round trip
    rtt_s: float           # that round trip
    rounds: int

    def to_json(self) -> dict:
        return asdict(self)


def estimate_offset(rank: int, world_size: int, group=None, rounds: int = 16) -> ClockOffset:
    """Collective over ``group`` (a Gloo group; None: the default one): this rank's clock
    offset to rank 0 (rank 0: exactly 0)."""
    if world_size == 1:
        return ClockOffset(0.0, 0.0, 0.0, 0)
    buf = torch.zeros(1, dtype=torch.float64)
    samples = []
    for peer in range(1, world_size):
        for _ in range(rounds):
            if rank == 0 and peer != 0:
                dist.recv(buf, src=peer, group=group)
                buf.fill_(observe.now())
                dist.send(buf, dst=peer, group=group)
                TRAFFIC.send(buf.numel() * buf.element_size())
            elif rank == peer:
                t1 = observe.now()
                dist.send(buf, dst=0, group=group)
                TRAFFIC.send(buf.numel() * buf.element_size())
                dist.recv(buf, src=0, group=group)
                t2 = observe.now()
                samples.append((t1, buf.item(), t2))
    if rank == 0:
        return ClockOffset(0.0, 0.0, 0.0, rounds)
    offset, bound, rtt = observe.cristian(samples)
    return ClockOffset(offset, bound, rtt, rounds)


class PeerExchange:
    """Fills in every record's wait_s, transfer_s and last_ready_rank; ``exchange`` is a
    collective every rank calls at the same steps with the same number of records."""

    def __init__(self, rank: int, world_size: int, offset: ClockOffset, group=None):
        self.rank, self.world_size, self.offset, self.group = rank, world_size, offset, group

    def exchange(self, records: list[StepRecord]) -> None:
        mine = torch.tensor([[rec.step, observe.ready_time(rec) - self.offset.offset_s] for rec in records],
                            dtype=torch.float64).reshape(len(records), 2)
        if self.world_size > 1:
            every = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(every, mine, group=self.group)
            TRAFFIC.all_gather(mine.numel() * mine.element_size(), self.world_size)
        else:
            every = [mine]
        table = torch.stack(every)                           # [rank, record, (step, ready)]
        if not bool((table[:, :, 0] == table[0:1, :, 0]).all()):
            raise RuntimeError(f"rank {self.rank}: ranks exchanged ready times of different steps")
        for i, rec in enumerate(records):
            ready_all = [float(v) for v in table[:, i, 1].tolist()]
            observe.split_wait(rec, ready_all, self.offset.offset_s)


def offsets_json(start: ClockOffset, end: ClockOffset | None) -> dict:
    """summary.json's clock figures for one rank."""
    out = {"offset_start_s": start.offset_s, "bound_start_s": start.bound_s}
    if end is not None:
        out |= {"offset_end_s": end.offset_s, "bound_end_s": end.bound_s,
                "drift_s": end.offset_s - start.offset_s}
    return {k: (v if math.isfinite(v) else None) for k, v in out.items()}
