"""Training throughput: ddp-fnn with metrics on, with metrics off, and a bare DDP loop.

Run under torchrun (the figures in README.md came from this command):

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/throughput.py

All three variants train the same FNN on the same data, global batch and world size, in
one process group, taking turns round after round (A, B, C, then C, A, B, ...) so that a
noisy machine slows them alike. Each variant's figure is its median samples/s over the
rounds, from the wall time of a whole run of --steps steps (model build and DDP wrap
included, for every variant; `train`'s held-out evaluation is left out: --eval-fraction 0).
Rank 0 prints a table and the ratios:

    metrics on / metrics off     what observing every step costs (target >= 0.97)
    metrics on / bare DDP loop   what ddp-fnn costs over the plainest DDP loop (target >= 0.97)

The bare loop: build_fnn, DistributedDataParallel, SGD, the rank's rows indexed from a
tensor already in memory, forward, MSE, backward, step. Nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_fnn import dist as ddist
from ddp_fnn import strictjson
from ddp_fnn import trainer
from ddp_fnn.config import TrainConfig
from ddp_fnn.data import GlobalBatches, load_dataset
from ddp_fnn.metrics import PHASES, Metrics, NullMetrics, StepRecord, Summary
from ddp_fnn.model import build_fnn


def bare_ddp(cfg: TrainConfig, ctx: ddist.DistContext, ds) -> None:
    model = DDP(build_fnn(cfg.layers, seed=cfg.seed), bucket_cap_mb=cfg.bucket_mb)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    x_all, y_all = torch.from_numpy(np.asarray(ds.x)), torch.from_numpy(np.asarray(ds.y))
    batches = GlobalBatches(ds.train_idx, cfg.global_batch_size, cfg.seed, ctx.rank, ctx.world_size, 1)
    for step in range(cfg.max_steps):
        epoch, pos = divmod(step, batches.steps_per_epoch)
        rows = torch.from_numpy(batches.rank_micro_batches(epoch, pos)[0])
        loss = F.mse_loss(model(x_all[rows]), y_all[rows])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def observe_cost_us(world_size: int, steps: int = 20000) -> float:
    """Microseconds one step's metrics cost on their own: Metrics.observe and Summary.add
    of a step record like a real one (4 phases, one collective), in a fresh registry."""
    m, summary = Metrics(0, world_size, {"device": "cpu"}), Summary(world_size)
    t0 = time.perf_counter()
    for i in range(steps):
        rec = StepRecord(step=i + 1, samples=256, step_s=0.05, phases=dict.fromkeys(PHASES, 0.01),
                         exposed_s=0.002, collectives=[(4_000_000, 1, 0.03, 0.045)], timestamp=time.time())
        m.observe(rec)
        summary.add(rec)
    return (time.perf_counter() - t0) / steps * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="256,1024,1024,1")
    p.add_argument("--global-batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--metrics-port", type=int, default=9450)
    p.add_argument("--json", dest="json_file", default=None, help="also write the figures here (rank 0)")
    args = p.parse_args()
    torch.set_num_threads(1)

    # --eval-fraction 0: the held-out evaluation at the end of `train` is not training, and
    # the bare loop has none; everything else `train` does per step is measured.
    cfg = TrainConfig(layers=args.layers, samples=args.global_batch_size * (args.steps + 1),
                      global_batch_size=args.global_batch_size, max_steps=args.steps, progress="none",
                      metrics_port=0, log_every=10, eval_fraction=0.0)
    ctx = ddist.setup("gloo", "cpu", 300)
    ds = load_dataset(cfg)
    run_info = {"backend": ctx.backend, "sync": cfg.sync, "compression": cfg.compression,
                "layers": args.layers, "device": "cpu"}
    metrics = Metrics(ctx.rank, ctx.world_size, run_info)
    metrics.serve(args.metrics_port + ctx.local_rank, "127.0.0.1")   # scraped or not, it serves
    variants = {
        "metrics on": lambda: trainer.train(cfg, ctx, ds, metrics),
        "metrics off": lambda: trainer.train(cfg, ctx, ds, NullMetrics()),
        "bare DDP loop": lambda: bare_ddp(cfg, ctx, ds),
    }
    names = list(variants)
    rates = {n: [] for n in names}
    variants["bare DDP loop"]()                          # warm-up: allocator, Gloo connections
    for r in range(args.rounds):
        order = names[r % 3:] + names[:r % 3]            # rotate who goes first
        for name in order:
            dist.barrier()
            t0 = time.perf_counter()
            variants[name]()
            dist.barrier()
            rates[name].append(args.steps * args.global_batch_size / (time.perf_counter() - t0))
    metrics.close()
    observe_us = observe_cost_us(ctx.world_size)
    if ctx.is_master:
        med = {n: statistics.median(v) for n, v in rates.items()}
        print(f"world size {ctx.world_size}, layers {args.layers}, global batch {args.global_batch_size}, "
              f"{args.steps} steps x {args.rounds} rounds (median samples/s, min..max)")
        for n in names:
            print(f"  {n:<15} {med[n]:>10,.0f}   {min(rates[n]):,.0f}..{max(rates[n]):,.0f}")
        on_off = med["metrics on"] / med["metrics off"]
        on_bare = med["metrics on"] / med["bare DDP loop"]
        step_us = args.global_batch_size / med["metrics on"] * 1e6
        print(f"  metrics' own cost per step (observe + summary, timed alone): {observe_us:.1f} us "
              f"= {observe_us / step_us:.3%} of a {step_us / 1e3:.1f} ms step")
        print(f"  ratio metrics on / metrics off:   {on_off:.3f}")
        print(f"  ratio metrics on / bare DDP loop: {on_bare:.3f}")
        if args.json_file:
            with open(args.json_file, "w") as f:
                f.write(strictjson.dumps({"config": dataclasses.asdict(cfg) | {"output": None}, "rates": rates,
                                          "median": med, "ratio_on_off": on_off, "ratio_on_bare": on_bare,
                                          "world_size": ctx.world_size, "observe_cost_us": observe_us},
                                         indent=2, default=str) + "\n")
    ddist.teardown()


if __name__ == "__main__":
    main()
