#!/usr/bin/env bash
# One GPU, one run of benchmarks/gpu.py: the trainer driven through its CLI only (phases vs
# torch.profiler's kernels; the host's waits for the device in the --profile trace, every
# synchronise call counted, none between log steps; each step's loss, read without a sync,
# against the logged loss; bf16 MFU; the run-ahead clock rule; the host >= 4 steps ahead
# of a stream slowed by a spin kernel; --on-nan skip, --target-loss, bucket detail, a
# matmul ceiling), sized to finish in under 7 minutes on an H100/H200; ddp-fnn need not be
# installed (PYTHONPATH is the checkout).
#
#   launch/gpu.sh OUT_DIR [EXTRA gpu.py OPTIONS...]     e.g. --parts a,profile  --no-compile
#                                                       or --device cpu --quick (smoke test)
#
#   OUT_DIR   where gpu.json, gpu.md, console.log, logs/ and artifacts/ go (created)
#   PYTHON    interpreter (default python3); OMP_NUM_THREADS defaults to 4
#
# The script's own budget is 390 s (--budget-s): each part gets at most its own limit
# and what is left of the budget; `timeout` is the backstop. Exit status: gpu.py's (0
# when every part ran, whatever its checks say), 124 if the backstop fired.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: launch/gpu.sh OUT_DIR [gpu.py options...]" >&2; exit 2; }
out=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo" || exit 2
mkdir -p "$out" || exit 2
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
timeout -k 10 410 "$python" -u benchmarks/gpu.py --out "$out" --budget-s 390 "$@" 2>&1 | tee "$out/console.log"
exit "${PIPESTATUS[0]}"
