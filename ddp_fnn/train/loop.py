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

Nothing between two log steps waits for the device: step records and the --on-nan stop
check are read at log steps (and checkpoint steps, and the end), so on CUDA the host runs
ahead of its GPU as it does under plain DDP.

job.py plans (setup.plan: checks, data, resume point), joins the group, builds the run
(setup.build) and calls ``train``: ``run_step`` (the micro-steps and the NaN policy),
``after_step`` (records, the loss, logging, evaluation, checkpoints) and ``finish``.
The collectives outside the gradient sync, in the order every rank makes them, are
listed in collectives.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ddp_fnn.data.datasets import Dataset, eval_shard
from ddp_fnn.observe import Stopwatch, peers
from ddp_fnn.train import checkpoint as ckpt
from ddp_fnn.train.collectives import global_mean, ranks_with, sum_over_ranks
from ddp_fnn.train.health import StepCheck, nonfinite_gradients
from ddp_fnn.train.outputs import result_dict
from ddp_fnn.train.setup import Run, note


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, diverged replicas): exit status 1."""


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the micro-batch: MSE (regression) or cross-entropy (classification)."""
    return F.cross_entropy(out, y) if task == "classification" else F.mse_loss(out, y)


@dataclass
class LoopState:
    """What the loop carries from step to step."""
    step: int                            # optimizer steps done (the next one is step + 1)
    stop_reason: str
    train_loss: float = float("nan")     # the global mean at the last reduction
    loss_sum: float = 0.0                # local, since the last global reduction
    loss_count: int = 0
    skipped_steps: int = 0               # --on-nan skip
    pending: list[StepCheck] = field(default_factory=list)   # --on-nan stop: queued, not yet read


def train(run: Run) -> tuple[dict, torch.nn.Module]:
    """Run the loop from ``run.start_step``; returns the summary (rank 0 writes it) and
    the unwrapped model."""
    stop = run.cfg.stop
    ends_by_steps = stop.max_steps is not None and run.total_steps == stop.max_steps
    state = LoopState(step=run.start_step, stop_reason="max-steps" if ends_by_steps else "epochs")
    wall = Stopwatch()
    while state.step < run.total_steps:
        if run.profiler is not None:
            run.profiler.before_step(state.step + 1)
        run_step(run, state)
        state.step += 1
        if after_step(run, state):
            break
    return finish(run, state, wall.seconds())


def run_step(run: Run, state: LoopState) -> None:
    """One optimizer step: K micro-steps, gradients synced on the last, one non-finite
    check of the synced gradients (health.py), and the optimizer step unless --on-nan
    skip skips it on every rank."""
    cfg, obs, sync = run.cfg, run.obs, run.syncer
    step, accum = state.step + 1, cfg.optim.grad_accum
    epoch, pos = divmod(state.step, run.batches.steps_per_epoch)
    obs.begin_step(step)
    step_loss, step_rows = 0.0, 0
    for k, rows in enumerate(run.batches.rank_micro_batches(epoch, pos)):
        with obs.phase("data"):
            x, y = run.ds.fetch(rows, run.ctx.device)
        # The sync's micro-step: this step's DDP wrapper (--bucket-detail-every), its
        # buckets held back (no_sync) on all but the last micro-step, and the loss scale
        # its hook expects applied in backward.
        with sync.micro_step(step, last=k == accum - 1) as micro:
            with obs.phase("forward"):
                with run.autocast:
                    loss = loss_fn(cfg.model.task, micro.model(x), y)
            with obs.phase("backward"):
                # Each micro-batch's mean loss, weighted by its share of the global batch
                # (1/K when the shards are equal): the ranks' gradients averaged are then
                # the gradient of the mean over all B rows (data.GlobalBatches.weighted).
                micro.backward(run.batches.weighted(loss, len(rows)))
        step_loss = step_loss + loss.detach().double() * len(rows)   # a tensor: no sync here
        step_rows += len(rows)
    with obs.phase("sync"):
        sync.finish()                          # allreduce mode: the flat all-reduce
    with obs.phase("optimizer"):
        check = StepCheck.queue(step, nonfinite_gradients(sync.module), step_loss / step_rows, obs.clock)
        skip = cfg.faults.on_nan == "skip" and check.bad()     # skip: one host read a step
        if not skip:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    if skip:
        skip_step(run, state, check)
    else:
        state.loss_sum = state.loss_sum + step_loss
        state.loss_count += step_rows
        if cfg.faults.on_nan == "stop":
            state.pending.append(check)
            if not obs.clock.deferred:
                settle(run, state)             # CPU: nothing to wait for; CUDA: at log steps
    obs.end_step(step_rows, step_loss / step_rows)


def skip_step(run: Run, state: LoopState, check: StepCheck) -> None:
    """--on-nan skip: every rank found the same non-finite gradients and took no optimizer
    step; PowerSGD's error feedback and warm-start memories hold the bad values too and
    start afresh. The ranks' own losses say whose it was (a collective on bad steps only)."""
    run.syncer.forget_hook_memory()
    state.skipped_steps += 1
    local_bad = not math.isfinite(check.local_loss())
    bad_ranks = ranks_with(local_bad, run.ctx.rank, run.ctx.world_size, run.ctx.device)
    if run.ctx.is_master:
        whose = (f"non-finite loss on rank {','.join(map(str, bad_ranks))}" if bad_ranks
                 else "non-finite gradients with every rank's loss finite (an overflow)")
        note(f"step {check.step}: {whose}; skipped on every rank (--on-nan skip)")


def settle(run: Run, state: LoopState) -> None:
    """--on-nan stop: read the queued checks, oldest first (on CUDA: waits for their flags
    to land); a bad step stops the job. Every rank reads them at the same steps and
    finds the same flags, so every rank stops alike."""
    pending, state.pending = state.pending, []
    check = next((c for c in pending if c.bad()), None)
    if check is None:
        return
    rank, loss = run.ctx.rank, check.local_loss()
    if not math.isfinite(loss):
        raise TrainingError(f"rank {rank}: loss is {loss} at step {check.step} on this rank; stopping "
                            f"(--on-nan stop)")
    raise TrainingError(f"rank {rank}: gradients are non-finite at step {check.step} (a peer's loss is "
                        f"non-finite, or a gradient overflowed); stopping (--on-nan stop)")


def after_step(run: Run, state: LoopState) -> bool:
    """Records, the global loss, logging, evaluation, replica checks and checkpoints after
    step ``state.step``. Returns True when --target-loss is met (every rank alike)."""
    cfg, out, step, device = run.cfg, run.cfg.output, state.step, run.ctx.device
    run.acct.witness_step(step)                    # --ddp-logger: DDP's own view of the previous step
    if run.profiler is not None:
        run.profiler.after_step(step)
    log_now = step % out.log_every == 0 or step == run.total_steps
    if log_now or (run.saver is not None and run.saver.due(step)):
        settle(run, state)                         # no step's non-finite values get logged or saved
    # At log steps the host may wait for the device: the interval's step records are read
    # (on CUDA their events: the records lag by up to --log-every steps), and the global
    # loss (one all-reduce and one host read), on which --target-loss is decided: the
    # mean over the steps since the last log step.
    if log_now:
        run.acct.add(run.obs.finished())
        state.train_loss = global_mean(float(state.loss_sum), state.loss_count, device)
        state.loss_sum, state.loss_count = 0.0, 0
        if not math.isfinite(state.train_loss):
            raise TrainingError(f"rank {run.ctx.rank}: training loss is {state.train_loss} at step {step}")
        run.metrics.set_loss("train", state.train_loss)
        run.progress.update(step, state.train_loss, run.acct.summary)
        target = cfg.stop.target_loss
        if target is not None and state.train_loss <= target:
            state.stop_reason = "target-loss"
            return True
        run.acct.flush()                           # collective: ready times exchanged; records out
        run.obs.reanchor()                         # CUDA: the host clock's anchor, once an interval
    if out.eval_every and step % out.eval_every == 0 and step < run.total_steps:
        run.metrics.set_loss("eval", evaluate(run)[0])
    every = cfg.faults.check_replicas_every
    if every and step % every == 0:
        ckpt.check_replicas(run.syncer.module, run.ctx.rank, run.ctx.world_size, step, device)
    if run.saver is not None and run.saver.due(step):
        run.saver.save(step, run.syncer.module, run.optimizer, run.syncer)
    return False


def finish(run: Run, state: LoopState, elapsed: float) -> tuple[dict, torch.nn.Module]:
    """The end: last checkpoint, last records, the clock's drift, the held-out
    evaluation, the timeline, and the result."""
    ctx, step = run.ctx, state.step
    settle(run, state)
    if run.saver is not None and run.saver.last_saved != step and step > run.start_step:
        stop = ({"reason": state.stop_reason, "train_loss": state.train_loss}
                if state.stop_reason == "target-loss" else None)
        run.saver.save(step, run.syncer.module, run.optimizer, run.syncer, stop=stop)
    if run.profiler is not None:
        run.profiler.close()                       # a run that ended inside the window
    run.acct.add(run.obs.finished())
    run.acct.flush()
    clock_end = peers.estimate_offset(ctx.rank, ctx.world_size, ctx.control)   # again: the drift over the run
    eval_loss, eval_acc = evaluate(run)
    if math.isfinite(eval_loss):
        run.metrics.set_loss("eval", eval_loss)
    if run.acct.timeline is not None:
        run.acct.timeline.gather(run.cfg.output.output / "timeline.json" if ctx.is_master else None,
                                 ctx.world_size)
    result = result_dict(run, step, state.stop_reason, state.train_loss, eval_loss, eval_acc, elapsed,
                         state.skipped_steps, peers.offsets_json(run.clock, clock_end))
    run.progress.finish(result)
    return result, run.syncer.module


@torch.no_grad()
def evaluate(run: Run) -> tuple[float, float | None]:
    """Global mean loss (and accuracy for classification) on the held-out split, each rank
    taking a disjoint part of it."""
    return evaluate_split(run.cfg.model.task, run.syncer.module, run.ds, run.ctx.rank, run.ctx.world_size,
                          run.ctx.device)


@torch.no_grad()
def evaluate_split(task: str, model: torch.nn.Module, ds: Dataset, rank: int, world_size: int,
                   device: torch.device) -> tuple[float, float | None]:
    rows = eval_shard(ds.eval_idx, rank, world_size)
    loss_sum, correct, count = 0.0, 0.0, 0.0
    model.eval()
    for start in range(0, len(rows), 4096):
        x, y = ds.fetch(rows[start:start + 4096], device)
        out = model(x)
        loss_sum += loss_fn(task, out, y).item() * len(x)
        if task == "classification":
            correct += (out.argmax(1) == y).sum().item()
        count += len(x)
    model.train()
    loss_sum, correct, count = sum_over_ranks([loss_sum, correct, count], device)
    if count == 0:
        return float("nan"), None
    return loss_sum / count, (correct / count if task == "classification" else None)
