"""Every plot ddp-fnn draws (matplotlib, the `plot` extra): `ddp-fnn sweep`'s, of real
jobs beside the model, and `ddp-fnn estimate --sweep --plot`'s, of the model alone.

`ddp-fnn sweep`:

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

`ddp-fnn estimate --sweep PARAM=... --plot FILE.png` (``estimate_sweep``): two panels
over the swept values, times per step (ms) and scaling efficiency (%).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ddp_fnn.perfmodel import netmodel
from ddp_fnn.perfmodel import predict

MBIT = 1e6 / 8          # bytes/s in one Mbit/s


def check_plotting(no_plot_option: bool = True) -> None:
    """ValueError naming the fix when matplotlib is missing (sweep --plot checks it before
    any job runs); ``no_plot_option``: the command has --no-plot to offer as well."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'ddp-fnn[plot]'"
                         + (" (or pass --no-plot)" if no_plot_option else "")) from None


def _plt(no_plot_option: bool = True):
    check_plotting(no_plot_option)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
            base = min(shaped, key=lambda r: netmodel.parse_rate(r["link_rate"]))
            eta = base["beta_bytes_per_second"] / netmodel.parse_rate(base["link_rate"])
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
        return netmodel.parse_rate(row["link_rate"]) / MBIT
    return UNSHAPED_X


def draw(cfg, rows: list[dict], out: Path) -> list[Path]:
    plt = _plt()
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

def estimate_sweep(path: str | Path, name: str, values: list, rows: list) -> None:
    """Two panels over the swept values (``netmodel.sweep``'s ``rows``): times per step
    (ms) and scaling efficiency (%). ValueError naming --plot when matplotlib is missing
    or the file cannot be written."""
    plt = _plt(no_plot_option=False)
    xs = [netmodel.parse_rate(v) * 8 / 1e9 for v in values] if name == "link-rate" else [float(v) for v in values]
    xlabel = "link rate (Gbit/s)" if name == "link-rate" else name
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    top.plot(xs, [r.comm_time_per_step_s * 1e3 for r in rows], "o-", label="all-reduce")
    top.plot(xs, [r.exposed_comm_time_per_step_s * 1e3 for r in rows], "o-", label="exposed")
    top.plot(xs, [r.compute_time_per_step_s * 1e3 for r in rows], "--", label="compute")
    top.set_ylabel("time per step (ms)")
    top.set_ylim(bottom=0)
    top.legend()
    bottom.plot(xs, [r.scaling_efficiency * 100 for r in rows], "o-")
    bottom.set_ylabel("scaling efficiency (%)")
    bottom.set_ylim(0, 105)
    bottom.set_xlabel(xlabel)
    if min(xs) > 0 and max(xs) / min(xs) >= 8:
        bottom.set_xscale("log")
    top.set_title(f"ddp-fnn estimate: {rows[0].algorithm} all-reduce, layers {','.join(map(str, rows[0].widths))}"
                  if name != "width" else f"ddp-fnn estimate: {rows[0].algorithm} all-reduce")
    fig.tight_layout()
    _save(plt, fig, path, 100, f"--plot {path}")


# ---------------------------------------------------------------------------------------
# netns-cluster.sh --sample-ms: each link's TX rate against time
# ---------------------------------------------------------------------------------------

def link_series(jsonl: str | Path, path: str | Path, *, t_from: float | None = None, t_to: float | None = None,
                title: str | None = None) -> None:
    """Each link's TX rate (Mbit/s) between consecutive samples of a cluster's
    ``linkstats.jsonl`` (ddp_fnn/cluster/linkstats.py), against seconds since the first
    sample: the nodes' eth0 in one panel, the leaf uplinks (both directions) in the
    other when there are any. ``t_from``/``t_to`` cut a window (seconds). ValueError
    when matplotlib is missing, the file has fewer than two samples, or the PNG cannot
    be written."""
    plt = _plt(no_plot_option=False)
    samples = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    if len(samples) < 2:
        raise ValueError(f"{jsonl}: fewer than two samples")
    t0 = samples[0]["t"]
    names = list(samples[0]["tx_bytes"])
    xs, rates = [], {n: [] for n in names}
    for a, b in zip(samples, samples[1:]):
        dt = b["t"] - a["t"]
        mid = (a["t"] + b["t"]) / 2 - t0
        if dt <= 0 or (t_from is not None and mid < t_from) or (t_to is not None and mid > t_to):
            continue
        xs.append(mid)
        for n in names:
            rates[n].append((b["tx_bytes"][n] - a["tx_bytes"][n]) / dt / MBIT)
    if not xs:
        raise ValueError(f"{jsonl}: no samples in the window")
    nodes = [n for n in names if not n.startswith("leaf")]
    uplinks = [n for n in names if n.startswith("leaf")]
    panels = [("node links (eth0 TX)", nodes)] + ([("leaf uplinks (up: leaf to spine, down: spine to leaf)",
                                                   uplinks)] if uplinks else [])
    period_ms = 1e3 * (samples[-1]["t"] - t0) / (len(samples) - 1)
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(11, 2.6 + 2.4 * len(panels)), squeeze=False)
    for ax, (label, group) in zip(axes[:, 0], panels):
        for n in group:
            ax.step(xs, rates[n], where="mid", lw=0.9, label=n)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("TX Mbit/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=min(4, len(group)))
    axes[-1, 0].set_xlabel(f"seconds since the first sample (one sample every {period_ms:.0f} ms)")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(plt, fig, path, 110, str(path))


def _save(plt, fig, path, dpi: int, label: str) -> None:
    """Write ``fig`` to ``path`` and close it; ValueError naming ``label`` if it cannot be written."""
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as e:
        raise ValueError(f"{label}: cannot write: {e.strerror}") from None
    finally:
        plt.close(fig)
