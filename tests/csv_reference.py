"""The CSV parser ddp-fnn used before the binary cache, verbatim (csv module and
float(), one Python float per cell): the witness the new reader's arrays are compared
with, bit for bit."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ddp_fnn.config import ConfigError


def read_csv(path: Path, target: str | None, task: str) -> tuple[np.ndarray, np.ndarray]:
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
