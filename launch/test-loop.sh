#!/usr/bin/env bash
# Run the test suite K times in a row from a fresh clone of this repository and count
# how the runs end: the check that the suite passes every time, not just once.
#
#   launch/test-loop.sh [-n K] [-k] [-- PYTEST_ARGS...]
#
#   -n K   runs (default 10)
#   -k     keep the clone and the logs (default: keep them only when a run failed)
#   after --, arguments for launch/test.sh (pytest), e.g. -- -m "not slow"
#
# The clone is `git clone` of this checkout's HEAD (committed work only) into a temporary
# directory, so nothing from the working tree (a .venv, caches, stray files) leaks in.
# Run 1 creates the clone's .venv with launch/setup.sh, as a new user's first
# launch/test.sh does; later runs reuse it. Each run's output goes to LOGDIR/run-I.log.
# A run fails when launch/test.sh exits non-zero; an abort of the pytest process
# ("Fatal Python error", "terminate called", exit status 134) is reported as such.
# Prints one line per run and a last line "K runs: P passed, F failed (A aborted)"; the
# exit status is 1 if any run failed.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
runs=10
keep=0
while [ $# -gt 0 ]; do
    case $1 in
        -n) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || { echo "test-loop.sh: error: -n needs a positive integer, got '${2:-}'" >&2; exit 2; }
            runs=$2; shift 2 ;;
        -k) keep=1; shift ;;
        -h|--help) sed -n '2,/^[^#]/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        *) echo "test-loop.sh: error: unknown option $1 (pytest arguments go after --)" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d "${TMPDIR:-/tmp}/ddp-fnn-test-loop.XXXXXX")
chmod 755 "$work"            # mktemp's 0700 would hide the clone from the tests that drop root
clone=$work/ddp-fnn
logs=$work/logs
mkdir -p "$logs"
git clone --quiet "$repo" "$clone" || { echo "test-loop.sh: error: cannot clone $repo" >&2; exit 2; }
echo "test-loop: $runs runs of launch/test.sh $* in a fresh clone of $(git -C "$clone" rev-parse --short HEAD) ($clone)"

passed=0 failed=0 aborted=0
for i in $(seq 1 "$runs"); do
    log=$logs/run-$i.log
    start=$(date +%s)
    (cd "$clone" && launch/test.sh "$@") > "$log" 2>&1
    status=$?
    took=$(( $(date +%s) - start ))
    # pytest's last line: "==== 411 passed, 2 skipped in 600.1s ====" (no "=" under -q)
    tally=$(grep -E '^=* *[0-9]+ (passed|failed|errors?|skipped|deselected).* in [0-9.]+s' "$log" | tail -1 |
            sed 's/=//g; s/^ *//; s/ *$//')
    if [ "$status" -eq 0 ]; then
        passed=$((passed + 1))
        echo "run $i: passed in ${took}s: $tally"
    else
        failed=$((failed + 1))
        why="exit status $status"
        if [ "$status" -eq 134 ] || grep -qE 'Fatal Python error|terminate called' "$log"; then
            aborted=$((aborted + 1))
            why="ABORTED ($why): $(grep -m1 -E 'Fatal Python error|terminate called' "$log")"
        fi
        echo "run $i: FAILED in ${took}s, $why: ${tally:-no pytest summary}; log $log"
        grep -E '^(FAILED|ERROR) ' "$log" | head -20 | sed 's/^/    /'
    fi
done
echo "$runs runs: $passed passed, $failed failed ($aborted aborted)"
if [ "$failed" -eq 0 ] && [ "$keep" -eq 0 ]; then
    rm -rf "$work"
else
    echo "test-loop: clone and logs kept in $work"
fi
[ "$failed" -eq 0 ]
