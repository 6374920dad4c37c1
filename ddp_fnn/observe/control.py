"""The bytes a rank sends in the job's own collectives: everything beside the gradients'
all-reduces (counted per step from the records) and the probe's (counted apart): the
global loss, the NaN vote, ready times, clock ping-pongs, evaluation sums, replica
digests, the resume agreement, checkpoints' and timelines' gathers, the final figures.
train/collectives.py lists them in the order a run makes them.

One tally per process (``TRAFFIC``), because these collectives live in the loop, the
clock, the checks and the outputs; each call site adds what it sent, by the algorithm
Gloo runs (torch 2.13's ProcessGroupGloo):

    all_reduce of S bytes          ring: 2(N-1)/N x S
    all_gather of S bytes a rank   ring: (N-1) x S
    all_gather_object / gather_object
                                   an all_gather of the pickled sizes (one int64 a rank),
                                   then every rank's object padded to the largest: all_gather
                                   (N-1) x max; gather: max to the root (the root sends none)
    send of S bytes                S

The pickled size of another rank's object is not known here; each rank counts its own
(the objects are alike across ranks: the same keys, numbers of the same kind), so the
gathers' figure is an estimate to a few bytes a rank. Message framing (Gloo's and TCP's
headers) is not payload and is left out, as for the gradients.
"""

from __future__ import annotations

import io
import pickle

from ddp_fnn.core.wire import ring_wire_bytes

_SIZE_BYTES = 8                     # the int64 size each rank publishes before an object gather


class ControlTraffic:
    def __init__(self):
        self.wire_bytes = 0.0
        self.calls = 0

    def _add(self, nbytes: float) -> None:
        self.wire_bytes += nbytes
        self.calls += 1

    def all_reduce(self, nbytes: int, world_size: int) -> None:
        if world_size > 1:
            self._add(ring_wire_bytes(nbytes, world_size))

    def all_gather(self, nbytes: int, world_size: int) -> None:
        if world_size > 1:
            self._add((world_size - 1) * nbytes)

    def all_gather_object(self, obj, world_size: int) -> None:
        if world_size > 1:
            self._add((world_size - 1) * (_SIZE_BYTES + pickled_size(obj)))

    def gather_object(self, obj, world_size: int, is_root: bool) -> None:
        if world_size > 1:
            self._add((world_size - 1) * _SIZE_BYTES + (0 if is_root else pickled_size(obj)))

    def send(self, nbytes: int) -> None:
        self._add(nbytes)


def pickled_size(obj) -> int:
    """Bytes torch.distributed's object collectives send for ``obj`` (its pickle)."""
    f = io.BytesIO()
    pickle.Pickler(f).dump(obj)
    return f.tell()


TRAFFIC = ControlTraffic()
