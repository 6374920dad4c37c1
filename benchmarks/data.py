"""Data loading at scale: load time and peak resident memory per rank.

    .venv/bin/python benchmarks/data.py csv [--sizes-mb 50,500,2000] [--ranks 1,2,4] [--repeats 3] [--train-only]
    .venv/bin/python benchmarks/data.py npy --gib 3 --limit-mib 1280        (root: a memory cgroup)

``csv``: for each size, a CSV of 64 standard-normal features (6 decimals) and a
regression target is generated once into --dir. Then, each in a fresh process, so that
its peak resident set (VmHWM in /proc/self/status) is its own:

    pyarrow.csv.read_csv(f)                                  the fast reader, whole table in memory
    numpy.loadtxt(f, delimiter=",", skiprows=1, dtype=float32)
    ddp-fnn first load  (load_dataset, cache removed first: parse + convert + map)
    ddp-fnn cache hit   (load_dataset again: identity check + map)

timed in alternation (A B C D, A B C D, ...), medians over --repeats. Then
`ddp-fnn train` at each of --ranks under torchrun (cache present, --max-steps steps),
each worker reporting its own VmHWM at the end: the peak over loading, training and
evaluation. "shard" is the rank's share of the features, n x d x 4 / N bytes.

``npy``: a features .npy of --gib GiB (256 float32 columns) trained at 2 ranks inside
a memory cgroup (v1, memory.limit_in_bytes) of --limit-mib for the whole torchrun job,
less than the file; the file's pages are evicted from the page cache first
(posix_fadvise DONTNEED) and each worker reports its VmHWM and the bytes it read
from storage (read_bytes in /proc/self/io); fincore tells how much of the file was
ever brought in.

Workers are this script run by torchrun (``worker``), calling job.main in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FEATURES = 64


def vm_hwm_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def read_bytes() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return -1


# ---------------------------------------------------------------------------------------
# data generation (once per size; kept in --dir)
# ---------------------------------------------------------------------------------------

def make_csv(path: Path, mb: int) -> Path:
    if path.exists():
        return path
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(mb)
    names = [f"f{i}" for i in range(FEATURES)] + ["y"]
    tmp = path.with_suffix(".tmp")
    with pacsv.CSVWriter(tmp, pa.schema([(n, pa.float64()) for n in names])) as w:
        while tmp.stat().st_size < mb * 1_000_000:
            x = np.round(rng.standard_normal((10_000, FEATURES)), 6)
            y = np.round(x[:, :3].sum(1) + 0.1 * rng.standard_normal(len(x)), 6)
            w.write_table(pa.table({**{n: x[:, i] for i, n in enumerate(names[:-1])}, "y": y}))
    os.replace(tmp, path)
    return path


def make_npy(dirpath: Path, gib: float, cols: int = 256) -> Path:
    import numpy as np

    x_path, y_path = dirpath / "x.npy", dirpath / "y.npy"
    rows = int(gib * (1 << 30)) // (cols * 4)
    if x_path.exists() and np.load(x_path, mmap_mode="r").shape == (rows, cols):
        return dirpath
    dirpath.mkdir(parents=True, exist_ok=True)
    x = np.lib.format.open_memmap(x_path.with_suffix(".tmp"), mode="w+", dtype=np.float32, shape=(rows, cols))
    y = np.empty(rows, dtype=np.float32)
    rng = np.random.default_rng(0)
    for start in range(0, rows, 65536):
        block = rng.standard_normal((min(65536, rows - start), cols), dtype=np.float32)
        x[start:start + len(block)] = block
        y[start:start + len(block)] = block[:, :3].sum(1)
    x.flush()
    del x
    os.replace(x_path.with_suffix(".tmp"), x_path)
    np.save(y_path, y)
    return dirpath


# ---------------------------------------------------------------------------------------
# one measurement = one fresh process
# ---------------------------------------------------------------------------------------

def probe(kind: str, path: str, cache_dir: str) -> None:
    """Run in a child: load `path` one way, print {"s": seconds, "hwm": bytes}. Imports
    are not timed (ddp-fnn's include torch's 1 s); they are in the peak RSS."""
    import numpy as np
    import pyarrow.csv as pacsv
    if kind in ("first", "hit"):
        from ddp_fnn.config import TrainConfig
        from ddp_fnn.data.datasets import load_dataset
    t0 = time.perf_counter()
    if kind == "pyarrow":
        rows = pacsv.read_csv(path).num_rows
    elif kind == "loadtxt":
        rows = len(np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32))
    else:
        cfg = TrainConfig.of(layers=f"{FEATURES},1", data=path, cache_dir=cache_dir)
        ds = load_dataset(cfg.data, cfg.model, cfg.seed)
        rows = len(ds.x)
    print(json.dumps({"s": time.perf_counter() - t0, "hwm": vm_hwm_bytes(), "rows": rows}))


def run_probe(kind: str, path: Path, cache_dir: Path) -> dict:
    if kind == "first":
        shutil.rmtree(cache_dir, ignore_errors=True)
    out = subprocess.run([sys.executable, __file__, "probe", kind, str(path), str(cache_dir)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(report_dir: str, argv: list[str]) -> None:
    """Under torchrun: `ddp-fnn train ARGV` in this process, then this rank's figures."""
    from ddp_fnn import cli
    code = 0
    try:
        cli.cli.main(["train", *argv], standalone_mode=False)
    except SystemExit as e:
        code = e.code or 0
    rank = int(os.environ.get("RANK", "0"))
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "hwm": vm_hwm_bytes(), "read_bytes": read_bytes(), "code": code}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_train(ranks: int, data: Path | str, cache_dir: Path, layers: str, steps: int,
              prefix: list[str] | None = None, batch: int = 256, extra: tuple[str, ...] = ()) -> list[dict]:
    report = Path(f"/tmp/ddp-fnn-bench-report-{os.getpid()}")
    shutil.rmtree(report, ignore_errors=True)
    report.mkdir()
    args = ["--data", str(data), "--cache-dir", str(cache_dir), "--layers", layers, "--max-steps", str(steps),
            "--global-batch-size", str(batch), "--eval-fraction", "0.05", "--metrics-port", "0",
            "--progress", "none", "--no-probe", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           __file__, "worker", str(report), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run((prefix or []) + cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"train at {ranks} ranks failed ({r.returncode}): {r.stderr[-2000:]}")
    out = [json.loads((report / f"rank{k}.json").read_text()) for k in range(ranks)]
    shutil.rmtree(report, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------
# the two benchmarks
# ---------------------------------------------------------------------------------------

def mib(b: float) -> str:
    return f"{b / (1 << 20):.0f}"


def bench_csv(args) -> None:
    base = Path(args.dir)
    base.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    print(f"# CSV: {FEATURES} features + 1 target, 6 decimals; medians of {args.repeats}; "
          f"train {args.steps} steps, global batch 256", flush=True)
    print("| CSV MB | rows | pyarrow.read_csv s / MiB | numpy.loadtxt s / MiB | ddp-fnn first load s / MiB "
          "| first ÷ pyarrow | cache hit s / MiB | " + " | ".join(f"train N={n}: peak MiB/rank (shard MiB)"
                                                        for n in ranks) + " |", flush=True)
    print("|" + "---|" * (7 + len(ranks)), flush=True)
    # The same worker on 8192 synthetic rows: interpreter, torch, model, optimizer.
    base_cells = [mib(max(p["hwm"] for p in run_train(n, "synthetic", base / "unused", f"{FEATURES},256,256,1",
                                                        args.steps, extra=("--samples", "8192"))))
                  for n in ranks]
    print("| baseline: synthetic, 8192 rows | | | | | | | " + " | ".join(base_cells) + " |", flush=True)
    for mb in sizes:
        f = make_csv(base / f"data-{mb}mb.csv", mb)
        cache = base / f"cache-{mb}"
        kinds = ["pyarrow", "first", "hit"] + (["loadtxt"] if mb <= args.loadtxt_max_mb else [])
        runs = {k: [] for k in kinds}
        for _ in range(args.repeats if not args.train_only else 0):
            for k in kinds:
                runs[k].append(run_probe(k, f, cache))
        if args.train_only:
            runs = {"hit": [run_probe("hit", f, cache)]}
        med = {k: (statistics.median(r["s"] for r in v), statistics.median(r["hwm"] for r in v))
               for k, v in runs.items()}
        rows = runs["hit"][0]["rows"]
        shard = rows * FEATURES * 4
        cells = []
        for n in ranks:
            per_rank = run_train(n, f, cache, f"{FEATURES},256,256,1", args.steps)
            cells.append(f"{mib(max(p['hwm'] for p in per_rank))} ({mib(shard / n)})")
        if args.train_only:
            print(f"| {f.stat().st_size / 1e6:.0f} | {rows} | | | | | {med['hit'][0]:.3f} / {mib(med['hit'][1])} | "
                  + " | ".join(cells) + " |", flush=True)
            continue
        lt = f"{med['loadtxt'][0]:.2f} / {mib(med['loadtxt'][1])}" if "loadtxt" in med else "not run"
        print(f"| {f.stat().st_size / 1e6:.0f} | {rows} | {med['pyarrow'][0]:.2f} / {mib(med['pyarrow'][1])} | {lt} "
              f"| {med['first'][0]:.2f} / {mib(med['first'][1])} | {med['first'][0] / med['pyarrow'][0]:.2f} "
              f"| {med['hit'][0]:.3f} / {mib(med['hit'][1])} | " + " | ".join(cells) + " |", flush=True)


def bench_npy(args) -> None:
    import numpy as np

    d = make_npy(Path(args.dir) / f"npy-{args.gib}gib", args.gib)
    x = d / "x.npy"
    size = x.stat().st_size
    with open(x, "rb") as fh:                      # start cold: nothing of the file cached
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    own = open("/proc/self/cgroup").read().split("memory:")[1].split("\n")[0]
    cg = Path("/sys/fs/cgroup/memory") / own.lstrip("/") / f"ddp-fnn-bench-{os.getpid()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(args.limit_mib << 20))
        prefix = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh"]
        cols = np.load(x, mmap_mode="r").shape[1]
        per_rank = run_train(2, d, Path(args.dir) / "unused-cache", f"{cols},256,256,1", args.steps, prefix)
        peak_cgroup = int((cg / "memory.max_usage_in_bytes").read_text())
        failcnt = int((cg / "memory.failcnt").read_text())
    finally:
        cg.rmdir()
    resident = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(x)],
                              capture_output=True, text=True).stdout.strip()
    print(f"# .npy {mib(size)} MiB features ({cols} float32 columns), 2 ranks, {args.steps} steps, global batch 256, "
          f"memory cgroup limit {args.limit_mib} MiB for the whole job ({args.limit_mib // 2} MiB a rank)")
    for p in per_rank:
        print(f"rank {p['rank']}: peak RSS {mib(p['hwm'])} MiB, read from storage {mib(p['read_bytes'])} MiB")
    print(f"cgroup peak usage {mib(peak_cgroup)} MiB (page cache included), limit hits {failcnt}; "
          f"file pages in the page cache afterwards: {mib(int(resident or 0))} of {mib(size)} MiB")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        return probe(*sys.argv[2:5])
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        return worker(sys.argv[2], sys.argv[3:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("csv", "npy"))
    ap.add_argument("--dir", default="/tmp/ddp-fnn-bench", help="where the generated data and caches live")
    ap.add_argument("--sizes-mb", default="50,500,2000")
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--loadtxt-max-mb", type=int, default=2000, help="skip numpy.loadtxt above this size")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-only", action="store_true", help="csv: only the cache hit and the training runs")
    ap.add_argument("--gib", type=float, default=3.0)
    ap.add_argument("--limit-mib", type=int, default=1280)
    args = ap.parse_args()
    bench_csv(args) if args.what == "csv" else bench_npy(args)


if __name__ == "__main__":
    main()
