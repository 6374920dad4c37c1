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
#   LINK_LIMIT      the shaper's queue in bytes (tbf `limit`) instead of 50 ms of backlog:
#                   a shallow buffer that tail-drops bursts. Needs LINK_RATE.
#   PYTHON          interpreter (default: the repo's .venv/bin/python if present, else python3)
#
# Example, two nodes whose first one is reachable as node0:
#   node0$ NNODES=2 RDZV_ENDPOINT=node0:29400 launch/node.sh --max-steps 100
#   node1$ NNODES=2 RDZV_ENDPOINT=node0:29400 launch/node.sh --max-steps 100
#
# Settings errors print one line `node.sh: error: ...` and exit 2. On success the script
# execs torchrun, so the exit status (and signals) are torchrun's.
set -euo pipefail
here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)    # ddp_fnn/cluster/, beside tbf.sh
repo=$(cd "$here/../.." && pwd)                       # a checkout's root, for its .venv

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
# A token bucket on the interface's egress caps what this node can send (launch/tbf.sh
# defines the bucket and its queue).
. "$here/tbf.sh"
link_limit=${LINK_LIMIT:-}
if [ -n "$link_limit" ]; then
    [[ $link_limit =~ ^[1-9][0-9]*$ ]] || die "LINK_LIMIT must be a positive number of bytes, got '$link_limit'"
    [ -n "$link_rate" ] || die "LINK_LIMIT=$link_limit needs LINK_RATE (it is the rate shaper's queue)"
fi
if [ -n "$link_rate" ]; then
    tbf_rate_bytes "$link_rate" >/dev/null \
        || die "LINK_RATE must be a tc rate like 1gbit, 100mbit or 12500kbps, got '$link_rate'"
    mtu=$(cat "/sys/class/net/$link_iface/mtu" 2>/dev/null) || die "LINK_IFACE $link_iface: no such interface"
    command -v tc >/dev/null || die "LINK_RATE is set but tc (iproute2) is not installed"
    params=$(tbf_params "$link_rate" "$mtu" "$link_limit")
    # shellcheck disable=SC2086    # params is a list of tc words
    if ! err=$(tc qdisc replace dev "$link_iface" root tbf $params 2>&1); then
        die "cannot shape $link_iface to $link_rate with tc (needs CAP_NET_ADMIN): ${err//$'\n'/ }"
    fi
    echo "node.sh: $link_iface egress shaped: tbf $params" >&2
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
