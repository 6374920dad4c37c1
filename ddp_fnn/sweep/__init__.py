"""`ddp-fnn sweep`: a grid of real training jobs, each one's measurement beside the cost
model's prediction.

The grid is world sizes x link rates x bucket caps x compression x packet loss x queue
limits. Each point is one `ddp-fnn train` job, on network-namespace nodes
(launch/netns-cluster.sh: one worker a node, each node's egress shaped by tc, root) or
on loopback (torchrun --standalone; no shaping or faults there). What it writes in
``--out``:

    points/NAME/          the job's own outputs (summary.json, step files, logs,
                          netstats.json); NAME says the point's settings
    points/NAME/point.json  written last: the point is complete (a rerun of the same
                          sweep reuses it rather than running it again)
    sweep.csv             one row per point (COLUMNS): settings, measured, predicted, errors
    sweep.json            the same rows and the validation figures, strict JSON
    validation.md         the rows as a Markdown table and the error statistics
    *.png                 plots (sweep/report.py; needs matplotlib, the `plot` extra)

Two predictions per point:

- ``pred_*``, the run's own (summary.json ``predicted_*``, recomputed by the model as
  it is now): its probe's alpha and beta, its measured compute, wait and bucket
  schedule, the backend's queue of all-reduces (predict.py).
- ``cal_*``, calibrated elsewhere: from the point of ``--calibrate-on`` nodes with the
  same link, buckets, compression and faults (predict.from_run), its compute scaled by
  the CPU share of this machine's cores (``compute_scale``): the nodes of a
  one-machine cluster share its cores, so N workers with one thread each on C cores
  compute max(1, N / C) times slower than one. On separate machines the scale is 1. The
  bus bandwidth is the calibration run's: the same cores also move every node's frames
  through veth and the bridge, which no smaller run shows (docs/netmodel.md says what
  that costs the prediction here).

Measured figures are rank 0's (summary.json's top level) unless said otherwise; p99 of
the step time comes from its step file (steps after the first, as the summary's).
"""


from __future__ import annotations

import json
import sys
from pathlib import Path

from ddp_fnn.sweep.grid import AXES, LAUNCHERS, Point, SweepConfig, parse_list  # noqa: F401
from ddp_fnn.sweep.measure import COLUMNS, bound, build_rows, quantile  # noqa: F401
from ddp_fnn.sweep.report import retable, validation, write_outputs  # noqa: F401
from ddp_fnn.sweep.run import _identity, command, point_dir, run_point  # noqa: F401


def main(cfg: SweepConfig) -> int:
    """Run every point (reusing complete ones), then write the table, the validation
    figures and the plots. Exit status 0, or 1 when a point failed."""
    import click

    cfg.check()
    points = cfg.points()
    for p in points:                         # before anything runs: no complete point of other settings
        done = point_dir(cfg, p) / "point.json"
        if done.is_file():
            ident, old = _identity(cfg, p), json.loads(done.read_text())
            if {k: old.get(k) for k in ident} != ident:
                raise ValueError(f"--out {cfg.out}: point {p.name} was run with other settings ({done}); "
                                 f"use another --out")
    cfg.out.mkdir(parents=True, exist_ok=True)
    results: dict[Point, tuple[bool, Path]] = {}
    click.echo(f"ddp-fnn sweep: {len(points)} point(s), launcher {cfg.launcher}, {cfg.steps} steps each; "
               f"results in {cfg.out}", err=True)
    with click.progressbar(points, label="sweep", file=sys.stderr, show_pos=True, show_eta=True,
                           item_show_func=lambda p: p.name if p else "") as bar:
        for p in bar:
            results[p] = run_point(cfg, p)
    rows = build_rows(cfg, results)
    figures, plots = write_outputs(cfg, rows, cfg.command_line())
    for key, label in (("step_error", "step time"), ("exposed_error", "exposed comm"),
                       ("cal_step_error", f"step time calibrated on {cfg.calibrate_on} nodes"),
                       ("tx_error", "kernel TX vs reported bytes")):
        f = figures[key]
        if f["points"]:
            click.echo(f"{label}: median abs error {f['median_abs']:.1%}, largest {f['max_abs']:.1%} "
                       f"over {f['points']} point(s)")
    for path in [cfg.out / "sweep.csv", cfg.out / "sweep.json", cfg.out / "validation.md", *plots]:
        click.echo(f"wrote {path}")
    failed = [r["point"] for r in rows if r["status"] != "ok"]
    if failed:
        click.echo(f"ddp-fnn sweep: {len(failed)} point(s) failed: {', '.join(failed)} (logs in "
                   f"{cfg.out / 'points'}/NAME/run.log; a rerun of the same command retries them)", err=True)
        return 1
    return 0
