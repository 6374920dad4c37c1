#!/usr/bin/env bash
# Build the compose simulation's images without any image registry (air-gapped hosts,
# and machines whose only network is a Debian mirror and PyPI):
#
#   ddp-fnn-base:bookworm     Debian bookworm (debootstrap --variant=minbase) with python3,
#                             pip and iproute2: the stand-in for python:3.11-slim
#   deploy/wheelhouse/        ddp-fnn and every wheel it needs (torch's CPU wheel included),
#                             gathered by pip on this host
#   ddp-fnn:cpu               deploy/Dockerfile on that base, installed from the wheelhouse
#   ddp-fnn-prometheus:local  Debian's prometheus package with deploy/prometheus baked in
#
# Usage: deploy/build-images.sh [--rebuild]     (root; docker reachable: DOCKER_HOST or the
# default socket, e.g. started by launch/dockerd.sh). Images already present are kept
# unless --rebuild; the other two are built every time, from Docker's layer cache where
# nothing they copy changed. Online users need none of this:
# `docker compose up --build` builds from python:3.11-slim and PyTorch's CPU index.
#   MIRROR=URL   Debian mirror for debootstrap       (default http://deb.debian.org/debian)
#   PYTHON=EXE   the pip that gathers the wheelhouse  (default: the repo's .venv, else python3)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
die() { echo "build-images.sh: error: $*" >&2; exit 2; }
rebuild=0
for a in "$@"; do
    case $a in
        --rebuild) rebuild=1 ;;
        *) die "unknown argument '$a' (usage: deploy/build-images.sh [--rebuild])" ;;
    esac
done
mirror=${MIRROR:-http://deb.debian.org/debian}
python=${PYTHON:-$repo/.venv/bin/python}
[ -x "$python" ] || python=python3
command -v docker >/dev/null || die "docker (the client) is not installed"
docker info >/dev/null 2>&1 || die "no Docker daemon answers (start one: launch/dockerd.sh start)"
have() { docker image inspect "$1" >/dev/null 2>&1; }
t0=$SECONDS
say() { echo "build-images.sh: [$((SECONDS - t0)) s] $*" >&2; }

# ---- the base: Debian's own packages, no registry ------------------------------------
if [ "$rebuild" = 1 ] || ! have ddp-fnn-base:bookworm; then
    command -v debootstrap >/dev/null || die "debootstrap is not installed (Debian: apt-get install debootstrap)"
    root=$(mktemp -d /var/tmp/ddp-fnn-rootfs.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    say "debootstrap bookworm (minbase) from $mirror"
    debootstrap --variant=minbase --include=python3,python3-pip,iproute2,ca-certificates \
        bookworm "$root" "$mirror" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    # PIP_BREAK_SYSTEM_PACKAGES: the image is the environment (Debian marks its Python
    # externally managed, PEP 668); python:3.11-slim behaves so already.
    tar -C "$root" -c . | docker import \
        --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 LANG=C.UTF-8' \
        --change 'CMD ["bash"]' - ddp-fnn-base:bookworm >/dev/null
    rm -rf "$root"
    trap - EXIT
    say "ddp-fnn-base:bookworm imported"
fi

# ---- the wheelhouse: pip on this host ---------------------------------------------------
say "gathering the wheelhouse (deploy/wheelhouse)"
rm -f deploy/wheelhouse/ddp_fnn-*.whl          # the package itself: always this checkout's code
"$python" -m pip wheel --quiet --wheel-dir deploy/wheelhouse -c launch/constraints-cpu.txt . 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
ls deploy/wheelhouse/torch-*.whl >/dev/null 2>&1 || die "the wheelhouse has no torch wheel"

# ---- the images -----------------------------------------------------------------------
# --network host: a build's apt-get reaches the mirror through the host's own network
# (launch/dockerd.sh runs the daemon without NAT or forwarding, so a build's own network
# namespace reaches nothing).
say "building ddp-fnn:cpu"
DOCKER_BUILDKIT=0 docker build --quiet --network host -f deploy/Dockerfile --build-arg BASE=ddp-fnn-base:bookworm \
    -t ddp-fnn:cpu . >/dev/null
say "building ddp-fnn-prometheus:local"
DOCKER_BUILDKIT=0 docker build --quiet --network host -f deploy/prometheus/Dockerfile --build-arg BASE=ddp-fnn-base:bookworm \
    -t ddp-fnn-prometheus:local . >/dev/null
say "done: ddp-fnn-base:bookworm, ddp-fnn:cpu, ddp-fnn-prometheus:local"
