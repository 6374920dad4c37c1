"""The sweep's outputs: sweep.csv, sweep.json, validation.md and the plots."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from ddp_fnn.core import fileio
from ddp_fnn.sweep.grid import SweepConfig
from ddp_fnn.sweep.measure import COLUMNS, LINK_BOUND_SHARE, bound


ERROR_KEYS = ("step_error", "exposed_error", "cal_step_error", "cal_exposed_error", "tx_error",
              "topo_step_error", "nic_tx_error", "uplink_tx_error")


def _error_stats(rows: list[dict]) -> dict:
    out = {}
    for key in ERROR_KEYS:
        errs = [abs(r[key]) for r in rows if r.get(key) is not None]
        out[key] = {"points": len(errs), "median_abs": statistics.median(errs) if errs else None,
                    "max_abs": max(errs) if errs else None}
    return out


def validation(rows: list[dict]) -> dict:
    """Median and largest absolute errors of each prediction over the complete points, and
    again over the link-bound ones alone (``link_bound``; ``bound``: points of each kind)."""
    out = _error_stats(rows)
    out["link_bound"] = _error_stats([r for r in rows if r.get("bound") == "link"])
    out["bound"] = {k: sum(r.get("bound") == k for r in rows) for k in ("link", "host", "fault", "unshaped")}
    out["points"] = len(rows)
    out["failed"] = sum(r["status"] != "ok" for r in rows)
    out["probe_methods"] = dict(sorted(
        {m: sum(r["probe_method"] == m for r in rows) for r in rows if (m := r["probe_method"])}.items()))
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    fileio.atomic_write(path, buf.getvalue())


def _pct(x) -> str:
    return "" if x is None else f"{x:+.1%}"


def _bound_cell(r: dict) -> str:
    return r["bound"] if r["wire_share"] is None else f"{r['bound']} ({r['wire_share']:.0%})"


def _ms(x) -> str:
    return "" if x is None else f"{x * 1e3:.1f}"


def markdown(rows: list[dict], figures: dict, command_line: str) -> str:
    """validation.md: the command, the error statistics, every point."""
    lines = ["# `ddp-fnn sweep`: measured vs predicted", "", "```", command_line, "```", ""]
    names = {"step_error": "step time, the run's own prediction", "exposed_error": "exposed communication, the run's own prediction",
             "cal_step_error": "step time, calibrated on another world size", "cal_exposed_error": "exposed communication, calibrated",
             "tx_error": "kernel TX payload vs reported bytes (steps + probe), worst node",
             "topo_step_error": "step time, the --topology fabric model (no probe)",
             "nic_tx_error": "each node's eth0 TX payload vs the fabric model's NIC bytes, worst node",
             "uplink_tx_error": "each uplink's TX payload vs the fabric model's, worst direction"}
    lines += ["| prediction | points | median abs error | largest abs error | link-bound points | median | largest |",
              "|---|---|---|---|---|---|---|"]
    for key, label in names.items():
        f, g = figures[key], figures["link_bound"][key]
        if f["points"]:
            link = (f"{g['points']} | {g['median_abs']:.1%} | {g['max_abs']:.1%}" if g["points"] else "0 | | ")
            lines.append(f"| {label} | {f['points']} | {f['median_abs']:.1%} | {f['max_abs']:.1%} | {link} |")
    b = figures["bound"]
    lines += ["", f"Points: {figures['points']}, failed: {figures['failed']}; probe fits: "
              + ", ".join(f"{k} {v}" for k, v in figures["probe_methods"].items()), "",
              f"What set the pace (bound): link {b['link']}, host {b['host']}, fault {b['fault']}, unshaped "
              f"{b['unshaped']}. A shaped point is link-bound when its busbw reached {LINK_BOUND_SHARE:.0%} of the "
              f"configured rate (with --topology: when the bottleneck link, at its line rate, was busy that "
              f"share of the measured comm time); below that the host's cores forwarding the frames set the pace (host), or, with "
              f"loss or a shallow queue configured, the fault or the host (fault). Unshaped points run as fast "
              f"as the host can.", ""]
    head = ("| nodes | link | bound (busbw/rate) | bucket MiB (n) | wire | loss % | step ms | p99 ms | exposed ms | wait ms | "
            "predicted step | err | predicted exposed | err | calibrated step | err | retrans/step |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['nodes']} | {r['link_rate']} | | {r['bucket_mb']:g} | {r['compression']} | "
                         f"{r['loss_percent']:g} | failed |" + " |" * 11)
            continue
        lines.append(
            f"| {r['nodes']} | {r['link_rate']} | {_bound_cell(r)} | {r['bucket_mb']:g} ({r['buckets']}) | "
            f"{'fp32' if r['compression'] == 'none' else r['compression']} | {r['loss_percent']:g} | "
            f"{_ms(r['step_mean_s'])} | {_ms(r['step_p99_s'])} | {_ms(r['exposed_s'])} | {_ms(r['wait_s'])} | "
            f"{_ms(r['pred_step_s'])} | {_pct(r['step_error'])} | {_ms(r['pred_exposed_s'])} | "
            f"{_pct(r['exposed_error'])} | {_ms(r['cal_step_s'])} | {_pct(r['cal_step_error'])} | "
            f"{r['retransmits_per_step']:.1f} |")
    if any(r.get("topo_step_s") is not None for r in rows):
        lines += ["", "The fabric (--topology): each point on its servers, NICs, leaves and uplinks, modelled link "
                  "by link (topology.py) with no probe: the step time at the links' TCP payload rates, the "
                  "bottleneck, and each link's kernel TX payload against the model's bytes over the whole job "
                  "(steps, probe, start-up broadcast), the worst node and the worst uplink direction.", "",
                  "| nodes x GPUs | link | all-reduce | bucket MiB (n) | bound | step ms | fabric model step ms | err | "
                  "bottleneck | NIC TX model MB | worst node err | uplink model MB | worst uplink err |",
                  "|" + "---|" * 13]
        for r in rows:
            if r["status"] != "ok" or r.get("topo_step_s") is None:
                continue
            up = r.get("model_uplink_bytes")
            lines.append(
                f"| {r['nodes']} x {r['gpus_per_node']} | {r['link_rate']} | {r['all_reduce']} | "
                f"{r['bucket_mb']:g} ({r['buckets']}) | {_bound_cell(r)} | {_ms(r['step_mean_s'])} | "
                f"{_ms(r['topo_step_s'])} | {_pct(r['topo_step_error'])} | {r['bottleneck_link']} | "
                f"{r['model_nic_tx_bytes'] / 1e6:.2f} | {_pct(r['nic_tx_error'])} | "
                f"{'' if up is None else f'{up / 1e6:.2f}'} | {_pct(r.get('uplink_tx_error'))} |")
    if any(r["loss_percent"] or r["queue_limit_bytes"] for r in rows):
        lines += ["", "Faults: what TCP saw (retransmitted segments per step and retransmission timeouts "
                  "per 100 steps, all nodes; frames the switch dropped over the run), the bus bandwidth "
                  "beside Mathis et al.'s estimate for the configured loss and the clock ping-pong's RTT, "
                  "capped by the link.", "",
                  "| nodes | link | buckets | loss % | queue B | step ms | p99 ms | transfer ms | busbw MB/s | "
                  "Mathis MB/s | retrans/step | timeouts/100 steps | dropped |", "|" + "---|" * 13]
        for r in rows:
            if r["status"] != "ok":
                continue
            mathis, timeouts = r["mathis_busbw_bytes_per_second"], r["timeouts_per_step"]
            lines.append(
                f"| {r['nodes']} | {r['link_rate']} | {r['buckets']} | {r['loss_percent']:g} | "
                f"{r['queue_limit_bytes'] or ''} | {_ms(r['step_mean_s'])} | {_ms(r['step_p99_s'])} | "
                f"{_ms(r['transfer_s'])} | {r['busbw_bytes_per_second'] / 1e6:.1f} | "
                f"{'' if mathis is None else f'{mathis / 1e6:.1f}'} | {r['retransmits_per_step']:.1f} | "
                f"{'' if timeouts is None else f'{100 * timeouts:.1f}'} | "
                f"{(r['loss_dropped_packets'] or 0) + (r['tc_dropped_packets'] or 0)} |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: list[dict], command_line: str, host_cores, calibrate_on) -> dict:
    figures = validation(rows)
    write_csv(out / "sweep.csv", rows)
    fileio.write_json(out / "sweep.json", {"command": command_line, "validation": figures, "rows": rows,
                                           "host_cores": host_cores, "calibrate_on": calibrate_on}, indent=2)
    fileio.atomic_write(out / "validation.md", markdown(rows, figures, command_line))
    return figures


def retable(out: Path) -> dict:
    """Rewrite a finished sweep's sweep.csv, sweep.json and validation.md from its
    sweep.json rows, with the columns and figures this version derives (``bound``):
    the measurements are the rows' own, nothing is run again. Returns the figures."""
    doc = fileio.loads((out / "sweep.json").read_text())
    rows = []
    for r in doc["rows"]:
        if r.get("status") == "ok":
            r["line_rate_bytes_per_second"], r["wire_share"], r["bound"] = bound(
                r["link_rate"], r.get("busbw_bytes_per_second"), bool(r["loss_percent"] or r["queue_limit_bytes"]),
                r.get("bottleneck_busy_s"), r.get("comm_s"))
        rows.append({c: r.get(c) for c in COLUMNS})
    return write_tables(out, rows, doc["command"], doc.get("host_cores"), doc.get("calibrate_on"))


def write_outputs(cfg: SweepConfig, rows: list[dict], command_line: str) -> tuple[dict, list[Path]]:
    figures = write_tables(cfg.out, rows, command_line, cfg.host_cores, cfg.calibrate_on)
    plots = []
    if cfg.plot:
        from ddp_fnn.sweep import plots as sweepplot

        plots = sweepplot.draw(cfg, rows, cfg.out)
    return figures, plots
