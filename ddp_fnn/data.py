"""Datasets and sharding.

A ``Dataset`` holds features ``x`` (n, features) and targets ``y`` as numpy arrays,
possibly memory-mapped (.npy, uncompressed .npz), so that a worker reads only the
rows of its own shard from a large file. It is split once, by the seed, into a
training part and a held-out evaluation part.

``GlobalBatches`` decides which rows form each optimizer step. The order depends
only on the seed, the epoch and the training-set size, never on the world size:

    epoch e:  perm_e = randperm(n_train, seed, e)           (as DistributedSampler)
    step  t:  G_t    = perm_e[t*B : (t+1)*B]                 (the global batch; the tail
                                                             that does not fill B is dropped)
    rank  r:  S_r    = G_t[r::N]                             (DistributedSampler's stride)
    micro k:  S_r split into K consecutive parts             (m = B / (N*K) rows each
                                                             when N*K divides B)

so the union over ranks and micro-steps is exactly G_t at every world size.

When N*K does not divide B the shards are uneven: rank r holds ceil or floor of B/N
rows (the first B mod N ranks one more), split into K parts whose sizes differ by at
most one, and every rank and micro-step has at least one row. DDP (and the
``allreduce`` mode) averages the ranks' gradients with equal weights 1/N, so an equal
weighting of unequal shards would overweight the rows of the smaller shards. Each
micro-batch's mean loss is therefore scaled by ``N * m_rk / B`` (``weighted``): the
ranks' gradients are sum_k N*m_rk/B * mean-grad_rk, and their average is exactly
(1/B) * sum over G_t of the per-row gradients, the gradient of one process on G_t.
With equal shards that weight is 1/K, the division the loop always made (the fast
path: same arithmetic as before, bitwise). The cost of uneven shards: the ranks with
one row more set the pace of each step, and the weight is one more multiply per
micro-step; nothing more is communicated.

This module knows the rank and world size it is given, not how they were obtained.
"""

from __future__ import annotations

import csv
import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ddp_fnn.config import ConfigError, TrainConfig
from ddp_fnn.model import FNN, he_init_


@dataclass
class Dataset:
    x: np.ndarray                 # (n, features), float; may be a read-only memmap
    y: np.ndarray                 # (n, outputs) float for regression, (n,) int64 class ids
    task: str
    identity: str                 # names the data for checkpoint fingerprints and summaries
    train_idx: np.ndarray         # row ids of the training split, int64
    eval_idx: np.ndarray          # row ids of the held-out split, int64
    mean: np.ndarray | None = None  # feature standardisation, from the training split
    std: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_outputs(self) -> int:
        """Output width the FNN needs: target columns, or class count."""
        if self.task == "classification":
            return int(self.y.max()) + 1 if len(self.y) else 0
        return int(self.y.shape[1])

    def fetch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows as float32 features and targets on ``device``; reads only those rows."""
        order = np.argsort(rows)                   # read in ascending rows: sequential on a memmap
        x = np.asarray(self.x[rows[order]], dtype=np.float32)
        y = np.asarray(self.y[rows[order]])
        if self.mean is not None:
            x = (x - self.mean) / self.std
        back = np.empty_like(order)                # then restore the sampler's order
        back[order] = np.arange(len(order))
        xt = torch.from_numpy(np.ascontiguousarray(x[back]))
        yt = torch.from_numpy(np.ascontiguousarray(y[back]))
        yt = yt.long() if self.task == "classification" else yt.float()
        return xt.to(device, non_blocking=True), yt.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------

def load_dataset(cfg: TrainConfig) -> Dataset:
    """The data `cfg` names, split and (optionally) standardised; ConfigError on bad input."""
    if cfg.data == "synthetic":
        x, y, identity = _synthetic(cfg)
    else:
        path = Path(cfg.data)
        if not path.exists():
            raise ConfigError(f"--data {cfg.data}: no such file")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            x, y = _read_csv(path, cfg.target, cfg.task)
        elif suffix == ".npz":
            x, y = _read_npz(path)
        elif suffix == ".npy" or path.is_dir():
            x, y = _read_npy_pair(path)
        else:
            raise ConfigError(f"--data {cfg.data}: unknown format {suffix!r} (use synthetic, .csv, .npz or .npy)")
        identity = _file_identity(path)
        x, y = _check_arrays(cfg, x, y)
    n = len(x)
    n_eval = int(round(n * cfg.eval_fraction))
    if n - n_eval < 1:
        raise ConfigError(f"--data {cfg.data}: {n} rows leave no training rows at --eval-fraction {cfg.eval_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).numpy()
    ds = Dataset(x=x, y=y, task=cfg.task, identity=identity,
                 train_idx=np.sort(perm[n_eval:]), eval_idx=np.sort(perm[:n_eval]))
    if cfg.standardize:
        ds.mean, ds.std = _train_moments(ds)
    return ds


def _synthetic(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """Inputs ~ N(0, 1); targets from a seeded random teacher FNN (one hidden layer of 64
    ReLU units, He init), plus Gaussian noise (regression) or argmax of its outputs
    (classification). Every rank generates the same data from the seed."""
    n_in, n_out = cfg.layers[0], cfg.layers[-1]
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.samples, n_in, generator=g)
    teacher = he_init_(FNN([n_in, 64, n_out]), seed=cfg.seed + 2)
    with torch.no_grad():
        out = torch.cat([teacher(chunk) for chunk in x.split(65536)])
    if cfg.task == "classification":
        y = out.argmax(dim=1).numpy().astype(np.int64)
    else:
        y = (out + cfg.noise * torch.randn(out.shape, generator=g)).numpy()
    identity = f"synthetic(samples={cfg.samples},in={n_in},out={n_out},task={cfg.task},noise={cfg.noise},seed={cfg.seed})"
    return x.numpy(), y, identity


def _read_csv(path: Path, target: str | None, task: str) -> tuple[np.ndarray, np.ndarray]:
    """A CSV with a header row. Features must be numbers; a classification target may
    be numbers or names (names are numbered in sorted order)."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise ConfigError(f"--data {path}: cannot read: {e.strerror}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise ConfigError(f"--data {path}: empty file (a header row is needed)")
        header = [h.strip() for h in header]
        if target is None:
            t_col = len(header) - 1
        elif target in header:
            t_col = header.index(target)
        else:
            raise ConfigError(f"--target {target!r}: no such column in {path} (columns: {', '.join(header)})")
        feats, labels = [], []
        for line_no, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ConfigError(f"--data {path}: line {line_no} has {len(row)} cells, the header has {len(header)}")
            values = []
            for col, cell in enumerate(row):
                if col == t_col:
                    continue
                try:
                    values.append(float(cell))
                except ValueError:
                    raise ConfigError(f"--data {path}: line {line_no}, column {header[col]!r}: "
                                      f"not a number: {cell!r}") from None
            feats.append(values)
            labels.append(row[t_col].strip())
    if not feats:
        raise ConfigError(f"--data {path}: no data rows")
    x = np.asarray(feats, dtype=np.float32)
    if task == "classification":
        try:
            as_num = [float(v) for v in labels]
            if any(v != int(v) or v < 0 for v in as_num):
                raise ValueError
            y = np.asarray(as_num, dtype=np.int64)
        except ValueError:
            classes = sorted(set(labels))
            y = np.asarray([classes.index(v) for v in labels], dtype=np.int64)
    else:
        y_list = []
        for line_no, v in enumerate(labels, start=2):
            try:
                y_list.append(float(v))
            except ValueError:
                raise ConfigError(f"--data {path}: line {line_no}, column {header[t_col]!r}: "
                                  f"not a number: {v!r}") from None
        y = np.asarray(y_list, dtype=np.float32)[:, None]
    return x, y


def _npy_in_zip(path: Path, member: str) -> np.ndarray:
    """Memory-map an uncompressed (np.savez) member of an .npz; load a compressed one."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(member) as f:
                return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(f"--data {path}: not a readable .npz: {e}") from None
    missing = [k for k in ("x", "y") if f"{k}.npy" not in names]
    if missing:
        raise ConfigError(f"--data {path}: .npz needs arrays 'x' and 'y', missing {', '.join(missing)}")
    try:
        return _npy_in_zip(path, "x.npy"), _npy_in_zip(path, "y.npy")
    except (ValueError, OSError) as e:
        raise ConfigError(f"--data {path}: cannot read arrays: {e}") from None


def _read_npy_pair(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """DIR (holding x.npy and y.npy), or NAME_x.npy with NAME_y.npy, or x.npy with y.npy."""
    if path.is_dir():
        xp, yp = path / "x.npy", path / "y.npy"
    elif path.name.endswith("_x.npy"):
        xp, yp = path, path.with_name(path.name[:-6] + "_y.npy")
    elif path.name == "x.npy":
        xp, yp = path, path.with_name("y.npy")
    else:
        raise ConfigError(f"--data {path}: a .npy features file must be named x.npy or NAME_x.npy "
                          "(targets in y.npy / NAME_y.npy)")
    for p in (xp, yp):
        if not p.exists():
            raise ConfigError(f"--data {path}: missing {p}")
    try:
        return np.load(xp, mmap_mode="r"), np.load(yp, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise ConfigError(f"--data {path}: cannot read arrays: {e}") from None


def _check_arrays(cfg: TrainConfig, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2:
        raise ConfigError(f"--data {cfg.data}: features must be 2-D (rows, features), got shape {x.shape}")
    if len(y) != len(x):
        raise ConfigError(f"--data {cfg.data}: {len(x)} feature rows but {len(y)} targets")
    if cfg.task == "classification":
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or (len(y) and (y.min() < 0 or not np.all(np.equal(np.mod(y, 1), 0)))):
            raise ConfigError(f"--data {cfg.data}: classification targets must be class ids 0..C-1")
        y = y.astype(np.int64)
    elif y.ndim == 1:
        y = y[:, None]
    return x, y


def _file_identity(path: Path) -> str:
    """Name, size and a hash of the first and last MiB: cheap even for a large file."""
    files = [path / "x.npy", path / "y.npy"] if path.is_dir() else [path]
    h = hashlib.sha256()
    size = 0
    for p in files:
        st = p.stat()
        size += st.st_size
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 2 << 20:
                f.seek(-(1 << 20), 2)
                h.update(f.read())
    return f"file({path.name},bytes={size},sha256-ends={h.hexdigest()[:16]})"


def _train_moments(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over the training split, in chunks (memmap-friendly)."""
    total = np.zeros(ds.n_features)
    total_sq = np.zeros(ds.n_features)
    for start in range(0, len(ds.train_idx), 65536):
        chunk = np.asarray(ds.x[ds.train_idx[start:start + 65536]], dtype=np.float64)
        total += chunk.sum(0)
        total_sq += (chunk * chunk).sum(0)
    n = len(ds.train_idx)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    std[std == 0] = 1.0                       # a constant feature stays 0 after centring
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------

class GlobalBatches:
    """Which training rows each rank uses at each (epoch, step, micro-step), and the weight
    of each micro-batch's loss; see the module doc."""

    def __init__(self, train_idx: np.ndarray, global_batch_size: int, seed: int,
                 rank: int, world_size: int, grad_accum: int):
        self.train_idx = train_idx
        self.B = global_batch_size
        self.seed = seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        parts = world_size * grad_accum
        if global_batch_size < parts:
            raise ConfigError(f"--global-batch-size {global_batch_size} is smaller than world size x grad-accum = "
                              f"{world_size} x {grad_accum} (every rank needs a row in every micro-step)")
        self.even = global_batch_size % parts == 0
        # This rank's rows per optimizer step (the first B mod N ranks take one more).
        self.rank_rows = global_batch_size // world_size + (rank < global_batch_size % world_size)
        # The micro-step sizes of this rank's shard (the first rank_rows mod K one more).
        q, extra = divmod(self.rank_rows, grad_accum)
        self.micro_sizes = [q + (k < extra) for k in range(grad_accum)]
        self.micro = global_batch_size // parts if self.even else None   # the one size, when even
        self.steps_per_epoch = len(train_idx) // global_batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f"--global-batch-size {global_batch_size} is larger than the training split "
                              f"({len(train_idx)} rows)")
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        """This epoch's order of training rows (same on every rank, like set_epoch)."""
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = self.train_idx[torch.randperm(len(self.train_idx), generator=g).numpy()]
            self._epoch = epoch
        return self._perm

    def global_batch(self, epoch: int, step_in_epoch: int) -> np.ndarray:
        return self.permutation(epoch)[step_in_epoch * self.B:(step_in_epoch + 1) * self.B]

    def rank_micro_batches(self, epoch: int, step_in_epoch: int) -> list[np.ndarray]:
        """This rank's rows for each micro-step of one optimizer step."""
        shard = self.global_batch(epoch, step_in_epoch)[self.rank::self.world_size]
        bounds = np.cumsum([0, *self.micro_sizes])
        return [shard[bounds[k]:bounds[k + 1]] for k in range(self.grad_accum)]

    def weighted(self, loss: torch.Tensor, rows: int) -> torch.Tensor:
        """A micro-batch's mean loss (over its ``rows`` rows), weighted so that the ranks'
        equally averaged gradients are the gradient of the mean loss over the global batch."""
        if self.even:
            return loss / self.grad_accum                       # the fast path: N*m/B = 1/K
        return loss * (self.world_size * rows / self.B)


def epochs_to_steps(steps_per_epoch: int, epochs: int | None, max_steps: int | None) -> int:
    """Total optimizer steps: --max-steps caps --epochs; with neither, one epoch."""
    if epochs is None and max_steps is not None:
        return max_steps
    total = steps_per_epoch * (epochs or 1)
    return min(total, max_steps) if max_steps is not None else total


def eval_shard(eval_idx: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of the held-out split (disjoint, covering it all)."""
    return eval_idx[rank::world_size]

