"""The training loop: every worker runs this, top to bottom.

Launch:

    one process      ddp-fnn train --max-steps 200
    N processes      torchrun --standalone --nproc-per-node N -m ddp_fnn train --max-steps 200
    two nodes        on each node (node0 hosts the rendezvous):
                     torchrun --nnodes 2 --nproc-per-node N --rdzv-backend c10d \\
                              --rdzv-endpoint node0:29400 --rdzv-id job1 -m ddp_fnn train ...
                     (launch/node.sh does this from environment variables)

Every rank holds the same FNN (same seed), takes its shard of each global batch
(data.GlobalBatches), computes gradients, and the Synchroniser averages them across
ranks (sync.py) before every rank takes the same optimizer step. Rank 0 alone logs
and writes; every rank serves its own /metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ddp_fnn.train import checkpoint as ckpt
from ddp_fnn.train import dist as ddist
from ddp_fnn.observe import mfu
from ddp_fnn.observe import peers
from ddp_fnn.perfmodel import predict
from ddp_fnn import fileio
from ddp_fnn.observe import tcpstats
from ddp_fnn.config import ConfigError, TrainConfig
from ddp_fnn.data.datasets import Dataset, GlobalBatches, epochs_to_steps, eval_shard, load_dataset
from ddp_fnn.observe.prometheus import Metrics, NullMetrics, Summary
from ddp_fnn.train.model import build_fnn
from ddp_fnn.observe import Clock, DdpLoggerWitness, Observer, Stopwatch
from ddp_fnn.observe.progress import make_progress, print_table
from ddp_fnn.observe.accounting import Accounting, gather_ranks, peak_flops
from ddp_fnn.observe.stepfile import JsonLines, StepFile
from ddp_fnn.train.sync import Synchroniser, gradient_bytes
from ddp_fnn.observe.timeline import Timeline


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the micro-batch: MSE (regression) or cross-entropy (classification)."""
    return F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out, y)


def check_data_fits(cfg: TrainConfig, ds: Dataset) -> None:
    if cfg.layers[0] != ds.n_features:
        raise ConfigError(f"--layers {','.join(map(str, cfg.layers))}: input width {cfg.layers[0]} does not match "
                          f"the data's {ds.n_features} features")
    if cfg.task == "regression" and cfg.layers[-1] != ds.n_outputs:
        raise ConfigError(f"--layers {','.join(map(str, cfg.layers))}: output width {cfg.layers[-1]} does not match "
                          f"the data's {ds.n_outputs} target columns")
    if cfg.task == "classification" and cfg.layers[-1] < ds.n_outputs:
        raise ConfigError(f"--layers {','.join(map(str, cfg.layers))}: output width {cfg.layers[-1]} is less than "
                          f"the data's {ds.n_outputs} classes")


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def global_mean(value_sum: float, count: float, device: torch.device) -> float:
    """Sum a (value, count) pair over ranks; returns the global mean. Same on every rank."""
    t = torch.tensor([value_sum, count], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t[0] / t[1]).item() if t[1] > 0 else float("nan")


@torch.no_grad()
def evaluate(cfg: TrainConfig, model: torch.nn.Module, ds: Dataset, rank: int, world_size: int,
             device: torch.device) -> tuple[float, float | None]:
    """Global mean loss (and accuracy for classification) on the held-out split, each rank
    taking a disjoint part of it."""
    rows = eval_shard(ds.eval_idx, rank, world_size)
    loss_sum, correct, count = 0.0, 0.0, 0.0
    model.eval()
    for start in range(0, len(rows), 4096):
        x, y = ds.fetch(rows[start:start + 4096], device)
        out = model(x)
        loss_sum += loss_fn(cfg.task, out, y).item() * len(x)
        if cfg.task == "classification":
            correct += (out.argmax(1) == y).sum().item()
        count += len(x)
    model.train()
    t = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    if t[2] == 0:
        return float("nan"), None
    return (t[0] / t[2]).item(), ((t[1] / t[2]).item() if cfg.task == "classification" else None)


@dataclass
class Run:
    """What the loop works with, built by ``setup``."""
    cfg: TrainConfig
    ctx: ddist.DistContext
    ds: Dataset
    batches: GlobalBatches
    total_steps: int
    start_step: int                     # the next step to run (0-based)
    syncer: Synchroniser                # .model: what the loop calls; .module: the plain FNN
    optimizer: torch.optim.Optimizer
    obs: Observer
    acct: Accounting
    progress: object
    saver: ckpt.Checkpointer | None
    autocast: object
    resumed: bool
    clock: peers.ClockOffset            # this rank's clock - rank 0's, at the start
    slow_s: float                       # --slow-rank: this rank idles so long in each forward


def setup(cfg: TrainConfig, ctx: ddist.DistContext, ds: Dataset, metrics: Metrics | NullMetrics,
          resume: ckpt.Resume | None) -> Run:
    """Model, sync, optimizer, checkpoints and accounting, restored from ``resume`` if given."""
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    batches = GlobalBatches(ds.train_idx, cfg.global_batch_size, cfg.seed, rank, world, cfg.grad_accum)
    total_steps = epochs_to_steps(batches.steps_per_epoch, cfg.epochs, cfg.max_steps)
    model = build_fnn(cfg.layers, seed=cfg.seed).to(device)   # same seed: the same replica on every rank
    if resume is not None:
        # Before DDP wraps the model: DDP broadcasts rank 0's parameters when it wraps, and
        # every rank loaded the same file, so the replicas start equal either way.
        ckpt.restore(resume, model, device, rank, world)
    obs = Observer(Clock(device))
    syncer = Synchroniser(model, cfg.sync, world, obs, bucket_mb=cfg.bucket_mb,
                          compression=cfg.compression, powersgd_rank=cfg.powersgd_rank, device=device)
    optimizer = make_optimizer(cfg, model.parameters())
    start_step = 0
    if resume is not None:
        # Optimizer state, DDP's bucket layout (one throw-away backward), the hook's state.
        hook_exact = ckpt.restore_after_wrap(resume, optimizer, syncer, device, rank, world, cfg.bucket_mb)
        start_step = resume.step
        if ctx.is_master:
            _note(f"resuming from {resume.path} (step {start_step} of {total_steps})")
            if resume.state["world_size"] != world:
                _note(f"elastic resume: the checkpoint was written at world size {resume.state['world_size']}, "
                      f"this run has {world}; the global batch ({cfg.global_batch_size}) and its order are the same")
            if not hook_exact:
                _note("PowerSGD restarts its error feedback and P/Q memories (another world size or "
                      "--bucket-mb than the checkpoint's): not bitwise the uninterrupted run")
    saver = (ckpt.Checkpointer(cfg.checkpoint_dir, cfg.checkpoint_every, cfg.keep, rank, world, device,
                               ckpt.fingerprint(cfg, ds.identity), cfg.bucket_mb,
                               discard=[p for p, _ in resume.skipped] if resume is not None else None)
             if cfg.checkpoint_dir is not None else None)
    metrics.set_gradient_bytes(gradient_bytes(model))
    metrics.count_setup(syncer.setup_wire_bytes)
    steps_path = cfg.steps_file_path(rank)
    steps_file = StepFile(steps_path, start_step) if steps_path is not None else None
    clock = peers.estimate_offset(rank, world, device)       # collective: ping-pongs with rank 0
    timeline = Timeline(*cfg.timeline_steps, rank, clock) if cfg.timeline_steps else None
    witness = ((DdpLoggerWitness(syncer.model), JsonLines(cfg.output / f"ddp-logger-rank{rank}.jsonl", start_step))
               if cfg.ddp_logger else None)
    acct = Accounting(metrics, Summary(world), steps_file, timeline,
                      mfu.train_flops_per_sample(cfg.layers), peak_flops(device, cfg.precision), witness,
                      peers.PeerExchange(rank, world, device, clock), tcpstats.TcpCounters())
    acct.summary.rank = rank
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else torch.autocast(device.type, enabled=False))
    progress = make_progress(cfg.progress if ctx.is_master else "none", total_steps)
    slow_s = cfg.slow_ms / 1000 if cfg.slow_rank == rank else 0.0
    return Run(cfg, ctx, ds, batches, total_steps, start_step, syncer, optimizer, obs, acct, progress, saver,
               autocast, resume is not None, clock, slow_s)


def train(cfg: TrainConfig, ctx: ddist.DistContext, ds: Dataset, metrics: Metrics | NullMetrics,
          resume: ckpt.Resume | None = None) -> tuple[dict, torch.nn.Module]:
    """Run the loop (from ``resume``'s step, if given); returns the summary (rank 0 writes
    it) and the unwrapped model."""
    run = setup(cfg, ctx, ds, metrics, resume)
    device, rank, world = ctx.device, ctx.rank, ctx.world_size
    syncer, optimizer, obs, acct = run.syncer, run.optimizer, run.obs, run.acct
    stop_reason = "max-steps" if cfg.max_steps is not None and run.total_steps == cfg.max_steps else "epochs"
    train_loss = float("nan")
    loss_sum, loss_count = 0.0, 0        # local, since the last global reduction
    skipped_steps = 0                    # --on-nan skip
    wall = Stopwatch()
    step = run.start_step                # the next step to run (0-based)
    while step < run.total_steps:
        epoch, pos = divmod(step, run.batches.steps_per_epoch)
        # ---- one optimizer step: K micro-steps, gradients synced on the last -----------
        obs.begin_step(step + 1)
        step_loss, step_rows = 0.0, 0
        bad, skip = False, False               # a non-finite loss here / on any rank
        for k, rows in enumerate(run.batches.rank_micro_batches(epoch, pos)):
            sync_now = k == cfg.grad_accum - 1
            with obs.phase("data"):
                x, y = ds.fetch(rows, device)
            with syncer.no_sync() if not sync_now else contextlib.nullcontext():
                with obs.phase("forward"):
                    with run.autocast:
                        loss = loss_fn(cfg.task, syncer.model(x), y)
                    if run.slow_s:
                        time.sleep(run.slow_s)         # --slow-rank: a straggler, injected
                    # NaN/Inf is checked before backward because in ddp mode backward *is* the
                    # gradient sync: one rank's non-finite gradient would reach every replica (and
                    # PowerSGD's error-feedback memory). bool() waits for the device: one host
                    # sync per micro-step on CUDA, the price of that guarantee.
                    if not bool(torch.isfinite(loss.detach())):
                        if cfg.on_nan == "stop":
                            raise TrainingError(f"rank {rank}: loss is {loss.item()} at step {step + 1} "
                                                f"(micro-step {k + 1} of {cfg.grad_accum}); stopping (--on-nan stop)")
                        bad = True
                    if sync_now and cfg.on_nan == "skip":
                        bad_ranks = _ranks_with(bad, rank, world, device)   # the same answer on every rank
                        skip = bool(bad_ranks)
                with obs.phase("backward"):
                    # Each micro-batch's mean loss, weighted by its share of the global batch
                    # (1/K when the shards are equal): the ranks' gradients averaged are then
                    # the gradient of the mean over all B rows (data.GlobalBatches.weighted).
                    # x grad_scale: 1/N where the sync sums instead of averaging (sync.py).
                    if not (bad or skip):          # DDP allows a forward with no backward
                        (run.batches.weighted(loss, len(rows)) * syncer.grad_scale).backward()
            step_loss = step_loss + loss.detach().double() * len(rows)   # a tensor: no sync here
            step_rows += len(rows)
        if skip:
            # Every rank skips this step: no sync, no optimizer step, no gradients kept.
            optimizer.zero_grad(set_to_none=True)
            skipped_steps += 1
            if ctx.is_master:
                _note(f"step {step + 1}: non-finite loss on rank {','.join(map(str, bad_ranks))}; "
                      f"skipped on every rank (--on-nan skip)")
        else:
            with obs.phase("sync"):
                syncer.after_backward()        # allreduce mode: the flat all-reduce
            with obs.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum = loss_sum + step_loss
            loss_count += step_rows
        obs.end_step(step_rows, step_loss / step_rows)
        step += 1
        acct.add(obs.finished())               # CPU: this step; CUDA: the previous one
        acct.witness_step(step)                # --ddp-logger: DDP's own view of the previous step

        # ---- the global loss: every step when --target-loss decides, else when logging
        log_now = step % cfg.log_every == 0 or step == run.total_steps
        if cfg.target_loss is not None or log_now:
            train_loss = global_mean(float(loss_sum), loss_count, device)
            loss_sum, loss_count = 0.0, 0
            if not math.isfinite(train_loss):
                raise TrainingError(f"rank {rank}: training loss is {train_loss} at step {step}")
            metrics.set_loss("train", train_loss)
            run.progress.update(step, train_loss, acct.summary)
            if cfg.target_loss is not None and train_loss <= cfg.target_loss:
                stop_reason = "target-loss"
                break
        if log_now:
            acct.flush()                       # collective: ready times exchanged; records out
        if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total_steps:
            metrics.set_loss("eval", evaluate(cfg, syncer.module, ds, rank, world, device)[0])

        # ---- replicas still equal? checkpoint? ---------------------------------------
        if cfg.check_replicas_every and step % cfg.check_replicas_every == 0:
            ckpt.check_replicas(syncer.module, rank, world, step, device)
        if run.saver is not None and run.saver.due(step):
            run.saver.save(step, syncer.module, optimizer, syncer)

    # ---- the end: last checkpoint, last records, held-out evaluation, the result -------
    if run.saver is not None and run.saver.last_saved != step and step > run.start_step:
        stop = {"reason": stop_reason, "train_loss": train_loss} if stop_reason == "target-loss" else None
        run.saver.save(step, syncer.module, optimizer, syncer, stop=stop)   # the end of the run (or an early stop)
    acct.add(obs.flush())
    acct.flush()
    elapsed = wall.seconds()
    clock_end = peers.estimate_offset(rank, world, device)   # again: the drift over the run
    eval_loss, eval_acc = evaluate(cfg, syncer.module, ds, rank, world, device)
    if math.isfinite(eval_loss):
        metrics.set_loss("eval", eval_loss)
    if acct.timeline is not None:
        acct.timeline.gather(cfg.output / "timeline.json" if ctx.is_master else None, world)
    result = result_dict(run, step, stop_reason, train_loss, eval_loss, eval_acc, elapsed, skipped_steps,
                         peers.offsets_json(run.clock, clock_end))
    run.progress.finish(result)
    return result, syncer.module


def result_dict(run: Run, step: int, stop_reason: str, train_loss: float, eval_loss: float,
                eval_acc: float | None, elapsed: float, skipped_steps: int, clock: dict) -> dict:
    """summary.json's keys (rank 0 writes them). Collective: every rank's own figures are
    gathered (``ranks``)."""
    cfg, ctx, summary = run.cfg, run.ctx, run.acct.summary
    figures = summary.figures()
    mine = {"rank": ctx.rank, "steps": step, "samples": summary.samples, "stop_reason": stop_reason, **figures,
            "setup_wire_bytes": run.syncer.setup_wire_bytes,
            "clock": clock, "tcp": tcpstats.summary_figures(run.acct.tcp.read() if run.acct.tcp else None)}
    ranks = gather_ranks(mine, ctx.world_size)
    module = run.syncer.module
    return {
        "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device), "sync": cfg.sync,
        "compression": cfg.compression, "bucket_mb": run.syncer.bucket_mb, "layers": list(cfg.layers),
        "parameters": module.num_parameters(), "gradient_bytes": gradient_bytes(module),
        "global_batch_size": cfg.global_batch_size, "grad_accum": cfg.grad_accum, "steps": step,
        "stop_reason": stop_reason, "samples": step * cfg.global_batch_size,
        "epochs_completed": step / run.batches.steps_per_epoch,
        "final_train_loss": train_loss, "eval_loss": eval_loss, "eval_accuracy": eval_acc,
        # Every rank's own samples (uneven shards differ by a row) over rank 0's step time.
        "samples_per_second": (sum(r["samples"] for r in ranks) / sum(summary.step_s)) if summary.step_s else 0.0,
        "wall_time_s": elapsed, "data": run.ds.identity, **figures,
        "setup_wire_bytes": run.syncer.setup_wire_bytes,
        "ranks": ranks,
        "clock_offsets": [r["clock"] for r in ranks],
        "mfu": run.acct.mfu(),
        "resumed_from_step": run.start_step if run.resumed else None, "skipped_steps": skipped_steps,
        "checkpoint": (str(run.saver.last_path) if run.saver is not None and run.saver.last_path is not None
                       else None),
        "steps_file": str(cfg.steps_file_path(ctx.rank)) if cfg.steps_file_path(ctx.rank) else None,
        "timeline": str(cfg.output / "timeline.json") if cfg.timeline_steps else None,
    }


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, diverged replicas): exit status 1."""


def write_outputs(cfg: TrainConfig, result: dict, model: torch.nn.Module) -> None:
    """model.pt (the unwrapped FNN's state_dict) and summary.json, each written atomically.
    A model with NaN/Inf parameters is never exported."""
    if not ckpt.all_finite(model):
        raise ckpt.NonFiniteError("rank 0: parameters are not finite at the end of the run; not writing model.pt")
    out = cfg.output
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out / "model.pt")
    tmp = out / ".summary.json.tmp"
    tmp.write_text(fileio.dumps({**result, "config": cfg.to_dict()}, indent=2, default=str) + "\n")
    os.replace(tmp, out / "summary.json")


def main(cfg: TrainConfig, dry_run: bool = False) -> int:
    """Validate, join the group, train, write, leave. Returns the exit status."""
    rank, _, world = ddist.worker_identity()
    cfg.check_world(world)
    ds = load_dataset(cfg)
    check_data_fits(cfg, ds)
    batches = GlobalBatches(ds.train_idx, cfg.global_batch_size, cfg.seed, rank, world, cfg.grad_accum)
    if cfg.output is not None:
        _check_writable(cfg.output)
    if cfg.checkpoint_dir is not None:
        ckpt.check_writable_dir(cfg.checkpoint_dir)
    bench_data = predict.read_bench_json(cfg.bench_json) if cfg.bench_json is not None else None
    # Every rank reads the checkpoint itself (weights-only), before it joins the group.
    resume = ckpt.find_resume(cfg, ckpt.fingerprint(cfg, ds.identity))
    if resume is not None and rank == 0:
        for path, why in resume.skipped:
            _note(f"checkpoint {path} is unreadable ({why}); using {resume.path.name} instead", "warning")
    if dry_run:
        if rank == 0:
            print(fileio.dumps({"ok": True, "world_size": world, "data": ds.identity,
                              "train_rows": len(ds.train_idx), "eval_rows": len(ds.eval_idx),
                              "micro_batch_per_rank": cfg.check_world(world)}))
        return 0
    # A finished run's command run again: nothing to train, every output left as it is.
    total_steps = epochs_to_steps(batches.steps_per_epoch, cfg.epochs, cfg.max_steps)
    done = ckpt.finished(resume, total_steps, cfg.target_loss) if resume is not None else None
    if done:
        if rank == 0:
            _note(f"this run already finished ({resume.path} is {done}); nothing to train, outputs left as they "
                  f"are (--resume never trains afresh)")
        return 0
    ctx = ddist.setup(cfg.backend, cfg.device, cfg.timeout_s)
    metrics = NullMetrics()
    try:
        metrics = make_metrics(cfg, ctx)
        net = predict.network(cfg, ctx, bench_data)       # alpha, beta: bench file or a probe
        metrics.count_probe(predict.probe_traffic(net))  # its bytes, apart from the gradients'
        result, model = train(cfg, ctx, ds, metrics, resume)
        result.update(predict.prediction(cfg, ctx.world_size, net, result))
        result["probe"] = predict.probe_traffic(net)
        if ctx.is_master and cfg.progress != "none":
            print_table(result)
        if ctx.is_master and cfg.output is not None:
            write_outputs(cfg, result, model)
        if cfg.pushgateway:
            metrics.push(cfg.pushgateway)
        if cfg.metrics_linger > 0 and metrics.registry is not None:
            time.sleep(cfg.metrics_linger)     # a feature: keeps /metrics up for a last scrape
        return 0
    except (TrainingError, ckpt.NonFiniteError, ckpt.ReplicaMismatchError) as e:
        _say(f"ddp-fnn: error: {e}")
        return 1
    except RuntimeError as e:                  # DistBackendError and Gloo's plain RuntimeErrors
        message = _collective_failure(e, ctx.rank, cfg.timeout_s)
        if message is None:
            raise
        _say(f"ddp-fnn: error: {message}")
        return 1
    finally:
        metrics.close()
        ddist.teardown()


def _note(message: str, kind: str = "note") -> None:
    """One line on stderr (rank 0 calls it): resumes, skipped checkpoints, skipped steps."""
    _say(f"ddp-fnn: {kind}: {message}")


def _say(line: str) -> None:
    """One line to stderr in one write: the ranks share torchrun's stderr, and print()'s
    separate write of the newline lets another rank's line land in between."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _ranks_with(flag: bool, rank: int, world: int, device: torch.device) -> list[int]:
    """The ranks whose ``flag`` is set, the same list on every rank (one all-reduce of
    ``world`` int32s)."""
    t = torch.zeros(world, dtype=torch.int32, device=device)
    t[rank] = int(flag)
    if world > 1:
        dist.all_reduce(t)
    return [r for r, v in enumerate(t.tolist()) if v]


def _collective_failure(e: BaseException, rank: int, timeout_s: float) -> str | None:
    """The one-line message for a collective that failed because a peer died or froze,
    or None for any other error (which then propagates with its traceback)."""
    text = str(e).lower()
    if "timed out" in text or "timeout" in text:
        return (f"rank {rank}: a collective did not complete within --timeout-s {timeout_s:g} "
                f"(a peer died or froze?)")
    lost = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")
    for s in lost:
        if s in text:
            return f"rank {rank}: a peer left the job during a collective ({s})"
    return None


def make_metrics(cfg: TrainConfig, ctx: ddist.DistContext) -> Metrics | NullMetrics:
    """This rank's metrics, serving on BASE + LOCAL_RANK (or off with --metrics-port 0)."""
    if cfg.metrics_port == 0 and cfg.pushgateway is None:
        return NullMetrics()
    run_info = {"backend": ctx.backend, "sync": cfg.sync, "compression": cfg.compression,
                "layers": ",".join(map(str, cfg.layers)), "device": str(ctx.device)}
    metrics = Metrics(ctx.rank, ctx.world_size, run_info)
    if cfg.metrics_port > 0:
        metrics.serve(cfg.metrics_port + ctx.local_rank, cfg.metrics_addr)
    return metrics


def _check_writable(path: Path) -> None:
    """--output must be creatable and writable before any work is done."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ConfigError(f"--output {path}: not a writable directory")
