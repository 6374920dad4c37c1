"""The binary cache a CSV or Parquet data set is converted into, once per node.

Parsing text is the slow part of loading, and every rank of every run would repeat it.
So the first process to need a file converts it into two ``.npy`` files (features
float32 (n, d); targets float32 (n, k) or int64 class ids (n,)) which every rank then
memory-maps. The entry lives in ``--cache-dir`` or, by default, in
``.ddp-fnn-cache/`` beside the file, one directory per source path::

    <root>/<file name>-<sha256(absolute path)[:8]>/
        lock             flock(2)ed while the entry is checked and (re)built
        meta.json        what the arrays were built from; written last, by rename
        x-<build>.npy    the arrays meta.json names (older builds are deleted)
        y-<build>.npy

Who builds, who waits. The data is loaded before the process group exists (and a
second job may read the same file at the same time), so the wait is a file lock, not
a collective: every process takes ``flock(LOCK_EX)`` on ``lock``, checks the entry,
builds it if it is missing or wrong, and lets go. The first to get the lock (on one
node usually local rank 0) builds; the others block in the kernel until it is done,
then find a good entry and map it. Nothing polls or sleeps; a builder that dies drops
its lock with its file descriptors, and the next process builds instead; it works
without torch.distributed and across independent runs. (On a shared file system flock
is only as good as the file system's locking: NFSv4 has it; give each node its own
``--cache-dir`` where it does not.)

Identity. An entry is used only when meta.json's ``source`` equals the file's identity
now: its size, its mtime (nanoseconds) and a SHA-256 of its first and last MiB and of
32 blocks of 64 KiB spaced evenly between (at most 4 MiB read, however big the file),
plus the settings the arrays depend on (target column, task, format version). Any
change of size or mtime, which is what an edit or a copy makes, forces a rebuild; the
sampled hash catches a same-size rewrite with a preserved mtime in the sampled blocks.

Never half-written, never trained on when wrong. The arrays are written under
temporary names, fsynced, renamed, and only then is meta.json replaced (rename is
atomic), so a reader sees the old entry or the new one. Each load checks meta.json
parses, the files exist with exactly the size the shape implies, their .npy headers
say that shape and dtype, and a sampled SHA-256 of each (same scheme, over the cache
file) matches the one recorded at build time. A failed check is reported on stderr
and the entry rebuilt. What this cannot see: a flipped byte outside the sampled blocks
of the cache file, which only a full read (the cost of a rebuild) would find.

A file that fails to parse is recorded too (``error`` in meta.json, keyed by the same
identity), so the other ranks report the same one-line error without parsing again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ddp_fnn.core import fileio
from ddp_fnn.core.errors import ConfigError

FORMAT = 1                    # bump when the arrays' meaning or layout changes
HEADER_BYTES = 128            # fixed .npy header: the row count is written after the rows
_HEAD = 1 << 20               # bytes hashed at each end of the source
_BLOCKS, _BLOCK = 32, 64 << 10


# ---------------------------------------------------------------------------------------
# identity
# ---------------------------------------------------------------------------------------

def sampled_sha256(path: Path, head: int = _HEAD) -> str:
    """SHA-256 of the first and last ``head`` bytes and 32 evenly spaced 64 KiB blocks."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 2 * head + _BLOCKS * _BLOCK:
            h.update(f.read())
            return h.hexdigest()
        h.update(f.read(head))
        span = size - 2 * head - _BLOCK
        for i in range(_BLOCKS):
            f.seek(head + span * i // (_BLOCKS - 1))
            h.update(f.read(_BLOCK))
        f.seek(size - head)
        h.update(f.read(head))
    return h.hexdigest()


def source_identity(path: Path, settings: dict) -> dict:
    st = path.stat()
    return {"format": FORMAT, "path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256_sampled": sampled_sha256(path), **settings}


def entry_dir(path: Path, cache_dir: Path | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else path.resolve().parent / ".ddp-fnn-cache"
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return root / f"{path.name}-{tag}"


# ---------------------------------------------------------------------------------------
# writing: rows are appended in blocks; the header (with the row count) goes in last
# ---------------------------------------------------------------------------------------

def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header padded to exactly HEADER_BYTES (numpy reads any padding)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(shape)}).encode("latin1")
    pad = HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little") + text + b" " * pad + b"\n"


class _ArrayFile:
    """A .npy file written row block by row block."""

    def __init__(self, path: Path):
        self.path, self.rows, self.dtype, self.row_shape = path, 0, None, None
        self.f = open(path, "wb")
        self.f.write(b"\0" * HEADER_BYTES)

    def append(self, block: np.ndarray) -> None:
        if self.dtype is None:
            self.dtype, self.row_shape = block.dtype, block.shape[1:]
        self.f.write(np.ascontiguousarray(block, dtype=self.dtype).data)
        self.rows += len(block)

    def close(self, default_dtype, default_row_shape) -> tuple[int, ...]:
        dtype = self.dtype if self.dtype is not None else np.dtype(default_dtype)
        shape = (self.rows, *(self.row_shape if self.row_shape is not None else default_row_shape))
        self.f.seek(0)
        self.f.write(npy_header(dtype, shape))
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.dtype = dtype
        return shape


@dataclass
class Blocks:
    """What a reader hands the cache: feature blocks in row order, then the targets
    (one column: held whole while building, a few percent of the features' bytes)."""
    x: Iterator[np.ndarray]                      # float32 (r, d) blocks
    n_features: int
    y_dtype: str                                 # "float32" or "int64"
    y_row_shape: tuple[int, ...]                 # (1,) regression, () class ids
    y: Callable[[], np.ndarray]                  # called once x is exhausted


# ---------------------------------------------------------------------------------------
# the entry: check, build, map
# ---------------------------------------------------------------------------------------

@dataclass
class Cached:
    x: np.ndarray           # read-only memmaps
    y: np.ndarray
    entry: Path
    built: bool             # this process built it (False: it was reused)


def load(path: Path, cache_dir: Path | None, settings: dict, reader: Callable[[], Blocks]) -> Cached:
    """The cached arrays of ``path``, building them with ``reader`` if the entry is
    missing, stale or corrupt. ConfigError for an unreadable source or cache location."""
    entry = entry_dir(path, cache_dir)
    identity = source_identity(path, settings)
    found, why = _check(entry, identity)
    if found is not None:
        return Cached(*found, entry=entry, built=False)
    try:
        entry.mkdir(parents=True, exist_ok=True)
        lock = open(entry / "lock", "a+b")
    except OSError as e:
        where = "--cache-dir" if cache_dir is not None else f"the cache beside it ({entry.parent}; or pass --cache-dir)"
        raise ConfigError(f"--data {path}: cannot write {where}: {e.strerror}") from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)    # blocks until the builder, if any, is done
        found, why = _check(entry, identity)
        if found is not None:
            return Cached(*found, entry=entry, built=False)
        if why not in ("no cache yet",):
            sys.stderr.write(f"ddp-fnn: note: rebuilding the data cache {entry}: {why}\n")
        _build(entry, identity, reader)
        found, why = _check(entry, identity)
        if found is None:
            raise ConfigError(f"--data {path}: the cache just built in {entry} does not check out: {why}")
        return Cached(*found, entry=entry, built=True)


def _check(entry: Path, identity: dict) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """((x, y), "") for a good entry; (None, why) otherwise. Raises the recorded
    ConfigError of a source that failed to parse."""
    meta_path = entry / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return None, "no cache yet"
    except (OSError, ValueError) as e:
        return None, f"meta.json unreadable ({e})"
    if not isinstance(meta, dict) or meta.get("source") != identity:
        return None, "the data file or the settings changed since it was built"
    if "error" in meta:
        raise ConfigError(meta["error"])
    arrays = []
    try:
        for name in ("x", "y"):
            spec = meta["arrays"][name]
            p = entry / spec["file"]
            shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
            expected = HEADER_BYTES + int(np.prod(shape)) * dtype.itemsize
            if not p.exists():
                return None, f"{spec['file']} is missing"
            if p.stat().st_size != expected:
                return None, f"{spec['file']} has {p.stat().st_size} bytes, its shape needs {expected}"
            if sampled_sha256(p, head=64 << 10) != spec["sha256_sampled"]:
                return None, f"{spec['file']}'s content does not match its recorded hash"
            a = np.load(p, mmap_mode="r")
            if a.shape != shape or a.dtype != dtype:
                return None, f"{spec['file']}'s header says {a.dtype}{a.shape}, meta.json {dtype}{shape}"
            arrays.append(a)
    except (KeyError, TypeError, ValueError, OSError) as e:
        return None, f"entry unreadable ({type(e).__name__}: {e})"
    if len(arrays[0]) != len(arrays[1]):
        return None, "features and targets have different row counts"
    return (arrays[0], arrays[1]), ""


def _build(entry: Path, identity: dict, reader: Callable[[], Blocks]) -> None:
    build = uuid.uuid4().hex[:12]
    files = {k: entry / f"{k}-{build}.npy" for k in ("x", "y")}
    tmp = {k: p.with_suffix(".npy.tmp") for k, p in files.items()}
    out: dict[str, _ArrayFile] = {}
    try:
        try:
            blocks = reader()
            out = {k: _ArrayFile(p) for k, p in tmp.items()}
            for xb in blocks.x:
                out["x"].append(xb)
            y = blocks.y()
            if len(y) != out["x"].rows:
                raise RuntimeError(f"reader gave {out['x'].rows} feature rows but {len(y)} targets")
            if len(y):
                out["y"].append(np.asarray(y, dtype=blocks.y_dtype))
            shapes = {"x": out["x"].close(np.float32, (blocks.n_features,)),
                      "y": out["y"].close(blocks.y_dtype, blocks.y_row_shape)}
        except ConfigError as e:
            _write_meta(entry, {"source": identity, "error": str(e)})
            raise
        arrays = {}
        for k in ("x", "y"):
            os.replace(tmp[k], files[k])
            arrays[k] = {"file": files[k].name, "shape": list(shapes[k]), "dtype": str(out[k].dtype),
                         "sha256_sampled": sampled_sha256(files[k], head=64 << 10)}
        _write_meta(entry, {"source": identity, "arrays": arrays})
    finally:
        for a in out.values():
            a.f.close()
        for p in tmp.values():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    keep = {p.name for p in files.values()}
    for old in entry.glob("[xy]-*.npy*"):      # earlier builds (a mapped one lives on until unmapped)
        if old.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()


def _write_meta(entry: Path, meta: dict) -> None:
    fileio.atomic_write(entry / "meta.json", json.dumps(meta, indent=1, allow_nan=False) + "\n")
