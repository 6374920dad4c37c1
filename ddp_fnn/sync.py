"""How gradients are averaged across ranks, and the one place every all-reduce is seen.

Two ways, chosen by ``--sync``:

* ``ddp``: ``DistributedDataParallel``. Gradients are grouped into buckets (``--bucket-mb``)
  and each bucket is all-reduced as soon as its gradients are ready, overlapping the rest
  of backward. Compression (fp16, bf16, PowerSGD) is a DDP communication hook. Our own
  hook wraps whichever hook runs, so it sees each bucket's payload and completion.
* ``allreduce``: the textbook version. After backward, every gradient is flattened into
  one buffer, all-reduced once (SUM), divided by the world size and copied back. Nothing
  overlaps: the whole all-reduce is exposed.

Every collective lands in a ``CommRecorder`` as (payload bytes, launch, completion) in
the clock's units; ``metrics.py`` turns those into Prometheus figures. This module does
not import Prometheus.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_fnn.timing import Clock


@dataclass
class Collective:
    payload_bytes: int    # bytes of the tensors handed to all-reduce (after compression)
    calls: int            # all-reduce calls behind this record (PowerSGD makes 3 per bucket)
    launched: object      # clock mark: when the hook handed the bucket over
    done: object = None   # clock mark: when the reduced bucket was back


@dataclass
class CommRecorder:
    """Collects this step's collectives. Written from DDP's hook (autograd thread) and
    its completion callbacks (the backend's thread); list.append is atomic in CPython."""

    clock: Clock
    records: list[Collective] = field(default_factory=list)

    def launch(self, payload_bytes: int, calls: int = 1) -> Collective:
        rec = Collective(payload_bytes=payload_bytes, calls=calls, launched=self.clock.mark())
        self.records.append(rec)
        return rec

    def complete(self, rec: Collective) -> None:
        rec.done = self.clock.mark()

    def take(self) -> list[Collective]:
        """This step's collectives, in launch order; starts a new step."""
        out, self.records = self.records, []
        return out


# ---------------------------------------------------------------------------------------
# ddp: DistributedDataParallel with an observing communication hook
# ---------------------------------------------------------------------------------------

@dataclass
class _HookState:
    recorder: CommRecorder
    compression: str
    powersgd: powerSGD_hook.PowerSGDState | None


def _observed_hook(state, bucket):
    """Run the configured hook on ``bucket`` and record what it put on the wire.

    (No annotations: DDP checks them, and this module's postponed annotations are strings.)"""
    buf = bucket.buffer()
    if state.compression == "powersgd":
        ps = state.powersgd
        vanilla = ps.iter < ps.start_powerSGD_iter    # PowerSGD all-reduces plainly until then
        before = ps.total_numel_after_compression
        rec = state.recorder.launch(0)
        fut = powerSGD_hook.powerSGD_hook(ps, bucket)
        if vanilla:
            rec.payload_bytes = buf.numel() * buf.element_size()
        else:
            # PowerSGD's own accounting: uncompressed tensors + P + Q elements, in 3 all-reduces.
            rec.payload_bytes = (ps.total_numel_after_compression - before) * buf.element_size()
            rec.calls = 3
    elif state.compression in ("fp16", "bf16"):
        rec = state.recorder.launch(buf.numel() * 2)
        hook = default_hooks.fp16_compress_hook if state.compression == "fp16" else default_hooks.bf16_compress_hook
        fut = hook(None, bucket)
    else:
        rec = state.recorder.launch(buf.numel() * buf.element_size())
        fut = default_hooks.allreduce_hook(None, bucket)

    def completed(f: torch.futures.Future) -> torch.Tensor:
        state.recorder.complete(rec)
        return f.value()

    return fut.then(completed)


class Synchroniser:
    """Owns the replica as the loop sees it (``self.model``) and how its gradients sync.

    ``no_sync()`` is the context for micro-steps whose gradients only accumulate;
    ``after_backward()`` runs the flat all-reduce in ``allreduce`` mode (nothing in ``ddp``
    mode, where the hook already did it during backward).
    """

    def __init__(self, model: nn.Module, mode: str, world_size: int, recorder: CommRecorder,
                 bucket_mb: float = 25.0, compression: str = "none", powersgd_rank: int = 2,
                 device: torch.device | None = None):
        self.module = model          # the unwrapped FNN: what gets saved
        self.mode = mode
        self.world_size = world_size
        self.recorder = recorder
        self.hook_state: _HookState | None = None
        self.bucket_mb = bucket_mb
        if mode == "ddp":
            if compression == "powersgd" and dist.get_backend() == "gloo":
                # PowerSGD's hook waits on an all-reduce inside another's completion callback;
                # on Gloo, with several buckets in flight, those waits can hold every worker
                # thread and the step deadlocks. One bucket has nothing in flight beside it.
                self.bucket_mb = max(bucket_mb, gradient_bytes(model) / 2 ** 20 + 1)
            device_ids = [device.index] if device is not None and device.type == "cuda" else None
            self.model = DDP(model, device_ids=device_ids, bucket_cap_mb=self.bucket_mb)
            ps = None
            if compression == "powersgd":
                # start_powerSGD_iter=2: the smallest DDP allows with error feedback; the first
                # two steps all-reduce plainly (DDP rebuilds its buckets after the first).
                ps = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                                 start_powerSGD_iter=2, min_compression_rate=1)
            self.hook_state = _HookState(recorder, compression, ps)
            self.model.register_comm_hook(self.hook_state, _observed_hook)
        elif mode == "allreduce":
            self.model = model
        else:
            raise ValueError(f"unknown sync mode {mode!r}")

    def no_sync(self):
        return self.model.no_sync() if self.mode == "ddp" else contextlib.nullcontext()

    def after_backward(self) -> None:
        if self.mode != "allreduce":
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        rec = self.recorder.launch(flat.numel() * flat.element_size())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self.recorder.complete(rec)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def gradient_bytes(model: nn.Module) -> int:
    """Uncompressed gradient size of one step: what a flat fp32 all-reduce would carry."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
