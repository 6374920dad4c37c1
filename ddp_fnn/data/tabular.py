"""Readers for the tabular formats that are converted into the cache (csvcache.py):
CSV with a header row, and Parquet. Each returns ``csvcache.Blocks``: float32 feature
blocks in file order, then the whole target column.

CSV is parsed by pyarrow's streaming reader (C++, multithreaded block parsing; values
parsed as float64 and then rounded to float32, exactly as ``float(cell)`` followed by
``np.asarray(..., float32)`` did, so the arrays are bitwise those of the csv-module
parser this replaced). Its grammar is a little narrower than Python's ``float()``
(no ``1_000``, no non-ASCII digits) and it has no notion of a line number, so whenever
it rejects a file, or the file holds a non-finite value, the file is read again by
``_PythonCsv``, the reference parser: it either raises the one-line error naming the
line, the column and the value, or (for a file only Python's grammar accepts) supplies
the rest of the rows itself. Errors are reported in the reference parser's order:
ragged rows and bad feature cells first, in line order, then bad targets.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from ddp_fnn.core.errors import ConfigError
from ddp_fnn.data.csvcache import Blocks

ARROW_BLOCK_BYTES = 4 << 20        # pyarrow's unit of parallel parsing
PY_BLOCK_ROWS = 65536
_F32_MAX = float(np.finfo(np.float32).max)


def _cell(path, line_no: int, column: str, cell: str) -> float:
    """One CSV cell as a finite float32-representable number, or the one-line error
    naming the file, line, column and value."""
    try:
        value = float(cell)
    except ValueError:
        raise ConfigError(f"--data {path}: line {line_no}, column {column!r}: not a number: {cell!r}") from None
    if not _finite32(value):
        raise ConfigError(f"--data {path}: line {line_no}, column {column!r}: not a finite number: {cell!r}")
    return value


def _finite32(v: float) -> bool:
    """Finite, and still finite when rounded to float32 (the arrays' dtype)."""
    if not math.isfinite(v):
        return False
    if abs(v) <= _F32_MAX:
        return True
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(v)))


def _class_ids(uniques: list[str]) -> np.ndarray:
    """Class id of each distinct (stripped) label, as the reference parser numbers them:
    the numbers themselves when every label is a non-negative integer, else the rank of
    the name in sorted order."""
    try:
        as_num = [float(v) for v in uniques]
        if any(v != int(v) or v < 0 for v in as_num):
            raise ValueError
        return np.asarray(as_num, dtype=np.int64)
    except (ValueError, OverflowError):
        classes = {v: i for i, v in enumerate(sorted(set(uniques)))}
        return np.asarray([classes[v] for v in uniques], dtype=np.int64)


# ---------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------

def _csv_header(path: Path, target: str | None) -> tuple[list[str], int]:
    try:
        f = open(path, newline="")
    except OSError as e:
        raise ConfigError(f"--data {path}: cannot read: {e.strerror}") from None
    with f:
        try:
            header = next(csv.reader(f), None)
        except UnicodeDecodeError as e:
            raise ConfigError(f"--data {path}: the header is not UTF-8 text ({e.reason})") from None
    if not header:
        raise ConfigError(f"--data {path}: empty file (a header row is needed)")
    header = [h.strip() for h in header]
    if target is None:
        return header, len(header) - 1
    if target in header:
        return header, header.index(target)
    raise ConfigError(f"--target {target!r}: no such column in {path} (columns: {', '.join(header)})")


def csv_blocks(path: Path, target: str | None, task: str) -> Blocks:
    header, t_col = _csv_header(path, target)
    reader = _ArrowCsv(path, header, t_col, task)
    y_shape = () if task == "classification" else (1,)
    return Blocks(x=reader.blocks(), n_features=len(header) - 1,
                  y_dtype="int64" if task == "classification" else "float32", y_row_shape=y_shape,
                  y=reader.targets)


class _ArrowCsv:
    def __init__(self, path: Path, header: list[str], t_col: int, task: str):
        self.path, self.header, self.t_col, self.task = path, header, t_col, task
        self.feature_cols = [c for c in range(len(header)) if c != t_col]
        self.fallback: _PythonCsv | None = None
        self.y_parts: list = []
        self.codes: list[np.ndarray] = []          # classification: label ids into self.uniques
        self.uniques: dict[str, int] = {}
        self.rows = 0

    def blocks(self) -> Iterator[np.ndarray]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        names = [f"c{i}" for i in range(len(self.header))]
        types = {n: pa.float64() for n in names}
        if self.task == "classification":
            types[names[self.t_col]] = pa.string()
        try:
            stream = pacsv.open_csv(
                self.path,
                read_options=pacsv.ReadOptions(skip_rows=1, column_names=names, block_size=ARROW_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=pacsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                                     quoted_strings_can_be_null=False))
            for batch in stream:
                # A value beyond float32's range becomes inf here and is reported below.
                with np.errstate(over="ignore"):
                    x = self._convert(batch)
                if not np.isfinite(x).all():
                    raise _NeedsReference
                self.rows += len(x)
                yield x
            if self.task != "classification" and self.y_parts:
                y = np.concatenate(self.y_parts)
                if not np.isfinite(y).all():
                    raise _NeedsReference
        except (pa.ArrowInvalid, _NeedsReference):
            # The reference parser raises the precise error, or reads what pyarrow could not.
            self.fallback = _PythonCsv(self.path, self.header, self.t_col, self.task)
            yield from self.fallback.blocks(skip=self.rows)
            return
        if self.rows == 0:
            raise ConfigError(f"--data {self.path}: no data rows")

    def _convert(self, batch) -> np.ndarray:
        """One record batch's features as float32 (its targets are kept aside)."""
        x = np.empty((batch.num_rows, len(self.feature_cols)), dtype=np.float32)
        for j, c in enumerate(self.feature_cols):
            x[:, j] = batch.column(c).to_numpy()         # float64 -> float32, round to nearest
        self._keep_targets(batch.column(self.t_col))
        return x

    def _keep_targets(self, col) -> None:
        if self.task != "classification":
            self.y_parts.append(col.to_numpy().astype(np.float32))
            return
        import pyarrow.compute as pc
        enc = pc.dictionary_encode(col)
        local = [self.uniques.setdefault(s, len(self.uniques)) for s in enc.dictionary.to_pylist()]
        self.codes.append(np.asarray(local, dtype=np.int64)[enc.indices.to_numpy()])

    def targets(self) -> np.ndarray:
        if self.fallback is not None:
            return self.fallback.targets()
        if self.task != "classification":
            return np.concatenate(self.y_parts)[:, None]
        uniques = [s.strip() for s in self.uniques]            # insertion order = id order
        return _class_ids(uniques)[np.concatenate(self.codes)]


class _NeedsReference(Exception):
    """pyarrow read the file, but it holds a value the reference parser must name."""


class _PythonCsv:
    """The reference parser (the csv module and ``float()``), streaming: it keeps the
    current block of features and the target strings, not a list of every row."""

    def __init__(self, path: Path, header: list[str], t_col: int, task: str):
        self.path, self.header, self.t_col, self.task = path, header, t_col, task
        self.labels: list[str] = []
        self.label_lines: list[int] = []

    def blocks(self, skip: int = 0) -> Iterator[np.ndarray]:
        """Feature blocks of every row after the first ``skip`` (all rows are checked)."""
        path, header, t_col = self.path, self.header, self.t_col
        width = len(header)
        buf: list[list[float]] = []
        seen = 0
        try:
            with open(path, newline="") as f:
                reader = csv.reader(f)
                next(reader, None)
                for line_no, row in enumerate(reader, start=2):
                    if not row or all(not c.strip() for c in row):
                        continue
                    if len(row) != width:
                        raise ConfigError(f"--data {path}: line {line_no} has {len(row)} cells, "
                                          f"the header has {width}")
                    values = []
                    for col, cell in enumerate(row):
                        if col == t_col:
                            continue
                        values.append(_cell(path, line_no, header[col], cell))
                    self.labels.append(row[t_col].strip())
                    self.label_lines.append(line_no)
                    seen += 1
                    if seen > skip:
                        buf.append(values)
                        if len(buf) == PY_BLOCK_ROWS:
                            yield np.asarray(buf, dtype=np.float32)
                            buf = []
        except UnicodeDecodeError as e:
            raise ConfigError(f"--data {path}: not UTF-8 text ({e.reason} at byte {e.start} of a chunk)") from None
        if not self.labels:
            raise ConfigError(f"--data {path}: no data rows")
        y = self._parse_targets()
        if buf:
            yield np.asarray(buf, dtype=np.float32)
        self.y = y

    def _parse_targets(self) -> np.ndarray:
        if self.task == "classification":
            uniques = list(dict.fromkeys(self.labels))
            ids = dict(zip(uniques, _class_ids(uniques).tolist()))
            return np.asarray([ids[v] for v in self.labels], dtype=np.int64)
        out = np.empty((len(self.labels), 1), dtype=np.float32)
        name = self.header[self.t_col]
        for i, (line_no, v) in enumerate(zip(self.label_lines, self.labels)):
            out[i, 0] = _cell(self.path, line_no, name, v)
        return out

    def targets(self) -> np.ndarray:
        return self.y


# ---------------------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------------------

def parquet_blocks(path: Path, target: str | None, task: str) -> Blocks:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"--data {path}: not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    if not names:
        raise ConfigError(f"--data {path}: no columns")
    t = names[-1] if target is None else target
    if t not in names:
        raise ConfigError(f"--target {target!r}: no such column in {path} (columns: {', '.join(names)})")
    feats = [n for n in names if n != t]
    for n in feats:
        kind = pf.schema_arrow.field(n).type
        if not (pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            raise ConfigError(f"--data {path}: column {n!r} holds {kind}, not numbers")

    def blocks() -> Iterator[np.ndarray]:
        start = 0
        for batch in pf.iter_batches(batch_size=PY_BLOCK_ROWS, columns=feats):
            x = np.empty((batch.num_rows, len(feats)), dtype=np.float32)
            for j, n in enumerate(feats):
                col = batch.column(j)
                if col.null_count:
                    row = start + int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]) + 1
                    raise ConfigError(f"--data {path}: row {row}, column {n!r}: missing value")
                x[:, j] = col.to_numpy(zero_copy_only=False)
                bad = np.flatnonzero(~np.isfinite(x[:, j]))
                if len(bad):
                    value = col[int(bad[0])].as_py()
                    raise ConfigError(f"--data {path}: row {start + int(bad[0]) + 1}, column {n!r}: "
                                      f"not a finite number: {value!r}")
            start += len(x)
            yield x
        if start == 0:
            raise ConfigError(f"--data {path}: no data rows")

    def targets() -> np.ndarray:
        col = pf.read(columns=[t]).column(0).combine_chunks()
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0]) + 1
            raise ConfigError(f"--data {path}: row {row}, column {t!r}: missing value")
        if task == "classification":
            import pyarrow.compute as pc
            enc = pc.dictionary_encode(col.cast(pa.string()))
            uniques = [s.strip() for s in enc.dictionary.to_pylist()]
            return _class_ids(uniques)[enc.indices.to_numpy()]
        if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
            raise ConfigError(f"--data {path}: target column {t!r} holds {col.type}, not numbers")
        y = col.to_numpy(zero_copy_only=False).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(y))
        if len(bad):
            raise ConfigError(f"--data {path}: row {int(bad[0]) + 1}, column {t!r}: "
                              f"not a finite number: {col[int(bad[0])].as_py()!r}")
        return y[:, None]

    return Blocks(x=blocks(), n_features=len(feats), y_dtype="int64" if task == "classification" else "float32",
                  y_row_shape=() if task == "classification" else (1,), y=targets)
