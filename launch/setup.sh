#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv beside this repo and install
# ddp-fnn into it with torch 2.13.0 (CPU) and the test tools. Idempotent: a
# second run installs nothing new. Prints the venv's path on its last line.
#   VENV=DIR     use another directory for the environment
#   PYTHON=EXE   the interpreter to build it with (default python3)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$repo/.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.ddp-fnn-installed"
# Reinstall only when the package metadata or the constraints changed.
want=$(cat "$repo/pyproject.toml" "$repo/launch/constraints-cpu.txt" | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet -c "$repo/launch/constraints-cpu.txt" -e "$repo[test,plot]" >&2
    echo "$want" > "$stamp"
fi
echo "$venv"
