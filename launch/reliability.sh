#!/usr/bin/env bash
# Run K consecutive short 2-rank torchrun launches of one command and count how they
# end; a check that a run's start and shutdown are reliable, not just its training.
#
#   launch/reliability.sh [-n K] [-p NPROC] [-t TAIL] [-- SCRIPT_OR_-m_MODULE ARGS...]
#
#   -n K      launches (default 50; or RUNS=K)
#   -p NPROC  ranks per launch (default 2)
#   -t TAIL   stderr lines shown per failure (default 15)
#   after --  what torchrun runs (default: -m ddp_fnn train --max-steps 5 --metrics-port 0)
#
# Each launch is `torchrun --standalone --nproc-per-node NPROC ARGS...` with
# OMP_NUM_THREADS=1. A failure is a non-zero torchrun status, or "terminate called" on
# stderr; each is printed with torchrun's status, the workers' exit codes that torchrun
# reported (-6 is SIGABRT), the workers' "terminate called"-style lines and the last
# TAIL lines of its stderr. The last line is "N passed, N failed"; the exit status is 1
# if any launch failed, else 0. A command that does not start with "-" may omit "--".
# Example: launch/reliability.sh -n 100 -- launch/repro_ddp_exit.py --fix exit
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=${RUNS:-50}
nproc=2
tail_n=15
while [ $# -gt 0 ]; do
    case $1 in
        -n) runs=$2; shift 2 ;;
        -p) nproc=$2; shift 2 ;;
        -t) tail_n=$2; shift 2 ;;
        -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        -*) echo "reliability.sh: unknown option $1 (the command goes after --)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -eq 0 ]; then
    set -- -m ddp_fnn train --max-steps 5 --metrics-port 0
fi
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

work=$(mktemp -d "${TMPDIR:-/tmp}/reliability.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$repo"
echo "reliability: $runs launches of: torchrun --standalone --nproc-per-node $nproc $*"
passed=0
failed=0
declare -A statuses=()
for ((i = 1; i <= runs; i++)); do
    "$python" -m torch.distributed.run --standalone --nproc-per-node "$nproc" "$@" \
        >"$work/out" 2>"$work/err"
    rc=$?
    # torchrun's failure summary names each failed worker's exit code (-6 is SIGABRT).
    workers=$(awk '/^ *rank *:/ {r = $3}
        /^ *exitcode *:/ {code[r] = $3} END {for (r in code) print "rank " r "=" code[r]}' \
        "$work/err" | sort | paste -sd' ' -)
    if [ $rc -eq 0 ] && ! grep -q 'terminate called' "$work/err"; then
        passed=$((passed + 1))
        statuses[0]=$(( ${statuses[0]:-0} + 1 ))
        continue
    fi
    failed=$((failed + 1))
    key="rc=$rc${workers:+ exit codes: $workers}"
    statuses[$key]=$(( ${statuses[$key]:-0} + 1 ))
    echo "--- launch $i/$runs failed: $key"
    # The workers' own last words first (torchrun's summary would push them out of the tail).
    grep -E 'terminate called|Fatal Python error|Segmentation fault|what\(\):' "$work/err" \
        | head -n 5 | sed 's/^/    worker: /'
    tail -n "$tail_n" "$work/err" | sed 's/^/    /'
done
echo "statuses:"
for k in "${!statuses[@]}"; do
    printf '  %4d  %s\n' "${statuses[$k]}" "$( [ "$k" = 0 ] && echo 'rc=0' || echo "$k")"
done
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
