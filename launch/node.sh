#!/usr/bin/env bash
# One node of a (multi-node) ddp-fnn training job: torchrun with c10d rendezvous,
# configured by environment variables. The same script is the entrypoint of the
# docker-compose services, the Kubernetes pods (Kubeflow PyTorchJob) and the nodes
# of launch/netns-cluster.sh. Extra arguments go to `ddp-fnn train` after TRAIN_ARGS.
#
#   NNODES          nodes in the job: N, or MIN:MAX for an elastic job        (default 1)
#   NPROC_PER_NODE  worker processes on this node                            (default 1)
#   RDZV_ENDPOINT   host:port of the rendezvous store; the node whose hostname or
#                   address is `host` serves it. Required when NNODES != 1; with
#                   NNODES=1 and none given the job runs --standalone on loopback.
#   RDZV_ID         rendezvous id; the same on every node of one job      (default ddp-fnn)
#   METRICS_ADDR    address each worker's /metrics endpoint binds      (default 127.0.0.1)
#   METRICS_PORT    base port of /metrics; worker LOCAL_RANK serves BASE+LOCAL_RANK
#                                                                          (default 9400)
#   TRAIN_ARGS      extra `ddp-fnn train` arguments, split on whitespace (no globbing)
#   OUTPUT_DIR      passed as --output (rank 0 writes summary.json and model.pt there)
#   MAX_RESTARTS    torchrun --max-restarts: times the whole group restarts  (default 0)
#   LINK_RATE       shape LINK_IFACE's egress to this rate before training, e.g. 1gbit,
#                   100mbit (tc units: bit = bit/s, bps = bytes/s). Needs CAP_NET_ADMIN.
#   LINK_IFACE      interface LINK_RATE shapes                              (default eth0)
#   PYTHON          interpreter (default: the repo's .venv/bin/python if present, else python3)
#
# Example, two nodes whose first one is reachable as node0:
#   node0$ NNODES=2 RDZV_ENDPOINT=node0:29400 launch/node.sh --max-steps 100
#   node1$ NNODES=2 RDZV_ENDPOINT=node0:29400 launch/node.sh --max-steps 100
#
# Settings errors print one line `node.sh: error: ...` and exit 2. On success the script
# execs torchrun, so the exit status (and signals) are torchrun's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "node.sh: error: $*" >&2; exit 2; }
need_uint() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"; }

nnodes=${NNODES:-1}
nproc=${NPROC_PER_NODE:-1}
rdzv_endpoint=${RDZV_ENDPOINT:-}
rdzv_id=${RDZV_ID:-ddp-fnn}
metrics_addr=${METRICS_ADDR:-127.0.0.1}
metrics_port=${METRICS_PORT:-9400}
train_args=${TRAIN_ARGS:-}
output_dir=${OUTPUT_DIR:-}
max_restarts=${MAX_RESTARTS:-0}
link_rate=${LINK_RATE:-}
link_iface=${LINK_IFACE:-eth0}
python=${PYTHON:-$repo/.venv/bin/python}      # PYTHON, else the repo's venv, else python3
[ -n "${PYTHON:-}" ] || [ -x "$python" ] || python=python3

[[ $nnodes =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES must be N or MIN:MAX (positive integers), got '$nnodes'"
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE must be a positive integer, got '$nproc'"
need_uint METRICS_PORT "$metrics_port"
need_uint MAX_RESTARTS "$max_restarts"
[ -n "$rdzv_id" ] || die "RDZV_ID must not be empty"
if [ "$nnodes" != 1 ] && [ -z "$rdzv_endpoint" ]; then
    die "RDZV_ENDPOINT (host:port of the rendezvous store) is required when NNODES=$nnodes"
fi
if [ -n "$rdzv_endpoint" ] && ! [[ $rdzv_endpoint =~ ^[^:]+:[0-9]+$|^\[[0-9a-fA-F:.]+\]:[0-9]+$ ]]; then
    die "RDZV_ENDPOINT must be host:port, got '$rdzv_endpoint'"
fi

# ---- link shaping ---------------------------------------------------------------------
# A token bucket on the interface's egress caps what this node can send. The bucket
# (burst) holds 4 ms of traffic at the rate (rate/250), and at least 16 full-size
# frames so a single TCP window's worth of MTU-sized packets is never dropped outright.
if [ -n "$link_rate" ]; then
    rate_bytes=$(awk -v r="$link_rate" 'BEGIN {
        if (!match(tolower(r), /^[0-9]+(\.[0-9]+)?/)) exit 1
        v = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
        if (u ~ /^(bit)?$/) m = 1/8; else if (u == "bps") m = 1
        else if (u ~ /^[kmgt]i?(bit|bps)$/) {
            p = index("kmgt", substr(u, 1, 1)); base = (substr(u, 2, 1) == "i") ? 1024 : 1000
            m = base ^ p; if (u ~ /bit$/) m /= 8
        } else exit 1
        b = v * m; if (b < 1) exit 1
        printf "%d\n", b }') || die "LINK_RATE must be a tc rate like 1gbit, 100mbit or 12500kbps, got '$link_rate'"
    mtu=$(cat "/sys/class/net/$link_iface/mtu" 2>/dev/null) || die "LINK_IFACE $link_iface: no such interface"
    burst=$(( rate_bytes / 250 ))
    (( burst >= 16 * mtu )) || burst=$(( 16 * mtu ))
    command -v tc >/dev/null || die "LINK_RATE is set but tc (iproute2) is not installed"
    if ! err=$(tc qdisc replace dev "$link_iface" root tbf rate "$link_rate" burst "$burst" latency 50ms 2>&1); then
        die "cannot shape $link_iface to $link_rate with tc (needs CAP_NET_ADMIN): ${err//$'\n'/ }"
    fi
    echo "node.sh: $link_iface egress shaped to $link_rate (tbf burst $burst bytes, latency 50ms)" >&2
fi

# ---- torchrun ---------------------------------------------------------------------------
if [ -n "$rdzv_endpoint" ]; then
    rdzv=(--rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" --rdzv-id "$rdzv_id")
else
    rdzv=(--standalone)
fi
out=()
[ -z "$output_dir" ] || out=(--output "$output_dir")
set -f                      # TRAIN_ARGS is split on whitespace, never globbed
extra=($train_args)
set +f

exec "$python" -m torch.distributed.run --nnodes "$nnodes" --nproc-per-node "$nproc" "${rdzv[@]}" \
    --max-restarts "$max_restarts" \
    -m ddp_fnn train --metrics-addr "$metrics_addr" --metrics-port "$metrics_port" "${out[@]}" \
    "${extra[@]}" "$@"
