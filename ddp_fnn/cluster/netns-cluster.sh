#!/usr/bin/env bash
# A multi-node ddp-fnn job on one Linux machine: each node is a network namespace with
# its own hostname, address and eth0, all joined by a bridge, so the gradient traffic
# crosses real (virtual) interfaces whose kernel counters can be read. Needs root.
#
#   launch/netns-cluster.sh --nodes N [--nproc-per-node P] [--link-rate RATE]
#                           [--leaves L] [--uplink-rate RATE] [--sample-ms MS]
#                           [--cpu-quota K:PERCENT]... [--loss K:PERCENT]... [--queue-limit K:BYTES]...
#                           [--rate-schedule T:RATE,T:RATE...] [--port PORT] [--out DIR] [-- TRAIN_ARGS...]
#   launch/netns-cluster.sh --cleanup
#
#   --nodes N           nodes (namespaces), 1..250
#   --nproc-per-node P  workers per node (default 1)
#   --link-rate RATE    cap each node's egress with a tc token bucket, e.g. 1gbit, 100mbit
#   --leaves L          a two-tier switch layer: the nodes on L leaf bridges in contiguous
#                       blocks, as torchrun ranks them (node k on leaf k / (N/L); L must
#                       divide N), the leaves joined through a spine bridge, one veth uplink
#                       per leaf (default 1: one bridge, no spine)
#   --uplink-rate RATE  cap each leaf's uplink in both directions with a token bucket (the
#                       leaf end's egress towards the spine, the spine end's towards the
#                       leaf); needs --leaves >= 2
#   --sample-ms MS      sample every node's eth0 and every uplink's TX counters every MS ms
#                       into DIR/linkstats.jsonl (ddp_fnn/cluster/linkstats.py; plot it
#                       with `python -m ddp_fnn.cluster.linkstats plot`)
#   --cpu-quota K:PCT   a slow node: node K's processes together get PCT % of one CPU
#                       (a cgroup's CFS quota: cgroup v1 cpu.cfs_quota_us, or v2 cpu.max),
#                       a real straggler; repeat for several nodes
#   --loss K:PCT        random packet loss on node K's egress: PCT % of the frames node K
#                       sends are dropped on the way (0.01 .. 100, steps of 0.01, e.g. 0.5
#                       or 0.5%), by an nftables rule on the switch (bridge forward hook,
#                       `iifname "vK" numgen random mod 10000 < N drop`), so that node K's
#                       TCP sees a loss in the network and retransmits; needs nft (Debian:
#                       nftables). (A drop in node K's own output hook or qdisc would not
#                       do: the kernel hands the error back to TCP, which sends the segment
#                       again as new data, and no retransmission is counted.)
#   --queue-limit K:BYTES  a shallow buffer: the switch port towards node K (vK's egress)
#                       gets a token bucket at the link rate with a queue of BYTES (tbf
#                       `limit`, a bucket of 16 frames), which tail-drops the rest of a
#                       burst, as a switch port with little buffer does; needs --link-rate
#   --rate-schedule T:RATE,...  change every node's link rate T seconds after the nodes
#                       start (tc qdisc change; T in increasing order). A first entry 0:RATE
#                       is the starting rate (the same as --link-rate RATE); otherwise
#                       --link-rate is needed. The wall-clock time of each change goes to
#                       DIR/rate-changes.jsonl as it happens and to netstats.json
#                       (rate_changes); --queue-limit ports change with the nodes
#   --port PORT         rendezvous port on node0 (default 29400)
#   --out DIR           where results go (default: a new directory under ${TMPDIR:-/tmp}):
#                       DIR/nodeK.log, DIR/nodeK/ (the node's --output; rank 0 writes
#                       summary.json in its node's directory), DIR/netstats.json,
#                       DIR/linkstats.jsonl (--sample-ms)
#   after --            arguments for `ddp-fnn train` on every node
#   --cleanup           remove what a killed earlier run left behind (namespaces named
#                       ddpfnn-PID-*, their /etc/netns entries), skipping runs still alive
#
# Layout (nothing is added to the host's own network configuration):
#
#   ns ddpfnn-PID-sw:  bridge br0 (no address, no route)  ports v0 .. v(N-1)
#   ns ddpfnn-PID-K:   eth0 = 10.213.0.(K+1)/24, lo; hostname nodeK (own UTS namespace);
#                      /etc/hosts maps node0..node(N-1) (from /etc/netns/ddpfnn-PID-K/hosts)
#
# and with --leaves L >= 2, instead of the one switch (one L2 segment still, one subnet):
#
#   ns ddpfnn-PID-leafJ:  bridge br0, ports vK for leaf J's nodes and `uplink`
#   ns ddpfnn-PID-spine:  bridge br0, ports l0 .. l(L-1), the far ends of the uplinks
#
# The subnet 10.213.0.0/24 exists only inside these namespaces, which have no route
# anywhere else, so concurrent runs do not clash and nothing leaves the machine. Each
# node runs launch/node.sh with NNODES=N, RDZV_ENDPOINT=node0:PORT, METRICS_ADDR = its own
# address, LINK_IFACE=eth0 (and LINK_RATE when given). IPv6 is off and GSO is limited to
# one segment on each eth0, so the interface counters count real Ethernet frames
# (MTU-sized), the way a physical NIC puts them on the wire.
#
# After the run, each node's eth0 TX/RX bytes and packets during the run (counters read
# before and after) are printed as a table and written to DIR/netstats.json, with each
# node's qdisc counters at the end (`tc -s qdisc`: kind, sent, dropped, overlimits), the
# same for the switch port towards it (`port_qdisc`), and the frames its --loss rule
# dropped. With --leaves >= 2, netstats.json's "uplinks" has one entry per leaf: the
# leaf end's counters (tx_bytes: leaf -> spine, rx_bytes: spine -> leaf, packets), the
# spine end's (spine_tx_bytes ...: the same traffic seen from the other end) and both
# ends' qdiscs; they are printed as a second table. Every namespace, veth, bridge, qdisc, nftables table, cgroup and /etc/netns
# entry is removed on every exit path (the qdiscs and nft rules live inside the
# cluster's namespaces, the nodes' and the switch's, and go with them)
# (success, failure, Ctrl-C, SIGTERM). When a node fails, the others are stopped rather
# than left waiting for it until a timeout. Exit status: 0 if every node exited 0, 1 if
# any failed, 2 for bad usage or a missing prerequisite, 128+signal when interrupted.
set -euo pipefail
# This script, node.sh and tbf.sh live together (ddp_fnn/cluster/, shipped in the wheel;
# launch/ holds links to them), so each finds the others beside its own real path.
here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
prog=netns-cluster.sh
prefix=ddpfnn
subnet=10.213.0

die() { echo "$prog: error: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# ---- prerequisites ----------------------------------------------------------------------
check_prereqs() {
    [ "$(uname -s)" = Linux ] || die "network namespaces need Linux (this is $(uname -s))"
    [ "$(id -u)" = 0 ] || die "must run as root (creates network namespaces); try: sudo $0 $*"
    command -v ip >/dev/null || die "'ip' (iproute2) not found"
    command -v unshare >/dev/null || die "'unshare' (util-linux) not found"
}

# Stop every process inside namespace $1: SIGTERM, up to 10 s to exit, then SIGKILL.
kill_ns_pids() {
    local ns=$1 pids deadline
    pids=$(ip netns pids "$ns" 2>/dev/null) || return 0
    [ -n "$pids" ] || return 0
    kill -TERM $pids 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do
        sleep 0.1
    done
    pids=$(ip netns pids "$ns" 2>/dev/null) || return 0
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while [ -n "$(ip netns pids "$ns" 2>/dev/null)" ] && [ $SECONDS -lt $deadline ]; do
        sleep 0.1
    done
}

# Remove namespace $1 (its interfaces and qdiscs go with it) and its /etc/netns entry.
remove_ns() {
    local ns=$1
    kill_ns_pids "$ns"
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "/etc/netns/$ns"
}

# ---- --cleanup ----------------------------------------------------------------------------
if [ "${1:-}" = --cleanup ]; then
    [ $# = 1 ] || die "--cleanup takes no other arguments"
    check_prereqs "$@"
    removed=0
    for ns in $(ip netns list | awk '{print $1}' | grep "^$prefix-[0-9]*-" || true) \
              $(ls /etc/netns 2>/dev/null | grep "^$prefix-[0-9]*-" || true); do
        pid=${ns#"$prefix"-}; pid=${pid%%-*}
        if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$prog"; then
            continue                # that run is still going; it cleans up after itself
        fi
        if [ -e "/run/netns/$ns" ] || [ -e "/etc/netns/$ns" ]; then
            remove_ns "$ns"
            echo "$prog: removed $ns"
            removed=$((removed + 1))
        fi
    done
    rmdir /etc/netns 2>/dev/null || true
    echo "$prog: $removed leftover namespace(s) removed"
    exit 0
fi

# ---- arguments ----------------------------------------------------------------------------
nodes=
nproc=1
link_rate=
leaves=1
uplink_rate=
sample_ms=
declare -A quota=() loss=() qlimit=()
rate_schedule=
port=29400
out=
while [ $# -gt 0 ]; do
    case $1 in
        --nodes) [ $# -ge 2 ] || die "--nodes needs a value"; nodes=$2; shift 2 ;;
        --nproc-per-node) [ $# -ge 2 ] || die "--nproc-per-node needs a value"; nproc=$2; shift 2 ;;
        --link-rate) [ $# -ge 2 ] || die "--link-rate needs a value"; link_rate=$2; shift 2 ;;
        --leaves) [ $# -ge 2 ] || die "--leaves needs a value"; leaves=$2; shift 2 ;;
        --uplink-rate) [ $# -ge 2 ] || die "--uplink-rate needs a value"; uplink_rate=$2; shift 2 ;;
        --sample-ms) [ $# -ge 2 ] || die "--sample-ms needs a value"; sample_ms=$2; shift 2 ;;
        --cpu-quota) [ $# -ge 2 ] || die "--cpu-quota needs K:PERCENT"
            [[ $2 =~ ^([0-9]+):([1-9][0-9]*)$ ]] || die "--cpu-quota must be K:PERCENT (e.g. 1:30), got '$2'"
            quota[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; shift 2 ;;
        --loss) [ $# -ge 2 ] || die "--loss needs K:PERCENT"
            [[ $2 =~ ^([0-9]+):([0-9]+(\.[0-9]{1,2})?)%?$ ]] || die "--loss must be K:PERCENT (e.g. 1:0.5), got '$2'"
            n=$(awk -v p="${BASH_REMATCH[2]}" 'BEGIN { printf "%d", p * 100 + 0.5 }')
            [ "$n" -ge 1 ] && [ "$n" -le 10000 ] || die "--loss $2: the percentage must be in 0.01..100"
            loss[${BASH_REMATCH[1]}]=$n; shift 2 ;;
        --queue-limit) [ $# -ge 2 ] || die "--queue-limit needs K:BYTES"
            [[ $2 =~ ^([0-9]+):([1-9][0-9]*)$ ]] || die "--queue-limit must be K:BYTES (e.g. 1:30000), got '$2'"
            qlimit[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}; shift 2 ;;
        --rate-schedule) [ $# -ge 2 ] || die "--rate-schedule needs T:RATE,T:RATE..."
            rate_schedule=$2; shift 2 ;;
        --port) [ $# -ge 2 ] || die "--port needs a value"; port=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a value"; out=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument '$1' (train arguments go after --; see --help)" ;;
    esac
done
[ -n "$nodes" ] || die "--nodes N is required"
[[ $nodes =~ ^[1-9][0-9]*$ ]] && [ "$nodes" -le 250 ] || die "--nodes must be an integer in 1..250, got '$nodes'"
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer, got '$nproc'"
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "--port must be in 1..65535, got '$port'"
[[ $leaves =~ ^[1-9][0-9]*$ ]] || die "--leaves must be a positive integer, got '$leaves'"
# Contiguous equal blocks, as torchrun places ranks (node k on leaf k / (N/L)); unequal
# leaves would need a topology the model does not describe either.
[ $((nodes % leaves)) = 0 ] || die "--leaves $leaves must divide --nodes $nodes"
if [ -n "$uplink_rate" ] && [ "$leaves" = 1 ]; then
    die "--uplink-rate shapes the leaves' uplinks to the spine: it needs --leaves 2 or more"
fi
if [ -n "$sample_ms" ]; then
    [[ $sample_ms =~ ^[1-9][0-9]*$ ]] || die "--sample-ms must be a positive integer (milliseconds), got '$sample_ms'"
fi
check_prereqs
. "$here/tbf.sh"
if [ -n "$uplink_rate" ]; then
    tbf_rate_bytes "$uplink_rate" >/dev/null || die "--uplink-rate must be a tc rate like 1gbit or 50mbit, got '$uplink_rate'"
    command -v tc >/dev/null || die "--uplink-rate needs tc (iproute2), not found"
fi
# The sampler is a plain script (standard library only): the interpreter node.sh uses.
sampler_python=${PYTHON:-$here/../../.venv/bin/python}
[ -n "${PYTHON:-}" ] || [ -x "$sampler_python" ] || sampler_python=python3
if [ -n "$sample_ms" ]; then
    command -v "$sampler_python" >/dev/null || die "--sample-ms needs python3 (or PYTHON=...), not found"
fi
# --rate-schedule: times (s after the nodes start) and rates; 0:RATE is the starting rate.
sched_t=() sched_rate=()
if [ -n "$rate_schedule" ]; then
    prev=-1
    IFS=, read -r -a entries <<< "$rate_schedule"
    for e in "${entries[@]}"; do
        [[ $e =~ ^([0-9]+(\.[0-9]+)?):(.+)$ ]] || die "--rate-schedule entries must be T:RATE (e.g. 0:1gbit,20:100mbit), got '$e'"
        t=${BASH_REMATCH[1]} r=${BASH_REMATCH[3]}
        tbf_rate_bytes "$r" >/dev/null || die "--rate-schedule $e: '$r' is not a tc rate like 1gbit or 100mbit"
        awk -v a="$t" -v b="$prev" 'BEGIN { exit !(a > b) }' \
            || die "--rate-schedule: times must increase, got $t after $prev"
        prev=$t
        if [ "$t" = 0 ] || awk -v a="$t" 'BEGIN { exit !(a == 0) }'; then
            [ -z "$link_rate" ] || [ "$link_rate" = "$r" ] \
                || die "--rate-schedule starts at $r but --link-rate says $link_rate"
            link_rate=$r
        else
            sched_t+=("$t"); sched_rate+=("$r")
        fi
    done
    [ -n "$link_rate" ] || die "--rate-schedule changes the link rate: give the starting one (--link-rate or 0:RATE)"
fi
if [ -n "$link_rate" ]; then
    tbf_rate_bytes "$link_rate" >/dev/null || die "--link-rate must be a tc rate like 1gbit or 100mbit, got '$link_rate'"
    command -v tc >/dev/null || die "--link-rate needs tc (iproute2), not found"
fi
for k in "${!quota[@]}"; do
    [ "$k" -lt "$nodes" ] || die "--cpu-quota $k:${quota[$k]}: there is no node$k (--nodes $nodes)"
done
for k in "${!loss[@]}"; do
    [ "$k" -lt "$nodes" ] || die "--loss $k:...: there is no node$k (--nodes $nodes)"
done
if [ ${#loss[@]} -gt 0 ]; then
    command -v nft >/dev/null || die "--loss needs nft (Debian package nftables), not found"
fi
for k in "${!qlimit[@]}"; do
    [ "$k" -lt "$nodes" ] || die "--queue-limit $k:${qlimit[$k]}: there is no node$k (--nodes $nodes)"
    [ -n "$link_rate" ] || die "--queue-limit $k:${qlimit[$k]} queues at the link rate: it needs --link-rate"
done
# Where CPU quotas go: cgroup v1's cpu controller, else cgroup v2 (unified) with cpu enabled.
cg_kind=
if [ ${#quota[@]} -gt 0 ]; then
    if [ -w /sys/fs/cgroup/cpu/cpu.cfs_quota_us ] || [ -e /sys/fs/cgroup/cpu/cpu.cfs_period_us ]; then
        cg_kind=v1; cg_root=/sys/fs/cgroup/cpu
    elif grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
        cg_kind=v2; cg_root=/sys/fs/cgroup
    else
        die "--cpu-quota needs cgroup v1's cpu controller (/sys/fs/cgroup/cpu) or cgroup v2 with cpu; neither is here"
    fi
fi
if [ -z "$out" ]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/ddp-fnn-cluster.XXXXXX")
fi
mkdir -p "$out" || die "--out $out: cannot create the directory"
out=$(cd "$out" && pwd)

# ---- cleanup on every exit path ------------------------------------------------------------
tag=$prefix-$$
# The switches: one bridge namespace (-sw) as ever, or with --leaves >= 2 one per leaf
# and a spine. sw_of[k] is node k's switch, where its port vK (and its --loss rule and
# --queue-limit qdisc) lives.
per_leaf=$((nodes / leaves))
leaf_ns=() sw_of=()
spine=
if [ "$leaves" = 1 ]; then
    leaf_ns=("$tag-sw")
else
    for ((j = 0; j < leaves; j++)); do leaf_ns+=("$tag-leaf$j"); done
    spine=$tag-spine
fi
node_ns=()
for ((k = 0; k < nodes; k++)); do node_ns+=("$tag-$k"); sw_of[k]=${leaf_ns[k / per_leaf]}; done
node_pids=()
sched_pid=
sampler_pid=
cleaned=0

stop_scheduler() {
    if [ -n "$sched_pid" ]; then
        kill -TERM "$sched_pid" 2>/dev/null || true
        wait "$sched_pid" 2>/dev/null || true
        sched_pid=
    fi
}
stop_sampler() {
    if [ -n "$sampler_pid" ]; then
        kill -TERM "$sampler_pid" 2>/dev/null || true      # it writes a last sample and exits
        wait "$sampler_pid" 2>/dev/null || true
        sampler_pid=
    fi
}
cleanup() {
    [ $cleaned = 0 ] || return 0
    cleaned=1
    local ns
    stop_scheduler
    stop_sampler              # it holds the namespaces' files open: stop it before removing them
    for ns in "${node_ns[@]}"; do           # stop all nodes first, together
        pids=$(ip netns pids "$ns" 2>/dev/null) || continue
        [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
    done
    for ns in "${node_ns[@]}" "${leaf_ns[@]}" ${spine:+"$spine"}; do
        remove_ns "$ns"
    done
    rmdir /etc/netns 2>/dev/null || true
    for k in "${!quota[@]}"; do              # empty once the node's processes are gone
        [ -d "$cg_root/$tag-$k" ] && rmdir "$cg_root/$tag-$k" 2>/dev/null || true
    done
}
on_signal() {
    local sig=$1 code=$2
    trap '' INT TERM                        # a second Ctrl-C does not cut the cleanup short
    echo "$prog: $sig received, stopping the nodes and removing the namespaces" >&2
    cleanup
    trap - EXIT
    exit "$code"
}
trap cleanup EXIT
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM

# ---- the network: a switch namespace with a bridge, one namespace per node -------------------
hosts_file() {
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    for ((j = 0; j < nodes; j++)); do echo "$subnet.$((j + 1)) node$j"; done
}

# A failing step leaves through the EXIT trap (cleanup); say which one it was.
trap 'echo "$prog: error: network set-up failed at: $BASH_COMMAND" >&2' ERR
for sw in "${leaf_ns[@]}" ${spine:+"$spine"}; do
    ip netns add "$sw"
    ip netns exec "$sw" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;
                               echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6'
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
done
# Each leaf's uplink: veth `uplink` on the leaf's bridge, its peer lJ on the spine's. A tree
# (no loop), so the bridges need no spanning tree. Every frame between leaves crosses two
# uplinks (up on the sender's leaf, down on the receiver's), as in a leaf-spine fabric.
for ((j = 0; j < ${#leaf_ns[@]} && leaves > 1; j++)); do
    ip -n "${leaf_ns[j]}" link add uplink type veth peer name "l$j" netns "$spine"
    ip -n "${leaf_ns[j]}" link set uplink master br0 up
    ip -n "$spine" link set "l$j" master br0 up
    if [ -n "$uplink_rate" ]; then
        # Both directions: the leaf end shapes leaf -> spine, the spine end spine -> leaf.
        up_mtu=$(ip netns exec "${leaf_ns[j]}" cat /sys/class/net/uplink/mtu)
        # shellcheck disable=SC2046    # tbf_params is a list of tc words
        ip netns exec "${leaf_ns[j]}" tc qdisc replace dev uplink root tbf $(tbf_params "$uplink_rate" "$up_mtu")
        # shellcheck disable=SC2046
        ip netns exec "$spine" tc qdisc replace dev "l$j" root tbf $(tbf_params "$uplink_rate" "$up_mtu")
    fi
done
for ((k = 0; k < nodes; k++)); do
    sw=${sw_of[k]}
    ns=${node_ns[k]}
    ip netns add "$ns"
    mkdir -p "/etc/netns/$ns"
    hosts_file > "/etc/netns/$ns/hosts"
    # No name server: every name this job uses is in hosts, and nothing may leave the machine.
    echo "# $prog: names come from /etc/hosts only" > "/etc/netns/$ns/resolv.conf"
    ip netns exec "$ns" sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6;
                               echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6'
    ip -n "$sw" link add "v$k" type veth peer name eth0 netns "$ns"
    ip -n "$sw" link set "v$k" master br0 up
    ip -n "$ns" link set eth0 gso_max_segs 1          # one frame per packet, as on a wire
    ip -n "$ns" addr add "$subnet.$((k + 1))/24" dev eth0
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
    if [ -n "${qlimit[$k]:-}" ]; then
        # shellcheck disable=SC2046    # tbf_port_params is a list of tc words
        ip netns exec "$sw" tc qdisc replace dev "v$k" root tbf \
            $(tbf_port_params "$link_rate" "$(ip netns exec "$ns" cat /sys/class/net/eth0/mtu)" "${qlimit[$k]}")
    fi
    if [ -n "${quota[$k]:-}" ]; then
        cg="$cg_root/$tag-$k"
        mkdir -p "$cg"
        if [ $cg_kind = v1 ]; then
            echo 100000 > "$cg/cpu.cfs_period_us"
            echo $((quota[$k] * 1000)) > "$cg/cpu.cfs_quota_us"
        else
            echo "$((quota[$k] * 1000)) 100000" > "$cg/cpu.max"
        fi
    fi
done

# --loss: frames from node K dropped at random on its switch (its leaf), one rule per
# lossy node, in a table on each leaf that has one.
for sw in "${leaf_ns[@]}"; do
    rules=()
    for k in "${!loss[@]}"; do
        [ "${sw_of[k]}" = "$sw" ] || continue
        rules+=("        iifname \"v$k\" numgen random mod 10000 < ${loss[$k]} counter drop comment \"node$k\"")
    done
    [ ${#rules[@]} -gt 0 ] || continue
    {
        echo "table bridge $prefix {"
        echo "    chain forward {"
        echo "        type filter hook forward priority 0; policy accept;"
        printf '%s\n' "${rules[@]}"
        echo "    }"
        echo "}"
    } | ip netns exec "$sw" nft -f -
done
trap - ERR

# ---- run launch/node.sh in every namespace ----------------------------------------------------
pct() { awk -v n="$1" 'BEGIN { printf "%g", n / 100 }'; }   # 1/10000ths as a percentage
stats_fields=(tx_bytes rx_bytes tx_packets rx_packets)
read_stats() {   # the four counters of interface $2 (default eth0) in namespace $1, space-separated
    local ns=$1 dev=${2:-eth0} f vals=()
    for f in "${stats_fields[@]}"; do
        vals+=("$(ip netns exec "$ns" cat "/sys/class/net/$dev/statistics/$f")")
    done
    echo "${vals[*]}"
}
# Uplink J's two ends: `uplink` in leaf J (index 2J) and lJ in the spine (index 2J+1).
uplink_ends() { local j; for ((j = 0; j < leaves && leaves > 1; j++)); do echo "${leaf_ns[j]} uplink"; echo "$spine l$j"; done; }
declare -a before after codes up_before up_after
for ((k = 0; k < nodes; k++)); do before[k]=$(read_stats "${node_ns[k]}"); done
i=0
while read -r ns dev; do up_before[i]=$(read_stats "$ns" "$dev"); i=$((i + 1)); done < <(uplink_ends)

quotas=""
for k in "${!quota[@]}"; do quotas+=", node$k at ${quota[$k]}% of a CPU"; done
for k in "${!loss[@]}"; do quotas+=", node$k losing $(pct "${loss[$k]}")% of its egress"; done
for k in "${!qlimit[@]}"; do quotas+=", the switch port to node$k queueing ${qlimit[$k]} bytes"; done
[ -z "$rate_schedule" ] || quotas+=", rate schedule $rate_schedule"
[ "$leaves" = 1 ] || quotas+=", $leaves leaves of $per_leaf node(s) on a spine${uplink_rate:+, uplinks $uplink_rate}"
[ -z "$sample_ms" ] || quotas+=", link counters sampled every $sample_ms ms"
echo "$prog: $nodes node(s) x $nproc worker(s), rendezvous node0:$port, subnet $subnet.0/24${link_rate:+, links $link_rate}$quotas; logs in $out" >&2
for ((k = 0; k < nodes; k++)); do
    ns=${node_ns[k]}
    mkdir -p "$out/node$k"
    # A throttled node enters its cgroup before it starts anything, so every process of
    # the node inherits it; before `ip netns exec`, which mounts a sysfs of its own
    # without the cgroup hierarchy.
    enter=()
    if [ -n "${quota[$k]:-}" ]; then
        enter=(sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg_root/$tag-$k")
    fi
    "${enter[@]}" ip netns exec "$ns" unshare --uts sh -c 'hostname "$1" && shift && exec "$@"' sh "node$k" \
        env NNODES="$nodes" NPROC_PER_NODE="$nproc" RDZV_ENDPOINT="node0:$port" RDZV_ID="$tag" \
            METRICS_ADDR="$subnet.$((k + 1))" OUTPUT_DIR="$out/node$k" \
            LINK_IFACE=eth0 LINK_RATE="$link_rate" LINK_LIMIT="${qlimit[$k]:-}" \
            bash "$here/node.sh" "$@" > "$out/node$k.log" 2>&1 < /dev/null &
    node_pids[k]=$!
done
# --rate-schedule: change every node's tbf at the given times after the nodes started. Each
# change is logged (time_unix_s, at_s, rate) in DIR/.rate-changes for netstats.json.
start_unix=$(date +%s.%N)
# --sample-ms: one sampler process in the root namespace reading every link's counters
# (linkstats.py says why not /sys/class/net); stopped, with a last sample, when the nodes end.
if [ -n "$sample_ms" ]; then
    links=()
    for ((k = 0; k < nodes; k++)); do links+=("node$k=${node_ns[k]}:eth0"); done
    for ((j = 0; j < leaves && leaves > 1; j++)); do
        links+=("leaf$j.up=${leaf_ns[j]}:uplink" "leaf$j.down=$spine:l$j")
    done
    "$sampler_python" "$here/linkstats.py" sample "$out/linkstats.jsonl" "$sample_ms" "${links[@]}" \
        2>"$out/linkstats.log" </dev/null &
    sampler_pid=$!
fi
changes_file="$out/.rate-changes"
: > "$changes_file"
rm -f "$out/rate-changes.jsonl"
if [ ${#sched_t[@]} -gt 0 ]; then
    mtu0=$(ip netns exec "${node_ns[0]}" cat /sys/class/net/eth0/mtu)
    (
        sp=
        trap '[ -z "$sp" ] || kill "$sp" 2>/dev/null; exit 0' TERM
        for i in "${!sched_t[@]}"; do
            left=$(awk -v s="$start_unix" -v t="${sched_t[i]}" -v now="$(date +%s.%N)" \
                   'BEGIN { d = s + t - now; printf "%.3f", (d > 0 ? d : 0) }')
            sleep "$left" & sp=$!
            wait "$sp"; sp=
            for ((k = 0; k < nodes; k++)); do
                # shellcheck disable=SC2046    # tbf_params is a list of tc words
                ip netns exec "${node_ns[k]}" tc qdisc change dev eth0 root tbf \
                    $(tbf_params "${sched_rate[i]}" "$mtu0") 2>>"$out/rate-schedule.log" || true
                [ -z "${qlimit[$k]:-}" ] || ip netns exec "${sw_of[k]}" tc qdisc change dev "v$k" root tbf \
                    $(tbf_port_params "${sched_rate[i]}" "$mtu0" "${qlimit[$k]}") 2>>"$out/rate-schedule.log" || true
            done
            when=$(date +%s.%N)
            printf '%s %s %s\n' "$when" "${sched_t[i]}" "${sched_rate[i]}" >> "$changes_file"
            printf '{"time_unix_s": %s, "at_s": %s, "rate": "%s"}\n' "$when" "${sched_t[i]}" "${sched_rate[i]}" \
                >> "$out/rate-changes.jsonl"
            echo "$prog: link rate changed to ${sched_rate[i]} on every node (${sched_t[i]} s after start)" >&2
        done
    ) &
    sched_pid=$!
fi
# Wait for the nodes as they finish. When one fails the others would wait for it at the
# next collective or rendezvous until a timeout, so they are stopped at once.
declare -A node_of
for ((k = 0; k < nodes; k++)); do node_of[${node_pids[k]}]=$k; done
failed=0
first_failed=
running=("${node_pids[@]}")
while [ ${#running[@]} -gt 0 ]; do
    code=0
    wait -n -p done_pid "${running[@]}" || code=$?
    k=${node_of[$done_pid]}
    unset "node_of[$done_pid]"
    running=("${!node_of[@]}")
    codes[k]=$code
    if [ "$code" != 0 ] && [ $failed = 0 ]; then
        failed=1
        first_failed=$k
        echo "$prog: node$k exited $code; stopping the other nodes" >&2
        for ((j = 0; j < nodes; j++)); do
            pids=$(ip netns pids "${node_ns[j]}" 2>/dev/null) || continue
            [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
        done
    fi
done
stop_scheduler
stop_sampler
for ((k = 0; k < nodes; k++)); do after[k]=$(read_stats "${node_ns[k]}"); done
i=0
while read -r ns dev; do up_after[i]=$(read_stats "$ns" "$dev"); i=$((i + 1)); done < <(uplink_ends)
# Each node's qdisc at the end (kind, sent bytes/packets, dropped, overlimits) and the
# packets its --loss rule dropped, as JSON objects.
qdisc_json() {
    { ip netns exec "$1" tc -s qdisc show dev "$2" || true; } | awk '
        /^qdisc/ && !kind { kind = $2 }
        /Sent/ && !done { for (i = 1; i <= NF; i++) {
                if ($i == "Sent") sent = $(i + 1); if ($i == "pkt") pkt = $(i - 1)
                if ($i == "(dropped") { d = $(i + 1); sub(",", "", d) }
                if ($i == "overlimits") o = $(i + 1) }
            done = 1 }
        END { printf "{\"kind\": \"%s\", \"sent_bytes\": %d, \"sent_packets\": %d, \"dropped\": %d, \"overlimits\": %d}", kind, sent, pkt, d, o }'
}
loss_dropped() {   # frames the --loss rule of node $1 dropped
    { ip netns exec "${sw_of[$1]}" nft list table bridge "$prefix" 2>/dev/null || true; } \
        | awk -v c="\"node$1\"" '/counter packets/ && $NF == c { for (i = 1; i <= NF; i++) if ($i == "packets") n += $(i + 1) }
                                 END { print n + 0 }'
}
declare -a qdiscs port_qdiscs dropped_by_rule
for ((k = 0; k < nodes; k++)); do
    qdiscs[k]=$(qdisc_json "${node_ns[k]}" eth0)
    port_qdiscs[k]=$(qdisc_json "${sw_of[k]}" "v$k")
    dropped_by_rule[k]=$(loss_dropped "$k")
done

# ---- report: per-node interface counters during the run ---------------------------------------
mtu=$(ip netns exec "${node_ns[0]}" cat /sys/class/net/eth0/mtu)
tcp_ts=$(ip netns exec "${node_ns[0]}" cat /proc/sys/net/ipv4/tcp_timestamps)
{
    printf '%-8s %-12s %6s %14s %14s %12s %12s\n' node address exit tx_bytes rx_bytes tx_packets rx_packets
    json_nodes=()
    for ((k = 0; k < nodes; k++)); do
        read -r -a b <<< "${before[k]}"
        read -r -a a <<< "${after[k]}"
        d=()
        for i in 0 1 2 3; do d[i]=$((a[i] - b[i])); done
        printf '%-8s %-12s %6s %14d %14d %12d %12d\n' "node$k" "$subnet.$((k + 1))" "${codes[k]}" "${d[@]}"
        json_nodes+=("$(printf '{"name": "node%d", "address": "%s", "leaf": %d, "exit_code": %d, "tx_bytes": %d, "rx_bytes": %d, "tx_packets": %d, "rx_packets": %d, "qdisc": %s, "port_qdisc": %s, "loss_dropped_packets": %d}' \
            "$k" "$subnet.$((k + 1))" $((k / per_leaf)) "${codes[k]}" "${d[@]}" "${qdiscs[k]}" "${port_qdiscs[k]}" "${dropped_by_rule[k]}")")
    done
}
# The uplinks: the leaf end's counters (its TX is leaf -> spine), the spine end's (its TX
# is spine -> leaf), and both ends' qdiscs.
json_uplinks=()
if [ "$leaves" -gt 1 ]; then
    echo
    printf '%-8s %14s %14s %12s %12s %14s %14s\n' uplink up_tx_bytes down_tx_bytes up_tx_pkts down_tx_pkts up_rx_bytes down_rx_bytes
    for ((j = 0; j < leaves; j++)); do
        read -r -a lb <<< "${up_before[2 * j]}"; read -r -a la <<< "${up_after[2 * j]}"
        read -r -a sb <<< "${up_before[2 * j + 1]}"; read -r -a sa <<< "${up_after[2 * j + 1]}"
        l=() sp=()
        for i in 0 1 2 3; do l[i]=$((la[i] - lb[i])); sp[i]=$((sa[i] - sb[i])); done
        printf '%-8s %14d %14d %12d %12d %14d %14d\n' "leaf$j" "${l[0]}" "${sp[0]}" "${l[2]}" "${sp[2]}" "${l[1]}" "${sp[1]}"
        json_uplinks+=("$(printf '{"leaf": %d, "name": "leaf%d", "tx_bytes": %d, "rx_bytes": %d, "tx_packets": %d, "rx_packets": %d, "spine_tx_bytes": %d, "spine_rx_bytes": %d, "spine_tx_packets": %d, "spine_rx_packets": %d, "qdisc": %s, "spine_qdisc": %s}' \
            "$j" "$j" "${l[@]}" "${sp[@]}" "$(qdisc_json "${leaf_ns[j]}" uplink)" "$(qdisc_json "$spine" "l$j")")")
    done
fi
{
    cpu_json="" loss_json="" qlimit_json="" changes_json=""
    for k in "${!quota[@]}"; do cpu_json+="${cpu_json:+, }\"node$k\": ${quota[$k]}"; done
    for k in "${!loss[@]}"; do loss_json+="${loss_json:+, }\"node$k\": $(pct "${loss[$k]}")"; done
    for k in "${!qlimit[@]}"; do qlimit_json+="${qlimit_json:+, }\"node$k\": ${qlimit[$k]}"; done
    while read -r when at rate; do
        changes_json+="${changes_json:+, }{\"time_unix_s\": $when, \"at_s\": $at, \"rate\": \"$rate\"}"
    done < "$changes_file"
    printf '{"interface": "eth0", "mtu": %d, "gso_max_segs": 1, "tcp_timestamps": %d, "link_rate": "%s",\n "cpu_quota_percent": {%s}, "loss_percent": {%s}, "queue_limit_bytes": {%s},\n "start_unix_s": %s, "rate_schedule": "%s", "rate_changes": [%s],\n "nproc_per_node": %d, "leaves": %d, "nodes_per_leaf": %d, "uplink_rate": "%s", "sample_ms": %s, "nodes": [\n  ' \
        "$mtu" "$tcp_ts" "$link_rate" "$cpu_json" "$loss_json" "$qlimit_json" "$start_unix" "$rate_schedule" "$changes_json" "$nproc" \
        "$leaves" "$per_leaf" "$uplink_rate" "${sample_ms:-null}"
    sep=""
    for j in "${json_nodes[@]}"; do printf '%s%s' "$sep" "$j"; sep=$',\n  '; done
    printf '\n],\n "uplinks": ['
    sep=$'\n  '
    for j in "${json_uplinks[@]}"; do printf '%s%s' "$sep" "$j"; sep=$',\n  '; done
    [ ${#json_uplinks[@]} = 0 ] || printf '\n'
    printf ']}\n'
} > "$out/netstats.json"
rm -f "$changes_file"
echo "$prog: wrote $out/netstats.json" >&2
if [ $failed != 0 ]; then
    echo "$prog: node$first_failed failed first (exit ${codes[first_failed]}); see $out/node$first_failed.log" >&2
    exit 1
fi
