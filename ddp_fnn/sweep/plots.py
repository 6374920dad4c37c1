"""`ddp-fnn sweep`'s plots (matplotlib, the `plot` extra), of real jobs beside the model.

step_time.png   step time against link rate, one panel per bucket cap and wire dtype:
                measured points (one marker a world size) and the model's lines,
                calibrated on the smallest world size's run at the slowest shaped link
                (predict.from_run), the bus bandwidth eta x rate (eta: that run's probe
                beta over its link rate) capped at the unshaped run's probe beta (the
                path's own ceiling), with the link rate below which the step becomes
                network-bound (the predicted exposed communication exceeds the compute)
comm_share.png  the same for the share of the step spent in exposed communication
fabric.png      with several --loss values: mean and p99 step time, busbw beside the
                Mathis estimate, retransmitted segments and transfer time against loss

Unshaped points have no link rate; they are drawn at the axis' right edge, where the
lines have reached the ceiling.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ddp_fnn.core import figures
from ddp_fnn.core.units import parse_rate
from ddp_fnn.perfmodel import predict

MBIT = 1e6 / 8          # bytes/s in one Mbit/s


def _summary(out: Path, name: str) -> dict:
    return json.loads((out / "points" / name / "node0" / "summary.json").read_text())


def model_lines(cfg, rows: list[dict], out: Path) -> dict:
    """Per (bucket_mb, compression): the calibration row, the efficiency eta = beta / rate,
    and per world size the predicted (rates, step, exposed, compute) and the
    network-bound rate (bytes/s), or None."""
    ok = [r for r in rows if r["status"] == "ok" and r["loss_percent"] == 0 and not r["queue_limit_bytes"]]
    base_n = cfg.calibrate_on or min(cfg.nodes)
    rates = [10 ** (1 + 3 * i / 60) * MBIT for i in range(61)]           # 10 Mbit/s .. 10 Gbit/s
    lines = {}
    for key in sorted({(r["bucket_mb"], r["compression"]) for r in ok}):
        cands = [r for r in ok if (r["bucket_mb"], r["compression"]) == key and r["nodes"] == base_n]
        shaped = [r for r in cands if r["link_rate"] != "unshaped"]
        unshaped = [r for r in cands if r["link_rate"] == "unshaped"]
        if shaped:
            base = min(shaped, key=lambda r: parse_rate(r["link_rate"]))
            eta = base["beta_bytes_per_second"] / parse_rate(base["link_rate"])
        elif cands:
            base, eta = cands[0], 1.0
        else:
            continue
        # The path's own ceiling: what the unshaped run's probe found (on namespace nodes,
        # the CPU moving frames through veth and the bridge).
        ceiling = unshaped[0]["beta_bytes_per_second"] if unshaped else math.inf
        summary = _summary(out, base["point"])
        per_n = {}
        for n in sorted({r["nodes"] for r in ok}):
            scale = cfg.compute_scale(n, base_n)
            ests = [predict.from_run(summary, world_size=n, compute_scale=scale,
                                     beta_bytes_per_second=min(eta * x, ceiling)) for x in rates]
            bound = next((x for x, e in zip(reversed(rates), reversed(ests))
                          if e.exposed_comm_time_per_step_s > e.compute_time_per_step_s), None)
            per_n[n] = {"step": [e.step_time_s for e in ests],
                        "share": [e.exposed_comm_time_per_step_s / e.step_time_s for e in ests],
                        "network_bound_below_bytes_per_second": bound}
        lines[key] = {"base": base["point"], "eta": eta, "ceiling": ceiling, "rates": rates, "per_n": per_n}
    return lines


UNSHAPED_X = 1e4
"""Where unshaped points sit on the link-rate axis (Mbit/s): its right edge, where the
lines have reached the path's own ceiling."""


def _x(row: dict) -> float:
    """A point's link rate in Mbit/s (unshaped: the axis' right edge)."""
    if row["link_rate"] != "unshaped":
        return parse_rate(row["link_rate"]) / MBIT
    return UNSHAPED_X


def draw(cfg, rows: list[dict], out: Path) -> list[Path]:
    plt = figures.pyplot()
    written = []
    lines = model_lines(cfg, rows, out)
    if lines:
        for name, ylabel, field, scale in (("step_time.png", "step time (ms)", "step", 1e3),
                                           ("comm_share.png", "exposed communication / step (%)", "share", 100)):
            cols = min(2, len(lines))
            rows_ = math.ceil(len(lines) / cols)
            fig, grid = plt.subplots(rows_, cols, figsize=(6 * cols, 4.2 * rows_), squeeze=False, sharey=True)
            axes = [a for row in grid for a in row]
            for ax in axes[len(lines):]:
                ax.set_visible(False)
            for ax, ((bucket, comp), m) in zip(axes, lines.items()):
                colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
                for i, (n, pred) in enumerate(m["per_n"].items()):
                    c = colours[i % len(colours)]
                    ax.plot([x / MBIT for x in m["rates"]], [y * scale for y in pred[field]], "-", color=c,
                            label=f"{n} nodes, predicted")
                    pts = [r for r in rows if r["status"] == "ok" and r["nodes"] == n and r["bucket_mb"] == bucket
                           and r["compression"] == comp and r["loss_percent"] == 0 and not r["queue_limit_bytes"]]
                    ys = [r["step_mean_s"] * scale if field == "step" else r["exposed_s"] / r["step_mean_s"] * scale
                          for r in pts]
                    ax.plot([_x(r) for r in pts], ys, "o", color=c, label=f"{n} nodes, measured")
                    bound = pred["network_bound_below_bytes_per_second"]
                    if bound:
                        ax.axvline(bound / MBIT, color=c, ls=":", lw=1)
                ax.set_xscale("log")
                ax.set_xlabel("link rate (Mbit/s; unshaped at the right edge); dotted: network-bound below")
                ax.set_title(f"bucket cap {bucket:g} MiB, {'fp32' if comp == 'none' else comp} on the wire",
                             fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
            for row in grid:
                row[0].set_ylabel(ylabel)
            if field == "step":
                for ax in axes:
                    ax.set_yscale("log")
            axes[len(lines) - 1].legend(fontsize=7)
            fig.suptitle(f"ddp-fnn sweep: layers {','.join(map(str, cfg.layers))}, {cfg.rows_per_rank} rows a rank; "
                         f"lines calibrated on {cfg.calibrate_on or min(cfg.nodes)} nodes", fontsize=10)
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            written.append(out / name)
    if len(set(cfg.losses)) > 1:
        written.append(_fabric(plt, rows, out))
    return written


def _fabric(plt, rows: list[dict], out: Path) -> Path:
    ok = [r for r in rows if r["status"] == "ok"]
    groups = sorted({(r["nodes"], r["bucket_mb"], r["compression"], r["link_rate"]) for r in ok})
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a, b), (c, d) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, g in enumerate(groups):
        col = colours[i % len(colours)]
        pts = sorted((r for r in ok if (r["nodes"], r["bucket_mb"], r["compression"], r["link_rate"]) == g),
                     key=lambda r: r["loss_percent"])
        loss = [r["loss_percent"] for r in pts]
        label = f"{g[0]} nodes, {g[1]:g} MiB buckets ({pts[0]['buckets']})"
        a.plot(loss, [r["step_mean_s"] * 1e3 for r in pts], "o-", color=col, label=label + ", mean")
        a.plot(loss, [r["step_p99_s"] * 1e3 for r in pts], "s--", color=col, label=label + ", p99")
        b.plot(loss, [r["busbw_bytes_per_second"] / MBIT for r in pts], "o-", color=col, label=label + ", measured")
        mathis = [(r["loss_percent"], r["mathis_busbw_bytes_per_second"]) for r in pts
                  if r["mathis_busbw_bytes_per_second"]]
        if mathis:
            b.plot([x for x, _ in mathis], [y / MBIT for _, y in mathis], "x:", color=col, label=label + ", Mathis")
        c.plot(loss, [r["retransmits_per_step"] for r in pts], "o-", color=col, label=label)
        c.plot(loss, [math.nan if r.get("timeouts_per_step") is None else 100 * r["timeouts_per_step"] for r in pts],
               "x:", color=col)
        d.plot(loss, [(r["transfer_s"] or math.nan) * 1e3 for r in pts], "o-", color=col, label=label)
    for ax, title, ylabel in ((a, "step time", "ms"), (b, "bus bandwidth", "Mbit/s"),
                              (c, "TCP retransmitted segments per step (o) and timeouts per 100 steps (x)",
                               "segments, timeouts"),
                              (d, "transfer (after the last rank is ready)", "ms")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("packet loss on one node's egress (%)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    b.set_yscale("log")
    a.legend(fontsize=6)
    b.legend(fontsize=6)
    fig.tight_layout()
    path = out / "fabric.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# `ddp-fnn estimate --sweep --plot`: the model alone
# ---------------------------------------------------------------------------------------
