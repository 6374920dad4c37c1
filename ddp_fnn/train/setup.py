"""Everything a run needs, built once, before its first step.

``plan`` runs before the process group exists (every rank alone): the settings checks
that need the world size, the data, the global batches, the step count, this rank's
resume point. ``agree_resume`` runs once the group is joined: the
ranks settle on one resume step. ``build`` runs after: model, synchroniser, optimizer,
checkpoints, the clock offset and the consumers of step records. The loop (loop.py)
gets both and computes none of it again.

This module, loop.py and job.py are the run's composition root: the only places outside
config.py and cli.py that hold the whole ``TrainConfig``; each part they build gets
only its section.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ddp_fnn.core import fileio
from ddp_fnn.config import ConfigError, ModelConfig, OptimConfig, TrainConfig
from ddp_fnn.data.datasets import Dataset, GlobalBatches, epochs_to_steps, load_dataset
from ddp_fnn.observe import DdpLoggerWitness, Observer, mfu, peers, tcpstats
from ddp_fnn.observe.accounting import Accounting, peak_flops
from ddp_fnn.observe.profile import StepProfiler
from ddp_fnn.observe.progress import make_progress
from ddp_fnn.observe.prometheus import Metrics, NullMetrics, Summary
from ddp_fnn.observe.stepfile import JsonLines, StepFile
from ddp_fnn.observe.timeline import Timeline
from ddp_fnn.train import checkpoint as ckpt
from ddp_fnn import dist as ddist
from ddp_fnn.train.collectives import resume_steps_of_ranks
from ddp_fnn.model import build_fnn
from ddp_fnn.train.faults import Faults
from ddp_fnn.train.sync import Synchroniser, gradient_bytes


@dataclass(frozen=True)
class Plan:
    """What is known before the group exists; the same on every rank once ``agree_resume``
    has settled ``resume`` (before it, each rank's own pick from its own storage)."""
    ds: Dataset
    batches: GlobalBatches               # this rank's shard of every global batch
    total_steps: int
    resume: ckpt.Resume | None
    micro_batch: tuple[int, int]         # the smallest and largest per-rank micro-batch
    # (step, path) this rank can resume from, newest first, for agree_resume; None: nothing
    # to agree on (world size 1, --resume never, or no --checkpoint-dir / --resume PATH)
    resume_steps: tuple[tuple[int, Path], ...] | None = None


def plan(cfg: TrainConfig, rank: int, world: int) -> Plan:
    """The checks, the data and the resume point: ConfigError before any work is done."""
    micro = cfg.check_world(world)
    ds = load_dataset(cfg.data, cfg.model, cfg.seed)
    check_data_fits(cfg.model, ds)
    batches = GlobalBatches(ds.train_idx, cfg.optim.global_batch_size, cfg.seed, rank, world, cfg.optim.grad_accum)
    if cfg.output.output is not None:
        fileio.check_writable_dir(cfg.output.output, "--output")
    if cfg.checkpoint.checkpoint_dir is not None:
        fileio.check_writable_dir(cfg.checkpoint.checkpoint_dir, "--checkpoint-dir")
    # Every rank reads the checkpoint itself (weights-only), before it joins the group; with
    # several ranks, each also lists every step it could resume from, since its storage may
    # not be the others' (node-local, or a shared file system that lags): agree_resume.
    fp = ckpt.fingerprint(cfg.math_settings(), ds.identity)
    resume = ckpt.find_resume(cfg.checkpoint, fp)
    steps = (tuple(ckpt.readable_steps(cfg.checkpoint, fp, resume))
             if world > 1 and ckpt.needs_agreement(cfg.checkpoint) else None)
    total_steps = epochs_to_steps(batches.steps_per_epoch, cfg.stop.epochs, cfg.stop.max_steps)
    return Plan(ds, batches, total_steps, resume, micro, steps)


def agree_resume(plan: Plan, ctx: ddist.DistContext) -> Plan:
    """Collective (when ``plan.resume_steps`` is set; the same on every rank): every rank
    resumes from the newest step that every rank can read, which is this rank's own pick
    unless another rank lacks it. ConfigError, alike on every rank, when some rank has a
    checkpoint but no step is readable on all of them."""
    if plan.resume_steps is None:
        return plan
    steps_of = resume_steps_of_ranks([s for s, _ in plan.resume_steps], ctx.world_size, ctx.control)
    if not any(steps_of):
        return plan                          # nobody has one: every rank starts afresh
    step = ckpt.common_step(steps_of)
    if step is None:
        raise ConfigError(f"no checkpoint step is readable on every rank ({_steps_by_rank(steps_of)}): "
                          f"each rank must see rank 0's checkpoints (shared --checkpoint-dir, or copies), "
                          f"or use --resume never to start afresh")
    newest = max(max(s) for s in steps_of if s)
    if ctx.is_master and step != newest:
        lacking = ",".join(str(r) for r, s in enumerate(steps_of) if newest not in s)
        note(f"checkpoint step {newest} is missing or unreadable on rank {lacking} (storage not shared, "
             f"or lagging?); every rank resumes from step {step}, the newest that every rank can read")
    if plan.resume.step == step:
        return plan
    path = dict(plan.resume_steps)[step]
    try:
        state = ckpt.read(path)              # read whole a moment ago (readable_steps)
    except ckpt.CheckpointError as e:
        raise ConfigError(f"rank {ctx.rank}: checkpoint {path} became unreadable while resuming ({e})") from None
    return replace(plan, resume=ckpt.Resume(path, state, plan.resume.skipped))


def _steps_by_rank(steps_of: list[list[int]]) -> str:
    """'ranks 0,2: steps 3,6; rank 1: none': the ranks with the same steps together."""
    groups: dict[tuple, list[int]] = {}
    for r, steps in enumerate(steps_of):
        groups.setdefault(tuple(sorted(steps)), []).append(r)
    return "; ".join(f"rank{'s' if len(g) > 1 else ''} {','.join(map(str, g))}: "
                     f"{'steps ' + ','.join(map(str, k)) if k else 'none'}" for k, g in groups.items())


def check_data_fits(model: ModelConfig, ds: Dataset) -> None:
    widths = ",".join(map(str, model.layers))
    if model.layers[0] != ds.n_features:
        raise ConfigError(f"--layers {widths}: input width {model.layers[0]} does not match "
                          f"the data's {ds.n_features} features")
    if model.task == "regression" and model.layers[-1] != ds.n_outputs:
        raise ConfigError(f"--layers {widths}: output width {model.layers[-1]} does not match "
                          f"the data's {ds.n_outputs} target columns")
    if model.task == "classification" and model.layers[-1] < ds.n_outputs:
        raise ConfigError(f"--layers {widths}: output width {model.layers[-1]} is less than "
                          f"the data's {ds.n_outputs} classes")


def make_optimizer(optim: OptimConfig, params) -> torch.optim.Optimizer:
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


@dataclass
class Run:
    """What the loop works with, built by ``build``."""
    cfg: TrainConfig
    plan: Plan
    ctx: ddist.DistContext
    metrics: Metrics | NullMetrics
    syncer: Synchroniser                # micro_step() and finish(); .module: the plain FNN
    optimizer: torch.optim.Optimizer
    obs: Observer
    acct: Accounting
    progress: object
    saver: ckpt.Checkpointer | None
    profiler: StepProfiler | None       # --profile A:B
    autocast: object
    start_step: int                     # the next step to run (0-based)
    clock: peers.ClockOffset            # this rank's clock - rank 0's, at the start

    @property
    def ds(self) -> Dataset:
        return self.plan.ds

    @property
    def batches(self) -> GlobalBatches:
        return self.plan.batches

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    @property
    def resumed(self) -> bool:
        return self.plan.resume is not None


def build(cfg: TrainConfig, plan: Plan, ctx: ddist.DistContext, metrics: Metrics | NullMetrics) -> Run:
    """Model, sync, optimizer, checkpoints and accounting, restored from the plan's resume
    point if there is one. Collective (DDP's wrap, the clock ping-pong)."""
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    par, out, resume = cfg.parallel, cfg.output, plan.resume
    model = build_fnn(cfg.model.layers, seed=cfg.seed).to(device)   # same seed: the same replica on every rank
    if resume is not None:
        # Before DDP wraps the model: DDP broadcasts rank 0's parameters when it wraps, and
        # every rank loaded the same file, so the replicas start equal either way.
        ckpt.restore(resume, model, device, rank, world)
    # Injected faults (tests, benchmarks): the clock's shift first, before any time the ranks
    # compare; the rest wrap the observer and the sync object only where asked.
    faults = Faults.read(cfg.faults, rank)
    obs = faults.observer(faults.clock(device))
    # collective: a group per node and per local rank, before DDP's wrap
    hierarchy = ddist.node_groups(ctx, par.timeout_s) if par.all_reduce == "hierarchical" else None
    syncer = Synchroniser(model, par.sync, world, obs, bucket_mb=par.bucket_mb,
                          compression=par.compression, powersgd_rank=par.powersgd_rank, device=device,
                          detail_every=par.bucket_detail_every, hierarchy=hierarchy)
    optimizer = make_optimizer(cfg.optim, model.parameters())
    if resume is not None:
        start_step = _restore_after_wrap(cfg, plan, ctx, optimizer, syncer)
    else:
        start_step = 0
        syncer.settle_buckets(device, fresh=True)   # collective with --bucket-detail-every > 1
    saver = (ckpt.Checkpointer(cfg.checkpoint.checkpoint_dir, cfg.checkpoint.checkpoint_every, cfg.checkpoint.keep,
                               rank, world, device, ckpt.fingerprint(cfg.math_settings(), plan.ds.identity),
                               par.bucket_mb, discard=[p for p, _ in resume.skipped] if resume is not None else None)
             if cfg.checkpoint.checkpoint_dir is not None else None)
    metrics.set_gradient_bytes(gradient_bytes(model))
    metrics.set_wire_bytes(syncer.wire_bytes)
    metrics.count_setup(syncer.setup_wire_bytes)
    steps_path = out.steps_file_path(rank)
    steps_file = StepFile(steps_path, start_step) if steps_path is not None else None
    clock = peers.estimate_offset(rank, world, ctx.control)  # collective: ping-pongs with rank 0
    timeline = Timeline(*out.timeline_steps, rank, clock) if out.timeline_steps else None
    witness = ((DdpLoggerWitness(syncer.model), JsonLines(out.output / f"ddp-logger-rank{rank}.jsonl", start_step))
               if out.ddp_logger else None)
    acct = Accounting(metrics, Summary(world, wire_bytes=syncer.wire_bytes), steps_file, timeline,
                      mfu.train_flops_per_sample(cfg.model.layers), peak_flops(device, cfg.optim.precision), witness,
                      peers.PeerExchange(rank, world, clock, ctx.control), tcpstats.TcpCounters())
    acct.summary.rank = rank
    profiler = (StepProfiler(*out.profile_steps, out.output / f"profile-rank{rank}.json", device, obs)
                if out.profile_steps else None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.optim.precision == "bf16"
                else torch.autocast(device.type, enabled=False))
    progress = make_progress(out.progress if ctx.is_master else "none", plan.total_steps)
    return Run(cfg, plan, ctx, metrics, faults.sync(syncer, obs.clock), optimizer, obs, acct, progress, saver,
               profiler, autocast, start_step, clock)


def _restore_after_wrap(cfg: TrainConfig, plan: Plan, ctx: ddist.DistContext, optimizer, syncer) -> int:
    """Optimizer state, DDP's bucket layout (one throw-away backward), the hook's state;
    returns the step to continue from."""
    resume = plan.resume
    hook_exact = ckpt.restore_after_wrap(resume, optimizer, syncer, ctx.device, ctx.rank, ctx.world_size,
                                         cfg.parallel.bucket_mb)
    if ctx.is_master:
        note(f"resuming from {resume.path} (step {resume.step} of {plan.total_steps})")
        if resume.state["world_size"] != ctx.world_size:
            note(f"elastic resume: the checkpoint was written at world size {resume.state['world_size']}, "
                 f"this run has {ctx.world_size}; the global batch ({cfg.optim.global_batch_size}) and its order "
                 f"are the same")
        if not hook_exact:
            note("PowerSGD restarts its error feedback and P/Q memories (another world size or "
                 "--bucket-mb than the checkpoint's): not bitwise the uninterrupted run")
    return resume.step


def make_metrics(cfg: TrainConfig, ctx: ddist.DistContext) -> Metrics | NullMetrics:
    """This rank's metrics, serving on BASE + LOCAL_RANK (or off with --metrics-port 0)."""
    m = cfg.metrics
    if m.metrics_port == 0 and m.pushgateway is None:
        return NullMetrics()
    run_info = {"backend": ctx.backend, "sync": cfg.parallel.sync, "compression": cfg.parallel.compression,
                "layers": ",".join(map(str, cfg.model.layers)), "device": str(ctx.device)}
    metrics = Metrics(ctx.rank, ctx.world_size, run_info)
    if m.metrics_port > 0:
        metrics.serve(m.metrics_port + ctx.local_rank, m.metrics_addr)
    return metrics


def note(message: str, kind: str = "note") -> None:
    """One line on stderr (rank 0 calls it): resumes, skipped checkpoints, skipped steps."""
    say(f"ddp-fnn: {kind}: {message}")


def say(line: str) -> None:
    """One line to stderr in one write: the ranks share torchrun's stderr, and print()'s
    separate write of the newline lets another rank's line land in between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()

