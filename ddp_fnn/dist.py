"""Process-group bring-up and tear-down, backend and device choice.

Under torchrun the environment names this worker (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Without torchrun the worker is rank 0 of 1 and its group
lives in an in-process store, so one process runs the same code path as N and
opens no port.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
# Imported before any process group exists, on purpose: imported later (DDP's constructor
# does it), torch.distributed.nn's functions capture the default group in their default
# arguments and keep it, and its Gloo threads, alive past destroy_process_group(); those
# threads then die in interpreter finalisation and abort the process ("terminate called
# without an active exception"). docs/shutdown.md has the measurements.
import torch.distributed.nn  # noqa: F401

from ddp_fnn.core.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    backend: str
    device: torch.device
    # The group for the host's own small messages (clock ping-pong, ready times): CPU
    # tensors over Gloo on every backend. NCCL's send/recv return before the data has moved
    # and its tensors live on the GPU's timeline, so a round trip over NCCL times Python's
    # queueing, not the exchange. None: the default group is Gloo already and serves.
    control: object = None

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def choose_device(device: str, local_rank: int) -> torch.device:
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"--device cuda: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs")
    return torch.device("cuda", local_rank)


def choose_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--backend nccl needs a CUDA device (use gloo on CPU)")
    return backend


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment {name}={value!r} is not an integer") from None


def worker_identity() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, or (0, 0, 1)."""
    return _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)


def setup(backend: str = "auto", device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the process group; returns who this worker is and where it computes."""
    rank, local_rank, world_size = worker_identity()
    dev = choose_device(device, local_rank)
    be = choose_backend(backend, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one TCPStore for the whole job, restarts included (torch
        # 2.13), so after a restart the new workers would read the addresses the previous
        # attempt's workers published there and connect to dead ports (Connection refused).
        # One key prefix per attempt keeps each worker group to its own keys.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(be, store=dist.PrefixStore(f"ddp-fnn/attempt-{attempt}", store), rank=rank,
                                world_size=world_size, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
    elif "MASTER_ADDR" in os.environ:
        dist.init_process_group(be, timeout=timeout, device_id=dev if dev.type == "cuda" else None)
    else:
        # Not launched by torchrun: a group of one in a HashStore (nothing listens).
        dist.init_process_group(be, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
    # Created once, by every rank in the same order (new_group is itself a collective).
    control = dist.new_group(backend="gloo", timeout=timeout) if be != "gloo" and world_size > 1 else None
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, backend=be, device=dev,
                       control=control)


@dataclass(frozen=True)
class NodeGroups:
    """The process groups of a hierarchical all-reduce: ``local``, this node's ranks;
    ``rail``, the ranks of every node with this rank's local rank (None with one node)."""
    local_size: int
    nodes: int
    local: object
    rail: object


def node_groups(ctx: DistContext, timeout_s: float) -> NodeGroups:
    """Collective (every rank, the same order): one group per node and one per local
    rank. torchrun gives node k's workers the ranks k*G .. k*G+G-1 (G = LOCAL_WORLD_SIZE,
    the same on every node); checked here across ranks, so a layout that breaks it is one
    clear error on every rank, not a wrong grouping."""
    local_size = _env_int("LOCAL_WORLD_SIZE", 1)
    node = _env_int("GROUP_RANK", 0)
    mine = (node, local_size, ctx.local_rank)
    every = [None] * ctx.world_size
    dist.all_gather_object(every, mine, group=ctx.control)
    for r, (k, g, lr) in enumerate(every):
        if g != local_size or r != k * g + lr:
            raise ConfigError(f"--all-reduce hierarchical needs the same --nproc-per-node on every node and node "
                              f"k holding ranks k*G..k*G+G-1; rank {r} is node {k}'s local rank {lr} of {g}")
    nodes = ctx.world_size // local_size
    timeout = timedelta(seconds=timeout_s)
    local = rail = None
    for k in range(nodes):
        g = dist.new_group(list(range(k * local_size, (k + 1) * local_size)), timeout=timeout)
        if k == node:
            local = g
    if nodes > 1:
        for i in range(local_size):
            g = dist.new_group([k * local_size + i for k in range(nodes)], timeout=timeout)
            if i == ctx.local_rank:
                rail = g
    return NodeGroups(local_size, nodes, local, rail)


def teardown() -> None:
    """Leave the process group (a no-op if it was never joined or is already gone), and
    make sure the group is destroyed here, on this thread, with its Gloo threads joined.

    Collect garbage first: a DDP wrapper or a communication hook's state that is only
    unreachable, not yet freed, still holds the group, and destroy_process_group() can
    free the group and join its threads only when nothing else does.

    Then wait until this function holds the group's last Python reference before letting
    it go. A Gloo worker thread (``pt_gloo_runloop``) runs a collective's completion
    callbacks and frees them *after* it has completed the future the main thread waits
    on; a callback that closes over the group (PowerSGD's hook does) is then its last
    reference but one. If the main thread has already dropped its references, the worker
    frees the group itself, ``~ProcessGroupGloo`` joins the worker's own thread, and
    ``std::thread::join`` throws (EDEADLK) from a destructor: std::terminate, SIGABRT.
    The worker needs the GIL to free the callback, so the wait sleeps (which releases
    the GIL) until the count drops: a condition, not a guess at a duration. A reference
    held elsewhere for good (a traceback, a test's leftover model) ends the wait at
    ``release_timeout_s``; the group then lives on as before. docs/shutdown.md has the
    backtrace and the measurements."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    group = dist.group.WORLD
    gc.collect()
    dist.destroy_process_group()
    t0 = time.monotonic()
    # sys.getrefcount counts `group` here and its own argument: 2 when no one else holds it.
    while sys.getrefcount(group) > 2 and time.monotonic() - t0 < release_timeout_s:
        time.sleep(0.001)
    del group        # the last reference, on this thread: ~ProcessGroupGloo joins its workers


release_timeout_s = 2.0


def gloo_threads_alive() -> int:
    """Gloo threads in this process (Linux /proc; 0 elsewhere): 0 after teardown() when
    the group was released, once the joined threads have finished exiting (a joined thread
    can stay listed for a few milliseconds on a busy machine)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0
    n = 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                n += "gloo" in f.read()
        except OSError:
            pass
    return n
