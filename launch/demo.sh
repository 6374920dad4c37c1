#!/usr/bin/env bash
# The main job on its embedded default, from a fresh machine: set up .venv
# (launch/setup.sh), then a short 2-worker CPU training with metrics on.
# Each worker serves http://127.0.0.1:9400+LOCAL_RANK/metrics while it trains (and 10 s
# after); rank 0 prints progress and the summary table and writes runs/demo/.
# Extra arguments go to `ddp-fnn train` and override the defaults, e.g.
#   launch/demo.sh --sync allreduce --max-steps 500
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$repo/launch/setup.sh")
PYTHON="$venv/bin/python" exec "$repo/launch/local.sh" -n 2 \
    --max-steps 300 --log-every 50 --metrics-port "${METRICS_PORT:-9400}" --metrics-linger 10 \
    --output "$repo/runs/demo" "$@"
