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
from ddp_fnn.core.wire import DEFAULT_BUCKET_MB, broadcast_wire_bytes, hierarchical_wire_bytes, ring_wire_bytes


# ---------------------------------------------------------------------------------------
# ddp: DistributedDataParallel with an observing communication hook
# ---------------------------------------------------------------------------------------

@dataclass
class _HookState:
    observer: Observer
    compression: str
    powersgd: powerSGD_hook.PowerSGDState | None
    world_size: int
    group: object = None        # the default process group (its allreduce, without dist's wrapper)
    scale_in_hook: bool = True  # False: the loss carries the 1/N (Synchroniser.loss_scale)
    hierarchy: object = None    # dist.NodeGroups: --all-reduce hierarchical


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
        # DDP's own arithmetic without a hook: each gradient times 1/N (the Reducer's
        # mul_out into the bucket, the scalar in float), then the sum. The steps on DDP's
        # C++ path (--bucket-detail-every) therefore come out bit for bit alike. With N a
        # power of two the loss carries the 1/N instead (Synchroniser.loss_scale): the
        # same bits without a pass over the bucket. The all-reduce is called on the
        # process group itself: dist.all_reduce's Python wrapper costs about as much as
        # the rest of the hook at 24 buckets.
        if state.scale_in_hook:
            buf.mul_(1.0 / state.world_size)
        rec = observer.launch(index, buf.numel() * buf.element_size())
        if state.hierarchy is not None:
            _hierarchical_all_reduce(buf, state.hierarchy)
            rec.calls = 3 if state.hierarchy.rail is not None else 2
            observer.complete(rec)
            done = torch.futures.Future()
            done.set_result(buf)
            return done
        fut = state.group.allreduce([buf]).get_future()

        def reduced(f: torch.futures.Future) -> torch.Tensor:
            observer.complete(rec)
            return f.value()[0]         # (raises if the all-reduce failed)

        return fut.then(reduced)

    def completed(f: torch.futures.Future) -> torch.Tensor:
        observer.complete(rec)
        return f.value()

    return fut.then(completed)


# The single-tensor collectives of the hierarchical all-reduce. torch 2.13 renamed them
# (reduce_scatter_tensor -> reduce_scatter_single, all_gather_into_tensor ->
# all_gather_single) and made the old names deprecated wrappers of the new ones, with a
# FutureWarning each call; releases before 2.13 (pyproject.toml's floor is older) have only
# the old names. The same collective either way.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _hierarchical_all_reduce(buf: torch.Tensor, h) -> None:
    """Sum ``buf`` over every rank in three phases (topology.hierarchical's mapping):
    reduce-scatter among this node's G ranks (each keeps the sum of one 1/G chunk), an
    all-reduce of that chunk across the nodes among the ranks of this local rank (the
    only phase that leaves the node: 2(n-1)/n x S/G bytes a rank), and an all-gather of
    the chunks inside the node. The bucket is padded to a multiple of G elements.

    The phases run one after the other inside the hook, each waited for here: chaining
    them as completion callbacks would wait on a collective inside another's callback,
    which on Gloo can hold every worker thread (the PowerSGD deadlock in ``__init__``).
    So a bucket's all-reduce starts when it is ready, as in the flat case, and backward
    waits for it; with one bucket a step (what the namespace comparison uses) the two
    overlap alike, that is, not at all."""
    g = h.local_size
    chunk = -(-buf.numel() // g)
    flat = buf if chunk * g == buf.numel() else torch.cat([buf, buf.new_zeros(chunk * g - buf.numel())])
    part = flat.new_empty(chunk)
    _reduce_scatter(part, flat, group=h.local)
    if h.rail is not None:
        dist.all_reduce(part, group=h.rail)
    _all_gather(flat, part, group=h.local)
    if flat is not buf:
        buf.copy_(flat[:buf.numel()])


class Synchroniser:
    """Owns the replica as the loop sees it (``self.model``) and how its gradients sync.

    Every hook averages its buckets itself (``--compression none``: times 1/N, then the
    sum, as DDP does without a hook); the flat mode divides after its all-reduce, as the
    textbook does. One exception, for speed: with ``--compression none`` and N a power of
    two, ``MicroStep.backward`` multiplies each micro-step's loss by ``loss_scale`` = 1/N on
    the steps the observing hook syncs, and the hook adds the buckets unscaled. Multiplying by a
    power of two is exact in floating point (every product and sum of backward is scaled
    exactly, barring subnormals below 1.2e-38), so the gradients are the same bits as the
    Reducer's own ``grad x 1/N``, without a pass over every bucket (about 1 ms a step for
    1.3 M parameters on one CPU core: 4 % of a 23 ms step). ``loss_scale`` is 1.0 on
    every other step and configuration.

    Bucket detail every K steps (``detail_every``, --bucket-detail-every; CPU,
    --compression none): at K = 1 every step syncs through the observing Python hook. At
    K > 1 a second DDP wrapper over the same module, stock (no hook), syncs the steps
    between on DDP's C++ path (the same arithmetic, so the same bits), at no cost per
    bucket. Only the wrapper whose forward ran expects gradients (its Reducer's
    ``prepare_for_backward``); the other's autograd hooks return at once. On those steps
    each bucket's hand-over comes from the Reducer's own per-gradient ready times
    (``get_backward_stats``: nanoseconds since its forward ended) and the sync's end from
    backward's return: step totals (ready, exposed, wait, transfer) on every step, each
    bucket's completion only on the detailed ones (docs/metrics.md, "Bucket detail").
    ``select(step)`` picks the wrapper before a step's first forward.

    The loop sees two calls. ``micro_step(step, last)`` is the context of one micro-step:
    it picks the step's wrapper (``select``), holds DDP's sync back with ``no_sync`` on
    all but the last micro-step (gradients only accumulate), and yields the ``MicroStep``
    whose ``model`` the loop calls and whose ``backward`` applies ``loss_scale``.
    ``finish()`` ends the step's sync: the flat all-reduce in ``allreduce`` mode, the C++
    path's ready times handed to the observer in ``ddp`` mode.
    """

    def __init__(self, model: nn.Module, mode: str, world_size: int, observer: Observer,
                 bucket_mb: float = DEFAULT_BUCKET_MB, compression: str = "none", powersgd_rank: int = 2,
                 device: torch.device | None = None, detail_every: int = 1, hierarchy=None):
        self.module = model          # the unwrapped FNN: what gets saved
        self.mode = mode
        self.world_size = world_size
        self.observer = observer
        self.hook_state: _HookState | None = None
        self.bucket_mb = bucket_mb
        self.plain: DDP | None = None           # the C++ path's wrapper (detail_every > 1)
        self.detail_every = 1
        self.detailed = True                    # this step syncs through the observing hook
        self.hierarchy = None                   # dist.NodeGroups with --all-reduce hierarchical
        self.loss_scale = 1.0                   # what this step's micro-steps multiply their loss by
        if mode == "ddp":
            if compression == "powersgd" and dist.get_backend() == "gloo":
                # PowerSGD's hook waits on an all-reduce inside another's completion callback;
                # on Gloo, with several buckets in flight, those waits can hold every worker
                # thread and the step deadlocks. One bucket has nothing in flight beside it.
                self.bucket_mb = max(bucket_mb, gradient_bytes(model) / 2 ** 20 + 1)
            device_ids = [device.index] if device is not None and device.type == "cuda" else None
            # gradient_as_bucket_view: each .grad is a view into its bucket, so after the
            # all-reduce nothing is copied back (one pass over the gradients less a step;
            # with zero_grad(set_to_none=True) the Reducer still copies each new gradient
            # in, times 1/N on its own path, so the arithmetic is unchanged).
            self.observed = DDP(model, device_ids=device_ids, bucket_cap_mb=self.bucket_mb, gradient_as_bucket_view=True)
            self.model = self.observed
            self.setup_wire_bytes = module_state_broadcast_bytes(model, world_size, dist.get_rank())
            ps = None
            if compression == "powersgd":
                # start_powerSGD_iter=2: the smallest DDP allows with error feedback; the first
                # two steps all-reduce plainly (DDP rebuilds its buckets after the first).
                ps = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                                 start_powerSGD_iter=2, min_compression_rate=1)
            exact = compression == "none" and world_size > 1 and world_size & (world_size - 1) == 0
            self.hook_state = _HookState(observer, compression, ps, world_size, _default_group(),
                                         scale_in_hook=not exact, hierarchy=hierarchy)
            self.hierarchy = hierarchy
            self.loss_scale = 1.0 / world_size if exact else 1.0
            self.observed.register_comm_hook(self.hook_state, _observed_hook)
            self._micro = self._observed_micro = MicroStep(self.observed, self.loss_scale)
            # On CUDA the Reducer's times are when the host queued each gradient, not when
            # the GPU made it (the run-ahead hazard, docs/metrics.md): every step detailed
            # wherever marks are device events (CUDA, or observe/emulated.py's stream).
            if detail_every > 1 and compression == "none" and not observer.clock.deferred:
                self.detail_every = detail_every
                # init_sync=False: the replicas are equal already (the first wrapper's broadcast).
                self.plain = DDP(model, device_ids=device_ids, bucket_cap_mb=self.bucket_mb, init_sync=False,
                                 gradient_as_bucket_view=True)
                self.plain.register_forward_hook(self._forward_returned)
                self._plain_micro = MicroStep(self.plain)        # the C++ path scales by 1/N itself
                self._forward_mark = None
                self._layout: list[tuple[list[int], int]] | None = None   # (param indices, bytes) per bucket
                self._plain_steps = 0
        elif mode == "allreduce":
            self.model = model
            self._micro = MicroStep(model)
            self.setup_wire_bytes = 0           # same seed, same replica: nothing to broadcast
        else:
            raise ValueError(f"unknown sync mode {mode!r}")

    def select(self, step: int) -> None:
        """Pick the wrapper for optimizer step ``step`` (1-based): the observing one on
        steps 1, 1 + K, 1 + 2K, ..., DDP's C++ path on the others."""
        if self.plain is None:
            return
        self.detailed = (step - 1) % self.detail_every == 0
        self._micro = self._observed_micro if self.detailed else self._plain_micro
        self.model, self.loss_scale = self._micro.model, self._micro.loss_scale

    def _forward_returned(self, module, args, output) -> None:
        # DDP's forward ends with Reducer.prepare_for_backward, the zero of its ready
        # times; this hook runs right after (microseconds).
        self._forward_mark = self.observer.clock.mark()

    setup_wire_bytes: int
    """What this rank sent to set the replicas up (module_state_broadcast_bytes)."""

    def wire_bytes(self, payload_bytes: float) -> float:
        """Bytes this rank sends to all-reduce ``payload_bytes`` of gradients: a ring's
        2(N-1)/N x S, or the hierarchical phases' sum (wire.hierarchical_wire_bytes)."""
        if self.hierarchy is not None:
            return hierarchical_wire_bytes(payload_bytes, self.hierarchy.local_size, self.hierarchy.nodes)
        return ring_wire_bytes(payload_bytes, self.world_size)

    @contextlib.contextmanager
    def micro_step(self, step: int, last: bool):
        """One micro-step of optimizer step ``step`` (1-based); ``last``: its gradients
        sync (the step's last micro-step). Yields the ``MicroStep`` to call."""
        self.select(step)
        micro = self._micro
        if last or self.mode != "ddp":
            yield micro
        else:
            # Only the wrapper whose forward runs expects gradients, so it is that one's
            # no_sync that holds its buckets back.
            with micro.model.no_sync():
                yield micro

    def finish(self) -> None:
        """After the step's last backward: the flat all-reduce (``allreduce``), or the C++
        path's hand-over times (``ddp`` without bucket detail this step)."""
        if self.mode == "ddp":
            if not self.detailed:
                self._hand_over_times()
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


    def _hand_over_times(self) -> None:
        """A step on the C++ path: each bucket's hand-over, from the Reducer's ready time
        of every gradient. DDP launches bucket b once all of its gradients are ready and
        every bucket before it launched (in order), so its launch is the latest ready time
        of buckets 0..b."""
        if self._layout is None or self._plain_steps < 2:
            # The Reducer's first backward uses one bucket in parameter order, and the
            # next forward rebuilds them (in ready order); read the layout until settled.
            self._layout = _bucket_layout(self.plain, self.module)
        self._plain_steps += 1
        ready_ns = self.plain.reducer.get_backward_stats()
        launches, latest = [], 0
        for b, (indices, nbytes) in enumerate(self._layout):
            latest = max(latest, max(ready_ns[i] for i in indices))
            launches.append((b, nbytes, latest * 1e-9))
        self.observer.handed_over(self._forward_mark, launches)

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

    def settle_buckets(self, device: torch.device, fresh: bool = False) -> None:
        """Collective. DDP reduces its first iteration in one bucket holding every gradient
        in parameter order, then rebuilds its buckets in the order the gradients became
        ready. The uninterrupted run computed step s with the rebuilt layout, so a resumed
        run must too: PowerSGD's memories are flat per-bucket buffers, and with 3+ ranks a
        gradient's position in a bucket decides the order in which the ring all-reduce
        adds it up. One throw-away forward and backward (all-reduced plainly, gradients
        discarded, no RNG drawn) makes DDP rebuild before the first real step; one for each
        wrapper with --bucket-detail-every. ``fresh``: a run from step 0, where the observing
        wrapper's first step is the uninterrupted run's own (one bucket, as DDP has it) and
        only the C++ path's wrapper, whose first step is step 2, needs settling. Its bytes
        count as set-up bytes (ring all-reduces of the gradients)."""
        if self.mode != "ddp":
            return
        wrappers = [w for w in ((None if fresh else self.observed), self.plain) if w is not None]
        if not wrappers:
            return
        hs = self.hook_state
        compression, hs.compression = hs.compression, "none"
        try:
            x = torch.zeros(1, self.module.widths[0], device=device)
            for wrapper in wrappers:
                wrapper(x).sum().backward()
                self.setup_wire_bytes += 2 * (self.world_size - 1) * gradient_bytes(self.module) // self.world_size
        finally:
            hs.compression = compression
        self.module.zero_grad(set_to_none=True)
        self.observer.discard_stray()


class MicroStep:
    """What one micro-step calls: the replica as wrapped for this step (``model``) and the
    backward that multiplies the loss by the scale that wrapper's sync expects."""
    __slots__ = ("model", "loss_scale")

    def __init__(self, model, loss_scale: float = 1.0):
        self.model, self.loss_scale = model, loss_scale

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, times ``loss_scale`` when that is not 1: a product of its
        own after the loss, so that every value in backward is exactly scaled."""
        (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()


def _default_group():
    return dist.distributed_c10d._get_default_group()


def _bucket_layout(ddp: DDP, module: nn.Module) -> list[tuple[list[int], int]]:
    """The Reducer's current buckets: each one's parameter indices (in
    ``module.parameters()`` order, the Reducer's own) and its bytes."""
    index = {id(p): i for i, p in enumerate(module.parameters())}
    buckets = sorted(ddp.reducer._get_zeros_like_grad_buckets(), key=lambda b: b.index())
    return [([index[id(p)] for p in b.parameters()], b.buffer().numel() * b.buffer().element_size())
            for b in buckets]


def _cpu_dict(d: dict) -> dict:
    return {int(k): v.detach().cpu().clone() for k, v in d.items()}


def gradient_bytes(model: nn.Module) -> int:
    """Uncompressed gradient size of one step: what a flat fp32 all-reduce would carry."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def module_state_broadcast_bytes(model: nn.Module, world_size: int, rank: int) -> int:
    """Bytes this rank sends when DDP wraps the model: DDP broadcasts rank 0's parameters
    and buffers to every rank (``_sync_module_states``), along Gloo's binomial tree
    (``wire.broadcast_wire_bytes``: at 4 ranks rank 0 sends 2 copies, rank 1 one).
    (NCCL pipelines a broadcast along a ring, where every rank but the last forwards it
    once; not measured here.) Checked against the namespace nodes' kernel TX counters in
    tests/test_launch_netns.py."""
    state = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return int(broadcast_wire_bytes(state, world_size, rank))
