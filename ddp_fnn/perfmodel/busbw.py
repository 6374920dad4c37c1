"""`ddp-fnn busbw`: NCCL's all-reduce on a topology file, row by row as nccl-tests'
all_reduce_perf prints it (size, count, time, algbw, busbw), with the algorithm,
protocol and channels NCCL's tuner would pick per size (perfmodel/nccl.py), and
``--compare OUT.txt``: an all_reduce_perf output beside the prediction, the error per row.

This is the NCCL backend's model. Gloo on the namespace cluster keeps the measured
alpha-beta model (``ddp-fnn bench``, perfmodel/netmodel.py).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from ddp_fnn.core import fileio, units
from ddp_fnn.core.errors import ConfigError
from ddp_fnn.perfmodel import nccl, topology

_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+\w+\s+\w+\s+-?\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMG]?)$", re.I)


def parse_sizes(spec: str) -> list[int]:
    """``8:8G`` (doubling, as all_reduce_perf -b 8 -e 8G -f 2) or a comma list ``1M,25M``."""
    def one(tok: str) -> int:
        m = _SIZE.match(tok.strip())
        if not m:
            raise ConfigError(f"--sizes: {tok!r} is not a size such as 8, 64K, 25M or 8G")
        return int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[m.group(2).upper()])
    if ":" in spec:
        lo, hi = (one(t) for t in spec.split(":", 1))
        if lo < 1 or hi < lo:
            raise ConfigError(f"--sizes {spec}: needs 1 <= first <= last")
        out, s = [], lo
        while s <= hi:
            out.append(s)
            s *= 2
        return out
    return [one(t) for t in spec.split(",") if t.strip()]


def read_perf(path: str | Path) -> list[dict]:
    """The out-of-place rows of an all_reduce_perf output: size (B), time (us), algbw and
    busbw (GB/s). A two-column ``SIZE BUSBW`` table (a vendor page's figures) reads as rows
    with busbw only; a CSV (``Nodes,GPUs,size(MB),...``) as rows per node count."""
    rows = []
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--compare {path}: cannot read: {e.strerror}") from None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = _ROW.match(line)
        if m:
            rows.append({"size": int(m.group(1)), "time_us": float(m.group(3)), "algbw": float(m.group(4)),
                         "busbw": float(m.group(5))})
            continue
        parts = line.split()
        if len(parts) == 2 and _SIZE.match(parts[0]):
            m2 = _SIZE.match(parts[0])
            mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m2.group(2).upper()]
            size = float(m2.group(1)) * mult
            size = 2 ** round(__import__("math").log2(size))     # the page rounds 2^n to 1K, 65K, 132K ..
            rows.append({"size": int(size), "time_us": None, "algbw": None, "busbw": float(parts[1])})
    if not rows:
        raise ConfigError(f"--compare {path}: no all_reduce_perf rows found")
    return rows


def predict(hw: nccl.Hardware, size: int, algorithm: str, protocol: str) -> dict:
    c = nccl.call(hw, size, algorithm, protocol)
    return {"size": size, "count": size // 4, "time_us": c.time_s * 1e6, "algbw": c.alg_bw / 1e9,
            "busbw": c.bus_bw / 1e9, "algorithm": nccl.NCCL_NAMES[c.algorithm], "protocol": c.protocol,
            "channels": c.channels, "bound": c.bound}


def compare_stats(rows: list[dict], lo: int = 2 ** 20, hi: int = 2 ** 30) -> dict:
    """Busbw errors from ``lo`` to ``hi`` bytes and the latency floor's (8 B - 64 KB, by time)."""
    bw = [abs(r["error"]) for r in rows if lo <= r["size"] <= hi and r.get("error") is not None]
    floor = [abs(r["time_error"]) for r in rows if r["size"] <= 65536 and r.get("time_error") is not None]
    return {"busbw_rows": len(bw), "busbw_max_abs_error": max(bw) if bw else None,
            "busbw_median_abs_error": statistics.median(bw) if bw else None,
            "floor_rows": len(floor), "floor_max_abs_error": max(floor) if floor else None}


def compare(hw: nccl.Hardware, measured: list[dict], algorithm: str, protocol: str) -> list[dict]:
    out = []
    for m in measured:
        p = predict(hw, m["size"], algorithm, protocol)
        p["measured_busbw"] = m["busbw"]
        p["measured_time_us"] = m["time_us"]
        p["error"] = (p["busbw"] - m["busbw"]) / m["busbw"] if m["busbw"] > 0 else None
        p["time_error"] = ((p["time_us"] - m["time_us"]) / m["time_us"]) if m["time_us"] else None
        out.append(p)
    return out


def run(*, topology_file: str, algorithm: str, protocol: str, sizes: str, compare_file: str | None,
        as_json: bool) -> list[str]:
    try:
        topo = topology.load(topology_file)
    except ValueError as e:
        raise ConfigError(f"--topology: {e}") from None
    hw = nccl.hardware(topo)
    if hw.ranks < 2:
        raise ConfigError(f"--topology {topology_file}: one GPU has nothing to all-reduce")
    try:
        if compare_file is not None:
            rows = compare(hw, read_perf(compare_file), algorithm, protocol)
        else:
            rows = [predict(hw, s, algorithm, protocol) for s in parse_sizes(sizes)]
    except ValueError as e:
        raise ConfigError(f"--algorithm/--protocol: {e}") from None
    head = (f"# NCCL model ({nccl.RELEASE}) on {topo.name}: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s), "
            f"{hw.arch}, NVLink {hw.nvlink_bw:.1f} GB/s, PCIe {hw.pcie_bw:.1f} GB/s, {hw.nics} NIC(s) x "
            f"{hw.nic_bw:.1f} GB/s; algorithm {algorithm}, protocol {protocol} (NCCL backend; Gloo keeps the "
            f"measured alpha-beta model)")
    if as_json:
        doc = {"topology": topo.name, "nccl_release": nccl.RELEASE, "algorithm": algorithm, "protocol": protocol,
               "rows": rows}
        if compare_file is not None:
            doc["stats"] = compare_stats(rows)
        return [fileio.dumps(fileio.clean(doc), indent=2)]
    lines = [head]
    if compare_file is None:
        lines.append(f"{'size':>12} {'count':>12} {'time(us)':>10} {'algbw':>8} {'busbw':>8}  algorithm/protocol  "
                     f"channels  bound")
        for r in rows:
            lines.append(f"{r['size']:>12} {r['count']:>12} {r['time_us']:>10.2f} {r['algbw']:>8.2f} "
                         f"{r['busbw']:>8.2f}  {r['algorithm'] + '/' + r['protocol']:<18}  {r['channels']:>8}  "
                         f"{r['bound']}")
        return lines
    lines.append(f"{'size':>12} {'measured':>9} {'model':>8} {'error':>8}  {'t meas':>9} {'t model':>9}  "
                 f"algorithm/protocol  channels")
    for r in rows:
        tm = f"{r['measured_time_us']:>9.2f}" if r["measured_time_us"] else f"{'':>9}"
        err = f"{r['error']:>+8.1%}" if r["error"] is not None else f"{'':>8}"
        lines.append(f"{r['size']:>12} {r['measured_busbw']:>9.2f} {r['busbw']:>8.2f} {err}  {tm} "
                     f"{r['time_us']:>9.2f}  {r['algorithm'] + '/' + r['protocol']:<18}  {r['channels']:>8}")
    st = compare_stats(rows)
    if st["busbw_rows"]:
        lines.append(f"busbw 1 MiB - 1 GiB: {st['busbw_rows']} rows, max |error| {st['busbw_max_abs_error']:.1%}, "
                     f"median {st['busbw_median_abs_error']:.1%}")
    if st["floor_rows"]:
        lines.append(f"latency floor 8 B - 64 KiB: {st['floor_rows']} rows, max |time error| "
                     f"{st['floor_max_abs_error']:.1%}")
    _ = units
    return lines
