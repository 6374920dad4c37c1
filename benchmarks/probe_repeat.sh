#!/usr/bin/env bash
# The pre-training probe, repeated (benchmarks/probe_repeat.py): 20 launch/demo.sh runs
# (2 ranks, loopback), 10 runs on 4 namespace nodes (root), and the probe alone timed 15
# times; per run the fit's method, alpha, beta, the probe's traffic in summary.json and
# in every rank's Prometheus counters, and (namespaces) kernel TX vs reported bytes.
# Each part writes /tmp/probe-repeat-{demo,netns,cost}.* as well. Results: docs/netmodel.md.
#   benchmarks/probe_repeat.sh [demo] [netns] [cost]      (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=$(launch/setup.sh)/bin/python
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(demo netns cost)
for part in "${parts[@]}"; do
    case $part in
        demo)  "$py" benchmarks/probe_repeat.py demo --runs 20 --steps 60 --json /tmp/probe-repeat-demo.json ;;
        netns) "$py" benchmarks/probe_repeat.py netns --runs 10 --nodes 4 --steps 30 --json /tmp/probe-repeat-netns.json ;;
        cost)  "$py" benchmarks/probe_repeat.py cost --runs 15 | tee /tmp/probe-repeat-cost.txt ;;
        *) echo "probe_repeat.sh: unknown part '$part' (demo, netns or cost)" >&2; exit 2 ;;
    esac
done
