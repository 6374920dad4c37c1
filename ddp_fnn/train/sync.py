"""How gradients are averaged across ranks, and the one place every all-reduce is seen.

Two ways, chosen by ``--sync``:

* ``ddp``: ``DistributedDataParallel``. Gradients are grouped into buckets (``--bucket-mb``)
  and each bucket is all-reduced as soon as its gradients are ready, overlapping the rest
  of backward. Compression (fp16, bf16, PowerSGD) is a DDP communication hook. Our own
  hook wraps whichever hook runs, so it sees each bucket's payload and completion.
* ``allreduce``: the textbook version. After backward, every gradient is flattened into
  one buffer, all-reduced once (SUM), divided by the world size and copied back. Nothing
  overlaps: the whole all-reduce is exposed.

Every collective is reported to an ``observe.Observer`` (bucket index, payload bytes,
launch and completion marks); observe.py turns those into seconds and metrics.py into
Prometheus figures. This module does not import Prometheus.

The Synchroniser owns its own state: ``state_dict()``/``load_state_dict()`` (PowerSGD's
error feedback, P/Q memories, iteration and RNG, for checkpoints) and ``settle_buckets()``
(DDP's rebuilt bucket layout before a resumed run's first step).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_fnn.train.checkpoint import np_state, np_tuple
from ddp_fnn.observe import Observer


# ---------------------------------------------------------------------------------------
# ddp: DistributedDataParallel with an observing communication hook
# ---------------------------------------------------------------------------------------

@dataclass
class _HookState:
    observer: Observer
    compression: str
    powersgd: powerSGD_hook.PowerSGDState | None
    world_size: int


def _observed_hook(state, bucket):
    """Run the configured hook on ``bucket`` and record what it put on the wire.

    (No annotations: DDP checks them, and this module's postponed annotations are strings.)"""
    buf, index, observer = bucket.buffer(), bucket.index(), state.observer
    if state.compression == "powersgd":
        ps = state.powersgd
        vanilla = ps.iter < ps.start_powerSGD_iter    # PowerSGD all-reduces plainly until then
        before = ps.total_numel_after_compression
        rec = observer.launch(index, 0)
        fut = powerSGD_hook.powerSGD_hook(ps, bucket)
        if vanilla:
            rec.payload_bytes = buf.numel() * buf.element_size()
        else:
            # PowerSGD's own accounting: uncompressed tensors + P + Q elements, in 3 all-reduces.
            rec.payload_bytes = (ps.total_numel_after_compression - before) * buf.element_size()
            rec.calls = 3
    elif state.compression in ("fp16", "bf16"):
        rec = observer.launch(index, buf.numel() * 2)
        hook = default_hooks.fp16_compress_hook if state.compression == "fp16" else default_hooks.bf16_compress_hook
        fut = hook(None, bucket)
    else:
        # A plain sum, done here so that a bucket costs one Python callback, not
        # default_hooks.allreduce_hook's chained two. No division by the world size: the
        # loop scales the loss by 1/N instead (Synchroniser.grad_scale), which costs one
        # scalar multiply, where dividing the bucket is another pass over every gradient
        # (DDP's own C++ path folds it into the copy into the bucket; with a hook it cannot).
        rec = observer.launch(index, buf.numel() * buf.element_size())
        fut = dist.all_reduce(buf, async_op=True).get_future()

        def reduced(f: torch.futures.Future) -> torch.Tensor:
            observer.complete(rec)
            return f.value()[0]         # (raises if the all-reduce failed)

        return fut.then(reduced)

    def completed(f: torch.futures.Future) -> torch.Tensor:
        observer.complete(rec)
        return f.value()

    return fut.then(completed)


class Synchroniser:
    """Owns the replica as the loop sees it (``self.model``) and how its gradients sync.

    ``grad_scale`` is the factor the loop multiplies the loss by before backward: 1/N
    where the hook sums the buckets as they are (``--compression none``: the gradients
    come out already divided, so the sum is the average; with N a power of two this is
    bitwise the same as dividing afterwards), 1 where the hook averages itself (fp16, bf16,
    PowerSGD) and in the flat mode, which divides after its all-reduce as the textbook does.

    ``no_sync()`` is the context for micro-steps whose gradients only accumulate;
    ``after_backward()`` runs the flat all-reduce in ``allreduce`` mode (nothing in ``ddp``
    mode, where the hook already did it during backward).
    """

    def __init__(self, model: nn.Module, mode: str, world_size: int, observer: Observer,
                 bucket_mb: float = 25.0, compression: str = "none", powersgd_rank: int = 2,
                 device: torch.device | None = None):
        self.module = model          # the unwrapped FNN: what gets saved
        self.mode = mode
        self.world_size = world_size
        self.observer = observer
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
            self.setup_wire_bytes = module_state_broadcast_bytes(model, world_size, dist.get_rank())
            ps = None
            if compression == "powersgd":
                # start_powerSGD_iter=2: the smallest DDP allows with error feedback; the first
                # two steps all-reduce plainly (DDP rebuilds its buckets after the first).
                ps = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                                 start_powerSGD_iter=2, min_compression_rate=1)
            self.hook_state = _HookState(observer, compression, ps, world_size)
            self.model.register_comm_hook(self.hook_state, _observed_hook)
            self.grad_scale = 1.0 / world_size if compression == "none" else 1.0
        elif mode == "allreduce":
            self.model = model
            self.grad_scale = 1.0
            self.setup_wire_bytes = 0           # same seed, same replica: nothing to broadcast
        else:
            raise ValueError(f"unknown sync mode {mode!r}")

    setup_wire_bytes: int
    """What this rank sent to set the replicas up (module_state_broadcast_bytes)."""

    def no_sync(self):
        return self.model.no_sync() if self.mode == "ddp" else contextlib.nullcontext()

    def after_backward(self) -> None:
        if self.mode != "allreduce":
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        rec = self.observer.launch(0, flat.numel() * flat.element_size())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        self.observer.complete(rec)
        flat.div_(self.world_size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


    def forget_hook_memory(self) -> None:
        """A skipped step (--on-nan skip): PowerSGD's error feedback and its P and Q
        warm-start memories were computed from the non-finite gradients; drop them, as at
        the start (the hook makes zero error feedback and fresh Qs from its RNG)."""
        ps = self.hook_state.powersgd if self.hook_state is not None else None
        if ps is not None:
            ps.error_dict, ps.p_memory_dict, ps.q_memory_dict = {}, {}, {}

    # ---- its own state: checkpoints and resume ---------------------------------------
    def state_dict(self) -> dict | None:
        """This rank's communication-hook state as tensors and numbers (weights-only
        loadable), or None for stateless hooks. PowerSGD: iter, its NumPy RandomState, P
        and Q memories and the rank's own error feedback."""
        ps = self.hook_state.powersgd if self.hook_state is not None else None
        if ps is None:
            return None
        return {"kind": "powersgd", "iter": int(ps.iter), "rng": np_state(ps.rng.get_state()),
                "error": _cpu_dict(ps.error_dict), "p_memory": _cpu_dict(ps.p_memory_dict),
                "q_memory": _cpu_dict(ps.q_memory_dict),
                "total_numel_before_compression": int(ps.total_numel_before_compression),
                "total_numel_after_compression": int(ps.total_numel_after_compression),
                "next_stats_report": int(ps.next_stats_report)}

    def load_state_dict(self, saved: dict | None, device: torch.device, exact: bool) -> bool:
        """Put a saved hook state back. With ``exact`` false (another world size, whose
        ranks' error feedback cannot be mapped, or another bucket layout), the per-bucket
        memories are dropped: PowerSGD goes on with zero error feedback and fresh random
        Qs from its restored RNG. Returns whether the state was restored exactly."""
        ps = self.hook_state.powersgd if self.hook_state is not None else None
        if ps is None or saved is None or saved.get("kind") != "powersgd":
            return True
        ps.rng.set_state(np_tuple(saved["rng"]))
        ps.total_numel_before_compression = saved["total_numel_before_compression"]
        ps.total_numel_after_compression = saved["total_numel_after_compression"]
        ps.next_stats_report = saved["next_stats_report"]
        ps.iter = saved["iter"]
        if not exact:
            ps.error_dict, ps.p_memory_dict, ps.q_memory_dict = {}, {}, {}
            return False
        ps.error_dict = {k: v.to(device) for k, v in saved["error"].items()}
        ps.p_memory_dict = {k: v.to(device) for k, v in saved["p_memory"].items()}
        ps.q_memory_dict = {k: v.to(device) for k, v in saved["q_memory"].items()}
        return True

    def settle_buckets(self, device: torch.device) -> None:
        """Collective. DDP reduces its first iteration in one bucket holding every gradient
        in parameter order, then rebuilds its buckets in the order the gradients became
        ready. The uninterrupted run computed step s with the rebuilt layout, so a resumed
        run must too: PowerSGD's memories are flat per-bucket buffers, and with 3+ ranks a
        gradient's position in a bucket decides the order in which the ring all-reduce
        adds it up. One throw-away forward and backward (all-reduced plainly, gradients
        discarded, no RNG drawn) makes DDP rebuild before the first real step."""
        if self.mode != "ddp":
            return
        hs = self.hook_state
        compression, hs.compression = hs.compression, "none"
        try:
            x = torch.zeros(1, self.module.widths[0], device=device)
            self.model(x).sum().backward()
        finally:
            hs.compression = compression
        self.module.zero_grad(set_to_none=True)
        self.observer.discard_stray()


def _cpu_dict(d: dict) -> dict:
    return {int(k): v.detach().cpu().clone() for k, v in d.items()}


def gradient_bytes(model: nn.Module) -> int:
    """Uncompressed gradient size of one step: what a flat fp32 all-reduce would carry."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def module_state_broadcast_bytes(model: nn.Module, world_size: int, rank: int) -> int:
    """Bytes this rank sends when DDP wraps the model: DDP broadcasts rank 0's parameters
    and buffers to every rank (``_sync_module_states``), and Gloo's broadcast sends the
    root's tensor to each other rank directly, so rank 0 sends (N-1) x their bytes and
    the others nothing. (NCCL pipelines a broadcast along a ring, where every rank but
    the last forwards it once; not measured here.) Checked against the namespace nodes'
    kernel TX counters in tests/test_launch_netns.py."""
    if rank != 0:
        return 0
    state = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return (world_size - 1) * state
