"""What a run leaves behind: summary.json's keys, and model.pt with summary.json written
by rank 0, each atomically (fileio.atomic_write)."""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ddp_fnn.core import fileio
from ddp_fnn.observe import tcpstats
from ddp_fnn.observe.control import TRAFFIC
from ddp_fnn.train import checkpoint as ckpt
from ddp_fnn.train.collectives import gather_ranks
from ddp_fnn.train.setup import Run
from ddp_fnn.train.sync import gradient_bytes


def result_dict(run: Run, step: int, stop_reason: str, train_loss: float, eval_loss: float,
                eval_acc: float | None, elapsed: float, skipped_steps: int, clock: dict) -> dict:
    """summary.json's keys (rank 0 writes them). Collective: every rank's own figures are
    gathered (``ranks``)."""
    cfg, ctx, summary = run.cfg, run.ctx, run.acct.summary
    figures = summary.figures()
    mine = {"rank": ctx.rank, "steps": step, "samples": summary.samples, "stop_reason": stop_reason, **figures,
            "setup_wire_bytes": run.syncer.setup_wire_bytes,
            # Every control collective up to this gather of figures (its own few hundred
            # bytes come after and are not in it).
            "control_wire_bytes": TRAFFIC.wire_bytes,
            "clock": clock, "tcp": tcpstats.summary_figures(run.acct.tcp.read() if run.acct.tcp else None)}
    ranks = gather_ranks(mine, ctx.world_size)
    module = run.syncer.module
    steps_file = cfg.output.steps_file_path(ctx.rank)
    return {
        "world_size": ctx.world_size, "backend": ctx.backend, "device": str(ctx.device), "sync": cfg.parallel.sync,
        "compression": cfg.parallel.compression, "bucket_mb": run.syncer.bucket_mb,
        "layers": list(cfg.model.layers), "parameters": module.num_parameters(), "gradient_bytes": gradient_bytes(module),
        "global_batch_size": cfg.optim.global_batch_size, "grad_accum": cfg.optim.grad_accum, "steps": step,
        "stop_reason": stop_reason, "samples": step * cfg.optim.global_batch_size,
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
        "steps_file": str(steps_file) if steps_file else None,
        "timeline": str(cfg.output.output / "timeline.json") if cfg.output.timeline_steps else None,
        "profile": str(cfg.output.output / f"profile-rank{ctx.rank}.json") if cfg.output.profile_steps else None,
    }


def write_outputs(out: Path, result: dict, config: dict, model: torch.nn.Module) -> None:
    """model.pt (the unwrapped FNN's state_dict) and summary.json (``config``: the flat
    settings), each written atomically. A model with NaN/Inf parameters is never exported."""
    if not ckpt.all_finite(model):
        raise ckpt.NonFiniteError("rank 0: parameters are not finite at the end of the run; not writing model.pt")
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    fileio.atomic_write(out / "model.pt", buf.getvalue())
    fileio.atomic_write(out / "summary.json",
                        fileio.dumps({**result, "config": config}, indent=2, default=str) + "\n")
