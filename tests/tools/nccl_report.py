"""The NCCL model against every published all_reduce_perf table in tests/data/nccl/: per
table and size, measured and predicted busbw (and time where the table has it), the
algorithm/protocol assumed, and the summary the must-show asks for (busbw 1 MiB - 1 GiB:
max and median |error|; latency floor 8 B - 64 KiB: max |time error|).

    PYTHONPATH=. python tests/tools/nccl_report.py            # markdown, as in docs/nccl.md

Pure arithmetic (perfmodel/nccl.py, perfmodel/busbw.py); nothing here is fitted.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ddp_fnn.perfmodel import busbw as B  # noqa: E402
from ddp_fnn.perfmodel import nccl as N  # noqa: E402
from ddp_fnn.perfmodel import topology as T  # noqa: E402

TOPO = REPO / "deploy" / "topologies"
DATA = REPO / "tests" / "data" / "nccl"

# (table, topology file, NCCL_ALGO the run used: auto = NCCL's default, as its source says)
TABLES = [
    ("h100-1x8-voltagepark.txt", "dgx-h100.toml", "auto"),
    ("h100-1x8-azure-ndv5.txt", "dgx-h100.toml", "nvls"),
    ("h100-4x8-voltagepark.txt", "h100-4x8-400g.toml", "auto"),
    ("h100-2x8-gcp-a3mega.txt", "h100-2x8-200g.toml", "auto"),
    ("h100-2x1-4nic-tree.txt", "h100-2x1-4nic.toml", "tree"),
]


def topo_path(name: str) -> Path:
    return TOPO / name if (TOPO / name).exists() else DATA / name


def rows_of(table: str, topo: str, algorithm: str) -> list[dict]:
    hw = N.hardware(T.load(topo_path(topo)))
    return B.compare(hw, B.read_perf(DATA / table), algorithm, "auto")


def main() -> None:
    for table, topo, algorithm in TABLES:
        if not (DATA / table).exists():
            continue
        rows = rows_of(table, topo, algorithm)
        st = B.compare_stats(rows)
        print(f"\n### {table} (topology {topo}, algorithm {algorithm})\n")
        print("| size | measured busbw | model busbw | error | t measured (us) | t model (us) | model's choice |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for r in rows:
            if r["size"] < 1024 and r["measured_time_us"] is None:
                continue
            err = f"{r['error']:+.1%}" if r["error"] is not None else ""
            tm = f"{r['measured_time_us']:.1f}" if r["measured_time_us"] else ""
            print(f"| {r['size']} | {r['measured_busbw']:.2f} | {r['busbw']:.2f} | {err} | {tm} | "
                  f"{r['time_us']:.1f} | {r['algorithm']}/{r['protocol']}, {r['channels']} ch |")
        line = "busbw 1 MiB - 1 GiB: "
        if st["busbw_rows"]:
            line += (f"{st['busbw_rows']} rows, max |error| {st['busbw_max_abs_error']:.1%}, "
                     f"median {st['busbw_median_abs_error']:.1%}")
        if st["floor_rows"]:
            line += f"; latency floor 8 B - 64 KiB: max |time error| {st['floor_max_abs_error']:.1%}"
        print(f"\n{line}")


if __name__ == "__main__":
    main()
