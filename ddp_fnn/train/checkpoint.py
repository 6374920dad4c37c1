"""Checkpoints: the whole training state, written atomically by rank 0, read by every rank.

A checkpoint is one file, ``DIR/step-00000120.pt``, holding everything the loop needs to
run step 120 (0-based: the *next* step) exactly as an uninterrupted run would:

    step             the next step to run; epoch and position follow from it
                     (``epoch, pos = divmod(step, steps_per_epoch)``; the data order
                     depends only on the seed and the epoch, see data.py)
    model            the unwrapped FNN's state_dict (keys ``layers.0.weight``..., no ``module.``)
    optimizer        its state_dict: SGD momentum buffers, Adam moments and step counts
    ranks[r]         per rank: every RNG that affects training (torch CPU, CUDA when used,
                     Python ``random``, NumPy's global generator: stored even though the
                     loop draws nothing today, so that future randomness resumes exactly),
                     and the communication hook's state (PowerSGD: iter, its NumPy
                     RandomState, P and Q memories and the rank's own error feedback)
    fingerprint      the settings that change the math, as a dict, so that a mismatch
                     names them (world size is not one of them: see ``find_resume``)
    world_size, bucket_mb, written_at
    stop             only in a run's last checkpoint when it stopped early on
                     --target-loss: {"reason": "target-loss", "train_loss": L}
                     (``finished`` reads it)

Only tensors, numbers, strings, lists and dicts: every file loads with
``torch.load(..., weights_only=True)``, so a checkpoint cannot run code when read.

Writes are atomic: a temporary file in the same directory, flushed and fsync'ed, renamed
over the final name with ``os.replace``, then the directory fsync'ed, so a crash leaves
either the old set of files or the new one, never a half-written ``step-*.pt``. (A
worker killed mid-write leaves a ``.step-*.tmp-PID`` file; the next save removes it.)
The last ``--keep`` checkpoints are kept.

Saving is a collective (every rank calls ``Checkpointer.save``): rank 0 gathers each
rank's RNG and hook state, then writes. Loading happens before the model is wrapped in
DDP, on every rank, from a file of the same step: each rank lists the steps it can read
(``readable_steps``) and, once the group is joined, all take the newest step in every list
(``common_step``, setup.agree_resume), since ranks' storage need not be shared or up to
date. After wrapping, ``Synchroniser.settle_buckets`` gives DDP the bucket layout the
uninterrupted run had (bitwise resume depends on it, see there).

Also here, because they guard the same thing (a run's state being worth keeping):
``all_finite`` (no NaN/Inf model is checkpointed or exported) and ``check_replicas``
(``--check-replicas-every``: every rank's parameter hash compared).
docs/fault-tolerance.md has the whole story.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ddp_fnn.core import fileio
from ddp_fnn.config import CheckpointConfig, ConfigError, math_defaults
from ddp_fnn.observe.control import TRAFFIC

FORMAT = "ddp-fnn-checkpoint"
VERSION = 1
NAME_RE = re.compile(r"^step-(\d{8,})\.pt$")
TMP_RE = re.compile(r"^\.step-\d{8,}\.pt\.tmp-\d+$")

# The settings that change the numbers a step computes. Not the world size (the global
# batch, not the shard, is what the optimizer sees), not bucket sizes, logging or ports.
class CheckpointError(Exception):
    """A file is not a readable checkpoint (truncated, corrupt, or not ours)."""


class NonFiniteError(RuntimeError):
    """The model has NaN/Inf parameters: it is never checkpointed or exported."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def fingerprint(math_settings: dict, data_identity: str) -> dict:
    """The settings that change the math (``TrainConfig.math_settings()``: derived from the
    config's sections, not listed here), plus the data's identity (data.Dataset.identity)."""
    return {**math_settings, "data": data_identity}


def _option(name: str) -> str:
    return "--data" if name == "data" else "--" + name.replace("_", "-")


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def fingerprint_diff(old: dict, new: dict) -> list[str]:
    """``['--lr 0.01 → 0.02', ...]`` for each setting that differs, in a stable order.

    A setting the old fingerprint lacks (a math field added since that checkpoint was
    written) counts as its default there: the run that wrote it computed what the default
    computes, so a checkpoint resumes while the new field is left at its default."""
    defaults = math_defaults()
    old = {**{k: defaults[k] for k in new if k not in old and k in defaults}, **old}
    names = list(new) + [k for k in old if k not in new]
    return [f"{_option(k)} {_show(old.get(k, '(unset)'))} → {_show(new.get(k, '(unset)'))}"
            for k in names if old.get(k) != new.get(k)]


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------------
# the directory: checks, listing, pruning
# ---------------------------------------------------------------------------------------

def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step-*.pt`` in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = NAME_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def write_atomic(obj: dict, path: Path) -> None:
    """torch.save ``obj`` to ``path`` so that ``path`` is either absent/old or complete."""
    fileio.atomic_write(path, lambda f: torch.save(obj, f))


def prune(directory: Path, newest_step: int, keep: int) -> list[Path]:
    """After writing step ``newest_step``: remove files of later steps (an abandoned
    timeline: the run resumed from an older file), stale temporaries, and all but the
    last ``keep`` checkpoints. Returns what was removed."""
    removed = []
    for p in directory.iterdir():
        if TMP_RE.match(p.name):
            p.unlink(missing_ok=True)
            removed.append(p)
    ckpts = list_checkpoints(directory)
    later = [p for s, p in ckpts if s > newest_step]
    upto = [p for s, p in ckpts if s <= newest_step]
    for p in later + upto[:-keep]:
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------
# RNG and communication-hook state as plain tensors and numbers
# ---------------------------------------------------------------------------------------

def np_state(state: tuple) -> dict:
    """A NumPy RandomState's get_state() as tensors and numbers (weights-only loadable)."""
    kind, keys, pos, has_gauss, cached = state
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def np_tuple(d: dict) -> tuple:
    """The inverse of ``np_state``."""
    return (d["kind"], d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


def capture_rng(device: torch.device) -> dict:
    version, internal, gauss = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
          "numpy": np_state(np.random.get_state())}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def restore_rng(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    np.random.set_state(np_tuple(st["numpy"]))
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(st["cuda"], device)


# ---------------------------------------------------------------------------------------
# reading and choosing what to resume from
# ---------------------------------------------------------------------------------------

def read(path: Path) -> dict:
    """Load a checkpoint weights-only onto the CPU; CheckpointError if it is not a whole one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                       # truncated zip, bad pickle, I/O error, ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{type(e).__name__}: {reason[:160]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError("not a ddp-fnn checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint format version {state.get('version')}, this ddp-fnn reads {VERSION}")
    missing = [k for k in ("step", "model", "optimizer", "ranks", "fingerprint", "world_size") if k not in state]
    if missing:
        raise CheckpointError(f"incomplete checkpoint: no {', '.join(missing)}")
    return state


@dataclass
class Resume:
    path: Path
    state: dict
    skipped: list[tuple[Path, str]] = field(default_factory=list)   # unreadable newer files, why

    @property
    def step(self) -> int:
        return int(self.state["step"])


def find_resume(cfg: CheckpointConfig, fp: dict) -> Resume | None:
    """What to resume from, per ``--resume``: ConfigError for a missing ``--resume PATH``,
    an unreadable one, a directory holding checkpoints none of which is readable, or a
    checkpoint written with other settings (naming each one, old → new)."""
    skipped: list[tuple[Path, str]] = []
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        if cfg.checkpoint_dir is None:
            return None
        found = list_checkpoints(cfg.checkpoint_dir)
        chosen = None
        for _, path in reversed(found):
            try:
                chosen = Resume(path, read(path), skipped)
                break
            except CheckpointError as e:
                skipped.append((path, str(e)))
        if chosen is None:
            if skipped:
                raise ConfigError(f"--checkpoint-dir {cfg.checkpoint_dir}: none of its {len(skipped)} checkpoints "
                                  f"is readable (newest {skipped[0][0].name}: {skipped[0][1]}); "
                                  f"use --resume never to start afresh")
            return None
    else:
        path = Path(cfg.resume)
        if not path.is_file():
            raise ConfigError(f"--resume {cfg.resume}: no such checkpoint file")
        try:
            chosen = Resume(path, read(path))
        except CheckpointError as e:
            raise ConfigError(f"--resume {cfg.resume}: not a readable checkpoint ({e})") from None
    diff = fingerprint_diff(chosen.state["fingerprint"], fp)
    if diff:
        raise ConfigError(f"checkpoint {chosen.path} was written with other settings: {'; '.join(diff)} "
                          f"(use another --checkpoint-dir, or --resume never)")
    return chosen


def needs_agreement(cfg: CheckpointConfig) -> bool:
    """Whether this run may resume, so that the ranks must agree on the step: the same on
    every rank (settings only, not what any rank's directory holds: a rank that finds no
    checkpoint still has to learn whether the others did)."""
    return cfg.resume != "never" and (cfg.resume != "auto" or cfg.checkpoint_dir is not None)


def readable_steps(cfg: CheckpointConfig, fp: dict, chosen: Resume | None) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint this rank could resume from, newest first: the
    chosen one and, with --resume auto, each older file in --checkpoint-dir that reads whole
    and has these settings. Files newer than the chosen one are unreadable already. Each
    older file is read and dropped (one in memory beside the chosen one): a step is only
    offered to the other ranks if this rank is sure it can load it, since a load failing
    on one rank after the agreement would leave the others waiting in a collective."""
    if chosen is None:
        return []
    found = [(chosen.step, chosen.path)]
    if cfg.resume == "auto":
        listed = list_checkpoints(cfg.checkpoint_dir)
        chosen_at = next(s for s, p in listed if p == chosen.path)
        for _, path in reversed([(s, p) for s, p in listed if s < chosen_at]):
            try:
                state = read(path)
            except CheckpointError:
                continue
            if not fingerprint_diff(state["fingerprint"], fp):
                found.append((int(state["step"]), path))
    return found


def common_step(steps_of: list[list[int]]) -> int | None:
    """The newest step in every rank's list (``readable_steps``, all-gathered), or None."""
    common = set(steps_of[0]).intersection(*steps_of[1:]) if steps_of else set()
    return max(common) if common else None


def finished(resume: Resume, total_steps: int, target_loss: float | None) -> str | None:
    """Why the run ``resume`` continues has nothing left to do, or None: its checkpoint is
    at the run's last step, or the run stopped on a --target-loss that this one's target
    does not lower. (A larger --max-steps or --epochs, or a lower --target-loss, is more
    work: that resumes.)"""
    if resume.step >= total_steps:
        return f"at step {resume.step} of {total_steps}"
    stop = resume.state.get("stop")
    if stop and stop.get("reason") == "target-loss" and target_loss is not None \
            and stop["train_loss"] <= target_loss:
        return f"at step {resume.step}: training loss {stop['train_loss']:.6g} <= --target-loss {target_loss:g}"
    return None


def restore(resume: Resume, model: torch.nn.Module, device: torch.device, rank: int, world_size: int) -> None:
    """Before DDP wraps ``model``: load its parameters and this rank's RNG state. At another
    world size every rank takes rank 0's RNG state (today they are all the same)."""
    model.load_state_dict(resume.state["model"])
    ranks = resume.state["ranks"]
    mine = ranks[rank] if world_size == resume.state["world_size"] else ranks[0]
    restore_rng(mine["rng"], device)


def restore_after_wrap(resume: Resume, optimizer: torch.optim.Optimizer, syncer, device: torch.device,
                       rank: int, world_size: int, bucket_mb: float) -> bool:
    """Collective, after DDP wraps the model: the optimizer's state, DDP's bucket layout,
    the hook's state. Returns whether the hook state was restored exactly (see
    ``Synchroniser.load_state_dict``): it is when the world size and ``--bucket-mb`` are those of the run
    that wrote the checkpoint."""
    optimizer.load_state_dict(resume.state["optimizer"])
    syncer.settle_buckets(device)
    ranks = resume.state["ranks"]
    same_world = world_size == resume.state["world_size"]
    mine = ranks[rank] if same_world else ranks[0]
    exact = same_world and resume.state.get("bucket_mb") == bucket_mb
    return syncer.load_state_dict(mine.get("hook"), device, exact)


# ---------------------------------------------------------------------------------------
# writing during the run
# ---------------------------------------------------------------------------------------

class Checkpointer:
    """Saves every ``every`` steps (and at the end) into ``directory``, keeping ``keep``."""

    def __init__(self, directory: Path, every: int | None, keep: int, rank: int, world_size: int,
                 device: torch.device, fp: dict, bucket_mb: float, discard: list[Path] | None = None):
        self.directory = Path(directory)
        self.discard = list(discard or [])      # unreadable files skipped on resume: gone at the first save
        self.every, self.keep = every, keep
        self.rank, self.world_size, self.device = rank, world_size, device
        self.fingerprint = fp
        self.bucket_mb = bucket_mb
        self.last_saved: int | None = None
        self.last_path: Path | None = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step != self.last_saved

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, syncer,
             stop: dict | None = None) -> Path | None:
        """Collective: every rank calls it with the same ``step`` (the next step to run).
        Refuses a model with NaN/Inf parameters (NonFiniteError, on every rank alike:
        the replicas are equal). ``stop``: why the run ended early, for the last one."""
        if not all_finite(model):
            raise NonFiniteError(f"rank {self.rank}: parameters are not finite after step {step}; "
                                 f"not writing a checkpoint")
        mine = {"rng": capture_rng(self.device), "hook": syncer.state_dict()}
        ranks = [None] * self.world_size if self.rank == 0 else None
        if self.world_size > 1:
            dist.gather_object(mine, ranks, dst=0)
            TRAFFIC.gather_object(mine, self.world_size, self.rank == 0)
        else:
            ranks = [mine]
        self.last_saved = step
        if self.rank != 0:
            return None
        state = {
            "format": FORMAT, "version": VERSION, "step": step, "world_size": self.world_size,
            "fingerprint": self.fingerprint, "bucket_mb": self.bucket_mb,
            "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "ranks": ranks,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if stop is not None:
            state["stop"] = stop
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / checkpoint_name(step)
        write_atomic(state, path)
        for p in self.discard:
            p.unlink(missing_ok=True)
        self.discard = []
        prune(self.directory, step, self.keep)
        self.last_path = path
        return path


# ---------------------------------------------------------------------------------------
# replica agreement (--check-replicas-every)
# ---------------------------------------------------------------------------------------

class ReplicaMismatchError(RuntimeError):
    """The ranks no longer hold the same parameters: exit status 1."""


def parameter_digest(model: torch.nn.Module) -> torch.Tensor:
    """The first 16 bytes of the SHA-256 of every parameter's bytes, as two int64s: equal
    digests mean bitwise-equal replicas (a float checksum could miss a swapped pair)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return torch.from_numpy(np.frombuffer(h.digest()[:16], dtype=np.int64).copy())


def check_replicas(model: torch.nn.Module, rank: int, world_size: int, step: int, device: torch.device) -> None:
    """Collective: every rank's parameter digest, all-gathered; ReplicaMismatchError naming
    the groups of ranks that agree with each other, on every rank alike."""
    if world_size == 1:
        return
    mine = parameter_digest(model).to(device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    TRAFFIC.all_gather(mine.numel() * mine.element_size(), world_size)
    groups: dict[tuple, list[int]] = {}
    for r, d in enumerate(every):
        groups.setdefault(tuple(d.tolist()), []).append(r)
    if len(groups) > 1:
        parts = " vs ".join("ranks " + ",".join(map(str, g)) for g in sorted(groups.values()))
        raise ReplicaMismatchError(f"rank {rank}: replicas diverged at step {step}: parameters differ "
                                   f"between {parts} (--check-replicas-every)")
