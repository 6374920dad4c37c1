"""CSV and Parquet through the binary cache: the arrays are bitwise the old parser's,
bad input still names its line and column, and a cache that is stale or corrupt is
rebuilt, never used."""

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli, dataset_of
from csv_reference import read_csv as reference_read_csv
from ddp_fnn.data import csvcache
from ddp_fnn.data import tabular
from ddp_fnn.config import ConfigError, TrainConfig
from ddp_fnn.data import datasets as data_module
from ddp_fnn.data.datasets import ShardedRows

BREAST = REPO / "tests" / "data" / "breast_cancer.csv"


def load(path, **kw):
    kw.setdefault("layers", "2,4,1")
    return dataset_of(TrainConfig.of(data=str(path), eval_fraction=0.0, **kw))


def tricky_csv(path: Path, rows: int = 3000, seed: int = 0, labels=None) -> Path:
    """Decimals with up to 17 significant digits (where rounding to float64 and then to
    float32 differs from rounding straight to float32), exponents, signs, quotes,
    padding, CRLF line ends and blank lines."""
    rng = np.random.default_rng(seed)
    out = ["a, b ,c,target"]
    for i in range(rows):
        v = rng.standard_normal(3) * 10.0 ** rng.integers(-8, 8, 3)
        cells = [repr(float(v[0])), f"{v[1]:.9e}", f" {np.float32(v[2])} "]
        if i % 7 == 0:
            cells[0] = f'"{cells[0]}"'
        if i % 11 == 0:
            cells[1] = cells[1] if cells[1].startswith("-") else "+" + cells[1]
        label = labels[i % len(labels)] if labels else repr(float(rng.standard_normal()))
        out.append(",".join(cells + [label]))
        if i % 500 == 0:
            out.append("")
    path.write_bytes(("\r\n".join(out) + "\r\n").encode())
    return path


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------
# equivalence with the parser this replaced
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("labels,task", [
    (None, "regression"),
    (["3", "0", "1.0", " 2"], "classification"),          # numbers: used as class ids
    (["cat", " dog", "ant", "cat "], "classification"),   # names: numbered in sorted order
])
def test_csv_arrays_are_bitwise_the_old_parsers(tmp_path, monkeypatch, labels, task):
    monkeypatch.setattr(tabular, "ARROW_BLOCK_BYTES", 16 << 10)     # many blocks
    f = tricky_csv(tmp_path / "d.csv", labels=labels)
    ref_x, ref_y = reference_read_csv(f, None, task)
    ds = load(f, task=task, layers="3,4,4" if task == "classification" else "3,4,1")
    assert len(ds.x) == 3000
    assert same_bits(ds.x, ref_x) and same_bits(ds.y, ref_y)


def test_breast_cancer_csv_is_bitwise_the_old_parsers():
    ref_x, ref_y = reference_read_csv(BREAST, None, "classification")
    ds = load(BREAST, task="classification", layers="30,4,2", cache_dir=None)
    assert same_bits(ds.x, ref_x) and same_bits(ds.y, ref_y)


def test_a_file_only_pythons_float_accepts_is_read_by_the_reference_parser(tmp_path, monkeypatch):
    monkeypatch.setattr(tabular, "ARROW_BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(tabular, "PY_BLOCK_ROWS", 100)
    f = tricky_csv(tmp_path / "d.csv")
    text = f.read_text().splitlines()
    text[2500] = "1_000,2,3,4"                # pyarrow: invalid; float(): 1000.0
    text.insert(2600, " , ,, ")               # blank cells: the old parser skipped the row
    f.write_text("\n".join(text) + "\n")
    ref_x, ref_y = reference_read_csv(f, None, "regression")
    ds = load(f, layers="3,4,1")
    assert same_bits(ds.x, ref_x) and same_bits(ds.y, ref_y)


def test_training_on_a_csv_is_bitwise_training_on_the_old_parsers_arrays(tmp_path):
    """The trained model from the CSV equals the one trained on the reference parser's
    arrays saved as .npy (a path this change leaves as it was)."""
    x, y = reference_read_csv(BREAST, None, "classification")
    np.save(tmp_path / "ref_x.npy", x)
    np.save(tmp_path / "ref_y.npy", y)
    common = ("--layers", "30,16,2", "--task", "classification", "--global-batch-size", "32", "--epochs", "2",
              "--standardize", "--metrics-port", "0", "--progress", "none", "--no-probe")
    a = run_cli("train", "--data", str(BREAST), "--cache-dir", str(tmp_path / "cache"), *common,
                "--output", str(tmp_path / "a"))
    b = run_cli("train", "--data", str(tmp_path / "ref_x.npy"), *common, "--output", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ma = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    mb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert sa["final_train_loss"] == sb["final_train_loss"] and sa["eval_loss"] == sb["eval_loss"]


# ---------------------------------------------------------------------------------------
# bad input: one line, with the line and the column
# ---------------------------------------------------------------------------------------

def with_row(tmp_path, line: int, row: str, rows: int = 3000) -> Path:
    f = tricky_csv(tmp_path / "d.csv", rows=rows)
    text = f.read_text().splitlines()
    text[line - 1] = row
    f.write_text("\n".join(text) + "\n")
    return f


@pytest.mark.parametrize("row,match", [
    ("1,x,3,4", r"line 2345, column 'b': not a number: 'x'"),
    ("1,,3,4", r"line 2345, column 'b': not a number: ''"),
    ("1,2,3", r"line 2345 has 3 cells, the header has 4"),
    ("1,2,3,4,5", r"line 2345 has 5 cells, the header has 4"),
    ("1,nan,3,4", r"line 2345, column 'b': not a finite number: 'nan'"),
    ("-inf,2,3,4", r"line 2345, column 'a': not a finite number: '-inf'"),
    ("1,2,1e39,4", r"line 2345, column 'c': not a finite number: '1e39'"),   # overflows float32
    ("1,2,3,oops", r"line 2345, column 'target': not a number: 'oops'"),
    ("1,2,3,Infinity", r"line 2345, column 'target': not a finite number: 'Infinity'"),
])
def test_bad_cells_deep_in_a_big_csv_name_line_column_and_value(tmp_path, monkeypatch, row, match):
    monkeypatch.setattr(tabular, "ARROW_BLOCK_BYTES", 16 << 10)
    f = with_row(tmp_path, 2345, row)
    with pytest.raises(ConfigError, match=match) as e:
        load(f, layers="3,4,1")
    assert str(e.value).startswith(f"--data {f}: ") and "\n" not in str(e.value)


def test_a_bad_file_fails_the_same_way_for_every_later_rank_without_a_cache(tmp_path):
    f = with_row(tmp_path, 20, "1,x,3,4", rows=50)
    for _ in range(2):
        with pytest.raises(ConfigError, match="line 20, column 'b': not a number: 'x'"):
            load(f, layers="3,4,1")
    assert not list((tmp_path / ".ddp-fnn-cache").glob("*/[xy]-*.npy"))    # nothing to train on
    f.write_text(f.read_text().replace("1,x,3,4", "1,2,3,4"))               # fixed: now it loads
    assert len(load(f, layers="3,4,1").x) == 50


def test_cli_reports_a_bad_csv_cell_in_one_line_with_exit_status_2(tmp_path):
    f = with_row(tmp_path, 7, "1,2,nan,4", rows=20)
    r = run_cli("train", "--data", str(f), "--layers", "3,4,1", "--metrics-port", "0", "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"ddp-fnn: error: --data {f}: line 7, column 'c': "
                                             "not a finite number: 'nan'"]


# ---------------------------------------------------------------------------------------
# the cache: reused, and rebuilt when stale or corrupt
# ---------------------------------------------------------------------------------------

def cached(f, cache_dir=None):
    return csvcache.load(f, cache_dir, {"reader": "csv", "target": None, "task": "regression"},
                         lambda: tabular.csv_blocks(f, None, "regression"))


def test_second_load_reuses_the_cache_beside_the_file_or_in_cache_dir(tmp_path):
    f = tricky_csv(tmp_path / "d.csv", rows=200)
    first, again = cached(f), cached(f)
    assert first.built and not again.built and first.entry.parent == tmp_path / ".ddp-fnn-cache"
    assert isinstance(again.x, np.memmap) and same_bits(first.x, again.x)
    elsewhere = cached(f, tmp_path / "elsewhere")
    assert elsewhere.built and elsewhere.entry.parent == tmp_path / "elsewhere"


def test_an_edited_csv_is_parsed_again(tmp_path):
    f = tricky_csv(tmp_path / "d.csv", rows=200)
    cached(f)
    stat = f.stat()
    lines = f.read_text().splitlines()
    lines[5] = "9,9,9,9"
    f.write_text("\n".join(lines) + "\n")
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))       # even with the old mtime
    c = cached(f)
    assert c.built and c.x[3].tolist() == [9.0, 9.0, 9.0]
    assert len(list(c.entry.glob("[xy]-*.npy"))) == 2         # the older build is gone


def corrupt_truncate(entry):
    x = next(entry.glob("x-*.npy"))
    with open(x, "r+b") as fh:
        fh.truncate(x.stat().st_size - 4)


def corrupt_flip(entry):
    x = next(entry.glob("x-*.npy"))
    with open(x, "r+b") as fh:
        fh.seek(csvcache.HEADER_BYTES + 100)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0x40]))


def corrupt_meta(entry):
    (entry / "meta.json").write_text('{"source": ')


def corrupt_missing(entry):
    next(entry.glob("y-*.npy")).unlink()


def corrupt_header(entry):
    x = next(entry.glob("x-*.npy"))
    a = np.load(x, mmap_mode="r")
    with open(x, "r+b") as fh:
        fh.write(csvcache.npy_header(np.float32, (a.shape[1], a.shape[0])))


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_flip, corrupt_meta, corrupt_missing, corrupt_header])
def test_a_corrupt_cache_is_detected_and_rebuilt_never_trained_on(tmp_path, capfd, corrupt):
    f = tricky_csv(tmp_path / "d.csv", rows=300)
    good = cached(f)
    want_x, want_y = np.array(good.x), np.array(good.y)
    del good
    corrupt(cached(f).entry)
    again = cached(f)
    assert again.built, "the corrupt entry was used"
    assert "rebuilding the data cache" in capfd.readouterr().err
    assert same_bits(again.x, want_x) and same_bits(again.y, want_y)
    assert not cached(f).built                                 # and the rebuilt one is good


def _load_in_child(args):
    f, cache_dir = args
    c = cached(Path(f), Path(cache_dir))
    return c.built, np.asarray(c.x).tobytes()


def test_concurrent_processes_build_the_cache_once_and_all_get_it(tmp_path):
    """Four real processes start together: one converts, three wait on the lock."""
    f = tricky_csv(tmp_path / "d.csv", rows=20000)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_load_in_child, [(str(f), str(tmp_path / "c"))] * 4)
    assert sum(built for built, _ in results) == 1
    assert len({data for _, data in results}) == 1


def test_an_unwritable_cache_location_is_a_one_line_error(tmp_path):
    f = tricky_csv(tmp_path / "d.csv", rows=10)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"--data .*d.csv: cannot write --cache-dir"):
        load(f, layers="3,4,1", cache_dir=str(tmp_path / "file" / "sub"))


# ---------------------------------------------------------------------------------------
# Parquet and .npy shards
# ---------------------------------------------------------------------------------------

def test_parquet_loads_like_the_same_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    f = tricky_csv(tmp_path / "d.csv", rows=500)
    table = pacsv.read_csv(f)
    pq.write_table(table.rename_columns([n.strip() for n in table.column_names]), tmp_path / "d.parquet",
                   row_group_size=100)
    a, b = load(f, layers="3,4,1"), load(tmp_path / "d.parquet", layers="3,4,1")
    assert same_bits(a.x, b.x) and same_bits(a.y, b.y)
    pq.write_table(pa.table({"a": [1.0, None, 2.0], "y": [1.0, 2.0, 3.0]}), tmp_path / "n.parquet")
    with pytest.raises(ConfigError, match=r"row 2, column 'a': missing value"):
        load(tmp_path / "n.parquet", layers="1,4,1")
    pq.write_table(pa.table({"a": [1.0, 2.0, float("inf")], "y": ["b", "a", "b"]}), tmp_path / "i.parquet")
    with pytest.raises(ConfigError, match=r"row 3, column 'a': not a finite number: inf"):
        load(tmp_path / "i.parquet", layers="1,4,2", task="classification")


def test_parquet_string_labels_are_numbered_in_sorted_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0, 4.0], "kind": ["dog", "ant", "dog", "cat"]}), tmp_path / "d.parquet")
    ds = load(tmp_path / "d.parquet", layers="1,4,3", task="classification")
    assert ds.y.tolist() == [2, 0, 2, 1]


def test_a_directory_of_npy_shards_is_mapped_not_copied(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 4)).astype(np.float32) for n in (30, 1, 50)]
    for i, p in enumerate(parts):
        np.save(tmp_path / f"part{i:03d}_x.npy", p)
        np.save(tmp_path / f"part{i:03d}_y.npy", p[:, 0])
    ds = load(tmp_path, layers="4,4,1")
    assert isinstance(ds.x, ShardedRows) and all(isinstance(p, np.memmap) for p in ds.x.parts)
    whole = np.concatenate(parts)
    rows = np.array([79, 0, 30, 31, 29, 5, 30])
    xt, yt = ds.fetch(rows, torch.device("cpu"))
    assert xt.numpy().tolist() == whole[rows].tolist() and yt[:, 0].tolist() == whole[rows, 0].tolist()
    (tmp_path / "part001_y.npy").unlink()
    with pytest.raises(ConfigError, match="shard part001_x.npy has no part001_y.npy"):
        load(tmp_path, layers="4,4,1")


# ---------------------------------------------------------------------------------------
# resident memory: fetch hands mapped pages back
# ---------------------------------------------------------------------------------------

def rss_file_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssFile")


@pytest.mark.parametrize("budget,bounded", [(data_module.RESIDENT_BUDGET, True), (1 << 40, False)])
def test_random_fetches_keep_mapped_pages_within_the_budget(tmp_path, monkeypatch, budget, bounded):
    """100 MiB of features, 100,000 random rows fetched: handing pages back every
    DROP_EVERY_ROWS rows, the rank's file-backed resident set grows by a few MiB (what
    64 row reads map: 11 MiB with Linux 6.18's large folios); never handing back (the
    control, so the check can fail), by most of the file."""
    rows, width = 400_000, 64
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(rows, width))
    x[:] = 1.0
    x.flush()
    del x
    np.save(tmp_path / "y.npy", np.zeros(rows, dtype=np.float32))
    monkeypatch.setattr(data_module, "RESIDENT_BUDGET", budget)
    ds = load(tmp_path / "x.npy", layers=f"{width},4,1")
    rng = np.random.default_rng(0)
    before = rss_file_bytes()
    for _ in range(400):
        ds.fetch(rng.integers(0, rows, 256), torch.device("cpu"))
    grown = rss_file_bytes() - before
    file_bytes = rows * width * 4
    if bounded:
        assert grown <= 32 << 20, grown
    else:
        assert grown > file_bytes // 2, grown
