#!/usr/bin/env bash
# One node, N worker processes: `torchrun --standalone --nproc-per-node N -m ddp_fnn train`.
#
#   launch/local.sh [-n N] [TRAIN_ARGS...]
#
#   -n N              workers (must come first; default: $NPROC_PER_NODE, else 2)
#   TRAIN_ARGS        `ddp-fnn train` options, e.g. --max-steps 100 --output runs/a
#   NPROC_PER_NODE    workers, when -n is not given
#   PYTHON            interpreter (default: the repo's .venv/bin/python if present, else python3)
#
# The settings are checked once first with `ddp-fnn train --dry-run` as rank 0 of a
# world of N, so a bad option is one line `ddp-fnn: error: ...` and exit status 2,
# not N workers each failing and torchrun's failure report. Then the script execs
# torchrun; its exit status is the job's. Workers use OMP_NUM_THREADS=1 unless set.
# Example: launch/local.sh -n 2 --max-steps 200 --global-batch-size 512
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "local.sh: error: $*" >&2; exit 2; }

nproc=${NPROC_PER_NODE:-2}
if [ "${1:-}" = -n ]; then
    [ $# -ge 2 ] || die "-n needs a value"
    nproc=$2
    shift 2
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "the worker count (-n or NPROC_PER_NODE) must be a positive integer, got '$nproc'"
python=${PYTHON:-$repo/.venv/bin/python}      # PYTHON, else the repo's venv, else python3
[ -n "${PYTHON:-}" ] || [ -x "$python" ] || python=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
for arg in "$@"; do
    if [ "$arg" = -h ] || [ "$arg" = --help ]; then
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        echo
        exec "$python" -m ddp_fnn train --help
    fi
done

# ---- validate once, as rank 0 of N, before starting N processes -------------------------
# The environment is what torchrun gives rank 0, so checks that depend on the world size
# (--global-batch-size at least N x grad-accum) run too. The plan goes to /dev/null;
# only a failure is shown.
errfile=$(mktemp "${TMPDIR:-/tmp}/ddp-fnn-local.XXXXXX")
trap 'rm -f "$errfile"' EXIT
status=0
WORLD_SIZE=$nproc RANK=0 LOCAL_RANK=0 LOCAL_WORLD_SIZE=$nproc GROUP_RANK=0 \
    "$python" -m ddp_fnn train --dry-run "$@" > /dev/null 2> "$errfile" || status=$?
if [ $status != 0 ]; then
    if [ $status = 2 ]; then
        grep -m1 '^ddp-fnn: error:' "$errfile" >&2 || tail -n 1 "$errfile" >&2
    else
        tail -n 20 "$errfile" >&2
    fi
    exit $status
fi
rm -f "$errfile"
trap - EXIT

exec "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m ddp_fnn train "$@"
