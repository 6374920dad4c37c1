"""Reproducer for the abort of a process that brings up and destroys Gloo groups in-process
(as the test suite's fixtures do): "Fatal Python error: Aborted" from a C++ thread.
docs/shutdown.md ("Groups inside a long-lived process") explains the cause.

    python launch/repro_inprocess_group.py --teardown bare    --rounds 200   # aborts
    python launch/repro_inprocess_group.py --teardown ddp-fnn --rounds 200   # does not

Each round: a Gloo group of one (HashStore, nothing listens), a DDP model with ddp-fnn's
PowerSGD communication hook, 4 SGD steps, then the group is left, either

  bare     dist.destroy_process_group() (what the test fixture used to do)
  ddp-fnn  ddp_fnn.dist.teardown() (collect, destroy, wait until this thread holds the
           group's last reference, drop it here)

and the process waits on a short subprocess, as the next test did. It prints one line
per 10 rounds and "N rounds, no abort" at the end; an abort kills it (exit status 134).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
import torch.distributed as dist

from ddp_fnn import dist as ddist          # imports torch.distributed.nn before any group
from ddp_fnn.model import build_fnn
from ddp_fnn.train.sync import CommRecorder, Synchroniser
from ddp_fnn.timing import Clock


def one_round(g: torch.Generator) -> None:
    model = build_fnn((8, 32, 32, 1), seed=0)
    syncer = Synchroniser(model, "ddp", 1, CommRecorder(Clock(torch.device("cpu"))),
                          compression="powersgd", powersgd_rank=2)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(4):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
        torch.nn.functional.mse_loss(syncer.model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teardown", choices=("bare", "ddp-fnn"), default="bare")
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    for r in range(1, args.rounds + 1):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        one_round(g)
        if args.teardown == "bare":
            dist.destroy_process_group()
        else:
            ddist.teardown()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        if r % 10 == 0:
            print(f"round {r}: gloo threads alive {ddist.gloo_threads_alive()}", flush=True)
    print(f"{args.rounds} rounds, no abort ({args.teardown})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
