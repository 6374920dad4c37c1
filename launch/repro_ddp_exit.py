"""Tutorial-style DDP run on Gloo that ends by returning from the script: a reproducer
for the rare "terminate called without an active exception" abort (SIGABRT) at exit.
docs/shutdown.md explains the cause and the measured rates.

    torchrun --standalone --nproc-per-node 2 launch/repro_ddp_exit.py [--fix VARIANT]

--fix picks how the worker shuts down after training:

  none     destroy_process_group(), then normal interpreter exit (the tutorial way)
  gc       del the DDP model and optimizer, gc.collect(), destroy_process_group()
  barrier  dist.barrier(), destroy_process_group()
  order    del model and optimizer, gc.collect(), dist.barrier(), destroy_process_group()
  release  as `order`, and torch.distributed.nn is imported before init_process_group,
           so that destroy_process_group() really frees the Gloo process group and joins
           its worker threads (see docs/shutdown.md)
  exit     destroy_process_group(), flush stdio and logging, os._exit(0)

--collective ddp (default) trains a DDP model; `allreduce` only calls dist.all_reduce
(the case that does not abort); `allreduce-tls` calls it with a Python object stashed in
the thread-local state, as Tensor.backward() does, which brings the abort back without
DDP. Except under `release`, torch.distributed.nn is imported right after
init_process_group, as DDP's constructor does, so all three keep the process group alive
past destroy_process_group() alike.

Rank 0 prints the variant and how many Gloo threads are alive after
destroy_process_group(). launch/reliability.sh runs it many times and counts aborts:

    launch/reliability.sh -n 100 -- launch/repro_ddp_exit.py --fix release
"""

from __future__ import annotations

import argparse
import contextvars
import gc
import logging
import os
import sys

FIXES = ("none", "gc", "barrier", "order", "release", "exit")
COLLECTIVES = ("ddp", "allreduce", "allreduce-tls")


def gloo_threads() -> int:
    """Threads of this process whose name says Gloo (Linux; 0 elsewhere). The same count as
    ddp_fnn.dist.gloo_threads_alive, written out: the reproducer imports nothing of
    ddp_fnn, whose imports would change what is loaded before init_process_group."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 0
    n = 0
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += "gloo" in f.read()
        except OSError:
            pass
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", choices=FIXES, default="none")
    parser.add_argument("--collective", choices=COLLECTIVES, default="ddp")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    if args.fix == "release":
        # Imported after init_process_group, this module's functions capture the default
        # process group in their `group=group.WORLD` default arguments, for good.
        import torch.distributed.nn  # noqa: F401

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    if args.fix != "release":
        # What DDP's constructor does implicitly (through torch.distributed._shard); done
        # here for every collective so that the all_reduce runs keep the process group
        # alive past destroy_process_group() just as the DDP runs do.
        import torch.distributed.nn  # noqa: F401
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = opt = None
    if args.collective == "ddp":
        model = DDP(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(args.steps):
            x = torch.randn(16, 32)
            y = torch.randint(0, 10, (16,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        t = torch.ones(1000)
        for _ in range(args.steps):
            if args.collective == "allreduce-tls":
                # What torch.autograd.backward() does around every backward pass; a
                # collective launched meanwhile (DDP's bucket all-reduce) copies it.
                torch._C._stash_obj_in_tls("context", contextvars.copy_context())
            dist.all_reduce(t)
            if args.collective == "allreduce-tls":
                torch._C._remove_obj_from_tls("context")

    if args.fix in ("gc", "order", "release"):
        del model, opt
        gc.collect()
    if args.fix in ("barrier", "order", "release"):
        dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(f"fix={args.fix} collective={args.collective} "
              f"gloo threads after destroy: {gloo_threads()}", flush=True)
    if args.fix == "exit":
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
