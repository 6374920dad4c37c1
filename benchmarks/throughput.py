"""Training throughput: what observing every step costs, in one run of three comparisons.

Run under torchrun (the figures in README.md came from this command):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/throughput.py --rounds 6

(--train-only: comparison 1 alone, as the A/B runs against an older tree in README were
made; --hook-only: comparisons 2 and 3.)

1. ``train``: ddp-fnn's ``train.loop.train`` on one FNN (--layers, default 256,1024,1024,1),
   four ways:

       files on       metrics served, a step file and a timeline of every step
                      (--output DIR --timeline 1:STEPS)
       files off      metrics served, --output DIR --no-steps-file, no timeline
       metrics off    no metrics, no files
       bare DDP loop  build_fnn, DDP, SGD, the rank's rows indexed from a tensor already in
                      memory, forward, MSE, backward, step. Nothing else.

2. ``hook``: the observing communication hook (sync.py's ``_observed_hook``, which runs
   every bucket's all-reduce from Python) against DDP's own C++ all-reduce, on a deep
   FNN with small buckets (--hook-layers, --hook-bucket-mb: >= 20 buckets a step), in
   the same bare loop:

       no hook          DDP as it comes
       torch hook       torch's own Python all-reduce hook (default_hooks.allreduce_hook),
                        observing nothing: what leaving DDP's C++ path costs by itself
       observed hook    a Synchroniser with an Observer (the hook ddp-fnn registers);
                        begin_step / end_step every step, finished every 10, as in training
       detail every K   the same with --bucket-detail-every K (--detail-every, default
                        10): buckets observed every K steps, DDP's C++ path between

3. The same at one bucket (--bucket-mb 1024): no hook, observed hook, detail every K.

Every comparison times each run from step --hook-warmup + 1 (after a barrier) to its
last step: the steady steps, without the model build, DDP's wrap and bucket rebuild, the
second wrapper's settling, or (``train``) the clock offset's ping-pongs, the final
evaluation and the gathers, which a run of thousands of steps pays once. ``train`` is
timed through the loop's profiler seam (``SteadySteps``), the bare loop by its own
``clock_from``. --bucket-mb sets the train comparison's buckets (one by default; the
README's 24-bucket row: --layers 256,512x24,10 --bucket-mb 0.25 --global-batch-size 64).

Method: every variant runs in the same process group, on the same data, global batch and
world size; within each comparison they take turns round after round, the first one
rotating (A, B, C, D, then B, C, D, A, ...), so that a noisy machine (here: 2 cores
shared with other jobs) slows them alike. A variant's figure is its median samples/s
over the rounds, from the wall time of its timed steps (--eval-fraction 0 as well). Beside it, rank 0's CPU seconds a step (process time, every thread):
less disturbed by other jobs than wall time, though not immune (caches, memory
bandwidth). Rank 0 prints the tables and the ratios of medians (and, as a check on them,
the median of the per-round ratios; for CPU time, the inverse ratio, so that below 1
means slower as for throughput):

    files on / files off          the step file and timeline           (target >= 0.99)
    files off / metrics off       Prometheus metrics                   (target >= 0.97)
    files off / bare DDP loop     ddp-fnn over the plainest DDP loop   (target >= 0.97)
    detail every K / no hook      bucket detail every K steps          (target >= 0.98)
    observed hook / no hook       the observing hook on every step
    observed hook / torch hook    observing, over any Python hook
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_fnn import dist as ddist
from ddp_fnn.observe import stepfile
from ddp_fnn.core import fileio
from ddp_fnn.train import loop as trainer
from ddp_fnn.train import setup
from ddp_fnn.config import TrainConfig, parse_layers
from ddp_fnn.data.datasets import GlobalBatches, load_dataset
from ddp_fnn.observe.prometheus import Metrics, NullMetrics, Summary
from ddp_fnn.model import build_fnn
from ddp_fnn.perfmodel.netmodel import bucket_layout
from ddp_fnn.observe import Clock, CollectiveRecord, Observer, make_record
from ddp_fnn.train.sync import Synchroniser


class Timed(NamedTuple):
    """A run's records and when (wall, CPU) its timed steps began (bare_loop's ``clock_from``)
    and, where it is not the run's return, when its last step ended."""
    records: list
    began: tuple[float, float]
    ended: tuple[float, float] | None = None


class SteadySteps:
    """A stopwatch on ``train``'s steady steps, through the loop's profiler seam (what
    --profile plugs in: ``before_step``, ``after_step``, ``close``): a barrier and a mark
    before step ``first``, a mark after step ``last``. The same window bare_loop's
    ``clock_from`` times, so that neither side pays the model build, DDP's wrap, the
    clock offset's ping-pongs or the final evaluation and gathers inside the figure."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.began, self.ended = first, last, None, None

    def before_step(self, step: int) -> None:
        if step == self.first:
            dist.barrier()
            self.began = (time.perf_counter(), time.process_time())

    def after_step(self, step: int) -> None:
        if step == self.last:
            self.ended = (time.perf_counter(), time.process_time())

    def close(self) -> None:
        pass


def steady_train(cfg: TrainConfig, plan, ctx, metrics, first: int) -> Timed:
    """``train`` on the built run, timed over steps ``first``..max_steps (SteadySteps)."""
    run = setup.build(cfg, plan, ctx, metrics)
    clock = SteadySteps(first, cfg.stop.max_steps)
    run.profiler = clock
    trainer.train(run)
    return Timed([], clock.began, clock.ended)


def bare_loop(cfg: TrainConfig, ctx: ddist.DistContext, ds, observer: Observer | None = None,
              torch_hook: bool = False, detail_every: int = 1, clock_from: int | None = None):
    """The plainest DDP loop. With ``observer``: the model is wrapped by a Synchroniser
    (ddp-fnn's observing hook; ``detail_every`` > 1: bucket detail every K steps, DDP's C++
    path between) and each step is opened and closed on the observer as in training;
    returns the step records it made. ``torch_hook``: torch's plain all-reduce hook.
    ``clock_from`` S: also return when (wall, CPU) step S began, after a barrier, so that a
    run can be timed over its steady steps only (model build, DDP's wrap, its bucket
    rebuild and the settling of a second wrapper left out)."""
    model = build_fnn(cfg.model.layers, seed=cfg.seed)
    syncer = None
    if observer is None:
        ddp = DDP(model, bucket_cap_mb=cfg.parallel.bucket_mb)
        if torch_hook:
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    else:
        syncer = Synchroniser(model, "ddp", ctx.world_size, observer, bucket_mb=cfg.parallel.bucket_mb,
                              detail_every=detail_every)
        syncer.settle_buckets(torch.device("cpu"), fresh=True)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    x_all, y_all = torch.from_numpy(np.asarray(ds.x)), torch.from_numpy(np.asarray(ds.y))
    batches = GlobalBatches(ds.train_idx, cfg.optim.global_batch_size, cfg.seed, ctx.rank, ctx.world_size, 1)
    records, began = [], None
    for step in range(cfg.stop.max_steps):
        if step + 1 == clock_from:
            dist.barrier()
            began = (time.perf_counter(), time.process_time())
        epoch, pos = divmod(step, batches.steps_per_epoch)
        rows = torch.from_numpy(batches.rank_micro_batches(epoch, pos)[0])
        if syncer is not None:
            observer.begin_step(step + 1)
            with syncer.micro_step(step + 1, last=True) as micro:    # as in training
                micro.backward(F.mse_loss(micro.model(x_all[rows]), y_all[rows]))
            syncer.finish()
        else:
            F.mse_loss(ddp(x_all[rows]), y_all[rows]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if syncer is not None:
            observer.end_step(len(rows))
            if (step + 1) % 10 == 0:           # read at log steps, as in training (--log-every 10)
                records += observer.finished()
    ended = (time.perf_counter(), time.process_time())
    if syncer is not None:
        records += observer.finished()
    return Timed(records, began, ended) if clock_from is not None else records


def per_step_cost_us(world_size: int, buckets: int = 1, n: int = 5000) -> dict[str, float]:
    """Microseconds one step's consumers cost on their own, for a record like a real one
    (4 phases, ``buckets`` collectives): make_record, Metrics.observe + Summary.add, and
    the step file line (to_json + json.dumps)."""
    colls = [CollectiveRecord(i, 4_000_000, 1, 0.020 + 0.001 * i, 0.030 + 0.001 * i) for i in range(buckets)]
    intervals = [("data", 0.0, 0.001), ("forward", 0.001, 0.01), ("backward", 0.01, 0.04), ("optimizer", 0.045, 0.05)]
    m, summary = Metrics(0, world_size, {"device": "cpu"}), Summary(world_size)
    t0 = time.perf_counter()
    recs = [make_record(i + 1, 256, time.time(), time.perf_counter(), 0.05, intervals, colls) for i in range(n)]
    t1 = time.perf_counter()
    for rec in recs:
        m.observe(rec)
        summary.add(rec)
    t2 = time.perf_counter()
    for rec in recs:
        json.dumps(rec.to_json(), allow_nan=False, separators=(",", ":"))
    t3 = time.perf_counter()
    return {"make_record": (t1 - t0) / n * 1e6, "metrics": (t2 - t1) / n * 1e6, "step_file": (t3 - t2) / n * 1e6}


def one_round(variants: dict, r: int, samples_per_run: int, rates: dict, cpu: dict) -> None:
    """Round ``r``: each variant once, the first one rotating; appends each run's samples/s
    and this rank's CPU seconds for it. A variant that returns ``Timed`` is
    timed from that instant (bare_loop's ``clock_from``); ``samples_per_run`` then counts
    the steps from there."""
    names = list(variants)
    for name in names[r % len(names):] + names[:r % len(names)]:
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        res = variants[name]()
        c1 = time.process_time()
        dist.barrier()
        t1 = time.perf_counter()
        if isinstance(res, Timed):
            t0, c0 = res.began
            if res.ended is not None:
                t1, c1 = res.ended
        rates.setdefault(name, []).append(samples_per_run / (t1 - t0))
        cpu.setdefault(name, []).append(c1 - c0)


def table(title: str, rates: dict, cpu: dict, steps: int, pairs: list[tuple[str, str]]) -> dict:
    med = {n: statistics.median(v) for n, v in rates.items()}
    cpu_ms = {n: statistics.median(v) / steps * 1e3 for n, v in cpu.items()}
    print(title)
    print(f"  {'':<15} {'samples/s':>10}   {'min..max':<15} {'CPU ms/step':>11}")
    for n, v in rates.items():
        print(f"  {n:<15} {med[n]:>10,.0f}   {f'{min(v):,.0f}..{max(v):,.0f}':<15} {cpu_ms[n]:>11.1f}")
    ratios = {}
    for a, b in pairs:
        r = {"of_medians": med[a] / med[b],
             "median_per_round": statistics.median(x / y for x, y in zip(rates[a], rates[b])),
             "cpu_of_medians": cpu_ms[b] / cpu_ms[a],
             "cpu_median_per_round": statistics.median(y / x for x, y in zip(cpu[a], cpu[b]))}
        ratios[f"{a} / {b}"] = r
        print(f"  ratio {a} / {b}: {r['of_medians']:.3f}   (median of per-round ratios "
              f"{r['median_per_round']:.3f}; CPU time {r['cpu_of_medians']:.3f}, per round "
              f"{r['cpu_median_per_round']:.3f})")
    return {"rates": rates, "cpu_s": cpu, "median": med, "cpu_ms_per_step": cpu_ms, "ratios": ratios}


def runs(widths) -> str:
    """256,512,512,10 -> '256,512x2,10'."""
    out: list[list[int]] = []
    for w in widths:
        if out and out[-1][0] == w:
            out[-1][1] += 1
        else:
            out.append([w, 1])
    return ",".join(f"{w}x{n}" if n > 1 else str(w) for w, n in out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="256,1024,1024,1")
    p.add_argument("--global-batch-size", type=int, default=512)
    p.add_argument("--bucket-mb", type=float, default=None,
                   help="train comparison's DDP bucket cap (default train's: one bucket for the default layers)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--train-detail-every", type=int, default=None,
                   help="train comparison's --bucket-detail-every (default train's: every step)")
    p.add_argument("--hook-layers", default=",".join(["256"] + ["512"] * 24 + ["10"]))
    p.add_argument("--hook-bucket-mb", type=float, default=0.25)
    p.add_argument("--hook-global-batch-size", type=int, default=64)
    p.add_argument("--hook-steps", type=int, default=40)
    p.add_argument("--hook-warmup", type=int, default=3,
                   help="steps of each hook run left out of its timing (wrap, bucket rebuild)")
    p.add_argument("--detail-every", type=int, default=10, help="--bucket-detail-every of the sampled variant")
    p.add_argument("--hook-only", action="store_true", help="only the hook comparisons (2 and 3)")
    p.add_argument("--train-only", action="store_true", help="only the train comparison (1)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--metrics-port", type=int, default=9450)
    p.add_argument("--json", dest="json_file", default=None, help="also write the figures here (rank 0)")
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx = ddist.setup("gloo", "cpu", 300)
    out = Path(tempfile.mkdtemp(prefix="ddp-fnn-bench-"))      # each rank its own; only files land here

    # ---- 1. train: step file + timeline, metrics, against the bare loop ------------------
    # --eval-fraction 0: the held-out evaluation at the end of `train` is not training, and
    # the bare loop has none; everything else `train` does per step is measured.
    settings = dict(layers=args.layers, samples=args.global_batch_size * (args.steps + 1),
                    global_batch_size=args.global_batch_size, max_steps=args.steps, progress="none",
                    metrics_port=0, log_every=10, eval_fraction=0.0)
    if args.bucket_mb is not None:
        settings["bucket_mb"] = args.bucket_mb
    if args.train_detail_every is not None:
        settings["bucket_detail_every"] = args.train_detail_every
    cfg = TrainConfig.of(**settings)
    files_on = TrainConfig.of(**settings, output=out, timeline=f"1:{args.steps}")
    files_off = TrainConfig.of(**settings, output=out, no_steps_file=True)
    plan = setup.plan(cfg, ctx.rank, ctx.world_size)      # the same data and batches for every variant
    ds = plan.ds
    run_info = {"backend": ctx.backend, "sync": cfg.parallel.sync, "compression": cfg.parallel.compression,
                "layers": args.layers, "device": "cpu"}
    metrics = Metrics(ctx.rank, ctx.world_size, run_info)
    metrics.serve(args.metrics_port + ctx.local_rank, "127.0.0.1")   # scraped or not, it serves
    tw = args.hook_warmup + 1       # every variant timed from this step to its last
    train_variants = {
        "files on": lambda: steady_train(files_on, plan, ctx, metrics, tw),
        "files off": lambda: steady_train(files_off, plan, ctx, metrics, tw),
        "metrics off": lambda: steady_train(cfg, plan, ctx, NullMetrics(), tw),
        "bare DDP loop": lambda: bare_loop(cfg, ctx, ds, clock_from=tw),
    }

    # ---- 2. hook: DDP's C++ all-reduce against the observing hook, at many buckets and one
    def hook_config(bucket_mb: float) -> TrainConfig:
        return TrainConfig.of(layers=args.hook_layers, samples=args.hook_global_batch_size * (args.hook_steps + 1),
                              global_batch_size=args.hook_global_batch_size, max_steps=args.hook_steps,
                              bucket_mb=bucket_mb, progress="none", metrics_port=0, eval_fraction=0.0)

    hcfg, one = hook_config(args.hook_bucket_mb), hook_config(1024.0)
    hds = load_dataset(hcfg.data, hcfg.model, hcfg.seed)
    layout = bucket_layout(parse_layers(args.hook_layers), args.hook_bucket_mb)
    # What the observed runs' records said, per run: (step, sorted bucket indices, detailed)
    # per step. Kept as tuples, not the records: thousands of live record objects would make
    # every later garbage collection slower, and the trainer's runs pay for those too.
    seen: list[list] = []           # the observed runs (every step detailed)
    sampled: list[list] = []        # the runs with detail every K steps
    k = args.detail_every
    cpu = torch.device("cpu")
    w = args.hook_warmup + 1       # timed from this step on

    def observed(config, every, keep=None):
        timed = bare_loop(config, ctx, hds, Observer(Clock(cpu)), detail_every=every, clock_from=w)
        if keep is not None:
            keep.append([(rec.step, tuple(sorted(c.bucket for c in rec.collectives)), rec.detailed)
                         for rec in timed.records])
        timed.records.clear()
        return timed

    hook_variants = {
        "no hook": lambda: bare_loop(hcfg, ctx, hds, clock_from=w),
        "torch hook": lambda: bare_loop(hcfg, ctx, hds, torch_hook=True, clock_from=w),
        "observed hook": lambda: observed(hcfg, 1, seen),
        f"detail every {k}": lambda: observed(hcfg, k, sampled),
    }
    one_variants = {
        "no hook": lambda: bare_loop(one, ctx, hds, clock_from=w),
        "observed hook": lambda: observed(one, 1),
        f"detail every {k}": lambda: observed(one, k),
    }

    bare_loop(cfg, ctx, ds)                               # warm-up: allocator, Gloo connections
    bare_loop(hcfg, ctx, hds)
    train_rates, train_cpu, hook_rates, hook_cpu, one_rates, one_cpu = {}, {}, {}, {}, {}, {}
    hook_samples = (args.hook_steps - args.hook_warmup) * args.hook_global_batch_size
    for r in range(args.rounds):                          # the comparisons interleaved, a round each
        if not args.hook_only:
            one_round(train_variants, r, (args.steps - tw + 1) * args.global_batch_size, train_rates, train_cpu)
        if not args.train_only:
            one_round(hook_variants, r, hook_samples, hook_rates, hook_cpu)
            one_round(one_variants, r, hook_samples, one_rates, one_cpu)
    metrics.close()

    # What the "files on" runs wrote, and the buckets the observed hook saw (after step 1:
    # DDP rebuilds its buckets after the first iteration).
    lines = len(stepfile.read(out / f"steps-rank{ctx.rank}.jsonl")) if not args.hook_only else 0
    timeline_ok = (out / "timeline.json").exists() if ctx.is_master else True
    buckets_seen = sorted({len(b) for run in seen + sampled for step, b, _ in run if step > 1})
    indices_ok = all(b == tuple(range(len(layout))) for run in seen + sampled for step, b, _ in run if step > 2)
    detailed = sorted({sum(d for _, _, d in run) for run in sampled})
    cost = per_step_cost_us(ctx.world_size, buckets=len(layout))
    if ctx.is_master:
        print(f"world size {ctx.world_size}, Gloo on CPU, {args.rounds} rounds (medians over the rounds)")
        figures = {}
        if not args.hook_only:
            figures["train"] = table(
                f"1. train: layers {args.layers}, global batch {args.global_batch_size}, {args.steps} steps a run",
                train_rates, train_cpu, args.steps - args.hook_warmup,
                [("files on", "files off"), ("files off", "metrics off"), ("files off", "bare DDP loop")])
            print(f"  files on wrote {lines} step-file lines a run (rank 0's last run) and "
                  f"{'a' if timeline_ok else 'NO'} timeline.json")
        if not args.train_only:
            figures["hook"] = table(
                f"2. hook: layers {runs(parse_layers(args.hook_layers))}, "
                f"--bucket-mb {args.hook_bucket_mb}, global batch {args.hook_global_batch_size}, "
                f"{args.hook_steps} steps a run",
                hook_rates, hook_cpu, args.hook_steps - args.hook_warmup,
                [(f"detail every {k}", "no hook"), ("observed hook", "no hook"), ("observed hook", "torch hook"),
                 ("torch hook", "no hook")])
            print(f"  buckets a step: {len(layout)} by netmodel.bucket_layout; seen (steps >= 2, both observed "
                  f"variants): {buckets_seen}, indices 0..{len(layout) - 1} every step from 3: {indices_ok}; "
                  f"detailed steps a run with detail every {k}: {detailed}")
            figures["one bucket"] = table(
                "3. the same at one bucket (--bucket-mb 1024)", one_rates, one_cpu, args.hook_steps - args.hook_warmup,
                [(f"detail every {k}", "no hook"), ("observed hook", "no hook")])
        print("  per step, timed alone (us): " + ", ".join(f"{k} {v:.1f}" for k, v in cost.items())
              + f" (record with {len(layout)} collectives)")
        if args.json_file:
            with open(args.json_file, "w") as f:
                f.write(fileio.dumps({"world_size": ctx.world_size, "rounds": args.rounds, "figures": figures,
                           "config": {"train": cfg.to_dict(), "hook": hcfg.to_dict(), "detail_every": k},
                           "buckets": {"layout": len(layout), "seen": buckets_seen, "indices_ok": indices_ok},
                           "per_step_cost_us": cost}, indent=2, default=str) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    ddist.teardown()


if __name__ == "__main__":
    main()
