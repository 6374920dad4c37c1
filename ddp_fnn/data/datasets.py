"""Datasets and sharding.

A ``Dataset`` holds features ``x`` (n, features) and targets ``y`` as numpy arrays,
memory-mapped for every file format (not synthetic data or a compressed .npz), so
that a worker reads only the rows of its own shard from a large file. .npy pairs, a
directory of .npy shards and uncompressed .npz are mapped as they are; CSV and
Parquet are converted once per node into a binary cache (csvcache.py, tabular.py)
that is mapped. A rank keeps resident only what it touches: for a mapped data set
larger than RESIDENT_BUDGET, ``fetch`` reads DROP_EVERY_ROWS rows at a time and hands
their pages back to the page cache after each piece (one page fault maps far more
than the row it reads, up to a whole large folio: 170 KiB a row measured on Linux
6.18, so reading a shard at random would map the whole file within an epoch), and
the standardisation moments are one streaming pass in 65536-row chunks
(docs/data.md). The data set is split once, by the seed, into a training part and a
held-out evaluation part.

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

import hashlib
import mmap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddp_fnn.data import csvcache
from ddp_fnn.data import tabular
from ddp_fnn.config import ConfigError, DataConfig, ModelConfig, micro_batch_range
from ddp_fnn.model import FNN, he_init_

RESIDENT_BUDGET = 64 << 20     # a mapped data set larger than this is not left resident
DROP_EVERY_ROWS = 64           # rows fetch reads between hand-backs of the mapped pages


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
    _drops: bool | None = field(default=None, repr=False)   # fetch hands pages back (decided once)

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
        """The rows as float32 features and targets on ``device``; reads only those rows.
        A mapped data set larger than RESIDENT_BUDGET is read DROP_EVERY_ROWS rows at a
        time, its pages handed back after each piece (see the module doc)."""
        order = np.argsort(rows)                   # read in ascending rows: sequential on a memmap
        idx = rows[order]
        if self._drops is None:
            self._drops = _nbytes(self.x) + _nbytes(self.y) > RESIDENT_BUDGET and _is_mapped(self.x, self.y)
            if self._drops:
                # No readahead on a fault: a random row would otherwise bring in up to a
                # large folio from storage, and with the page cache under pressure every
                # fetch reads it again (measured: 59 GB read per rank of a 3 GiB file).
                advise_pages(mmap.MADV_RANDOM, self.x, self.y)
        step = DROP_EVERY_ROWS if self._drops else max(len(idx), 1)
        xs, ys = [], []
        for i in range(0, len(idx), step):
            xs.append(np.asarray(self.x[idx[i:i + step]], dtype=np.float32))
            ys.append(np.asarray(self.y[idx[i:i + step]]))
            if self._drops:
                drop_pages(self.x, self.y)
        x = xs[0] if len(xs) == 1 else np.concatenate(xs) if xs else np.asarray(self.x[idx], dtype=np.float32)
        y = ys[0] if len(ys) == 1 else np.concatenate(ys) if ys else np.asarray(self.y[idx])
        if self.mean is not None:
            x = (x - self.mean) / self.std
        back = np.empty_like(order)                # then restore the sampler's order
        back[order] = np.arange(len(order))
        xt = torch.from_numpy(np.ascontiguousarray(x[back]))
        yt = torch.from_numpy(np.ascontiguousarray(y[back]))
        yt = yt.long() if self.task == "classification" else yt.float()
        return xt.to(device, non_blocking=True), yt.to(device, non_blocking=True)


def _nbytes(a) -> int:
    return int(np.prod(a.shape)) * a.dtype.itemsize


def _is_mapped(*arrays) -> bool:
    return any(getattr(m, "_mmap", None) is not None
               for a in arrays for m in (a.parts if isinstance(a, ShardedRows) else [a]))


def drop_pages(*arrays) -> None:
    """Unmap the pages of memory-mapped ``arrays`` from this process (madvise DONTNEED):
    its resident memory falls back, the data stays in the shared page cache, and the
    next read maps it again. Arrays in memory are left alone."""
    advise_pages(mmap.MADV_DONTNEED, *arrays)


def advise_pages(advice: int, *arrays) -> None:
    for a in arrays:
        for m in (a.parts if isinstance(a, ShardedRows) else [a]):
            mm = getattr(m, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise"):
                mm.madvise(advice)


class ShardedRows:
    """Memory-mapped arrays of equal row width, concatenated by rows without a copy:
    ``rows[i]`` indexing reads each part's rows from that part."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        part = np.searchsorted(self.starts, rows, side="right") - 1
        for k in np.unique(part):
            sel = part == k
            out[sel] = self.parts[k][rows[sel] - self.starts[k]]
        return out

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate(self.parts)
        return a if dtype is None else a.astype(dtype)


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------

def load_dataset(data: DataConfig, model: ModelConfig, seed: int) -> Dataset:
    """The data `data` names, split and (optionally) standardised; ConfigError on bad input."""
    if data.data == "synthetic":
        x, y, identity = _synthetic(data, model, seed)
    else:
        path = Path(data.data)
        if not path.exists():
            raise ConfigError(f"--data {data.data}: no such file")
        suffix = path.suffix.lower()
        files = [path]
        if suffix in (".csv", ".parquet", ".pq"):
            x, y = _read_cached(data, model.task, path, suffix)
        elif suffix == ".npz":
            x, y = _read_npz(path)
        elif path.is_dir() and not (path / "x.npy").exists():
            x, y, files = _read_npy_shards(path)
        elif suffix == ".npy" or path.is_dir():
            x, y = _read_npy_pair(path)
        else:
            raise ConfigError(f"--data {data.data}: unknown format {suffix!r} "
                              "(use synthetic, .csv, .parquet, .npz, .npy or a directory of .npy shards)")
        identity = _file_identity(path, files)
        x, y = _check_arrays(data.data, model.task, x, y)
    n = len(x)
    n_eval = int(round(n * data.eval_fraction))
    if n - n_eval < 1:
        raise ConfigError(f"--data {data.data}: {n} rows leave no training rows at --eval-fraction {data.eval_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    held_out = np.zeros(n, dtype=bool)        # sorted row ids of each part, in O(n) (not a sort)
    held_out[perm[:n_eval]] = True
    ds = Dataset(x=x, y=y, task=model.task, identity=identity,
                 train_idx=np.flatnonzero(~held_out), eval_idx=np.flatnonzero(held_out))
    if data.standardize:
        ds.mean, ds.std = _train_moments(ds)
    return ds


def _synthetic(data: DataConfig, model: ModelConfig, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Inputs ~ N(0, 1); targets from a seeded random teacher FNN (one hidden layer of 64
    ReLU units, He init), plus Gaussian noise (regression) or argmax of its outputs
    (classification). Every rank generates the same data from the seed."""
    n_in, n_out = model.layers[0], model.layers[-1]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(data.samples, n_in, generator=g)
    teacher = he_init_(FNN([n_in, 64, n_out]), seed=seed + 2)
    with torch.no_grad():
        out = torch.cat([teacher(chunk) for chunk in x.split(65536)])
    if model.task == "classification":
        y = out.argmax(dim=1).numpy().astype(np.int64)
    else:
        y = (out + data.noise * torch.randn(out.shape, generator=g)).numpy()
    identity = f"synthetic(samples={data.samples},in={n_in},out={n_out},task={model.task},noise={data.noise},seed={seed})"
    return x.numpy(), y, identity


def _read_cached(data: DataConfig, task: str, path: Path, suffix: str) -> tuple[np.ndarray, np.ndarray]:
    """CSV or Parquet, through the once-per-node binary cache (csvcache.py)."""
    if suffix == ".csv":
        reader = lambda: tabular.csv_blocks(path, data.target, task)          # noqa: E731
    else:
        reader = lambda: tabular.parquet_blocks(path, data.target, task)      # noqa: E731
    settings = {"reader": suffix.lstrip("."), "target": data.target, "task": task}
    cached = csvcache.load(path, data.cache_dir, settings, reader)
    return cached.x, cached.y


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


def _read_npy_shards(path: Path) -> tuple[ShardedRows, np.ndarray, list[Path]]:
    """DIR holding PART_x.npy with PART_y.npy pairs, concatenated in the sorted order of
    PART (zero-pad the numbers). Features stay mapped; targets are joined in memory."""
    xs = sorted(path.glob("*_x.npy"))
    if not xs:
        raise ConfigError(f"--data {path}: a directory needs x.npy and y.npy, or shards PART_x.npy with PART_y.npy")
    files, xparts, yparts = [], [], []
    for xp in xs:
        yp = xp.with_name(xp.name[:-6] + "_y.npy")
        if not yp.exists():
            raise ConfigError(f"--data {path}: shard {xp.name} has no {yp.name}")
        try:
            x, y = np.load(xp, mmap_mode="r"), np.load(yp, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise ConfigError(f"--data {path}: cannot read shard {xp.name}: {e}") from None
        first = xparts[0] if xparts else x
        if x.ndim != 2 or (x.shape[1], x.dtype) != (first.shape[1], first.dtype):
            raise ConfigError(f"--data {path}: shard {xp.name} holds {x.dtype} {x.shape}; every shard needs "
                              f"2-D features of the first's width and dtype ({first.dtype}, {first.shape[1:]})")
        if len(y) != len(x):
            raise ConfigError(f"--data {path}: shard {xp.name} has {len(x)} rows but {yp.name} {len(y)}")
        files += [xp, yp]
        xparts.append(x)
        yparts.append(y)
    return ShardedRows(xparts), np.concatenate(yparts), files


def _check_arrays(source: str, task: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim != 2:
        raise ConfigError(f"--data {source}: features must be 2-D (rows, features), got shape {x.shape}")
    if len(y) != len(x):
        raise ConfigError(f"--data {source}: {len(x)} feature rows but {len(y)} targets")
    if task == "classification":
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or (len(y) and (y.min() < 0 or not np.all(np.equal(np.mod(y, 1), 0)))):
            raise ConfigError(f"--data {source}: classification targets must be class ids 0..C-1")
        y = y.astype(np.int64, copy=False)
    elif y.ndim == 1:
        y = y[:, None]
    return x, y


def _file_identity(path: Path, files: list[Path]) -> str:
    """Name, size and a hash of the first and last MiB of each file: cheap even for a
    large file. (Checkpoints are fingerprinted with it: keep it stable.)"""
    if path.is_dir() and (path / "x.npy").exists():
        files = [path / "x.npy", path / "y.npy"]
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
        drop_pages(ds.x)                      # one streaming pass: nothing stays resident
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
        micro_batch_range(global_batch_size, world_size, grad_accum)      # ConfigError if a rank gets none
        parts = world_size * grad_accum
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

