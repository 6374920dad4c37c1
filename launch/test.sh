#!/usr/bin/env bash
# The test suite, from a fresh machine: set up .venv (launch/setup.sh), then pytest.
# Extra arguments go to pytest, e.g. `launch/test.sh -m "not slow"` for the quick part.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$repo/launch/setup.sh")
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
