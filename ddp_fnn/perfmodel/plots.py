"""`ddp-fnn estimate --sweep PARAM=... --plot FILE.png` (``estimate_sweep``): two panels
over the swept values, times per step (ms) and scaling efficiency (%). (The sweep's plots
of real jobs are sweep/plots.py; a cluster's link series, cluster/linkstats.py.)"""

from __future__ import annotations

from pathlib import Path

from ddp_fnn.core import figures
from ddp_fnn.core.units import parse_rate

MBIT = 1e6 / 8          # bytes/s in one Mbit/s


def estimate_sweep(path: str | Path, name: str, values: list, rows: list) -> None:
    """Two panels over the swept values (``netmodel.sweep``'s ``rows``): times per step
    (ms) and scaling efficiency (%). ValueError naming --plot when matplotlib is missing
    or the file cannot be written."""
    plt = figures.pyplot(no_plot_option=False)
    xs = [parse_rate(v) * 8 / 1e9 for v in values] if name == "link-rate" else [float(v) for v in values]
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
    figures.save(plt, fig, path, 100, f"--plot {path}")


