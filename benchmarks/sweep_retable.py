"""Rewrite recorded sweeps' tables (sweep.csv, sweep.json, validation.md) with the columns
and figures the current sweep derives from the same measurements (e.g. which points were
link-bound and which host-bound), without running a job:

    .venv/bin/python benchmarks/sweep_retable.py docs/sweep/model docs/sweep/calibrate docs/sweep/fabric
"""

import sys
from pathlib import Path

from ddp_fnn import sweep

for d in sys.argv[1:]:
    figures = sweep.retable(Path(d))
    link = figures["link_bound"]["step_error"]
    print(f"{d}: {figures['bound']}; step error, all {figures['step_error']['points']} points: median "
          f"{figures['step_error']['median_abs']:.1%}, max {figures['step_error']['max_abs']:.1%}; link-bound "
          + (f"{link['points']}: median {link['median_abs']:.1%}, max {link['max_abs']:.1%}" if link["points"] else "none"))
